"""``medfuse predict RUN <MSD dataset>`` predicts the dataset.json ``test`` list (4D files split into
the run's modalities), not the training cases it used to fall back to."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medfuse.config import validate


def _write(path, arr, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def test_predict_on_an_msd_folder_reads_its_test_list(tmp_path):
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    ds = tmp_path / "Task99_Tiny"
    rng = np.random.default_rng(0)
    aff = np.diag([1.2, 1.1, 2.0, 1.0])
    for i in range(6):
        img = rng.normal(0, 0.3, (12, 10, 8, 2)).astype(np.float32)  # (X, Y, Z, 2 modalities)
        lab = np.zeros((12, 10, 8), np.uint8)
        lab[4:8, 3:7, 2:6] = 1
        img[lab > 0, 1] += 2.0
        _write(ds / "imagesTr" / f"tiny_{i:03d}.nii.gz", img, aff)
        _write(ds / "labelsTr" / f"tiny_{i:03d}.nii.gz", lab, aff)
    test_aff = np.array([[-1.0, 0, 0, 5.0], [0, -1.3, 0, 2.0], [0, 0, 2.5, -4.0], [0, 0, 0, 1]])
    for name, shape in (("tiny_100", (13, 9, 7)), ("tiny_101", (11, 12, 6))):
        _write(ds / "imagesTs" / f"{name}.nii.gz", rng.normal(0, 0.3, (*shape, 2)).astype(np.float32), test_aff)
    (ds / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MR1", "1": "MR2"}, "labels": {"0": "background", "1": "blob"},
        "training": [{"image": f"./imagesTr/tiny_{i:03d}.nii.gz", "label": f"./labelsTr/tiny_{i:03d}.nii.gz"}
                     for i in range(6)],
        "test": ["./imagesTs/tiny_100.nii.gz", "./imagesTs/tiny_101.nii.gz"]}))
    run = fit(validate({
        "name": "msd", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(ds), "batch_size": 2, "split": {"val": 0.2, "test": 0.2},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
        "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2]}},
        "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False, "accelerator": "cpu"},
        "eval": {"n_boot": 10, "overlays": 0}}))
    for given in (ds, ds / "imagesTs"):
        out = predict(run, [str(given)], tmp_path / f"preds_{given.name}")
        assert sorted(p.name for p in out.glob("*.nii.gz")) == ["tiny_100.nii.gz", "tiny_101.nii.gz"]
        for name in ("tiny_100", "tiny_101"):
            src, pred = nib.load(ds / "imagesTs" / f"{name}.nii.gz"), nib.load(out / f"{name}.nii.gz")
            assert pred.shape == src.shape[:3]
            np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)


def test_a_single_4d_file_names_the_ways_to_give_it(tmp_path):
    """One MSD test file given alone: one line that says it holds the channels and how to give them."""
    import pytest

    from medfuse.data.layouts import Case
    from medfuse.engine.predict import Predictor
    from medfuse.errors import DataError

    f = tmp_path / "tiny_100.nii.gz"
    _write(f, np.zeros((6, 5, 4, 2), np.float32), np.eye(4))

    class _DM:
        modalities = ["MR1", "MR2"]

    pred = Predictor.__new__(Predictor)
    pred.dm = _DM()
    with pytest.raises(DataError, match=r"holds 2 channels in one file.*channel_<modality> columns"):
        pred.check_complete([Case(case_id="tiny_100", patient_id="tiny_100", images={"MR1": str(f)})])
