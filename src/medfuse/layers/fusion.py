"""Gated fusion shared by two families.

:class:`GatedFusion` is seed 000's BGAMF gate ``f = g * a + (1 - g) * b`` with
``g = sigmoid(Linear([a; b]))`` per position and channel; staging's BGAMF
(:mod:`medfuse.families.staging.bgamf`) and text_seg's single-level baseline
(:mod:`medfuse.families.text_seg.fusion`) both use it.
"""

from __future__ import annotations

import torch
from torch import nn


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
