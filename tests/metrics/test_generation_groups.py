"""Report-generation CIs resample patients when a patient has several reports (CT-RATE scans)."""

from __future__ import annotations

from medfuse.metrics.generation import generation_report

REFS = ["no nodule in the right lung.", "a nodule in the left lung.", "the heart is enlarged.",
        "normal heart size and no effusion.", "small effusion on the left."]
HYPS = ["no nodule in the right lung.", "a nodule in the right lung.", "the heart is normal.",
        "normal heart size and no effusion.", "large effusion on the right."]


def test_generation_metrics_resample_patients_and_count_them():
    hyps, refs = HYPS * 4, REFS * 4  # 5 patients with 4 reports each (the same text: their scans agree)
    groups = [f"p{i % 5}" for i in range(20)]
    flat = generation_report(hyps, refs, n_boot=300, seed=0)["metrics"]
    grouped = generation_report(hyps, refs, n_boot=300, seed=0, groups=groups)["metrics"]
    for key in ("bleu1", "rouge_l", "meteor"):
        assert flat[key]["n"] == 20 and (grouped[key]["n"], grouped[key]["n_items"]) == (5, 20)
        assert grouped[key]["value"] == flat[key]["value"]
        assert grouped[key]["high"] - grouped[key]["low"] > flat[key]["high"] - flat[key]["low"]


def test_clinical_efficacy_takes_the_same_groups():
    import numpy as np

    t = np.array([[0, 1], [1, 0], [0, 1], [1, 1], [0, 0]] * 2, dtype=float)
    p = np.array([[0, 1], [0, 0], [0, 1], [1, 0], [1, 0]] * 2, dtype=float)
    m = generation_report(HYPS * 2, REFS * 2, p, t, ["nodule", "effusion"], n_boot=100, seed=0,
                          groups=[f"p{i % 5}" for i in range(10)])["metrics"]
    assert all(m[k]["n"] == 5 and m[k]["n_items"] == 10 for k in ("ce_f1", "ce_f1_micro", "ce_precision"))
