"""Train -> evaluate -> predict on a tiny separable set: learning, reports, honest selection."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.engine.evaluate import evaluate
from medfuse.engine.predict import predict
from medfuse.engine.trainer import fit
from medfuse.errors import DataError, RunDirError


@pytest.fixture(scope="module")
def trained(cls_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = validate(tiny_cls_config(cls_dataset.parent, out, name="ev", train__max_epochs=6))
    return fit(cfg)


def test_run_directory_contract(trained):
    for rel in ("config.yaml", "splits.csv", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (trained / rel).is_file(), rel


def test_split_is_by_patient_and_saved(trained):
    with (trained / "splits.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_evaluate_learns_and_reports_ci(trained):
    rep = evaluate(trained, split="test", n_boot=200)
    bacc = rep["metrics"]["balanced_accuracy"]
    assert rep["n"] == bacc["n"] == 6
    assert bacc["low"] <= bacc["value"] <= bacc["high"]
    assert bacc["value"] >= 0.8  # chance is 0.5; the blob is obvious
    saved = json.loads((trained / "report.json").read_text(encoding="utf-8"))
    assert saved["split"] == "test" and "balanced_accuracy" in saved["metrics"]
    html = (trained / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "balanced_accuracy" in html
    for png in ("confusion.png", "roc.png", "curves.png"):
        assert (trained / "plots" / png).stat().st_size > 1000
    assert (trained / "predictions" / "test.csv").is_file()


def test_evaluate_infers_the_split_once(trained, count_forwards):
    import math

    rep = evaluate(trained, split="test", n_boot=20)
    assert count_forwards.calls == math.ceil(rep["n"] / 4)  # batch_size 4: one forward per test batch
    assert sum(count_forwards.batches) == rep["n"]


def test_predict_files_and_errors(trained, cls_dataset, tmp_path):
    root = cls_dataset.parent
    out = predict(trained, [str(root / "images/case000_a.nii.gz"), str(root / "images/case000_b.nii.gz")], tmp_path)
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["pred"] in ("c0", "c1")
    with pytest.raises(DataError, match="not a modality"):
        predict(trained, [str(root / "images/case000_a.nii.gz")], tmp_path, modalities=["t2w"])
    with pytest.raises(DataError, match="file not found"):
        predict(trained, [str(tmp_path / "nope.nii.gz"), str(tmp_path / "nope2.nii.gz")], tmp_path)


def test_refuses_to_overwrite_a_run(trained):
    from medfuse.engine.trainer import load_run

    with pytest.raises(RunDirError, match="--resume"):
        fit(load_run(trained))


def test_eval_ci_is_honoured(trained):
    wide = evaluate(trained, split="test", n_boot=300)
    narrow = evaluate(trained, split="test", n_boot=300, overrides=["eval.ci=0.5"])
    assert wide["ci"] == 0.95 and narrow["ci"] == 0.5
    w, n = wide["metrics"]["roc_auc"], narrow["metrics"]["roc_auc"]
    assert w["value"] == n["value"]
    assert (n["high"] - n["low"]) < (w["high"] - w["low"])  # a 50% interval is narrower than a 95% one


def test_segmentation_cis_resample_patients_when_a_patient_has_several_cases():
    """BraTS follow-ups or several scans of one patient are not independent cases: the evaluator
    hands their patients to the bootstrap; one case per patient keeps the plain case bootstrap."""
    from types import SimpleNamespace

    from medfuse.engine.segmentation_evaluator import SegmentationEvaluator

    cases = {c: SimpleNamespace(patient_id=p) for c, p in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("c1", None))}
    ev = SimpleNamespace(_cases=cases, case_ids=["a1", "a2", "b1", "c1"])
    assert SegmentationEvaluator.patient_groups(ev) == ["A", "A", "B", "c1"]
    ev.case_ids = ["a1", "b1", "c1"]
    assert SegmentationEvaluator.patient_groups(ev) is None
