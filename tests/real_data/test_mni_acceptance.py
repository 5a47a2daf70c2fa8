"""Acceptance on real anatomy (MNI152 boxes from nilearn, odd sizes, RAS/LPS/oblique/anisotropic):
train without spatial_size, predict a plain imagesTs folder onto each input's own grid, and the
evaluated test Dice equals an independent nibabel recomputation on the label files' grid."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

pytest.importorskip("nilearn")
nib = pytest.importorskip("nibabel")




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.real_data.mni import make_mni_dataset

    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    root = tmp_path_factory.mktemp("mni")
    ds = make_mni_dataset(root)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(f"name: mni\nfamily: baseline\ndata:\n  root: {ds}\nmodel:\n  name: baseline_unet3d\n")
    cfg = load_config(cfg_path, [f"output_dir={root / 'runs'}", "train.max_epochs=2", "data.batch_size=2",
                                 "data.num_workers=0", "train.progress_bar=false", "train.accelerator=cpu"])
    assert cfg.data.transforms.spatial_size is None
    return root, fit(cfg)


def _dice(pred: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = pred == k, ref == k
    return float(2 * (a & b).sum() / (a.sum() + b.sum())) if a.sum() + b.sum() else float("nan")


def test_predict_imagesTs_on_input_grid(trained, tmp_path):
    from medfuse.engine.predict import predict

    root, run = trained
    out = predict(run, [str(root / "imagesTs")], tmp_path / "pred")
    inputs = sorted((root / "imagesTs").glob("*_0000.nii.gz"))
    assert len(inputs) == 4
    for f in inputs:
        cid = f.name.removesuffix("_0000.nii.gz")
        a, b = nib.load(f), nib.load(out / f"{cid}.nii.gz")
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.affine, b.affine)
    assert not list(out.glob("*_pred.nii.gz"))


def test_lps_copy_gives_flipped_identical_prediction(trained, tmp_path):
    from medfuse.engine.predict import predict

    root, run = trained
    src = nib.load(root / "imagesTs" / "ts_ras_0000.nii.gz")
    x = np.asarray(src.dataobj, dtype=np.float32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = x.shape[0] - 1, x.shape[1] - 1
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(root / "imagesTs" / "ts_ras_0000.nii.gz", folder / "a_0000.nii.gz")
    nib.save(nib.Nifti1Image(x[::-1, ::-1].copy(), src.affine @ flip), folder / "b_0000.nii.gz")
    out = predict(run, [str(folder)], tmp_path / "pred")
    a = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    b = np.asarray(nib.load(out / "b.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b[::-1, ::-1])


def test_evaluate_dice_equals_nibabel_recomputation(trained):
    from medfuse.engine.evaluate import evaluate

    root, run = trained
    evaluate(run, n_boot=20)
    rows = list(csv.DictReader((run / "metrics_per_case.csv").open(encoding="utf-8")))
    assert rows
    for r in rows:
        pred = np.asarray(nib.load(run / "predictions" / "test" / f"{r['case_id']}.nii.gz").dataobj)
        ref = np.asarray(nib.load(root / "Dataset901_MNI" / "labelsTr" / f"{r['case_id']}.nii.gz").dataobj)
        for k, name in ((1, "GM"), (2, "WM")):
            assert float(r[f"dice_{name}"]) == pytest.approx(_dice(pred, ref, k), abs=1e-5)
    assert (run / "metrics_per_case.csv").stat().st_mode & 0o044  # readable by others (not 0600)
    assert (run / "config.yaml").stat().st_mode & 0o044


def test_tta_on_off_reported(trained):
    from medfuse.engine.evaluate import evaluate

    _, run = trained
    off = evaluate(run, n_boot=50)["metrics"]["dice"]
    on = evaluate(run, n_boot=50, overrides=["eval.tta=true"])["metrics"]["dice"]
    assert 0 <= off["value"] <= 1 and 0 <= on["value"] <= 1
    if on["n"] >= 2:
        assert on["low"] <= on["value"] <= on["high"]
    else:  # one test patient: no interval (a resample of one is the data itself)
        assert on["n"] == 1 and np.isnan(on["low"]) and np.isnan(on["high"])


def test_exported_package_predicts_identical_files_elsewhere(trained, tmp_path, monkeypatch):
    """``medfuse export`` then ``medfuse predict model.zip`` from another directory, with the run
    folder moved away: byte-identical files to the run's own predictions."""
    from medfuse.cli import main

    root, run = trained
    own, pkg = tmp_path / "own", tmp_path / "mni.zip"
    for argv in (["predict", str(run), str(root / "imagesTs"), "--out", str(own)],
                 ["export", str(run), "--out", str(pkg)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)
    try:
        cwd = tmp_path / "elsewhere"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as e:
            main(["predict", str(pkg), str(root / "imagesTs"), "--out", "preds"])
        assert e.value.code == 0
    finally:
        shutil.move(str(moved), run)
    names = sorted(p.name for p in own.glob("*.nii.gz"))
    assert len(names) == 4 and names == sorted(p.name for p in (cwd / "preds").glob("*.nii.gz"))
    for n in names:
        a, b = nib.load(own / n), nib.load(cwd / "preds" / n)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
        assert (own / n).read_bytes() == (cwd / "preds" / n).read_bytes()  # byte-identical
