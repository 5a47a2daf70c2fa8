"""Baseline 3D CNN classifier: the reference every family's classifier is compared with.

Modalities are stacked as input channels (early fusion), so the same model serves single-modality
and multi-modality ablations by changing ``in_channels``. Built from :mod:`medfuse.layers.conv`
blocks. Volumes are anisotropic (thick axial slices, fine in-plane spacing), so the first two
levels downsample in-plane only (stride (1, 2, 2)) and later levels downsample all axes.
"""

from __future__ import annotations

import torch
from torch import nn

from medfuse.layers.conv import ConvNormAct, ResBlock

__all__ = ["BaselineCNN"]


class BaselineCNN(nn.Module):
    """Stem conv, one residual block per extra width, global pooling and a linear head.

    Args:
        in_channels: number of stacked modalities M.
        num_classes: number of classes K.
        widths: channels of the stem and of each residual stage; every entry halves the
            in-plane size, and entries after the second also halve the depth.
        dropout: dropout before the linear head.
        spatial_dims: 3 for volumes (B, M, D, H, W), 2 for images (B, M, H, W).
        norm: normalisation of every block (see :class:`~medfuse.layers.conv.ConvNormAct`).
        pool: global pooling, ``"avg"``, ``"max"`` or ``"avgmax"`` (both, concatenated; a
            small lesion anywhere in the volume is not averaged away).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (16, 32, 64),
        dropout: float = 0.1,
        spatial_dims: int = 3,
        norm: str | None = "instance",
        pool: str = "avgmax",
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or not widths:
            raise ValueError("in_channels and num_classes must be >= 1 and widths non-empty")
        if pool not in ("avg", "max", "avgmax"):
            raise ValueError(f"unknown pool {pool!r}; use 'avg', 'max' or 'avgmax'")
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.pool = pool

        def stride(level: int) -> int | tuple[int, ...]:
            if spatial_dims == 3 and level < 2:
                return (1, 2, 2)  # thick slices: keep depth early
            return 2

        self.stem = ConvNormAct(in_channels, widths[0], 3, stride(0), spatial_dims=spatial_dims, norm=norm)
        self.stages = nn.Sequential(
            *[
                ResBlock(widths[i - 1], widths[i], stride=stride(i), spatial_dims=spatial_dims, norm=norm)
                for i in range(1, len(widths))
            ]
        )
        feat = widths[-1] * (2 if pool == "avgmax" else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch.

        Args:
            x: (B, M, D, H, W) when ``spatial_dims=3``, (B, M, H, W) when 2.

        Returns:
            Logits (B, K).
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ({'B, M, D, H, W' if self.spatial_dims == 3 else 'B, M, H, W'}) with "
                f"M={self.in_channels}, got shape {tuple(x.shape)}"
            )
        f = self.stages(self.stem(x)).flatten(2)  # (B, C, D'*H'*W')
        if self.pool == "avg":
            g = f.mean(-1)
        elif self.pool == "max":
            g = f.amax(-1)
        else:
            g = torch.cat([f.mean(-1), f.amax(-1)], dim=1)  # (B, 2C)
        return self.head(g)
