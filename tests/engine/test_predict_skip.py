"""``medfuse predict ... --skip-refused``: a refused case (2D among 3D volumes, an unreadable file, a
missing modality) is listed in ``refused.csv`` and the other cases are predicted into the same files
as without the flag; without it the first refused case still stops the run (exit 2, one line)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from conftest import AFFINE, tiny_cls_config, write_seg_dataset
from medfuse.config import validate
from medfuse.data.io import write_nifti

SHAPE = (6, 12, 12)  # (D, H, W) of the training volumes


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A one-epoch segmentation run (one modality, 'mr') trained from a manifest of 3D volumes."""
    from medfuse.engine.trainer import fit

    root = write_seg_dataset(tmp_path_factory.mktemp("skip_seg"), n_cases=8, shape=SHAPE)
    return fit(validate({
        "name": "seg", "task": "segmentation", "output_dir": str(tmp_path_factory.mktemp("skip_runs")),
        "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
        "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2]}},
        "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 10, "overlays": 0}}))


@pytest.fixture(scope="module")
def cls_run(cls_dataset, tmp_path_factory):
    from medfuse.engine.trainer import fit

    return fit(validate(tiny_cls_config(cls_dataset, tmp_path_factory.mktemp("skip_cls"), train__max_epochs=1)))


def _volume(path, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return write_nifti(rng.normal(0, 0.3, shape).astype(np.float32)[None], path, affine=AFFINE)


def _truncated(path):
    """A .nii.gz whose header reads (so the checks pass) but whose voxels are cut off: refused while read."""
    _volume(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _seg_folder(folder):
    """An imagesTs folder: three 3D volumes, a single-slice 2D image (a0flat) and a truncated file (a1broken)."""
    folder.mkdir(parents=True)
    for i, name in enumerate(("g1", "g2", "g3")):
        _volume(folder / f"{name}_0000.nii.gz", seed=i + 1)
    _volume(folder / "a0flat_0000.nii.gz", shape=(1, 12, 12))
    _truncated(folder / "a1broken_0000.nii.gz")
    return folder


def run_cli(argv, capsys) -> tuple[int, str]:
    from medfuse.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code or 0, capsys.readouterr().err


def _rows(path):
    with path.open(newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def _recorded(out):
    return set(_rows(out / "inputs.csv"))


def test_skip_refused_predicts_the_others_as_alone_and_lists_the_refused(seg_run, tmp_path, capsys):
    from medfuse.engine.predict import predict

    folder = _seg_folder(tmp_path / "imagesTs")
    out = tmp_path / "out"
    code, err = run_cli(["predict", seg_run, folder, "--out", out], capsys)  # without the flag: as before
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "a0flat_0000.nii.gz" in lines[0] and "Traceback" not in err
    assert not any(out.glob("*.nii.gz")) and not (out / "refused.csv").exists()
    code, err = run_cli(["predict", seg_run, folder, "--out", out, "--skip-refused"], capsys)
    assert code == 0, err
    assert f"2 of 5 cases refused; listed in {out / 'refused.csv'}" in err.splitlines()
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["g1.nii.gz", "g2.nii.gz", "g3.nii.gz"]
    for name in ("g1", "g2", "g3"):  # the same bytes as predicting the case on its own
        alone = predict(seg_run, [str(folder / f"{name}_0000.nii.gz")], tmp_path / f"alone_{name}")
        assert (out / f"{name}.nii.gz").read_bytes() == (alone / f"{name}.nii.gz").read_bytes()
    refused = _rows(out / "refused.csv")
    assert list(refused) == ["a0flat", "a1broken"]
    assert refused["a0flat"]["file"] == str(folder / "a0flat_0000.nii.gz") and "2D" in refused["a0flat"]["problem"]
    assert refused["a1broken"]["file"] == str(folder / "a1broken_0000.nii.gz")
    assert "cannot read" in refused["a1broken"]["problem"] and refused["a1broken"]["fix"]
    assert _recorded(out) == {"g1", "g2", "g3"}  # inputs.csv claims no refused case


def test_every_case_refused_exits_2_and_still_lists_them(seg_run, tmp_path, capsys):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    _volume(folder / "flat_0000.nii.gz", shape=(1, 12, 12))
    _truncated(folder / "broken_0000.nii.gz")
    out = tmp_path / "out"
    code, err = run_cli(["predict", seg_run, folder, "--out", out, "--skip-refused"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert str(out / "refused.csv") in lines[0] and "every case was refused" in lines[0]
    assert set(_rows(out / "refused.csv")) == {"broken", "flat"}
    assert not any(out.glob("*.nii.gz")) and not (out / "inputs.csv").exists()
    empty = tmp_path / "empty.csv"  # no case at all is not a refused case: it stops (it used to exit 0)
    empty.write_text("case_id,image_mr\n")
    code, err = run_cli(["predict", seg_run, empty, "--out", tmp_path / "out2", "--skip-refused"], capsys)
    assert code == 2 and f"{empty}: holds no case to predict" in err and not (tmp_path / "out2" / "inputs.csv").exists()


def test_a_fixed_case_leaves_refused_csv_in_the_next_run(seg_run, tmp_path, capsys):
    folder = _seg_folder(tmp_path / "imagesTs")
    out = tmp_path / "out"
    assert run_cli(["predict", seg_run, folder, "--out", out, "--skip-refused"], capsys)[0] == 0
    _volume(folder / "a1broken_0000.nii.gz", seed=7)  # the file is written again, whole
    code, err = run_cli(["predict", seg_run, folder, "--out", out, "--skip-refused"], capsys)
    assert code == 0 and "1 of 5 cases refused" in err
    assert list(_rows(out / "refused.csv")) == ["a0flat"]
    assert (out / "a1broken.nii.gz").is_file() and "a1broken" in _recorded(out)
    _volume(folder / "a0flat_0000.nii.gz", seed=8)  # now 3D: predicted without the flag, the list is empty
    assert run_cli(["predict", seg_run, folder / "a0flat_0000.nii.gz", "--out", out], capsys)[0] == 0
    assert not (out / "refused.csv").exists() and (out / "a0flat.nii.gz").is_file()


def test_classification_rows_only_for_the_predicted_cases(cls_run, cls_dataset, tmp_path, capsys):
    """Classification (two modalities, batched without the flag): a case without its 'b' image and a
    2D case are refused; predictions.csv holds the others, with the probabilities of each alone."""
    from medfuse.engine.predict import predict

    images = cls_dataset.parent / "images"
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for i in range(3):
        for chan, m in enumerate("ab"):
            shutil.copy(images / f"case{i:03d}_{m}.nii.gz", folder / f"k{i}_{chan:04d}.nii.gz")
    shutil.copy(images / "case003_a.nii.gz", folder / "half_0000.nii.gz")  # no channel 0001 ('b')
    for chan in range(2):
        write_nifti(np.ones((1, 1, 16, 16), np.float32), folder / f"flat_{chan:04d}.nii.gz", affine=AFFINE)
    out = tmp_path / "out"
    code, err = run_cli(["predict", cls_run, folder, "--out", out], capsys)
    assert code == 2 and not (out / "predictions.csv").exists()
    path = predict(cls_run, [str(folder)], out, skip_refused=True)
    assert "2 of 5 cases refused" in capsys.readouterr().err
    rows = _rows(path / "predictions.csv")
    assert sorted(rows) == ["k0", "k1", "k2"]
    refused = _rows(path / "refused.csv")
    assert sorted(refused) == ["flat", "half"] and "has no b image" in refused["half"]["problem"]
    assert _recorded(path) == {"k0", "k1", "k2"}
    alone = predict(cls_run, [str(folder / "k1_0000.nii.gz"), str(folder / "k1_0001.nii.gz")], tmp_path / "alone")
    assert _rows(alone / "predictions.csv")["k1"] == rows["k1"]


@pytest.fixture(scope="module")
def inc_run(tmp_path_factory):
    """A one-epoch incomplete_seg run (the family's own ``cases``: any subset of the four modalities);
    the tiny config of tests/families/incomplete_seg/tiny_incomplete.py."""
    from medfuse.engine.trainer import fit
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    tmp = tmp_path_factory.mktemp("skip_inc")
    root = make_incomplete_seg_demo(tmp / "data", n_patients=8, shape=(16, 16, 16))
    tiny = {"widths": [4, 8], "aspp_dilations": [1, 2], "ssim_window": 3, "channels_last": False}
    return root, fit(validate({
        "name": "inc", "output_dir": str(tmp / "runs"),
        "data": {"root": str(root), "layout": "brats", "batch_size": 2, "eval_batch_size": 1,
                 "split": {"val": 0.25, "test": 0.25, "seed": 0},
                 "transforms": {"intensity": {"*": {"kind": "percentile", "nonzero": True}}}},
        "model": {"name": "incomplete_seg", "params": {**tiny, "val_combos_per_case": 2}},
        "train": {"max_epochs": 1, "monitor": "val/loss", "mode": "min", "progress_bar": False, "accelerator": "cpu"},
        "eval": {"n_boot": 10, "overlays": 0}}))


def test_incomplete_seg_skips_an_unreadable_case_and_keeps_partial_ones(inc_run, tmp_path, capsys):
    """A case with two of four modalities is predicted (the family allows it); a case with a cut-off
    file and a 2D case are refused; predictions.csv and the label maps hold the others only."""
    from medfuse.data.layouts.brats import BRATS_MODALITIES as mods  # channel order of a BraTS run
    from medfuse.engine.predict import predict

    root, run = inc_run
    src = sorted(p for p in root.iterdir() if p.is_dir())
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name, case, chans in (("full", src[0], range(4)), ("half", src[1], (0, 2)), ("cut", src[2], range(4))):
        for c in chans:
            shutil.copy(case / f"{case.name}_{mods[c]}.nii.gz", folder / f"{name}_{c:04d}.nii.gz")
    _truncated(folder / "cut_0001.nii.gz")
    write_nifti(np.ones((1, 1, 16, 16), np.float32), folder / "flat_0000.nii.gz")
    out = predict(run, [str(folder)], tmp_path / "out", skip_refused=True)
    assert "2 of 4 cases refused" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["full.nii.gz", "half.nii.gz"]
    assert {k: r["modalities"] for k, r in _rows(out / "predictions.csv").items()} == \
        {"full": "+".join(mods), "half": f"{mods[0]}+{mods[2]}"}
    assert sorted(_rows(out / "refused.csv")) == ["cut", "flat"] and _recorded(out) == {"full", "half"}


def test_a_case_refused_while_inferred_is_skipped_too(seg_run, tmp_path, capsys, monkeypatch):
    """A DataError raised in inference (after the case was read) refuses that case like a read error:
    no output, no inputs.csv record, a refused.csv row; it stopped the whole run with the flag."""
    from medfuse.engine.predict import Predictor
    from medfuse.errors import DataError

    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in ("g1", "g2"):
        _volume(folder / f"{name}_0000.nii.gz", seed=int(name[1]))
    infer = Predictor.infer

    def refusing(self, batch):
        if list(batch["case_id"]) == ["g1"]:
            raise DataError("g1", "the model's output is not finite", "check the input's intensities")
        return infer(self, batch)

    monkeypatch.setattr(Predictor, "infer", refusing)
    out = tmp_path / "out"
    code, err = run_cli(["predict", seg_run, folder, "--out", out, "--skip-refused"], capsys)
    assert code == 0 and "1 of 2 cases refused" in err, err
    assert [p.name for p in out.glob("*.nii.gz")] == ["g2.nii.gz"] and _recorded(out) == {"g2"}
    assert "not finite" in _rows(out / "refused.csv")["g1"]["problem"]


def test_a_modality_resampled_at_predict_is_said_once(cls_run, cls_dataset, tmp_path, caplog):
    """A case whose 'b' image lies on another (overlapping) grid is predicted on 'a''s grid, as data
    check's ``grid`` rule and the README say, and predict now logs one warning naming the case."""
    import logging

    import nibabel as nib

    from medfuse.engine.predict import predict

    images = cls_dataset.parent / "images"
    b = nib.load(images / "case000_b.nii.gz")
    moved = b.affine.copy()
    moved[:3, 3] += 1.0  # 1 mm along each axis: still over 'a'
    nib.save(nib.Nifti1Image(np.asarray(b.dataobj), moved), tmp_path / "case000_b.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        predict(cls_run, [str(images / "case000_a.nii.gz"), str(tmp_path / "case000_b.nii.gz")], tmp_path / "out")
        predict(cls_run, [str(images / "case001_a.nii.gz"), str(images / "case001_b.nii.gz")], tmp_path / "out2")
    said = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert said == ["case000_a: image(s) 'b' resampled (trilinear) onto the grid of image 'a'"]
