"""text_seg through a model package: masks and predictions.csv from ``model.zip`` equal the run's own,
without the run folder or the training manifest."""

from __future__ import annotations

import csv
import shutil

import pytest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit
    from medfuse.families.text_seg import FAMILY
    from medfuse.families.text_seg.demo import make_text_seg_demo

    tmp = tmp_path_factory.mktemp("ts_pkg")
    data = tmp / "data"
    make_text_seg_demo(data, n_patients=10, seed=1, size=64)
    cfg = load_config(FAMILY.demo_config, [
        f"data.root={data}", f"output_dir={tmp / 'runs'}", "name=ts", "train.max_epochs=1",
        "data.batch_size=8", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "eval.n_boot=10",
        "data.split.val=0.25", "data.split.test=0.3", "train.accelerator=cpu"])
    return tmp, data, fit(cfg)


def test_package_gives_the_runs_masks(run, tmp_path, monkeypatch):
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    tmp, data, run_dir = run
    rows = list(csv.DictReader((data / "manifest.csv").open()))[:3]
    (tmp_path / "img").mkdir()
    infer = tmp_path / "infer.csv"
    keep = ["case_id", "image_us", "box", *[k for k in rows[0] if k in ("size", "echogenicity", "margin", "position")]]
    with infer.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keep)
        w.writeheader()
        for r in rows:
            img = shutil.copy(data / r["image_us"], tmp_path / "img")
            w.writerow({k: (img if k == "image_us" else r[k]) for k in keep})
    own = predict(run_dir, [str(infer)], tmp_path / "own")
    pkg = export(run_dir, tmp_path / "ts.zip")
    away = tmp_path / "away"
    shutil.move(str(tmp), away)  # the run and the training data
    try:
        monkeypatch.chdir(tmp_path)
        out = tmp_path / predict(str(pkg), [str(infer)], "pk")
    finally:
        shutil.move(str(away), tmp)
    masks = sorted(p.name for p in own.glob("*_mask.png"))
    assert len(masks) == 3 and masks == sorted(p.name for p in out.glob("*_mask.png"))
    for name in masks:
        assert (own / name).read_bytes() == (out / name).read_bytes()
    assert (own / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
