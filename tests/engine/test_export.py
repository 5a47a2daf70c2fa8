"""Portable model packages: ``export`` a run, move the run away, ``predict`` from ``model.zip`` in
another directory -> the same files as the run's own predictions; refused packages (pickles,
path traversal, corrupt members)."""

from __future__ import annotations

import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest

from medfuse.config import validate
from medfuse.errors import ConfigError, DataError, RunDirError, WeightsError

LPS = np.array([[-1.5, 0, 0, 20.0], [0, -1.2, 0, 14.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])


def _case(rng, shape):
    img = rng.normal(0, 0.3, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    lab[c[0] - 2: c[0] + 3, c[1] - 3: c[1] + 2, c[2] - 2: c[2] + 2] = 1
    img[lab > 0] += 2.0
    return img, lab


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch UNet on a tiny nnU-Net v2 set of odd, different sizes; imagesTs holds an LPS case."""
    from medfuse.engine.trainer import fit

    root = tmp_path_factory.mktemp("export")
    ds = root / "Dataset902_Tiny"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    (root / "imagesTs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img, lab = _case(rng, (13 + i % 3, 11 + i % 2, 9 + 2 * (i % 2)))
        aff = np.diag([1.2, 1.1, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), ds / "imagesTr" / f"t_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), ds / "labelsTr" / f"t_{i:03d}.nii.gz")
    for name, aff in (("ts_lps", LPS), ("ts_ras", np.diag([1.0, 1.0, 2.5, 1.0]))):
        img, _ = _case(rng, (15, 12, 9))
        nib.save(nib.Nifti1Image(img, aff), root / "imagesTs" / f"{name}_0000.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "blob": 1},
                                                 "numTraining": 8, "file_ending": ".nii.gz"}))
    cfg = validate({
        "name": "tiny", "output_dir": str(root / "runs"),
        "data": {"root": str(ds), "batch_size": 2, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
        "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2]}},
        "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 20, "overlays": 0},
    })
    return root, fit(cfg)


def _same_files(a, b):
    names = sorted(p.name for p in a.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in b.glob("*.nii.gz"))
    for n in names:
        x, y = nib.load(a / n), nib.load(b / n)
        np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
        np.testing.assert_array_equal(x.affine, y.affine)
        assert x.header.get_data_dtype() == y.header.get_data_dtype()
        assert (a / n).read_bytes() == (b / n).read_bytes()  # byte-identical files
    return names


def test_export_then_predict_from_the_package_elsewhere(run, tmp_path, monkeypatch):
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    root, run_dir = run
    rep = evaluate(run_dir, n_boot=20)
    own = predict(run_dir, [str(root / "imagesTs")], tmp_path / "own", overrides=["eval.tta=true"])
    pkg = export(run_dir, tmp_path / "model.zip")
    with zipfile.ZipFile(pkg) as zf:
        names = set(zf.namelist())
        card = zf.read("model_card.md").decode()
        labels = json.loads(zf.read("labels.json"))
    assert names == {"medfuse_package.json", "config.yaml", "weights.safetensors", "labels.json",
                     "preprocessing.json", "predictor.json", "splits.csv", "model_card.md"}
    assert labels["modalities"] == ["T1"] and labels["mask_labels"] == {"background": 0, "blob": 1}
    dice = rep["metrics"]["dice"]
    assert f"| dice | {dice['value']:.4g} |" in card and "[" in card  # the run's test metric with its CI
    assert "test 2 cases, train 4 cases, val 2 cases" in card  # the split's sizes (from splits.csv)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run_dir), moved)  # neither the run folder ...
    try:
        other = tmp_path / "cwd"
        other.mkdir()
        monkeypatch.chdir(other)
        data = root / "Dataset902_Tiny"
        hidden = root / "hidden_data"
        data.rename(hidden)  # ... nor the training data are there
        try:
            out = predict(str(pkg), [str(root / "imagesTs")], "preds", overrides=["eval.tta=true"])
        finally:
            hidden.rename(data)
    finally:
        shutil.move(str(moved), run_dir)
    assert _same_files(own, other / out) == ["ts_lps.nii.gz", "ts_ras.nii.gz"]
    lps = nib.load(other / out / "ts_lps.nii.gz")
    assert lps.shape == (15, 12, 9)
    np.testing.assert_allclose(lps.affine, LPS, atol=1e-5)


def test_model_card_says_not_evaluated_and_export_refusals(run, tmp_path):
    from medfuse.engine.package import export

    root, run_dir = run
    report = run_dir / "report.json"
    saved = report.read_bytes() if report.exists() else None
    report.unlink(missing_ok=True)
    try:
        pkg = export(run_dir, tmp_path / "m.zip")
    finally:
        if saved is not None:
            report.write_bytes(saved)
    with zipfile.ZipFile(pkg) as zf:
        assert "not evaluated" in zf.read("model_card.md").decode()
    with pytest.raises(RunDirError, match="already exists"):
        export(run_dir, pkg)
    with pytest.raises(RunDirError, match=r"\.zip"):
        export(run_dir, tmp_path / "m.tar")
    with pytest.raises(RunDirError, match="not a run directory"):
        export(tmp_path, tmp_path / "x.zip")


def _rewrite(src, dst, change):
    """Copy a package with ``change(name, data) -> [(name, data), ...]`` applied to each member."""
    import warnings

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name we write on purpose
        for info in zin.infolist():
            for name, data in change(info.filename, zin.read(info)):
                zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def package(run, tmp_path_factory):
    from medfuse.engine.package import export

    return export(run[1], tmp_path_factory.mktemp("pkg") / "model.zip")


def _plus(extra_name, extra_data):
    """Every member unchanged, plus one more (added once, after the manifest)."""
    return lambda n, d: [(n, d)] + ([(extra_name, extra_data)] if n == "medfuse_package.json" else [])


@pytest.mark.parametrize(("change", "match"), [
    (_plus("model.pt", b"\x80\x04K\x01."), "pickle"),
    (lambda n, d: [("weights.pt", d) if n == "weights.safetensors" else (n, d)], "pickle"),
    (_plus("../evil.txt", b"x"), "path traversal"),
    (_plus("/abs/evil.json", b"{}"), "path traversal"),
    (_plus("sub\\..\\evil.json", b"{}"), "path traversal"),
    (_plus("notes.txt", b"x"), "unexpected member"),
    (_plus("labels.json", b"{}"), "twice"),
    (lambda n, d: [(n, b"\x80\x04K\x01." if n == "labels.json" else d)], "pickle"),
    (lambda n, d: [(n, d + b" " if n == "config.yaml" else d)], "checksum"),
    (lambda n, d: [(n, b"not safetensors" if n == "weights.safetensors" else d)], "checksum"),
    (lambda n, d: [(n, d)] if n != "weights.safetensors" else [], "no 'weights.safetensors'"),
])
def test_refused_packages(package, tmp_path, change, match):
    from medfuse.engine.predict import predict

    bad = _rewrite(package, tmp_path / "bad.zip", change)
    with pytest.raises(WeightsError, match=match):
        predict(bad, ["x.nii.gz"], tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def _with_manifest(src, dst, edit):
    """Copy a package whose manifest is ``edit(manifest)`` and whose members are ``edit``'s changes
    (``edit`` may replace members in ``members``; their checksums are updated, so only the content
    check can refuse them)."""
    import hashlib

    with zipfile.ZipFile(src) as zin:
        members = {n: zin.read(n) for n in zin.namelist()}
    man = json.loads(members.pop("medfuse_package.json"))
    edit(man, members)
    man["sha256"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}
    with zipfile.ZipFile(dst, "w") as zout:
        zout.writestr("medfuse_package.json", json.dumps(man))
        for n, d in members.items():
            zout.writestr(n, d)
    return dst


@pytest.mark.parametrize(("edit", "match"), [
    (lambda man, m: m.update({"weights.safetensors": b"\x80\x04\x95" + b"0" * 64}), "not a safetensors file"),
    (lambda man, m: man.update({"external_files": {"model.params.image_weights": "/nowhere/medsam.pth"}}),
     "needs model.params.image_weights = /nowhere/medsam.pth, which is not on this machine"),
    (lambda man, m: man.update({"format": "something-else"}), "not a medfuse model package"),
    (lambda man, m: m.update({"config.yaml": b"model: !!python/object:os.system [ls]\n"}), "not plain YAML"),
])
def test_refused_contents(package, tmp_path, edit, match):
    from medfuse.engine.predict import predict

    bad = _with_manifest(package, tmp_path / "bad.zip", edit)
    with pytest.raises(WeightsError, match=match):
        predict(bad, ["x.nii.gz"], tmp_path / "out")


def test_not_a_package_and_bad_overrides(package, tmp_path):
    from medfuse.engine.predict import predict

    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(WeightsError, match="not a zip"):
        predict(junk, ["x.nii.gz"], tmp_path / "out")
    with pytest.raises(ConfigError, match="only eval"):
        predict(package, ["x.nii.gz"], tmp_path / "out", overrides=["model.name=x"])
    with pytest.raises(ConfigError, match="eval.postprocess.min_et_voxels"):
        predict(package, ["x.nii.gz"], tmp_path / "out", overrides=["eval.postprocess.min_et_voxels=10"])


def test_cli_export_and_predict_package(package, run, tmp_path):
    from medfuse.cli import main

    root, run_dir = run
    with pytest.raises(SystemExit) as e:
        main(["predict", str(package), str(root / "imagesTs"), "--out", str(tmp_path / "p"), "eval.sw_mode=constant"])
    assert e.value.code == 0 and (tmp_path / "p" / "ts_lps.nii.gz").is_file()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--out", str(package)])
    assert e.value.code == 2


def test_classification_package_gives_the_runs_probabilities(cls_dataset, tmp_path, monkeypatch):
    from conftest import tiny_cls_config
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    run_dir = fit(validate(tiny_cls_config(cls_dataset.parent, tmp_path / "runs", train__max_epochs=1)))
    own = predict(run_dir, [str(cls_dataset)], tmp_path / "own")
    pkg = export(run_dir, tmp_path / "cls.zip")
    shutil.move(str(run_dir), tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    out = predict(str(pkg), [str(cls_dataset)], "pk")
    text = (own / "predictions.csv").read_text(encoding="utf-8")
    assert text == (tmp_path / out / "predictions.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "case_id,pred,p_c0,p_c1" and len(text.splitlines()) == 25


def test_package_refuses_a_2d_image_for_a_3d_model(package, tmp_path):
    """The 2D/3D check has no training images to look at: the package carries their shape."""
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    flat = tmp_path / "flat_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 1), np.float32), np.eye(4)), flat)
    with zipfile.ZipFile(package) as zf:
        assert json.loads(zf.read("preprocessing.json"))["reference_shape"][1] > 1
    with pytest.raises(DataError, match="2D image"):
        predict(package, [str(flat)], tmp_path / "out")


def test_predict_reads_dicom_with_the_package_or_run_settings_and_data_dicom_overrides(package, run, tmp_path):
    """A series with a missing slice is refused as the run's data.dicom says (on_gap: error), and
    ``data.dicom.on_gap=resample`` given to predict reads it, from a package as from the run (a
    package used to ignore data.dicom, and predict refused data.dicom overrides)."""
    from tests.data.test_dicom import write_series

    from medfuse.engine.predict import predict

    first = str(write_series(tmp_path / "gap", [0.0, 3.0, 9.0, 12.0])[0])  # the slice at 6 mm is missing
    for model in (package, run[1]):
        with pytest.raises(DataError, match="missing 1 slice"):
            predict(model, [first], tmp_path / "refused")
        out = predict(model, [first], tmp_path / f"read_{model.name}", overrides=["data.dicom.on_gap=resample"])
        (pred,) = [nib.load(f) for f in out.glob("*.nii.gz")]
        assert pred.shape == (128, 128, 5)  # 0..12 mm at 3 mm: the resampled grid of 5 slices
    with pytest.raises(ConfigError, match=r"only eval\.\*, data\.dicom\.\* and data\.root"):
        predict(package, [first], tmp_path / "out", overrides=["data.name=/x"])
    with pytest.raises(ConfigError, match="a model package reads no training data"):
        predict(package, [first], tmp_path / "out", overrides=["data.root=/x"])


def test_predict_refuses_a_case_without_every_modality(tmp_path):
    """A 2-modality baseline run given one of them: refused in one line (it was filled with zeros)."""
    from medfuse.data.layouts import Case
    from medfuse.engine.predict import Predictor

    class _DM:
        modalities = ["T1", "T2"]

    pred = Predictor.__new__(Predictor)
    pred.dm = _DM()
    with pytest.raises(DataError, match=r"t1_0000.nii.gz: case c1 has no T2 image; the run was trained on T1, T2"):
        pred.check_complete([Case(case_id="c1", patient_id="c1", images={"T1": "t1_0000.nii.gz"})])
    pred.check_complete([Case(case_id="c2", patient_id="c2", images={"T1": "a", "T2": "b"})])
    pred.partial_modalities = True
    pred.check_complete([Case(case_id="c1", patient_id="c1", images={"T1": "t1_0000.nii.gz"})])


def test_predict_takes_a_dicom_series_folder_as_one_image(run, tmp_path):
    """A series folder is an image (as everywhere else), named by the folder: it used to be read as a
    dataset and refused ("matches no dataset layout")."""
    from tests.data.test_dicom import write_series

    from medfuse.engine.predict import predict

    write_series(tmp_path / "patient7_t1", [0.0, 3.0, 6.0, 9.0])
    out = predict(run[1], [str(tmp_path / "patient7_t1")], tmp_path / "preds")
    pred = nib.load(out / "patient7_t1.nii.gz")
    assert pred.shape == (128, 128, 4)


def test_model_card_counts_cases_and_patients():
    from medfuse.engine.package import model_card

    class _Cfg:
        name, task = "x", "classification"

        class model:  # noqa: N801 - stands in for cfg.model
            name = "baseline_cnn3d"

        class train:  # noqa: N801
            monitor, mode = "val/auc", "max"

    splits = "case_id,patient_id,split\nc1,p1,test\nc2,p1,test\nc3,p2,test\nc4,p3,train\n"
    rep = {"split": "test", "n": 3, "n_patients": 2, "n_boot": 10,
           "metrics": {"auc": {"value": 0.5, "low": 0.4, "high": 0.6, "n": 2, "n_items": 3}}}
    card = model_card(_Cfg, "baseline", "best", 3, {"modalities": ["ct"], "class_names": ["a", "b"]},
                      {"transforms": {}}, rep, splits)
    assert "test 3 cases of 2 patients, train 1 cases" in card and "names every case and patient id" in card
    assert "n = 3 cases of 2 patients (CIs resample patients)" in card and "split (by patient," in card
    own = "case_id,patient_id,split\nc1,c1,test\nc2,c2,train\n"  # nnU-Net: no patient ids, each case its own
    card = model_card(_Cfg, "baseline", "best", 3, {"modalities": ["ct"], "class_names": ["a", "b"]},
                      {"transforms": {}}, None, own)
    assert "split (by case: the data set gives no patient ids," in card


def test_export_without_ids_leaves_the_split_and_data_paths_out_and_still_predicts(run, tmp_path):
    import yaml

    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    root, run_dir = run
    pkg = export(run_dir, tmp_path / "anon.zip", without_ids=True)
    with zipfile.ZipFile(pkg) as zf:
        names = set(zf.namelist())
        card = zf.read("model_card.md").decode()
        cfg = yaml.safe_load(zf.read("config.yaml"))
    assert "splits.csv" not in names and cfg["data"]["root"] is None and cfg["data"]["cache_dir"] is None
    assert "counts only" in card and "train 4 cases" in card
    for line in (run_dir / "splits.csv").read_text(encoding="utf-8").splitlines()[1:]:
        assert line.split(",")[0] not in card  # no case id in the card either
    out = predict(str(pkg), [str(root / "imagesTs")], tmp_path / "p")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ts_lps.nii.gz", "ts_ras.nii.gz"]
