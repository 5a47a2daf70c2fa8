"""incomplete_seg CIs resample patients when a patient has several cases (BraTS 2023+ follow-ups,
``BraTS-GLI-<patient>-<timepoint>``): the per-combination table, the paired comparison of two runs
(one resample draws the same patients, with all their cases, for both models), and end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medfuse.families.incomplete_seg.compare import (
    COMBINATIONS_FILE,
    compare_runs,
    comparison_markdown,
    load_combination_dice,
    paired_differences,
    save_combination_dice,
)
from medfuse.families.incomplete_seg.evaluate import _ci
from medfuse.metrics import cluster_mean_ci

COMBOS = ["flair", "t1", "flair+t1"]


def _one_big_patient(n_small: int = 10, n_big: int = 20, seed: int = 0):
    """Dice (N,) and patients (N,): patient "big" has ``n_big`` identical cases of Dice 0.9, each
    other patient one case around 0.4."""
    rng = np.random.default_rng(seed)
    dice = np.r_[np.full(n_big, 0.9), rng.uniform(0.3, 0.5, n_small)]
    return dice, ["big"] * n_big + [f"p{i}" for i in range(n_small)]


def test_ci_resamples_patients_and_leaves_nan_cases_out_with_their_patient_ids():
    dice, patients = _one_big_patient()
    cases = _ci(dice, 500, 0)
    pats = _ci(dice, 500, 0, patients)
    assert pats["value"] == pytest.approx(cases["value"]) and cases["n"] == 30
    assert pats["n"] == 11 and pats["n_items"] == 30
    assert pats["high"] - pats["low"] > 2 * (cases["high"] - cases["low"])
    holed = dice.copy()
    holed[20:25] = np.nan  # five small patients not scored: they leave with their ids
    assert _ci(holed, 500, 0, patients) == cluster_mean_ci(dice[np.isfinite(holed)],
                                                           np.asarray(patients)[np.isfinite(holed)], n_boot=500)
    assert _ci(dice, 500, 0, None) == cases


def test_paired_differences_draw_the_same_patients_for_both_models():
    """b = a - 0.1 on every case: every paired resample's mean difference is 0.1 exactly (a zero-
    width CI), although a's own interval, over 11 patients, is wide. n counts patients."""
    dice, patients = _one_big_patient()
    a = np.repeat(dice[:, None, None], 3, axis=1)  # (N, C, R) with R = 1
    b = a - 0.1
    out = paired_differences(a, b, COMBOS, n_boot=500, groups=patients)
    for row in [*out["rows"], out["incomplete"], out["all"]]:
        d = row["difference"]
        assert d["n"] == 11 and d["n_items"] == 30 and row["a"]["n"] == row["b"]["n"] == 11
        assert d["value"] == pytest.approx(0.1) and d["high"] - d["low"] == pytest.approx(0, abs=1e-12)
        assert row["a"]["high"] - row["a"]["low"] > 0.2
        # the same resamples for a and b: b's interval is a's shifted by 0.1
        assert row["b"]["low"] == pytest.approx(row["a"]["low"] - 0.1)
        assert row["b"]["high"] == pytest.approx(row["a"]["high"] - 0.1)
    assert out["a_better"] == COMBOS and out["n_patients"] == 11
    assert "CIs over 11 patients (" in comparison_markdown(out)


def test_paired_differences_without_repeated_patients_are_todays():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.4, 0.8, (12, 3, 2)), rng.uniform(0.4, 0.8, (12, 3, 2))
    plain = paired_differences(a, b, COMBOS, n_boot=200)
    single = paired_differences(a, b, COMBOS, n_boot=200, groups=[f"p{i}" for i in range(12)])
    assert single == plain and "n_patients" not in single
    with pytest.raises(ValueError, match="groups"):
        paired_differences(a, b, COMBOS, groups=["p0"])


def test_the_combinations_file_keeps_patients_and_compare_runs_resamples_them(tmp_path):
    from medfuse.families.incomplete_seg.compare import load_patient_ids

    dice, patients = _one_big_patient()
    d = np.repeat(dice[:, None, None], 3, axis=1)
    ids = [f"c{i}" for i in range(len(dice))]
    for run, shift in (("a", 0.1), ("b", 0.0)):
        save_combination_dice(tmp_path / run / "predictions" / "test" / COMBINATIONS_FILE, ids, COMBOS, ["WT"],
                              d + shift, patient_ids=patients)
    file_a = tmp_path / "a" / "predictions" / "test" / COMBINATIONS_FILE
    cases, combos, regions, back = load_combination_dice(file_a)
    assert (cases, combos, regions) == (ids, COMBOS, ["WT"])  # the patient column is not a region
    np.testing.assert_allclose(back, d + 0.1, atol=1e-6)
    assert load_patient_ids(file_a) == dict(zip(ids, patients, strict=True))
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=200)
    assert cmp["n"] == 30 and cmp["n_patients"] == 11
    assert all(r["a"]["n"] == 11 and r["a"]["n_items"] == 30 for r in cmp["rows"])
    # a file without patient ids (written before they were stored): every case its own patient
    save_combination_dice(file_a, ids, COMBOS, ["WT"], d + 0.1)
    shutil.copy(file_a, tmp_path / "b" / "predictions" / "test" / COMBINATIONS_FILE)
    assert load_patient_ids(file_a) == {}
    old = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=200)
    assert "n_patients" not in old and old["rows"][0]["a"]["n"] == 30
    with pytest.raises(ValueError, match="patient ids"):
        save_combination_dice(file_a, ids, COMBOS, ["WT"], d, patient_ids=patients[:3])


@pytest.fixture(scope="module")
def follow_up_run(tmp_path_factory):
    """A tiny incomplete_seg run on BraTS 2023-named data where each of 8 patients has 2 timepoints."""
    import nibabel as nib

    from medfuse.config import validate
    from medfuse.engine.trainer import fit
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    tmp = tmp_path_factory.mktemp("inc_follow_ups")
    src = make_incomplete_seg_demo(tmp / "classic", n_patients=16, shape=(16, 16, 16))
    root = tmp / "brats2023"
    names = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
    for k, case in enumerate(sorted(p for p in src.iterdir() if p.is_dir())):
        cid = f"BraTS-GLI-{k // 2:05d}-{k % 2:03d}"  # patient k // 2, timepoint k % 2
        (root / cid).mkdir(parents=True)
        for old, new in names.items():
            img = nib.load(str(case / f"{case.name}_{old}.nii.gz"))
            arr = np.asarray(img.dataobj)
            if old == "seg":
                arr = np.where(arr == 4, 3, arr).astype(np.uint8)
            nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(root / cid / f"{cid}-{new}.nii.gz"))
    cfg = validate({
        "name": "inc", "output_dir": str(tmp / "runs"),
        "data": {"root": str(root), "layout": "brats", "batch_size": 2, "eval_batch_size": 2,
                 "split": {"val": 0.25, "test": 0.25, "seed": 0},
                 "transforms": {"intensity": {"*": {"kind": "percentile", "nonzero": True}}}},
        "model": {"name": "incomplete_seg", "params": {"widths": [4, 8], "aspp_dilations": [1, 2], "ssim_window": 3,
                                                       "channels_last": False, "val_combos_per_case": 2}},
        "train": {"max_epochs": 1, "monitor": "val/loss", "mode": "min", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 50, "overlays": 0},
    })
    return fit(cfg)


def test_evaluate_resamples_follow_up_patients(follow_up_run):
    import csv

    from medfuse.engine.evaluate import evaluate

    rep = evaluate(follow_up_run, n_boot=50)
    split = [r for r in csv.DictReader((follow_up_run / "splits.csv").open(encoding="utf-8")) if r["split"] == "test"]
    n_patients = len({r["patient_id"] for r in split})
    assert rep["n"] == len(split) == 2 * n_patients >= 4  # both timepoints of every test patient
    for key in ("dice_all_combinations", "dice_incomplete", "dice_complete", "hd95_all_combinations"):
        entry = rep["metrics"][key]
        assert entry["n"] == n_patients and entry["n_items"] == rep["n"], key
    for row in rep["modality_combinations"]["rows"]:
        assert row[2]["n"] == n_patients  # every cell of the per-combination table
    assert rep["n_patients"] == n_patients and rep["full_input"]["n_patients"] == n_patients

    from medfuse.families.incomplete_seg.compare import load_patient_ids

    patients = load_patient_ids(follow_up_run / "predictions" / "test" / COMBINATIONS_FILE)
    assert patients == {r["case_id"]: r["patient_id"] for r in split}
    assert all(c.rsplit("-", 1)[0] == p for c, p in patients.items())
    cmp = compare_runs(follow_up_run, follow_up_run, n_boot=50)
    assert cmp["n_patients"] == n_patients and cmp["all"]["difference"]["value"] == 0
