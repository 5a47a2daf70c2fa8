"""context_seg predict writes on the raw input's own grid (LPS, oblique, odd sizes, a coarser label
grid), and runs from a model package without the data or the run."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medfuse.data.io import write_nifti

ENC = {"out_channels": 4, "hidden": [4, 4]}


def _pair(rng, shape):
    """A raw volume with a bright cube (label 1) and its context (twice the field of view at 2x voxels)."""
    raw = rng.normal(1.0, 0.05, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    sl = tuple(slice(s // 4, s // 2) for s in shape)
    raw[sl] += 1.0
    lab[sl] = 1
    ctx = rng.normal(1.0, 0.05, shape).astype(np.float32)
    return raw, lab, ctx


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("ctx_pred")
    root = tmp / "d"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        raw, lab, ctx = _pair(rng, (16, 16, 16))
        for name, arr, sp in (("raw", raw, 1.0), ("lab", lab, 1.0), ("ctx", ctx, 2.0)):
            write_nifti(arr[None], root / f"c{i}_{name}.nii.gz", affine=np.diag([sp, sp, sp, 1.0]))
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i}", "image_raw": f"c{i}_raw.nii.gz",
                     "image_context": f"c{i}_ctx.nii.gz", "mask": f"c{i}_lab.nii.gz"})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "dataset.json").write_text(json.dumps({"mask_labels": {"background": 0, "bright": 1}}))
    cfg = load_config(base={
        "name": "ctx", "family": "context_seg", "output_dir": str(tmp / "runs"),
        "data": {"root": str(root), "batch_size": 2, "split": {"val": 0.34, "test": 0.0, "seed": 0},
                 "params": {"encoder_params": ENC, "raw_input_size": 64, "patch_size": [8, 8, 8],
                            "samples_per_case": 1}},
        "model": {"name": "context_seg", "params": {"feature_channels": 4, "base": 4, "levels": 2}},
        "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 10, "overlays": 0},
    })
    return tmp, root, fit(cfg)


def _oblique(shape, lps: bool):
    """A 20-degree in-plane rotation, anisotropic voxels, and (``lps``) the first two axes flipped."""
    a = np.deg2rad(20.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    aff = rot @ np.diag([0.95, 1.0, 1.05, 1.0])  # within 10% of the training voxels (1 mm)
    aff[:3, 3] = [-7.0, 12.0, 3.5]
    if lps:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = shape[2] - 1, shape[1] - 1  # file axes (i, j) = (W, H)
        aff = aff @ flip
    return aff


def _label_scale(monkeypatch, scale):
    """Predict as if the run had been trained on labels at ``scale`` times the raw resolution."""
    import medfuse.engine.evaluate as ev

    real = ev.load_trained

    def patched(*args, **kwargs):
        cfg, dm, task = real(*args, **kwargs)
        dm.label_scale = np.array([scale] * 3)
        return cfg, dm, task

    monkeypatch.setattr(ev, "load_trained", patched)


@pytest.mark.parametrize(("lps", "scale"), [(True, 1.0), (False, 1.0), (True, 0.5), (False, 0.7)])
def test_prediction_has_the_raw_inputs_shape_and_affine(run, tmp_path, monkeypatch, lps, scale):
    from medfuse.engine.predict import predict

    _, _, run_dir = run
    if scale != 1.0:  # features and logits on a coarser grid than the raw file's
        _label_scale(monkeypatch, scale)
    rng = np.random.default_rng(1)
    shape = (15, 13, 11)  # (D, H, W), odd and unlike the training size
    raw, lab, ctx = _pair(rng, shape)
    aff = _oblique(shape, lps)
    raw_path = write_nifti(raw[None], tmp_path / "new_0000.nii.gz", affine=aff)
    ctx_path = write_nifti(ctx[None], tmp_path / "new_0001.nii.gz", affine=aff @ np.diag([2.0, 2.0, 2.0, 1.0]))
    out = predict(run_dir, [str(raw_path), str(ctx_path)], tmp_path / "out", overrides=["eval.save_probabilities=true"])
    img = nib.load(str(out / "new.nii.gz"))
    src = nib.load(str(raw_path))
    assert img.shape == src.shape == (11, 13, 15)  # file order (i, j, k)
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    probs = nib.load(str(out / "new_probs.nii.gz"))
    assert probs.shape == (11, 13, 15, 2)
    p = np.asarray(probs.dataobj)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), p.argmax(-1))


def test_a_coarser_label_grid_is_resampled_onto_the_raw_grid(run, tmp_path, monkeypatch):
    """Trained on labels at half the raw resolution: the features and logits live on a grid of
    8^3 voxels of 2 mm; the written map is back on the 16^3 raw grid of 1 mm."""
    from medfuse.engine.predict import predict

    _, root, run_dir = run
    _label_scale(monkeypatch, 0.5)
    out = predict(run_dir, [str(root / "c0_raw.nii.gz"), str(root / "c0_ctx.nii.gz")], tmp_path / "o",
                  overrides=["eval.save_probabilities=true"])
    img = nib.load(str(out / "c0_raw.nii.gz"))
    assert img.shape == (16, 16, 16)
    np.testing.assert_allclose(img.affine, np.diag([1.0, 1.0, 1.0, 1.0]))
    p = np.asarray(nib.load(str(out / "c0_raw_probs.nii.gz")).dataobj)
    assert p.shape == (16, 16, 16, 2)
    # each 2x2x2 block of raw voxels shares one label voxel: inside the grid the probabilities vary smoothly
    assert np.abs(np.diff(p[2:-2, 2:-2, 2:-2, 1], axis=0)).max() < 0.5


def test_package_round_trip(run, tmp_path, monkeypatch):
    import zipfile

    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    tmp, root, run_dir = run
    inputs = [str(root / "c1_raw.nii.gz"), str(root / "c1_ctx.nii.gz")]
    own = predict(run_dir, inputs, tmp_path / "own")
    pkg = export(run_dir, tmp_path / "ctx.zip")
    with zipfile.ZipFile(pkg) as zf:
        state = json.loads(zf.read("predictor.json"))
    assert state["num_classes"] == 2 and state["label_scale"] == [1.0, 1.0, 1.0] and state["encoder_weights_id"]
    assert state["raw_spacing"] == [1.0, 1.0, 1.0]
    with zipfile.ZipFile(pkg) as zf:
        card = {line.split(":")[0]: line for line in zf.read("model_card.md").decode().splitlines()}
    # what predict takes and does, not the generic one-image-per-modality input and intensity chain
    assert card["- inputs"].startswith("- inputs: RAW CONTEXT (`medfuse predict model.zip RAW CONTEXT`)")
    assert "training raw voxel size (1, 1, 1) mm" in card["- inputs"] and "one image per modality" not in card["- inputs"]
    assert "frozen encoder `tiny`" in card["- preprocessing"] and "raw 64x64" in card["- preprocessing"]
    assert "orientation" not in card["- preprocessing"].split("(not")[0] and "percentile\"" not in card["- preprocessing"]
    assert "NIfTI-1) on RAW's grid" in card["- outputs"] and "(x, y, z)" in card["- outputs"]
    copies = tmp_path / "inputs"
    copies.mkdir()
    new = [shutil.copy(p, copies) for p in inputs]
    away = tmp_path / "away"
    shutil.move(str(tmp), away)  # the run and the training data
    try:
        monkeypatch.chdir(tmp_path)
        out = predict(str(pkg), new, "pk")
    finally:
        shutil.move(str(away), tmp)
    a, b = nib.load(str(own / "c1_raw.nii.gz")), nib.load(str(tmp_path / out / "c1_raw.nii.gz"))
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (own / "c1_raw.nii.gz").read_bytes() == (tmp_path / out / "c1_raw.nii.gz").read_bytes()


def test_a_context_away_from_the_raw_crop_is_refused(run, tmp_path):
    """predict places the context by the two files' affines: one moved 1 m away is refused, naming it."""
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, root, run_dir = run
    ctx = nib.load(str(root / "c0_ctx.nii.gz"))
    aff = ctx.affine.copy()
    aff[:3, 3] += 1000.0
    far = write_nifti(np.asarray(ctx.dataobj)[None].transpose(0, 3, 2, 1), tmp_path / "far_ctx.nii.gz", affine=aff)
    with pytest.raises(DataError, match=r"far_ctx.nii.gz: does not contain the raw crop's field of view"):
        predict(run_dir, [str(root / "c0_raw.nii.gz"), str(far)], tmp_path / "out")


def test_a_2d_raw_is_refused(run, tmp_path):
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, root, run_dir = run
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), np.eye(4)), str(flat))
    with pytest.raises(DataError, match=r"flat.nii.gz.*2D"):
        predict(run_dir, [str(flat), str(root / "c0_ctx.nii.gz")], tmp_path / "out")
    assert not (tmp_path / "out" / "flat.nii.gz").exists()


def test_a_raw_at_another_voxel_size_is_refused_from_run_and_package(run, tmp_path):
    """Trained on 1 mm raw voxels: a raw at 2 mm (its context at 4 mm) is refused, from the run
    directory and from the package (which records the training voxel size)."""
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, root, run_dir = run
    raw = np.asarray(nib.load(str(root / "c0_raw.nii.gz")).dataobj).transpose(2, 1, 0)
    ctx = np.asarray(nib.load(str(root / "c0_ctx.nii.gz")).dataobj).transpose(2, 1, 0)
    r = write_nifti(raw[None], tmp_path / "coarse_0000.nii.gz", affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    c = write_nifti(ctx[None], tmp_path / "coarse_0001.nii.gz", affine=np.diag([4.0, 4.0, 4.0, 1.0]))
    msg = r"coarse_0000.nii.gz: has raw voxels of \(2.0, 2.0, 2.0\) \(d, h, w\), but the run was trained on \(1.0, 1.0, 1.0\)"
    with pytest.raises(DataError, match=msg):
        predict(run_dir, [str(r), str(c)], tmp_path / "o1")
    pkg = export(run_dir, tmp_path / "ctx.zip")
    with pytest.raises(DataError, match=msg):
        predict(str(pkg), [str(r), str(c)], tmp_path / "o2")


@pytest.mark.parametrize(("raw", "name"), [
    ("jrc_hela-2.zarr/recon-1/em/fibsem-uint8/s1", "jrc_hela-2_recon-1_em_fibsem-uint8"),  # not "s1"
    ("jrc_hela-2.zarr/recon-1/em/fibsem-uint8", "jrc_hela-2_recon-1_em_fibsem-uint8"),  # the multiscales group
    ("jrc_hela-2.zarr/recon-1/em/fibsem-uint8/crop155/s0", "jrc_hela-2_crop155"),  # as evaluate names the crop
    ("preds.zarr/crop7/raw/0", "preds_crop7"),
    ("sample.zarr/0", "sample"),  # OME-NGFF numeric scale level
    ("jrc_mus-liver.n5/em/fibsem-uint8/s0", "jrc_mus-liver_em_fibsem-uint8"),
    ("jrc_x.zarr/recon-1/em/fibsem-uint8/raw_crop", "jrc_x_recon-1_em_fibsem-uint8_raw_crop"),  # not a scale level
])
def test_a_zarr_raw_is_named_after_its_data_not_its_scale_level(tmp_path, raw, name):
    """``predict`` names a case after its raw input; an array inside a Zarr/N5 container gets the
    container and group (or CellMap crop) name, so two data sets' ``s1`` do not both become ``s1``."""
    from types import SimpleNamespace

    from medfuse.families.context_seg.params import ContextSegDataParams
    from medfuse.families.context_seg.predict import ContextSegPredictor

    pred = object.__new__(ContextSegPredictor)  # cases() reads only the data params (Zarr: no 2D check here)
    pred.dm, pred.refused = SimpleNamespace(params=ContextSegDataParams()), []
    (tmp_path / raw).mkdir(parents=True)
    (tmp_path / "ctx.zarr" / "s3").mkdir(parents=True)
    (case,) = pred.cases([str(tmp_path / raw), str(tmp_path / "ctx.zarr" / "s3")], None)
    assert case.case_id == case.patient_id == name


def test_a_zarr_name_that_is_no_case_id_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    from medfuse.errors import DataError
    from medfuse.families.context_seg.params import ContextSegDataParams
    from medfuse.families.context_seg.predict import ContextSegPredictor

    pred = object.__new__(ContextSegPredictor)
    pred.dm, pred.refused = SimpleNamespace(params=ContextSegDataParams()), []
    raw = tmp_path / "my data.zarr" / "s0"
    raw.mkdir(parents=True)
    with pytest.raises(DataError, match="has characters outside") as err:
        pred.cases([str(raw), str(raw)], None)
    assert str(raw) in err.value.one_line() and "rename the case" in err.value.one_line()
