"""encoder_params the encoder does not take are one line, not a TypeError traceback (a YAML flow map
without a space after the colon, ``{out_channels:16}``, reads as the key ``out_channels:16``)."""

from __future__ import annotations

import pytest
import yaml

import medfuse.encoders  # noqa: F401 - registers the encoders
from medfuse.encoders.base import build_encoder
from medfuse.errors import ConfigError


def test_a_key_without_a_space_after_its_colon_is_named_with_the_fix():
    params = yaml.safe_load("{out_channels:16, hidden: [8, 16]}")
    assert "out_channels:16" in params
    with pytest.raises(ConfigError) as err:
        build_encoder("tiny", **params)
    line = err.value.one_line()
    assert "'out_channels:16'" in line and "space after each colon" in line and "out_channels, hidden" in line


def test_an_unknown_key_and_a_good_call():
    with pytest.raises(ConfigError, match="takes no 'widht'"):
        build_encoder("tiny", widht=3)
    assert build_encoder("tiny", out_channels=8, hidden=[4, 8]) is not None
