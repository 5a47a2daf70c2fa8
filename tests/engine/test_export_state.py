"""Every registered predictor's package state survives the trip through ``predictor.json``: what
``package_state`` records from a data module, ``package_data`` rebuilds for the predictor (no data set)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from medfuse.config import validate
from medfuse.engine.package import _jsonable
from medfuse.engine.predict import PackagedData, PackagedTable, Predictor
from medfuse.registry import FAMILIES

ENTRIES = [(fam.name, m) for fam in FAMILIES for m in fam.models]
REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}


def _stub_dm():
    """A data module stand-in with every attribute some predictor's ``package_state`` reads."""
    return SimpleNamespace(
        modalities=["flair", "t1"], mask_values=[0, 1, 2], cases={},
        table=SimpleNamespace(class_names=None, mask_labels={"background": 0, "a": 1, "b": 2}),
        raw_regions=dict(REGIONS), region_names=list(REGIONS),  # incomplete_seg
        raw_mask_labels={"background": 0, "necrosis": 1, "edema": 2, "enhancing": 4},
        num_classes=3, _predict_scale=lambda: np.array([0.5, 0.5, 0.5]),  # context_seg
        builder=SimpleNamespace(weights_id="w123"),
        modality="us",  # text_seg
    )


def _cfg(model: str):
    raw = {"model": {"name": model}, "data": {"transforms": {"spatial_size": [8, 16, 16]}}}
    return validate(raw)


@pytest.mark.parametrize(("family", "entry"), ENTRIES, ids=[m.name for _, m in ENTRIES])
def test_package_state_round_trip(family, entry):
    cls = entry.predictor
    assert issubclass(cls, Predictor)
    cfg = _cfg(entry.name)
    state = _jsonable(cls.package_state(_stub_dm(), cfg))
    back = json.loads(json.dumps(state))
    assert back == state
    labels = json.loads(json.dumps(_jsonable(cls.package_labels(_stub_dm(), cfg))))
    assert labels["modalities"] == ["flair", "t1"]
    assert labels["mask_values"] == (None if family == "ct_encoder" else [0, 1, 2])
    data = PackagedData(labels["modalities"], labels["mask_values"],
                        PackagedTable(labels["class_names"], labels["mask_labels"]), (1, 8, 16, 16))
    view = cls.package_data(data, cfg, back)
    pred = cls(None, view, cfg)  # a predictor over the package's view, as load_package builds it
    assert list(view.modalities) == ["flair", "t1"] and pred.dm is view
    if family == "incomplete_seg":
        assert labels["output_labels"] == {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 4}
        assert list(view.raw_regions.items()) == list(REGIONS.items()) and view.region_names == ["WT", "TC", "ET"]
    elif family == "context_seg":
        assert view.num_classes == 3 and view.weights_id == "w123" and view.cases == {}
        np.testing.assert_array_equal(view._predict_scale(), [0.5, 0.5, 0.5])  # the training cases' factor
        assert view.params.raw == "raw" and view.cache_root is None
    elif family == "text_seg":
        assert view.modality == "us" and view.params.image_size == 1024
    elif family == "ct_encoder":
        assert view.params.hu is not None
    else:  # the generic predictors read nothing beyond PackagedData
        assert state == {} and view is data and pred.reference_shape() == (1, 8, 16, 16)


def test_portable_config_drops_training_machine_paths():
    cfg = validate({"model": {"name": "staging", "weights": "/train/init.safetensors",
                              "params": {"feature_cache": "/train/cache"}},
                    "data": {"cache_dir": "/train/monai_cache"}})
    out = Predictor.portable_config(cfg)
    assert out.model.weights is None and out.data.cache_dir is None and out.model.params["feature_cache"] is None
    assert cfg.model.weights == "/train/init.safetensors"  # the run's config is not changed


def test_external_files_are_listed(tmp_path):
    from medfuse.engine.package import external_files

    weights = tmp_path / "medsam_vit_b.pth"
    weights.write_bytes(b"x")
    cfg = validate({"model": {"name": "text_seg", "params": {"image_weights": str(weights)}},
                    "data": {"params": {"modality": "us"}}})
    assert external_files(cfg) == {"model.params.image_weights": str(weights)}
    assert external_files(validate({"model": {"name": "text_seg"}})) == {}
