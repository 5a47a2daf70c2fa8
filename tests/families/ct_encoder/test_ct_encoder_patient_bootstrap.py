"""ct_encoder CIs resample patients when a CT-RATE patient has several volumes (here: a second
reconstruction of every scan, ``data.params.reconstructions=all``): retrieval, zero-shot AUROC, the
linear probe, volume-to-volume retrieval, region-text accuracy, step-patch correlation and
localization count patients (``n``) and volumes (``n_items``); with one volume per patient the
intervals are over volumes, as before."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from test_ctrate import CONFIGS, TINY, make_ctrate

CLUSTERED = ("image_to_text/R@1", "text_to_image/R@1", "zero_shot/mean_auroc", "probe/mean_accuracy",
             "probe/mean_auroc", "volume_to_volume/R@1", "region_text_accuracy", "step_patch_corr",
             "localization_iou", "localization_pointing")
SMALL = dict(num_regions=9, patch_size=(2, 8, 8), img_size=(8, 32, 32), fpn_levels=3, mask_hidden=4, embed_dim=16)


@pytest.fixture(scope="module")
def two_reconstructions(tmp_path_factory):
    """The ct_encoder demo (12 patients, CoT, lesions) with a copy of every volume as the scan's
    second reconstruction (``train_N_a_2``: same report, labels, masks and metadata)."""
    from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

    root = tmp_path_factory.mktemp("ct_recons") / "data"
    make_ct_encoder_demo(root, n_patients=12, seed=0, shape=(8, 32, 32))
    for f in sorted(root.rglob("*_a_1.nii.gz")):
        shutil.copy(f, f.with_name(f.name.replace("_a_1.", "_a_2.")))
    for name in ("reports.csv", "labels.csv", "metadata.csv"):
        rows = list(csv.DictReader((root / name).open(encoding="utf-8")))
        copies = [{**r, "VolumeName": r["VolumeName"].replace("_a_1.", "_a_2.")} for r in rows]
        with (root / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows + copies)
    return root


def _test_patients(run):
    rows = [r for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8")) if r["split"] == "test"]
    return [r["case_id"] for r in rows], [r["patient_id"] for r in rows]


def test_every_reconstruction_of_a_patient_is_resampled_with_the_patient(two_reconstructions, tmp_path):
    from medfuse.config import validate
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    run = fit(validate({
        "name": "recons", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(two_reconstructions), "batch_size": 4, "split": {"val": 0.2, "test": 0.3},
                 "transforms": {"spatial_size": [8, 32, 32],
                                "intensity": {"ct": {"kind": "ct_window", "level": -300, "width": 1400}}},
                 "params": {"hu": "metadata", "reconstructions": "all"}},
        "model": {"name": "ct_encoder", "params": SMALL},
        "train": {"max_epochs": 1, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False},
        "eval": {"n_boot": 20},
    }))
    cases, patients = _test_patients(run)
    n_pat = len(set(patients))
    assert len(cases) == 2 * n_pat >= 4 and all(c.startswith(p + "_") for c, p in zip(cases, patients, strict=True))
    rep = evaluate(run, split="test")
    m = rep["metrics"]
    # volume-to-volume needs two patients with one finding set (a patient's own other volumes are
    # not its positives): present or not, depending on the split
    assert set(CLUSTERED) - {"volume_to_volume/R@1"} <= set(m), sorted(m)
    for key in (k for k in CLUSTERED if k in m):
        assert m[key]["n"] == n_pat and m[key]["n_items"] == len(cases), (key, m[key])
    assert rep["n"] == len(cases) and rep["n_patients"] == n_pat
    auroc = [v for v in rep["per_class"].values() if "zero_shot_auroc" in v and "probe_auroc" in v]
    assert auroc and all(v["zero_shot_auroc"]["n"] == v["probe_auroc"]["n"] == n_pat for v in auroc)


def test_one_volume_per_patient_keeps_the_bootstrap_over_volumes(tmp_path):
    """The CT-RATE replica keeps the first reconstruction of each patient's one scan."""
    from medfuse.config import load_config
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    root = make_ctrate(tmp_path / "dataset", n_patients=15)
    run = fit(load_config(CONFIGS / "ct_encoder_ctrate.yaml", [f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
                                                                *TINY, "data.split.test=0.3", "eval.n_boot=50"]))
    cases, patients = _test_patients(run)
    assert len(set(patients)) == len(cases)
    rep = evaluate(run, split="test", n_boot=50)
    assert "n_patients" not in rep
    for key in ("image_to_text/R@1", "zero_shot/mean_auroc", "probe/mean_auroc"):
        assert rep["metrics"][key]["n"] == len(cases) and "n_items" not in rep["metrics"][key], key


def test_per_case_values_keep_their_case_index():
    """The per-case rows of step correlation / localization are kept with their case index, so
    their patients can be looked up (cases without a finite value drop out)."""
    from medfuse.families.ct_encoder.evaluate import (
        _per_case,
        volume_to_volume_queries,
        volume_to_volume_ranks,
    )

    cases, values = _per_case([(3, 0.5), (1, 0.2), (3, 0.7), (2, float("nan"))])
    assert cases.tolist() == [1, 3] and values.tolist() == pytest.approx([0.2, 0.6])
    y = np.array([[1, 0], [0, 1], [1, 0], [1, 1]], dtype=float)  # volumes 0 and 2 share a finding set
    q = volume_to_volume_queries(y)
    assert q.tolist() == [True, False, True, False]
    assert len(volume_to_volume_ranks(torch.eye(4), y)) == int(q.sum())
