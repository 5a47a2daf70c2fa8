"""The dataset configs of issue 14 load, and their model.params / data.params validate against their family."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfuse.config import load_config, validate_params

CONFIGS = Path(__file__).parents[2] / "src" / "medfuse" / "configs"
NAMES = ["context_seg_cellmap", "text_seg_nsclc", "ct_encoder_ctrate", "ct_encoder_ctrate_v1",
         "ct_encoder_omniabnorm", "staging_rectal"]


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_with_its_family(name):
    import medfuse.families  # noqa: F401 - registers the families
    from medfuse.registry import FAMILIES

    cfg = load_config(CONFIGS / f"{name}.yaml")
    family, entry = FAMILIES.find_model(cfg.model.name)
    assert cfg.name == name and name.startswith(family.name)  # <family>_<dataset>.yaml
    validate_params(entry.params, cfg.model.params, "model.params")
    if family.data_params is not None:
        validate_params(family.data_params, cfg.data.params, "data.params")
    header = (CONFIGS / f"{name}.yaml").read_text(encoding="utf-8").split("\nname:")[0]
    assert "Tiny CPU smoke run" in header and "data check" in header
