"""BGAMF (seed 000, "Innovative Multi-Modal Fusion (BGAMF)").

Cross-attention alignment in both directions, a Bi-Mamba per modality, and the per-position,
per-channel gate of :class:`~medfuse.layers.fusion.GatedFusion`
(``f = g * h_t2w + (1 - g) * h_dwi``), optionally with a temperature
(:class:`TemperedGatedFusion`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from medfuse.layers.attention import CrossAttention
from medfuse.layers.fusion import GatedFusion


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


class TemperedGatedFusion(GatedFusion):
    """:class:`GatedFusion` with a temperature: ``g = sigmoid(Linear([a; b]) / temperature)``.

    A temperature below 1 scales the gate's logits and their gradients up, so the gate can move
    away from 0.5 within a short training run; the parameters (``gate.weight``, ``gate.bias``) are
    those of :class:`GatedFusion`, so checkpoints are interchangeable.

    Args:
        dim: channels C of both inputs.
        temperature: divides the gate logits (> 0).
    """

    def __init__(self, dim: int, temperature: float = 1.0):
        super().__init__(dim)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: (B, L, C) -> (fused (B, L, C), gate (B, L, C) in (0, 1))."""
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)) / self.temperature)
        return g * a + (1 - g) * b, g


class BGAMF(nn.Module):
    """Bidirectional Gated & Alignment-aware Mamba Fusion of two token sequences.

    Args:
        dim: channels C.
        num_heads: heads of the alignment cross-attention.
        bidirectional: Bi-Mamba (True) or a forward-only Mamba (the ``mamba: uni`` ablation).
        align_mode: ``auto`` | ``full`` | ``slice`` (see :class:`AlignCrossAttention`).
        d_state: Mamba state size.
        align: use the alignment cross-attention (False: the component ablation).
        branch_mamba: use the per-modality Bi-Mamba (False: the component ablation).
        init_scale: factor on the initial output projections of the alignment and Mamba branches.
        gate_temperature: temperature of the gate's sigmoid (1: the seed's gate, :class:`GatedFusion`).
    """

    def __init__(self, dim: int, num_heads: int = 4, bidirectional: bool = True, align_mode: str = "auto",
                 d_state: int = 16, align: bool = True, branch_mamba: bool = True, init_scale: float = 0.1,
                 gate_temperature: float = 1.0):
        super().__init__()
        from medfuse.ssm import BiMamba

        self.align_a = AlignCrossAttention(dim, num_heads, align_mode) if align else None
        self.align_b = AlignCrossAttention(dim, num_heads, align_mode) if align else None
        self.norm_a, self.norm_b = (nn.LayerNorm(dim), nn.LayerNorm(dim)) if branch_mamba else (None, None)
        self.mamba_a = BiMamba(dim, d_state=d_state, bidirectional=bidirectional) if branch_mamba else None
        self.mamba_b = BiMamba(dim, d_state=d_state, bidirectional=bidirectional) if branch_mamba else None
        self.fuse = GatedFusion(dim) if gate_temperature == 1.0 else TemperedGatedFusion(dim, gate_temperature)
        # Near-identity start of the residual branches (alignment, per-modality Mamba): at init the
        # block is close to the gated blend of its inputs, which trains like concatenation, and the
        # branches grow from there. At full scale, the untrained cross-attention adds a near-uniform
        # average of the other modality to every token, which buried the local DWI cue in the demo.
        with torch.no_grad():
            outs = [m.attn.proj for m in (self.align_a, self.align_b) if m is not None]
            outs += [m.out_proj for m in (self.mamba_a, self.mamba_b) if m is not None]
            for lin in outs:
                lin.weight.mul_(init_scale)
                if lin.bias is not None:
                    lin.bias.mul_(init_scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """a (T2W), b (DWI): (B, L, C) -> (fused (B, L, C), gate (B, L, C); gate 1 = trust ``a``)."""
        if self.align_a is not None:
            a, b = self.align_a(a, b, grid), self.align_b(b, a, grid)  # T2W queries DWI and vice versa
        if self.mamba_a is not None:
            a = a + self.mamba_a(self.norm_a(a))
            b = b + self.mamba_b(self.norm_b(b))
        return self.fuse(a, b)
