"""A run keeps working from another folder: the paths it was trained with relative to the working
directory (data.root, cache_dir, weights files of model.params) are saved absolute."""

from __future__ import annotations

import os
import shutil

import yaml

from conftest import tiny_cls_config
from medfuse.config import absolute_paths, validate


def test_evaluate_and_predict_from_another_folder(cls_dataset, tmp_path, monkeypatch):
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    work = tmp_path / "work"
    shutil.copytree(cls_dataset.parent, work / "data")
    monkeypatch.chdir(work)
    cfg = tiny_cls_config("data/manifest.csv", "runs", train__max_epochs=1)
    cfg["data"]["cache_dir"] = "cache"
    run = fit(validate(cfg))
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["root"] == str(work / "data" / "manifest.csv")
    assert saved["data"]["cache_dir"] == str(work / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rep = evaluate(work / run)  # was: "data/manifest.csv: dataset not found"
    assert rep["n"] > 0
    out = predict(str(work / run), [str(work / "data" / "manifest.csv")], elsewhere / "preds")
    assert (out / "predictions.csv").is_file()
    assert not (elsewhere / "cache").exists()


def test_only_existing_working_directory_paths_of_model_params_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    cfg = validate({"name": "x", "data": {"root": "d/manifest.csv", "params": {"reports": "r.csv"}},
                    "model": {"name": "baseline_cnn3d",
                              "params": {"encoder_params": {"weights": "w.pt", "hidden": [4]}, "path_hint": "nope",
                                         "widths": [4, 8]}}})
    out = absolute_paths(cfg)
    assert out.data.root == os.path.join(str(tmp_path), "d", "manifest.csv")
    assert out.model.params["encoder_params"] == {"weights": str(tmp_path / "w.pt"), "hidden": [4]}
    assert out.model.params["path_hint"] == "nope" and out.model.params["widths"] == [4, 8]  # missing: as given
    assert out.data.params == {"reports": "r.csv"}  # relative to data.root, untouched


def test_evaluate_takes_data_dicom_overrides_as_predict_does():
    """A test series with a missing slice surfaces only at evaluate (train never reads the test
    split): its fix, data.dicom.on_gap=resample, must be accepted there too."""
    import pytest

    from medfuse.engine.evaluate import check_eval_overrides
    from medfuse.engine.predict import check_predict_overrides
    from medfuse.errors import ConfigError

    ok = ["eval.tta=true", "data.dicom.on_gap=resample", "data.dicom.b_value=highest", "data.root=/moved"]
    assert check_eval_overrides(ok) == ok == check_predict_overrides(ok)
    for bad in (["data.cache_dir=/x"], ["model.name=x"], ["eval.tta"]):
        with pytest.raises(ConfigError, match=r"only eval\.\*, data\.dicom\.\* and data\.root"):
            check_eval_overrides(bad)


def test_a_run_whose_training_data_is_gone_points_at_a_package(cls_dataset, tmp_path, monkeypatch):
    import pytest

    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit
    from medfuse.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(cls_dataset.parent, data)
    run = fit(validate(tiny_cls_config(data / "manifest.csv", tmp_path / "runs", train__max_epochs=1)))
    image = tmp_path / "new.nii.gz"
    shutil.copy(data / "images" / "case000_a.nii.gz", image)
    shutil.copy(data / "images" / "case000_b.nii.gz", tmp_path / "new_b.nii.gz")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    shutil.rmtree(data)
    with pytest.raises(DataError) as err:
        predict(run, [str(image), str(tmp_path / "new_b.nii.gz")], tmp_path / "out")
    line = err.value.one_line()
    assert "the training data of run" in line and "data.root=PATH" in line and "medfuse export RUN" in line
    out = predict(run, [str(image), str(tmp_path / "new_b.nii.gz")], tmp_path / "out",
                  overrides=[f"data.root={moved / 'manifest.csv'}"])  # the dataset's new place
    assert (out / "predictions.csv").is_file()


def test_a_finished_run_with_relative_paths_is_recognised_for_reuse(cls_dataset, tmp_path, monkeypatch):
    """The demo reuses a finished run of the same config; relative --out/data paths, saved absolute,
    made every rerun of `make demo` retrain (the comparison saw other paths)."""
    from medfuse.engine.demo import config_changes
    from medfuse.engine.trainer import fit

    shutil.copytree(cls_dataset.parent, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg = validate(tiny_cls_config("data/manifest.csv", "runs", train__max_epochs=1))
    run = fit(cfg)
    assert config_changes(tmp_path / run, cfg) == []
    other = validate(tiny_cls_config("data/manifest.csv", "runs", train__max_epochs=2))
    assert config_changes(tmp_path / run, other) == ["train.max_epochs"]


def test_a_stage_on_a_config_without_stages_is_refused_before_anything_is_written(cls_dataset, tmp_path):
    import pytest

    from medfuse.engine.trainer import fit
    from medfuse.errors import RunDirError

    with pytest.raises(RunDirError, match="the config has no train.stages: drop --stage"):
        fit(validate(tiny_cls_config(cls_dataset, tmp_path / "runs", train__max_epochs=1)), only_stage="s1",
            resume=True)
    assert not (tmp_path / "runs" / "t" / "splits.csv").exists()
