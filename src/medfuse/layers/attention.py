"""Multi-head self- and cross-attention on torch SDPA (DESIGN "layers/attention.py").

Shared by every family: the staging MemoryBlock (seed "Spatiotemporal Context Enhancement"), the
BGAMF alignment cross-attention (seed "Alignment-aware Feature Mapping") and the ct_encoder family,
which adds a slice-distance bias built per query block through ``bias_fn``.

The fast path is :func:`torch.nn.functional.scaled_dot_product_attention`; :func:`naive_attention`
is the explicit-softmax reference beside it, used by the parity tests and selectable with
``fused=False``.

Shapes use DESIGN's alphabet: B batch, L tokens (Lq queries, Lk keys), C channels; H here is the
number of heads and Dh the per-head width (C = H * Dh).

Masks are additive float biases (``-inf`` removes a key). ``key_padding_mask`` follows
``nn.MultiheadAttention``: a bool (B, Lk) tensor that is ``True`` at padded keys. A query whose
keys are all masked gets NaN, as in torch.

This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["Attention", "BiasFn", "CrossAttention", "attend", "naive_attention"]

BiasFn = Callable[[int, int], torch.Tensor]
"""``bias_fn(q_start, q_end) -> (B|1, H|1, q_end - q_start, Lk)`` additive bias for a query block."""


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference attention with an explicit softmax (the spec the SDPA path must match).

    Args:
        q: queries, (B, H, Lq, Dh).
        k: keys, (B, H, Lk, Dh).
        v: values, (B, H, Lk, Dv).
        bias: additive float bias broadcastable to (B, H, Lq, Lk), or ``None``.
        dropout_p: dropout on the attention weights (apply only in training).

    Returns:
        (B, H, Lq, Dv).
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _padding_bias(key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, Lk) bool, True = padded  ->  (B, 1, 1, Lk) additive bias (0 or -inf)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padded), got {key_padding_mask.dtype}")
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    bias = bias.masked_fill(key_padding_mask, float("-inf"))
    return bias[:, None, None, :]


def _merge(bias: torch.Tensor | None, pad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is not None:
        bias = bias.to(dtype)
    if pad is None:
        return bias
    return pad if bias is None else bias + pad


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    bias_fn: BiasFn | None = None,
    chunk_size: int | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """Multi-head attention core: the single dispatcher between SDPA and the reference.

    With ``chunk_size`` (or ``bias_fn``) the queries are processed in blocks of ``chunk_size``
    rows, so an (Lq, Lk) bias never has to exist in full: ``bias_fn`` builds each block's rows.
    Every query row sees all keys in every block, so the result equals the unchunked one.

    Args:
        q: (B, H, Lq, Dh).
        k: (B, H, Lk, Dh).
        v: (B, H, Lk, Dv).
        bias: additive bias broadcastable to (B, H, Lq, Lk); exclusive with ``bias_fn``.
        key_padding_mask: bool (B, Lk), True at padded keys.
        bias_fn: ``bias_fn(q_start, q_end) -> (B|1, H|1, q_end - q_start, Lk)``.
        chunk_size: query rows per block (``None``: one block, i.e. all of Lq).
        dropout_p: attention-weight dropout (pass 0.0 in eval).
        fused: use SDPA (``True``) or :func:`naive_attention`.

    Returns:
        (B, H, Lq, Dv).
    """
    if bias is not None and bias_fn is not None:
        raise ValueError("pass either bias or bias_fn, not both")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pad = _padding_bias(key_padding_mask, q.dtype)

    def one(qb: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        mask = _merge(b, pad, qb.dtype)
        if fused:
            return F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, dropout_p=dropout_p)
        return naive_attention(qb, k, v, mask, dropout_p=dropout_p)

    lq = q.shape[-2]
    if chunk_size is None and bias_fn is None:
        return one(q, bias)
    step = lq if chunk_size is None else chunk_size
    outs = []
    for start in range(0, lq, step):
        end = min(start + step, lq)
        if bias_fn is not None:
            b = bias_fn(start, end)
        elif bias is not None and bias.shape[-2] != 1:
            b = bias[..., start:end, :]  # rows of this query block
        else:
            b = bias
        outs.append(one(q[..., start:end, :], b))
    return torch.cat(outs, dim=-2)  # (B, H, Lq, Dv)


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive bias and query chunking.

    Args:
        dim: token width C (divisible by ``num_heads``).
        num_heads: number of heads H.
        qkv_bias: bias in the fused qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        chunk_size: default query-block size for long L (``None``: no chunking unless ``bias_fn``).
        fused: SDPA (``True``) or the explicit-softmax reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        chunk_size: int | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.chunk_size = chunk_size
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        bias_fn: BiasFn | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Attend every token to every token.

        Args:
            x: tokens, (B, L, C).
            bias: additive float bias, (B|1, H|1, L, L), or ``None``.
            key_padding_mask: bool (B, L), True at padded tokens.
            bias_fn: alternative to ``bias`` for long L: ``bias_fn(q_start, q_end)`` returns the
                (B|1, H|1, q_end - q_start, L) rows of the bias for one query block.
            chunk_size: overrides the constructor's ``chunk_size`` for this call.

        Returns:
            (B, L, C).
        """
        qkv = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        out = attend(
            qkv[0], qkv[1], qkv[2], bias=bias, key_padding_mask=key_padding_mask, bias_fn=bias_fn,
            chunk_size=chunk_size if chunk_size is not None else self.chunk_size,
            dropout_p=self.attn_drop if self.training else 0.0, fused=self.fused,
        )  # (B, H, L, Dh)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from queries ``x`` to a ``context`` sequence.

    Args:
        dim: query and output width C (divisible by ``num_heads``).
        num_heads: number of heads H.
        kv_dim: context width Ckv (default: ``dim``).
        qkv_bias: bias in the q and kv projections.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        fused: SDPA (``True``) or the explicit-softmax reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.fused = fused
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend each query token to the context tokens.

        Args:
            x: queries, (B, Lq, C).
            context: keys/values, (B, Lk, Ckv).
            bias: additive float bias, (B|1, H|1, Lq, Lk), or ``None``.
            key_padding_mask: bool (B, Lk), True at padded context tokens.

        Returns:
            (B, Lq, C).
        """
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.num_heads)
        kv = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        out = attend(
            q, kv[0], kv[1], bias=bias, key_padding_mask=key_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0, fused=self.fused,
        )  # (B, H, Lq, Dh)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.proj_drop(self.proj(out))
