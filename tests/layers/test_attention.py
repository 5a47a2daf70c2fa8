"""SDPA attention against the explicit-softmax reference, chunking, cross-attention, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfuse.layers.attention import Attention, CrossAttention, attend, naive_attention

B, H, L, C = 2, 4, 10, 16


def _assert_all_grads(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert all(p.grad.abs().sum() > 0 for p in module.parameters())


def _bias(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _qkv(lq: int = L, lk: int = L) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(B, H, lq, 8), (B, H, lk, 8), (B, H, lk, 8)]
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return list(torch.autograd.grad((out * weight).sum(), leaves))


@pytest.mark.parametrize("bias_shape", [None, (B, H, L, L), (1, 1, L, L), (B, 1, L, L), (1, H, 1, L)])
def test_sdpa_matches_naive_outputs_and_grads(bias_shape):
    q, k, v = _qkv()
    bias = None if bias_shape is None else _bias(bias_shape)
    fast = attend(q, k, v, bias=bias)
    ref = naive_attention(q, k, v, bias)
    torch.testing.assert_close(fast, ref)
    for g_fast, g_ref in zip(_grads(fast, [q, k, v]), _grads(ref, [q, k, v]), strict=True):
        torch.testing.assert_close(g_fast, g_ref)


def test_bias_changes_the_output():
    q, k, v = _qkv()
    assert not torch.allclose(attend(q, k, v), attend(q, k, v, bias=_bias((1, 1, L, L))))


@pytest.mark.parametrize("bias", [None, "full"])
def test_attention_module_fused_matches_reference(bias):
    torch.manual_seed(0)
    fast = Attention(C, num_heads=H).double()
    ref = Attention(C, num_heads=H, fused=False).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    b = None if bias is None else _bias((B, H, L, L))
    y_fast, y_ref = fast(x, bias=b), ref(x, bias=b)
    assert y_fast.shape == (B, L, C)
    torch.testing.assert_close(y_fast, y_ref)
    g_fast = _grads(y_fast, [x, *fast.parameters()])
    g_ref = _grads(y_ref, [x, *ref.parameters()])
    for a, r in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, L, 64])
@pytest.mark.parametrize("fused", [True, False])
def test_chunked_bias_fn_equals_full_bias(chunk_size, fused):
    torch.manual_seed(0)
    attn = Attention(C, num_heads=H, fused=fused).double()
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    # slice-distance-like bias: -|z_i - z_j| per head, built full and per query block
    z = torch.arange(L, dtype=torch.float64) // 3
    slope = torch.linspace(0.1, 1.0, H, dtype=torch.float64)[None, :, None, None]
    full = -slope * (z[:, None] - z[None, :]).abs()  # (1, H, L, L)
    calls = []

    def bias_fn(s: int, e: int) -> torch.Tensor:
        calls.append((s, e))
        return -slope * (z[s:e, None] - z[None, :]).abs()  # (1, H, e - s, L)

    y_full = attn(x, bias=full)
    y_chunk = attn(x, bias_fn=bias_fn, chunk_size=chunk_size)
    torch.testing.assert_close(y_chunk, y_full)
    expected_blocks = -(-L // chunk_size)
    assert len(calls) == expected_blocks and calls[-1][1] == L
    leaves = [x, *attn.parameters()]
    for a, r in zip(_grads(y_chunk, leaves), _grads(y_full, leaves), strict=True):
        torch.testing.assert_close(a, r)


def test_chunked_full_bias_equals_unchunked():
    torch.manual_seed(0)
    attn = Attention(C, num_heads=H, chunk_size=3).double()
    x = torch.randn(B, L, C, dtype=torch.float64)
    b = _bias((B, H, L, L))
    torch.testing.assert_close(attn(x, bias=b), attn(x, bias=b, chunk_size=L + 1))


def test_bias_and_bias_fn_are_exclusive():
    attn = Attention(C, num_heads=H)
    with pytest.raises(ValueError, match="either bias or bias_fn"):
        attn(torch.randn(1, L, C), bias=torch.zeros(1, 1, L, L), bias_fn=lambda s, e: torch.zeros(1, 1, e - s, L))


def test_key_padding_mask_equals_dropping_the_padded_tokens():
    torch.manual_seed(0)
    attn = Attention(C, num_heads=H).double().eval()
    x = torch.randn(1, L, C, dtype=torch.float64)
    pad = torch.zeros(1, L, dtype=torch.bool)
    pad[:, 7:] = True
    y = attn(x, key_padding_mask=pad)
    torch.testing.assert_close(y[:, :7], attn(x[:, :7]))


@pytest.mark.parametrize(("kv_dim", "lk"), [(None, 5), (24, 5), (7, 2), (32, 13)])
def test_cross_attention_shapes_and_grads(kv_dim, lk):
    torch.manual_seed(0)
    xa = CrossAttention(C, num_heads=H, kv_dim=kv_dim)
    x = torch.randn(B, L, C)
    ctx = torch.randn(B, lk, kv_dim or C)
    y = xa(x, ctx)
    assert y.shape == (B, L, C)
    y.square().mean().backward()
    _assert_all_grads(xa)


def test_cross_attention_matches_reference_with_bias():
    torch.manual_seed(0)
    fast = CrossAttention(C, num_heads=H, kv_dim=12).double()
    ref = CrossAttention(C, num_heads=H, kv_dim=12, fused=False).double()
    ref.load_state_dict(fast.state_dict())
    x, ctx = torch.randn(B, L, C, dtype=torch.float64), torch.randn(B, 6, 12, dtype=torch.float64)
    b = _bias((B, 1, L, 6))
    torch.testing.assert_close(fast(x, ctx, bias=b), ref(x, ctx, bias=b))


def test_cross_attention_depends_on_context():
    torch.manual_seed(0)
    xa = CrossAttention(C, num_heads=H, kv_dim=8)
    x = torch.randn(1, L, C)
    assert not torch.allclose(xa(x, torch.randn(1, 4, 8)), xa(x, torch.randn(1, 4, 8)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_every_param_gets_grad(with_bias):
    torch.manual_seed(0)
    attn = Attention(C, num_heads=H, attn_drop=0.1, proj_drop=0.1)
    x = torch.randn(B, L, C)
    y = attn(x, bias=torch.randn(1, H, L, L) if with_bias else None)
    y.square().mean().backward()
    _assert_all_grads(attn)


def test_dim_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=4)
