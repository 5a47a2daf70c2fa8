"""incomplete_seg predict through a model package (regions travel in the package), and the optional
small-ET post-processing applied alike by ``predict`` and ``evaluate``."""

from __future__ import annotations

import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
from tiny_incomplete import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medfuse.config import validate
    from medfuse.engine.trainer import fit
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    tmp = tmp_path_factory.mktemp("inc_pkg")
    root = make_incomplete_seg_demo(tmp / "data", n_patients=8, shape=(16, 16, 16))
    cfg = validate(tiny_config(root, tmp / "runs", n_boot=10))
    run_dir = fit(cfg)
    # a new case with two of the four modalities (FLAIR, T1ce), in its own folder
    case = next(p for p in sorted(root.iterdir()) if p.is_dir())
    new = tmp / "NewCase"
    new.mkdir()
    for m in ("flair", "t1ce"):
        shutil.copy(next(case.glob(f"*_{m}.nii.gz")), new / f"NewCase_{m}.nii.gz")
    return tmp, root, run_dir, new


def _label(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_package_predicts_like_the_run_without_data_or_run(run, tmp_path, monkeypatch):
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    tmp, root, run_dir, new = run
    own = predict(run_dir, [str(new)], tmp_path / "own")
    pkg = export(run_dir, tmp_path / "inc.zip")
    with zipfile.ZipFile(pkg) as zf:
        state = json.loads(zf.read("predictor.json"))
        labels = json.loads(zf.read("labels.json"))
        card = zf.read("model_card.md").decode()
    assert labels["mask_labels"] == {"background": 0, "WT not TC": 1, "TC not ET": 2, "ET": 3}  # canonical
    assert set(labels["output_labels"].values()) == {0, 1, 2, 4}  # what the written files hold
    assert json.dumps(labels["output_labels"]) in card
    assert state["raw_regions"] == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
    assert list(state["raw_regions"]) == state["region_names"] == ["WT", "TC", "ET"]
    away = tmp_path / "away"
    away.mkdir()
    shutil.move(str(run_dir), away / "run")
    shutil.move(str(root), away / "data")
    try:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        out = predict(str(pkg), [str(new)], "preds")
    finally:
        shutil.move(str(away / "run"), run_dir)
        shutil.move(str(away / "data"), root)
    a, b = own / "NewCase.nii.gz", cwd / out / "NewCase.nii.gz"
    np.testing.assert_array_equal(_label(a), _label(b))
    np.testing.assert_array_equal(nib.load(str(a)).affine, nib.load(str(b)).affine)
    assert a.read_bytes() == b.read_bytes()
    assert (own / "predictions.csv").read_text(encoding="utf-8") == (cwd / out / "predictions.csv").read_text(encoding="utf-8") \
        == "case_id,modalities,prediction\nNewCase,flair+t1ce,NewCase.nii.gz\n"
    assert set(np.unique(_label(b))) <= {0, 1, 2, 4}  # raw BraTS label values


@pytest.fixture
def small_et(monkeypatch):
    """The task predicts a fixed nested WT > TC > ET with an ET of 3 voxels (whatever the weights)."""
    from tiny_incomplete import fix_regions

    box = slice(2, 10), slice(4, 8)
    fix_regions(monkeypatch, wt=(box[0],) * 3, tc=(box[1],) * 3, et=(5, 5, slice(5, 8)))  # ET: 3 voxels


@pytest.mark.parametrize("threshold", [0, 3, 4])
def test_predict_relabels_a_small_et_as_necrosis(run, small_et, tmp_path, threshold):
    from medfuse.engine.predict import predict

    _, _, run_dir, new = run
    out = predict(run_dir, [str(new)], tmp_path / "p", overrides=[f"eval.postprocess.min_et_voxels={threshold}"])
    lab = _label(out / "NewCase.nii.gz")
    assert int((lab > 0).sum()) == 8 ** 3 and int((lab == 1).sum() + (lab == 4).sum()) == 4 ** 3
    assert int((lab == 4).sum()) == (0 if threshold > 3 else 3)  # ET kept unless fewer voxels than asked


def test_evaluate_applies_the_same_postprocessing(run, small_et):
    from medfuse.engine.evaluate import evaluate

    _, _, run_dir, _ = run
    found = {}
    for threshold in (0, 10):
        evaluate(run_dir, n_boot=5, overrides=[f"eval.postprocess.min_et_voxels={threshold}"])
        files = sorted((run_dir / "predictions" / "test").glob("*.nii.gz"))
        found[threshold] = [int((_label(f) == 4).sum()) for f in files]  # BraTS ET = 4, as predict writes
    assert found[0] and all(n == 3 for n in found[0])
    assert all(n == 0 for n in found[10])
