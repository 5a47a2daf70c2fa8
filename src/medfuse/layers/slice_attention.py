"""Slice-aware multi-head self-attention (seed 001, "3. Slice-Aware Multi-Head Attention").

Every head h adds a learnable bias ``table[h, min(|z_q - z_k|, K - 1)]`` to its attention logits,
where z is a token's slice index in patch units and K = 32 (so |dz| is clamped at 31, as in the
seed). Patches in the same or adjacent slices can thus attend more (or less) to each other than
distant ones.

The seed builds the bias as a dense (B, heads, N, N) tensor. At the default volume (64, 512, 512)
with (4, 16, 16) patches, N = 16 x 32 x 32 = 16,384 tokens and one fp32 (12, N, N) bias is 12.9 GB,
so that is never done here. :func:`slice_attention` dispatches between exact implementations that
never materialise it:

``flex``
    FlexAttention with a ``score_mod`` that looks the bias up per score (CUDA; compiled once per
    shape). The default on CUDA. On CPU FlexAttention has no backward pass, so it is never chosen
    automatically there.
``fold``
    The bias depends on (z_q, z_k) only, so it is a product of per-token vectors: with S distinct
    slices, ``bias[q, k] = T[z_q] . onehot(z_k)`` where ``T[a, b] = table[h, min(|a - b|, K - 1)]``
    is an (S, S) matrix. Appending ``T[z_q] / scale`` to each query and ``onehot(z_k)`` to each key
    (and S zeros to each value) gives the biased logits exactly inside one fused SDPA call (flash
    attention on CPU and GPU: O(N) memory). Costs S extra head channels; the default on CPU when
    S <= ``FOLD_MAX_SLICES``.
``chunked``
    Query blocks of ``chunk_size`` rows through :func:`medfuse.layers.attention.attend`, each with
    its own (heads, rows, N) bias; in training every block is recomputed in the backward pass
    (activation checkpointing). Memory O(heads * rows * N).
``naive``
    :func:`naive_slice_attention`, the dense reference (the spec; tests only).

Parity of every path against ``naive`` (outputs and gradients) is in
``tests/layers/test_slice_attention.py``; time and memory are in ``docs/benchmarks_ct_encoder.md``.

Shapes: B batch, H heads, N tokens, Dh head width, C = H * Dh, S distinct slices.
This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfuse.layers.attention import attend

__all__ = ["FOLD_MAX_SLICES", "IMPLS", "MAX_DISTANCE", "SliceAwareAttention", "naive_slice_attention",
           "slice_attention", "slice_distance_bias"]

MAX_DISTANCE = 32  # bias table entries; |dz| >= 31 share the last one (seed: clamp(max=31))
FOLD_MAX_SLICES = 64  # above this many distinct slices the fold path's extra channels cost too much
IMPLS = ("auto", "flex", "fold", "chunked", "naive")
_FLEX_BROKEN = False


def slice_distance_bias(table: torch.Tensor, zq: torch.Tensor, zk: torch.Tensor) -> torch.Tensor:
    """The bias rows for queries at slices ``zq`` against keys at ``zk``.

    Args:
        table: (H, K) learnable bias per head and clamped distance.
        zq: (Lq,) integer slice index of each query.
        zk: (Lk,) integer slice index of each key.

    Returns:
        (H, Lq, Lk) with entry ``table[h, min(|zq - zk|, K - 1)]``.
    """
    dz = (zq[:, None] - zk[None, :]).abs().clamp(max=table.shape[1] - 1)  # (Lq, Lk)
    return table[:, dz]


def naive_slice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                          table: torch.Tensor) -> torch.Tensor:
    """Reference: dense (H, N, N) bias and explicit softmax, as the seed writes it.

    Args:
        q, k: (B, H, N, Dh).
        v: (B, H, N, Dv).
        z: (N,) integer slice index per token.
        table: (H, K) bias table.

    Returns:
        (B, H, N, Dv).
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    scores = scores + slice_distance_bias(table, z, z).to(scores.dtype)
    return scores.softmax(dim=-1) @ v


def _fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = q.shape
    dv = v.shape[-1]
    slices, zi = torch.unique(z, return_inverse=True)  # zi: (N,) index into the S distinct slices
    s = slices.shape[0]
    width = -(-max(dh + s, dv) // 8) * 8  # one head width for q, k and v, a multiple of 8 (fused kernels)
    pad = width - dh - s
    scale = dh ** -0.5
    t = slice_distance_bias(table, slices, slices)  # (H, S, S): bias of query slice a to key slice b
    qa = (t[:, zi] / scale).to(q.dtype)  # (H, N, S); SDPA multiplies by scale again
    ka = F.one_hot(zi, s).to(k.dtype)  # (N, S)
    qq = torch.cat([q, qa.expand(b, h, n, s), q.new_zeros(b, h, n, pad)], dim=-1)  # (B, H, N, Dh + S + pad)
    kk = torch.cat([k, ka.expand(b, h, n, s), k.new_zeros(b, h, n, pad)], dim=-1)
    vv = F.pad(v, (0, qq.shape[-1] - dv))  # zeros: the extra channels carry no value
    out = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
    return out[..., :dv]


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    kmax = table.shape[1] - 1
    table = table.to(q.dtype)

    def score_mod(score, b, h, qi, ki):
        return score + table[h, (z[qi] - z[ki]).abs().clamp(max=kmax)]

    return _compiled_flex(flex_attention)(q, k, v, score_mod=score_mod)


_FLEX_CACHE: dict[str, object] = {}


def _compiled_flex(fn):
    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = torch.compile(fn, dynamic=False)
    return _FLEX_CACHE["fn"]


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, table: torch.Tensor,
             chunk_size: int) -> torch.Tensor:
    def block(qb: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        bias = slice_distance_bias(table, zq, z)[None].to(qb.dtype)  # (1, H, rows, N): this block's rows only
        return attend(qb, k, v, bias=bias)

    # In training each block is recomputed in the backward pass, so autograd never holds more than
    # one block's bias and attention weights at a time (otherwise it would keep all of them).
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, table))
    outs = []
    for start in range(0, q.shape[-2], chunk_size):
        qb, zq = q[..., start: start + chunk_size, :], z[start: start + chunk_size]
        outs.append(checkpoint(block, qb, zq, use_reentrant=False) if grad else block(qb, zq))
    return torch.cat(outs, dim=-2)  # (B, H, N, Dv)


def _flex_available(q: torch.Tensor) -> bool:
    if _FLEX_BROKEN or not q.is_cuda:
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, q: torch.Tensor, n_slices: int) -> str:
    """The implementation ``impl="auto"`` picks for these inputs (see module doc)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if _flex_available(q):
        return "flex"
    return "fold" if n_slices <= FOLD_MAX_SLICES else "chunked"


def slice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, table: torch.Tensor,
                    impl: str = "auto", chunk_size: int = 1024) -> torch.Tensor:
    """Attention with the slice-distance bias; the single dispatcher (see module doc).

    Args:
        q, k: (B, H, N, Dh).
        v: (B, H, N, Dv).
        z: (N,) integer slice index of every token (shared by the batch: one grid per batch).
        table: (H, K) bias table; |dz| is clamped at K - 1.
        impl: ``auto`` | ``flex`` | ``fold`` | ``chunked`` | ``naive``.
        chunk_size: query rows per block of the ``chunked`` path.

    Returns:
        (B, H, N, Dv), equal (to rounding) whichever path runs.
    """
    global _FLEX_BROKEN
    if z.ndim != 1 or z.shape[0] != q.shape[-2]:
        raise ValueError(f"z must be (N,) = ({q.shape[-2]},), got {tuple(z.shape)}")
    z = z.to(device=q.device, dtype=torch.long)
    n_slices = int(torch.unique(z).numel()) if impl in ("auto", "fold") else 0
    path = resolve_impl(impl, q, n_slices)
    if path == "flex":
        try:
            return _flex(q, k, v, z, table)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop training
            if impl == "flex":
                raise
            _FLEX_BROKEN = True
            warnings.warn(f"FlexAttention failed ({type(exc).__name__}: {exc}); using the fold path instead",
                          stacklevel=2)
            path = "fold" if int(torch.unique(z).numel()) <= FOLD_MAX_SLICES else "chunked"
    if path == "fold":
        return _fold(q, k, v, z, table)
    if path == "chunked":
        return _chunked(q, k, v, z, table, chunk_size)
    return naive_slice_attention(q, k, v, z, table)


class SliceAwareAttention(nn.Module):
    """Multi-head self-attention with a learnable per-head |dz| bias (seed ``SliceAwareAttention``).

    Args:
        dim: token width C (divisible by ``num_heads``).
        num_heads: heads H.
        max_distance: bias table size K; |dz| >= K - 1 share one entry (32: clamp at 31).
        slice_bias: add the bias (``False``: plain SDPA attention, the ablation).
        qkv_bias: bias in the qkv projection.
        proj_drop: dropout after the output projection.
        impl: implementation, see :func:`slice_attention`.
        chunk_size: query rows per block of the ``chunked`` path.

    The table starts at zero (the seed's initialisation), i.e. as plain attention. The seed also
    multiplies the table by a constant ``slice_distance_weight=0.5``; that only rescales a
    learnable parameter and is left out.
    """

    def __init__(self, dim: int, num_heads: int = 8, max_distance: int = MAX_DISTANCE, slice_bias: bool = True,
                 qkv_bias: bool = True, proj_drop: float = 0.0, impl: str = "auto", chunk_size: int = 1024):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.slice_bias = nn.Parameter(torch.zeros(num_heads, max_distance)) if slice_bias else None

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Attend every token to every token.

        Args:
            x: tokens, (B, N, C).
            z: (N,) integer slice index (patch units) of every token.

        Returns:
            (B, N, C).
        """
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.slice_bias is None:
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        else:
            out = slice_attention(qkv[0], qkv[1], qkv[2], z, self.slice_bias, impl=self.impl,
                                  chunk_size=self.chunk_size)  # (B, H, N, Dh)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
