"""MemoryBlock: spatio-temporal self-attention plus a learnable prototype memory.

Implements seed "Spatiotemporal-Enhanced MedSAM2-Mamba", section 3 "Spatiotemporal Context
Enhancement (MemoryBlock)": the (B, L, C) slice-major sequence built from per-slice encoder
features (L = D * h * w; "spatio" = within a slice, "temporal" = along the slice axis D) goes
through, each pre-norm with a residual,

1. spatio-temporal self-attention over the tokens,
2. cross-attention from the tokens to K learnable prototypes (the "prototype memory"),
3. a GELU feed-forward network.

Self-attention over all L tokens costs O(L^2); for large volumes ``mode="factorized"`` replaces it
by within-slice attention (h * w tokens per slice) followed by across-slice attention (D tokens per
(y, x) position), each with its own pre-norm and residual. ``mode="auto"`` picks full attention
when L <= ``full_max_tokens`` and factorized attention above.

The block adds no positional encoding: callers add one (``layers.pos_embed.PosEmbed3d``) first.

This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from medfuse.layers.attention import Attention, CrossAttention

__all__ = ["MODES", "MemoryBlock"]

MODES = ("auto", "full", "factorized")


class MemoryBlock(nn.Module):
    """Spatio-temporal self-attention, prototype cross-attention and FFN, each pre-norm + residual.

    Parameter layout: ``norm_attn``/``attn`` serve full attention and, in factorized mode, the
    within-slice attention; ``norm_depth``/``attn_depth`` (across-slice attention) exist only in
    the ``factorized`` and ``auto`` modes. So a ``full`` state dict is a subset of an ``auto`` one.
    In ``auto`` mode the across-slice weights receive gradients only for inputs above
    ``full_max_tokens``.

    Args:
        dim: token width C.
        num_heads: attention heads (``dim`` must be divisible by it).
        num_prototypes: K, rows of the prototype memory.
        mlp_ratio: FFN hidden width as a multiple of ``dim``.
        mode: ``"auto"``, ``"full"`` or ``"factorized"``.
        full_max_tokens: the largest L that ``auto`` attends in full.
        drop: dropout after each projection and inside the FFN.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_prototypes: int = 16,
        mlp_ratio: float = 4.0,
        mode: str = "auto",
        full_max_tokens: int = 4096,
        drop: float = 0.0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        self.mode = mode
        self.full_max_tokens = full_max_tokens
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        if mode != "full":
            self.norm_depth = nn.LayerNorm(dim)
            self.attn_depth = Attention(dim, num_heads, proj_drop=drop)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, dim))  # (K, C)
        nn.init.trunc_normal_(self.prototypes, std=0.02, a=-0.04, b=0.04)
        self.norm_mem = nn.LayerNorm(dim)
        self.mem_attn = CrossAttention(dim, num_heads, proj_drop=drop)
        hidden = int(dim * mlp_ratio)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop)
        )

    def resolve_mode(self, num_tokens: int) -> str:
        """The attention mode used for a sequence of ``num_tokens`` tokens: ``"full"`` or ``"factorized"``."""
        if self.mode == "auto":
            return "full" if num_tokens <= self.full_max_tokens else "factorized"
        return self.mode

    def mix_tokens(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """The spatio-temporal self-attention step with its residual(s).

        Args:
            x: tokens, (B, L, C), L = D * h * w slice-major.
            grid: (D, h, w).

        Returns:
            (B, L, C).
        """
        D, h, w = grid
        if self.resolve_mode(x.shape[1]) == "full":
            return x + self.attn(self.norm_attn(x))
        # within-slice: every slice is its own sequence of h*w tokens
        t = rearrange(x, "b (d h w) c -> (b d) (h w) c", d=D, h=h, w=w)  # (B*D, h*w, C)
        t = t + self.attn(self.norm_attn(t))
        # across-slice: every (y, x) position is its own sequence of D tokens
        t = rearrange(t, "(b d) (h w) c -> (b h w) d c", d=D, h=h, w=w)  # (B*h*w, D, C)
        t = t + self.attn_depth(self.norm_depth(t))
        return rearrange(t, "(b h w) d c -> b (d h w) c", h=h, w=w)  # (B, L, C)

    def read_memory(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention from tokens (B, L, C) to the prototypes, with residual -> (B, L, C)."""
        protos = self.prototypes.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, K, C)
        return x + self.mem_attn(self.norm_mem(x), protos)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Enhance a slice-major token sequence with 3D context and the prototype memory.

        Args:
            x: tokens, (B, L, C) with L = D * h * w, slice-major (z outermost).
            grid: (D, h, w).

        Returns:
            (B, L, C).
        """
        D, h, w = (int(s) for s in grid)
        if x.ndim != 3 or x.shape[1] != D * h * w:
            raise ValueError(f"expected tokens (B, L={D * h * w}, C) for grid {(D, h, w)}, got {tuple(x.shape)}")
        x = self.mix_tokens(x, (D, h, w))
        x = self.read_memory(x)
        return x + self.ffn(self.norm_ffn(x))
