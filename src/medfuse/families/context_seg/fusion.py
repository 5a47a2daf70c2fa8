"""Context attention fusion (seed 004): context-gated skips ``raw + raw * att(context)``."""

from __future__ import annotations

import torch
from torch import nn


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

    def forward_intermediates(self, raw: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw, context: (B, C, D, H, W) (or (B, C, H, W)) on one grid -> (fused, att), both (B, C, D, H, W)."""
        if raw.shape != context.shape:
            raise ValueError(f"raw {tuple(raw.shape)} and context {tuple(context.shape)} must share a grid")
        att = self.attention(context)
        return raw + raw * att, att

    def forward(self, raw: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """raw, context: (B, C, D, H, W) (or (B, C, H, W)) on one grid -> fused (B, C, D, H, W)."""
        return self.forward_intermediates(raw, context)[0]
