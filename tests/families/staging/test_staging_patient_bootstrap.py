"""Staging CIs resample patients when a patient has repeat scans (the demo's ~10 % of patients have
two): the evaluator hands the split's patient ids to classification_report; with one scan per
patient the report is today's, number for number."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from medfuse.metrics import CLASSIFICATION_METRICS, classification_report

NAMES = ["T1-2", "T3-4"]


def _evaluator(tmp_path, patients: list[str], labels: np.ndarray, probs: np.ndarray, n_boot: int = 500):
    """A StagingEvaluator over a fake split (no model: probabilities given) of cases c0, c1, ...
    with the given patients, labels (N,) and probabilities (N, 2), as if one pass had run."""
    from medfuse.families.staging.evaluate import StagingEvaluator

    ids = [f"c{i}" for i in range(len(patients))]
    cases = [SimpleNamespace(case_id=c, patient_id=p, label=int(y)) for c, p, y in zip(ids, patients, labels, strict=True)]
    dm = SimpleNamespace(cases={"test": cases}, table=SimpleNamespace(class_names=NAMES))
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0))
    ev = StagingEvaluator(None, dm, cfg, tmp_path, "test", n_boot)
    ev.probs, ev.case_ids = [probs], ids  # what update() collects
    return ev


def _split(n_small: int = 12, n_big: int = 30, seed: int = 0):
    """Patient "big" has ``n_big`` identical, correctly staged scans; ``n_small`` other patients
    one scan each, half of them wrongly staged. Returns patients (N,), labels (N,), probs (N, 2)."""
    rng = np.random.default_rng(seed)
    y_small = np.arange(n_small) % 2
    right = rng.permutation(np.arange(n_small) < n_small // 2)
    pred = np.r_[np.ones(n_big, dtype=np.int64), np.where(right, y_small, 1 - y_small)]
    labels = np.r_[np.ones(n_big, dtype=np.int64), y_small]
    p1 = np.clip(0.1 + 0.8 * pred + rng.uniform(-0.05, 0.05, pred.size), 0, 1)
    return ["big"] * n_big + [f"p{i}" for i in range(n_small)], labels, np.stack([1 - p1, p1], 1)


def test_repeat_scans_of_one_patient_are_resampled_together(tmp_path):
    patients, labels, probs = _split()
    rep = _evaluator(tmp_path, patients, labels, probs).compute()
    per_case = classification_report(labels, probs, NAMES, n_boot=500, seed=0)
    for name in CLASSIFICATION_METRICS:
        entry = rep["metrics"][name]
        assert entry["n"] == 13 and entry["n_items"] == 42, name
        assert entry["value"] == per_case[name]["value"], name
    assert rep["n"] == 42 and rep["n_patients"] == 13
    acc, acc_cases = rep["metrics"]["accuracy"], per_case["accuracy"]
    # counted per scan, the 30 identical scans make the model look right and sure of it
    assert acc_cases["low"] > 0.7 and acc["low"] < 0.5
    assert acc["high"] - acc["low"] > 2.5 * (acc_cases["high"] - acc_cases["low"])


def test_one_scan_per_patient_keeps_todays_report(tmp_path):
    patients, labels, probs = _split()
    patients = [f"{p}_{i}" for i, p in enumerate(patients)]  # every scan its own patient
    ev = _evaluator(tmp_path, patients, labels, probs)
    assert ev.patient_groups() is None
    rep = ev.compute()
    per_case = classification_report(labels, probs, NAMES, n_boot=500, seed=0)
    assert "n_patients" not in rep and rep["n"] == 42
    for name in CLASSIFICATION_METRICS:
        assert rep["metrics"][name] == per_case[name], name


def test_patient_ids_come_from_the_split_and_default_to_the_case_id(tmp_path):
    patients, labels, probs = _split(n_small=2, n_big=2)
    ev = _evaluator(tmp_path, patients, labels, probs)
    ev.dm.cases["test"][3].patient_id = None  # no patient id: its own patient
    assert ev.patients_of(["c0", "c1", "c3", "unknown"]) == ["big", "big", "c3", "unknown"]
    assert ev.patient_groups() == ["big", "big", "p0", "c3"]
    assert ev.patient_groups(["c0", "c2"]) is None

