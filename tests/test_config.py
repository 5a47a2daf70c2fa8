"""Config schema: loading, overrides, one-line errors that name the key and list valid ones."""

from __future__ import annotations

import pytest
import yaml

from medfuse.config import load_config, save_config
from medfuse.errors import ConfigError


@pytest.fixture()
def cfg_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(
        yaml.safe_dump({"name": "x", "train": {"max_epochs": 4, "lr": 0.01}, "data": {"batch_size": 3}})
    )
    return p


def test_load_and_override(cfg_file):
    cfg = load_config(
        cfg_file, ["train.max_epochs=3", "data.modalities=[t2w, dwi]", "model.params.widths=[8,16]"]
    )
    assert cfg.train.max_epochs == 3
    assert cfg.train.lr == 0.01
    assert cfg.data.modalities == ["t2w", "dwi"]
    assert cfg.model.params["widths"] == [8, 16]


@pytest.mark.parametrize(
    "override, key, listed",
    [
        ("train.max_epoch=3", "train.max_epoch", "max_epochs"),
        ("data.transform.spacing=[1,1,1]", "data.transform", "transforms"),
        ("bogus=1", "bogus", "train"),
        ("data.transforms.intensity.t2w.knd=zscore", "data.transforms.intensity.t2w.knd", "kind"),
    ],
)
def test_unknown_key_names_key_and_lists_valid(cfg_file, override, key, listed):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    line = e.value.one_line()
    assert "\n" not in line
    assert key in line and "unknown key" in line and listed in line


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("train.max_epochs=abc", "train.max_epochs", "int"),
        ("train.optimizer=lion", "train.optimizer", "'adamw'"),
        ("train.mode=up", "train.mode", "'max'"),
    ],
)
def test_wrong_type_names_key_and_expected(cfg_file, override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    line = e.value.one_line()
    assert key in line and hint in line and "\n" not in line


def test_bad_override_syntax(cfg_file):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(cfg_file, ["train.max_epochs"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_save_roundtrip(cfg_file, tmp_path):
    cfg = load_config(cfg_file, ["train.max_epochs=7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg


def test_duplicate_stage_names_refused(cfg_file):
    with pytest.raises(ConfigError, match="unique"):
        load_config(cfg_file, ["train.stages=[{name: a}, {name: a}]"])
