"""Staging family: every registered variant runs forward and backward; gate semantics; errors."""

from __future__ import annotations

import pytest
import torch

from medfuse.config import validate_params
from medfuse.errors import ConfigError, DataError
from medfuse.families.staging.model import FUSIONS
from medfuse.families.staging.params import StagingParams, build_staging
from medfuse.families.staging.task import StagingTask
from medfuse.layers.fusion import GatedFusion


def staging(modalities, **kw):
    """Build through the family's params model, as the engine does (bad keys -> ConfigError)."""
    return build_staging(validate_params(StagingParams, {"modalities": modalities, **kw}, "model.params"))

SMALL = dict(dim=16, num_heads=2, num_prototypes=4, d_state=4, token_pool=4, memory_mode="full",
             encoder_params={"out_channels": 8, "hidden": (4, 8)})


def _x(b=2, d=3, hw=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 2, d, hw, hw, generator=g)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("memory_block, mamba, memory_mode", [(True, "bi", "full"), (False, "uni", "full"),
                                                              (True, "bi", "factorized")])
def test_variant_forward_backward_all_params_get_grad(fusion, memory_block, mamba, memory_mode):
    torch.manual_seed(0)
    params = dict(SMALL, memory_mode=memory_mode)
    m = staging(["t2w", "dwi"], num_classes=4, fusion=fusion, memory_block=memory_block, mamba=mamba, **params)
    logits = m(_x())
    assert logits.shape == (2, 4)
    logits.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


@pytest.mark.parametrize("align, branch_mamba", [(False, True), (True, False), (False, False)])
def test_bgamf_component_switches_train_every_parameter(align, branch_mamba):
    torch.manual_seed(0)
    m = staging(["t2w", "dwi"], num_classes=2, fusion="bgamf", bgamf_align=align, bgamf_mamba=branch_mamba, **SMALL)
    assert (m.bgamf.align_a is not None) == align and (m.bgamf.mamba_a is not None) == branch_mamba
    m(_x()).logsumexp(-1).sum().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_bgamf_branches_start_near_identity():
    from medfuse.families.staging.bgamf import BGAMF

    a, b = torch.randn(2, 48, 16), torch.randn(2, 48, 16)
    out = {}
    for scale in (0.01, 1.0):
        torch.manual_seed(0)  # the same weights up to the scale of the branch outputs
        out[scale] = BGAMF(16, num_heads=2, d_state=4, init_scale=scale).eval()
    gate_only = BGAMF(16, num_heads=2, d_state=4, align=False, branch_mamba=False).eval()
    gate_only.fuse.load_state_dict(out[1.0].fuse.state_dict())
    with torch.no_grad():
        f_gate = gate_only(a, b, (3, 4, 4))[0]
        d_small = (out[0.01](a, b, (3, 4, 4))[0] - f_gate).abs().mean()
        d_full = (out[1.0](a, b, (3, 4, 4))[0] - f_gate).abs().mean()
    assert d_small < 0.05 * d_full  # scaled branches barely move the gated blend at init


def test_frozen_encoder_features_come_from_the_disk_cache(tmp_path):
    torch.manual_seed(0)
    m = staging(["t2w", "dwi"], num_classes=2, freeze_encoder=True, feature_cache=str(tmp_path / "feats"),
                **SMALL).eval()
    x = _x()
    first = m(x)
    assert m.extractor.stats == {"hits": 0, "misses": 4}  # 2 cases x 2 modalities
    second = m(x)
    assert m.extractor.stats["hits"] == 4
    torch.testing.assert_close(first, second)
    assert len(list((tmp_path / "feats").rglob("*.safetensors"))) == 4
    trainable = staging(["t2w", "dwi"], num_classes=2, feature_cache=str(tmp_path / "feats"), **SMALL)
    assert trainable.extractor.cache_dir is None  # a trainable encoder never reads stale features


@pytest.mark.parametrize("fusion, used, unused", [("t2w_only", 0, 1), ("dwi_only", 1, 0)])
def test_single_modality_variants_ignore_the_other(fusion, used, unused):
    torch.manual_seed(0)
    m = staging(["t2w", "dwi"], fusion=fusion, **SMALL).eval()
    x = _x()
    y = x.clone()
    y[:, unused] = torch.rand_like(y[:, unused])
    torch.testing.assert_close(m(x), m(y))
    z = x.clone()
    z[:, used] = torch.rand_like(z[:, used])
    assert not torch.allclose(m(x), m(z))


def test_bgamf_uses_both_modalities_and_returns_gate_map():
    torch.manual_seed(0)
    m = staging(["t2w", "dwi"], fusion="bgamf", **SMALL).eval()
    x = _x()
    base, inter = m.forward_intermediates(x)
    torch.testing.assert_close(base, m(x))
    gate = inter["gate"]
    assert not any(k.startswith("last_") for k in vars(m))  # nothing left on the module
    assert gate.shape == (2, 3, 4, 4) and float(gate.min()) > 0 and float(gate.max()) < 1
    for c in (0, 1):
        y = x.clone()
        y[:, c] = torch.rand_like(y[:, c])
        assert not torch.allclose(m(y), base)


def test_gated_fusion_formula():
    torch.manual_seed(0)
    gf = GatedFusion(6)
    a, b = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    f, g = gf(a, b)
    g_ref = torch.sigmoid(gf.gate(torch.cat([a, b], -1)))
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(f, g_ref * a + (1 - g_ref) * b)


def test_bi_mamba_adds_backward_branch_params():
    torch.manual_seed(0)
    bi = staging(["t2w", "dwi"], mamba="bi", **SMALL)
    uni = staging(["t2w", "dwi"], mamba="uni", **SMALL)
    assert sum(p.numel() for p in bi.parameters()) > sum(p.numel() for p in uni.parameters())


def test_missing_modality_refused():
    task = StagingTask({"model": {"name": "staging", "params": SMALL}}, auto={"modalities": ["t2w", "dwi"],
                                                                               "num_classes": 2})
    assert task.cfg.family == "staging" and task.cfg.task == "classification"
    batch = {"image": _x(), "present": torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "case_id": ["a", "b"]}
    with pytest.raises(DataError, match="b: modality 'dwi' is missing"):
        task.forward_batch(batch)


@pytest.mark.parametrize("fusion", ["sum", "t2w_only"])
def test_no_gate_without_bgamf(fusion):
    m = staging(["t2w", "dwi"], fusion=fusion, **SMALL).eval()
    assert m.forward_intermediates(_x())[1] == {}


@pytest.mark.parametrize("key, value, msg", [("no_such_key", 1, "unknown key"), ("dim", "wide", "dim"),
                                             ("fusion", "attention", "fusion")])
def test_params_errors_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=f"model.params.{key}") as e:
        staging(["t2w", "dwi"], **{key: value})
    assert "\n" not in e.value.one_line() and msg in e.value.one_line()


@pytest.mark.parametrize("kw, key", [({"fusion": "attention"}, "fusion"), ({"mamba": "tri"}, "mamba")])
def test_bad_switch_is_config_error(kw, key):
    with pytest.raises(ConfigError, match=key):
        staging(["t2w", "dwi"], **kw)


def test_needs_two_modalities():
    with pytest.raises(ConfigError, match="data.modalities"):
        staging(["t2w"], **SMALL)
