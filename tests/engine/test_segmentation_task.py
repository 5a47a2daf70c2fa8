"""The segmentation task end to end: masks through the transforms, Dice on validation, NIfTI predictions."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import AFFINE, write_seg_dataset
from medfuse.config import validate
from medfuse.data.io import read_image
from medfuse.engine.evaluate import evaluate
from medfuse.engine.trainer import fit


@pytest.fixture(scope="module")
def seg_dataset(tmp_path_factory):
    return write_seg_dataset(tmp_path_factory.mktemp("seg"))


def test_segmentation_trains_and_evaluates(seg_dataset, tmp_path):
    cfg = validate({
        "name": "seg", "task": "segmentation", "output_dir": str(tmp_path),
        "data": {"root": str(seg_dataset), "batch_size": 4, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
        "model": {"name": "baseline_unet3d", "params": {"channels": [8, 16], "strides": [2]}},
        "train": {"max_epochs": 8, "lr": 0.01, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "scheduler": "none"},
        "eval": {"n_boot": 50, "overlays": 1},
    })
    run = fit(cfg)
    rep = evaluate(run, split="test")
    dice = rep["metrics"]["dice"]
    assert dice["n"] == 4 and dice["value"] > 0.6  # an untrained net scores ~0.1 on this lesion
    pred = read_image(run / "predictions" / "test" / f"{rep_case(run)}.nii.gz")
    np.testing.assert_allclose(pred.affine, AFFINE, atol=1e-5)
    assert set(np.unique(pred.array)) <= {0, 1}
    assert any((run / "plots").glob("overlay_*.png"))
    table = rep["per_case"]  # the same rows as metrics_per_case.csv, shown in report.html
    assert len(table["rows"]) == 4 and table["columns"][:2] == ["case_id", "dice_lesion"]
    with (run / "metrics_per_case.csv").open(encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in csv_rows] == [r[0] for r in table["rows"]]
    assert abs(float(csv_rows[0]["dice_lesion"]) - table["rows"][0][1]) < 1e-5
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Per case" in html and table["rows"][0][0] in html


def rep_case(run):
    with (run / "splits.csv").open(encoding="utf-8") as f:
        return next(r["case_id"] for r in csv.DictReader(f) if r["split"] == "test")
