"""Staging family: every registered variant runs forward and backward; gate semantics; errors."""

from __future__ import annotations

import pytest
import torch

from medfuse.errors import ConfigError, DataError
from medfuse.layers.fusion import GatedFusion
from medfuse.models.staging import FUSIONS, staging

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


def test_bgamf_uses_both_modalities_and_exposes_gate_map():
    torch.manual_seed(0)
    m = staging(["t2w", "dwi"], fusion="bgamf", **SMALL).eval()
    x = _x()
    base = m(x)
    gate = m.gate_map()
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
    m = staging(["t2w", "dwi"], **SMALL)
    batch = {"image": _x(), "present": torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "case_id": ["a", "b"]}
    with pytest.raises(DataError, match="b: modality 'dwi' is missing"):
        m.forward_batch(batch)


@pytest.mark.parametrize("kw, key", [({"fusion": "attention"}, "fusion"), ({"mamba": "tri"}, "mamba")])
def test_bad_switch_is_config_error(kw, key):
    with pytest.raises(ConfigError, match=key):
        staging(["t2w", "dwi"], **kw)


def test_needs_two_modalities():
    with pytest.raises(ConfigError, match="data.modalities"):
        staging(["t2w"], **SMALL)
