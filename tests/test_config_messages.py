"""Config errors read well: a bad value given on the command line is named as an override (not
blamed on the YAML file), validator messages lose pydantic's "Value error," prefix, and
data.dicom.b_value says what it takes."""

from __future__ import annotations

import pytest

from medfuse.config import load_config
from medfuse.errors import ConfigError


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel: {name: baseline_cnn3d}\ndata: {dicom: {on_gap: error}}\n")
    return path


def test_a_bad_override_is_named_as_an_override(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file, ["data.dicom.b_value=abc"])
    line = err.value.one_line()
    assert line.startswith("override data.dicom.b_value:") and str(yaml_file) not in line
    assert 'is not a b-value: give a number of s/mm² >= 0 (e.g. 800) or "highest"' in line
    assert "Value error" not in line and "constrained-float" not in line


def test_a_bad_value_in_the_file_is_named_by_the_file(yaml_file):
    yaml_file.write_text("name: x\nmodel: {name: baseline_cnn3d}\ndata: {dicom: {b_value: -5}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file, ["train.max_epochs=2"])
    assert err.value.one_line().startswith(f"{yaml_file}: data.dicom.b_value:")


@pytest.mark.parametrize(("given", "value"), [("800", 800.0), ("highest", "highest"), ("HIGHEST", "highest")])
def test_b_value_accepts_numbers_and_highest(yaml_file, given, value):
    assert load_config(yaml_file, [f"data.dicom.b_value={given}"]).data.dicom.b_value == value
