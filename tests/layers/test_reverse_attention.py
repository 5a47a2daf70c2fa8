"""Reverse attention adapter: the UniMRSeg formula against a written-out reference, on outputs and
gradients; strides, layer scale and the peer's depth-averaged variant."""

from __future__ import annotations

import pytest
import torch

from medfuse.layers.reverse_attention import ReverseAttentionAdapter


def _reference(a: ReverseAttentionAdapter, fc: torch.Tensor, prev: torch.Tensor, reduce_depth: bool) -> torch.Tensor:
    h = a.cbr_f(fc) + a.cbr_p(prev)
    t = a.block(h)
    m = t.mean(dim=(1, 2), keepdim=True) if reduce_depth else t.mean(dim=1, keepdim=True)
    gamma = a.gamma if a.gamma is not None else 1.0
    return fc + gamma * (1 - torch.sigmoid(m)) * h


@pytest.mark.parametrize("stride, layer_scale, reduce_depth", [(2, 0.1, False), (1, None, False), (2, 1.0, True)])
def test_matches_reference_on_outputs_and_gradients(stride, layer_scale, reduce_depth):
    torch.manual_seed(0)
    a = ReverseAttentionAdapter(6, 4, stride=stride, layer_scale=layer_scale, reduce_depth=reduce_depth)
    prev = torch.randn(2, 4, 6, 8, 8, requires_grad=True)
    s = (6 // stride, 8 // stride, 8 // stride)
    fc = torch.randn(2, 6, *s, requires_grad=True)
    out = a(fc, prev)
    ref = _reference(a, fc, prev, reduce_depth)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), [fc, prev, *a.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [fc, prev, *a.parameters()])
    for x, y in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(x, y)
    assert all(g.abs().sum() > 0 for g in g_out)
    out2, att = a(fc, prev, return_attention=True)
    torch.testing.assert_close(out2, out)
    assert not att.requires_grad and not any(k.startswith("last_") for k in vars(a))
    assert att.shape == ((2, 1, 1, *s[1:]) if reduce_depth else (2, 1, *s))
    assert float(att.min()) > 0 and float(att.max()) < 1


def test_small_layer_scale_keeps_the_frozen_features_at_start():
    torch.manual_seed(0)
    fc, prev = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 2, 8, 8, 8)
    near = ReverseAttentionAdapter(4, 2, layer_scale=1e-4)
    full = ReverseAttentionAdapter(4, 2, layer_scale=None)
    assert (near(fc, prev) - fc).abs().max() < 1e-3
    assert (full(fc, prev) - fc).abs().max() > 1e-2
    assert near.gamma is not None and full.gamma is None


def test_mismatched_grids_are_refused():
    a = ReverseAttentionAdapter(4, 2, stride=1)
    with pytest.raises(ValueError, match="prev maps to"):
        a(torch.randn(1, 4, 4, 4, 4), torch.randn(1, 2, 8, 8, 8))
