"""The family registry as a whole: every family is one complete record the engine can drive.

Each family's own tests (``tests/families/<name>/``) build every model it registers, run a forward
and backward pass and check that every trainable parameter gets a gradient; this file checks the
records themselves, so that a new family cannot land half-wired.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from medfuse.config import Params
from medfuse.engine.evaluate import Evaluator
from medfuse.engine.predict import Predictor
from medfuse.engine.tasks import BaseTask
from medfuse.registry import CONFIG_DIR, FAMILIES

TESTS = Path(__file__).parent
ENTRIES = [(f.name, m.name) for f in FAMILIES for m in f.models]


def test_the_built_in_families_are_registered_once_each():
    assert FAMILIES.names() == ["baseline", "staging", "ct_encoder", "text_seg", "incomplete_seg", "context_seg"]


@pytest.mark.parametrize("family, model", ENTRIES)
def test_model_entry_is_complete(family, model):
    fam = FAMILIES.get(family)
    entry = fam.model(model)
    assert FAMILIES.find_model(model) == (fam, entry)
    assert issubclass(entry.params, Params)
    assert issubclass(entry.task, BaseTask) and entry.task.kind in ("classification", "segmentation", "contrastive")
    assert issubclass(entry.evaluator, Evaluator) and issubclass(entry.predictor, Predictor)
    undocumented = [k for k, f in entry.params.model_fields.items() if not f.description]
    assert undocumented == [], f"{model}: params without a description ({undocumented})"
    entry.params()  # the defaults validate


@pytest.mark.parametrize("family", FAMILIES.names())
def test_family_has_configs_tests_and_a_gradient_test(family):
    fam = FAMILIES.get(family)
    if fam.data_params is not None:
        assert issubclass(fam.data_params, Params)
        assert [k for k, f in fam.data_params.model_fields.items() if not f.description] == []
    assert fam.demo_config.is_file(), f"ship configs/{family}_demo.yaml"
    assert fam.demo_ablations and fam.demo_ablations[0][1] == (), "the first demo variant is the full model"
    folder = TESTS / family
    tests = sorted(folder.glob("test_*.py"))
    assert tests, f"tests/families/{family}/ holds the family's tests"
    names = [n.name for t in tests for n in ast.walk(ast.parse(t.read_text(encoding="utf-8")))
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert any("grad" in n for n in names), f"{family}: no test checks that every parameter gets a gradient"
    assert any("once" in n for n in names) or family == "baseline", f"{family}: no evaluate-once counting test"


def test_demo_configs_name_their_family():
    from medfuse.config import load_config
    from medfuse.engine.build import resolve

    for fam in FAMILIES:
        cfg = resolve(load_config(fam.demo_config))
        assert cfg.family == fam.name, fam.name
    assert sorted(p.name for p in CONFIG_DIR.glob("*_demo.yaml")) == sorted(f"{f}_demo.yaml" for f in FAMILIES.names())
