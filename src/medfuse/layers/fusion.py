"""Fusion blocks shared by the families.

* :class:`GatedFusion` and :class:`BGAMF`: seed 000, "Innovative Multi-Modal Fusion (BGAMF)":
  cross-attention alignment in both directions, a Bi-Mamba per modality, and a per-position,
  per-channel gate ``f = g * h_t2w + (1 - g) * h_dwi`` with ``g = sigmoid(Linear([h_t2w; h_dwi]))``.
* :class:`ContextAttentionFusion`: seed 004, context-gated skips ``raw + raw * att(context)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from medfuse.layers.attention import CrossAttention


class GatedFusion(nn.Module):
    """``f = g * a + (1 - g) * b`` with ``g = sigmoid(Linear([a; b]))`` per position and channel.

    Args:
        dim: channels C of both inputs.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: (B, L, C) -> (fused (B, L, C), gate (B, L, C) in (0, 1))."""
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        return g * a + (1 - g) * b, g


class AlignCrossAttention(nn.Module):
    """Pre-norm residual cross-attention of ``x`` to ``context`` (BGAMF step 1).

    ``mode="full"`` attends over all L context tokens; ``mode="slice"`` restricts each token to
    the context tokens of its own slice (the modalities share one grid), which keeps the cost
    linear in the number of slices; ``auto`` picks ``slice`` above ``full_max_tokens``.
    """

    def __init__(self, dim: int, num_heads: int = 4, mode: str = "auto", full_max_tokens: int = 4096):
        super().__init__()
        if mode not in ("auto", "full", "slice"):
            raise ValueError(f"mode must be auto|full|slice, got {mode!r}")
        self.mode, self.full_max_tokens = mode, full_max_tokens
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads=num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """x, context: (B, L, C), L = D*h*w slice-major -> (B, L, C)."""
        d, h, w = grid
        mode = self.mode
        if mode == "auto":
            mode = "full" if x.shape[1] <= self.full_max_tokens else "slice"
        q, kv = self.norm_q(x), self.norm_kv(context)
        if mode == "full":
            return x + self.attn(q, kv)
        q = rearrange(q, "b (d n) c -> (b d) n c", d=d)  # (B*D, h*w, C)
        kv = rearrange(kv, "b (d n) c -> (b d) n c", d=d)
        out = rearrange(self.attn(q, kv), "(b d) n c -> b (d n) c", d=d)
        return x + out


class BGAMF(nn.Module):
    """Bidirectional Gated & Alignment-aware Mamba Fusion of two token sequences.

    Args:
        dim: channels C.
        num_heads: heads of the alignment cross-attention.
        bidirectional: Bi-Mamba (True) or a forward-only Mamba (the ``mamba: uni`` ablation).
        align_mode: ``auto`` | ``full`` | ``slice`` (see :class:`AlignCrossAttention`).
        d_state: Mamba state size.
    """

    def __init__(self, dim: int, num_heads: int = 4, bidirectional: bool = True, align_mode: str = "auto",
                 d_state: int = 16):
        super().__init__()
        from medfuse.ssm import BiMamba

        self.align_a = AlignCrossAttention(dim, num_heads, align_mode)
        self.align_b = AlignCrossAttention(dim, num_heads, align_mode)
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mamba_a = BiMamba(dim, d_state=d_state, bidirectional=bidirectional)
        self.mamba_b = BiMamba(dim, d_state=d_state, bidirectional=bidirectional)
        self.fuse = GatedFusion(dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """a (T2W), b (DWI): (B, L, C) -> (fused (B, L, C), gate (B, L, C); gate 1 = trust ``a``)."""
        a_al = self.align_a(a, b, grid)  # T2W queries DWI
        b_al = self.align_b(b, a, grid)  # DWI queries T2W
        h_a = a_al + self.mamba_a(self.norm_a(a_al))
        h_b = b_al + self.mamba_b(self.norm_b(b_al))
        return self.fuse(h_a, h_b)


class ContextAttentionFusion(nn.Module):
    """Context gates raw features at a skip (seed 004): ``fused = raw + raw * att``.

    ``att = sigmoid(conv1x1(C -> C/r) -> norm -> ReLU -> conv1x1(C/r -> C))(context)``. The raw
    and context streams stay separate tensors up to here; the context only rescales raw channels,
    so the output keeps C channels (no concatenation, no doubled width downstream).

    Args:
        channels: C of both raw and context features.
        reduction: bottleneck ratio r (seed: 4).
        spatial_dims: 2 or 3.
        norm: ``"instance"``, ``"batch"`` or ``"group"``.
    """

    def __init__(self, channels: int, reduction: int = 4, spatial_dims: int = 3, norm: str = "instance"):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        hidden = max(1, channels // reduction)
        if norm == "batch":
            nrm: nn.Module = (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(hidden)
        elif norm == "group":
            nrm = nn.GroupNorm(min(8, hidden), hidden)
        else:
            nrm = (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(hidden, affine=True)
        self.att = nn.Sequential(conv(channels, hidden, 1), nrm, nn.ReLU(inplace=True), conv(hidden, channels, 1))

    def attention(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, C, *S) -> att (B, C, *S) in (0, 1)."""
        return torch.sigmoid(self.att(context))

    def forward(self, raw: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """raw, context: (B, C, D, H, W) (or (B, C, H, W)) on one grid -> fused (B, C, D, H, W)."""
        if raw.shape != context.shape:
            raise ValueError(f"raw {tuple(raw.shape)} and context {tuple(context.shape)} must share a grid")
        return raw + raw * self.attention(context)
