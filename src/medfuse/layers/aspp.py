"""Atrous spatial pyramid pooling (DeepLab v3) for 2D and 3D feature maps.

Used as the bottleneck of the ``incomplete_seg`` family's 3D UNet (seed 003, UniMRSeg backbone:
"3D UNet with a 3D ASPP, dilations 1/6/12/18 plus global pooling"). MONAI's ``SimpleASPP`` has no
image-pooling branch, so the block is written here from :class:`~medfuse.layers.conv.ConvNormAct`.

Shapes: B batch, C channels, ``*S`` the spatial axes ((H, W) for ``spatial_dims=2``, (D, H, W) for 3).
This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfuse.layers.conv import ConvNormAct, conv_layer, make_act

__all__ = ["ASPP"]


class ASPP(nn.Module):
    """Parallel dilated convolutions plus an image-pooling branch, concatenated and projected.

    Branches: one per entry of ``dilations`` (a 1x1 conv for dilation 1, else a 3x3 conv with that
    dilation, each conv -> norm -> act), and, with ``image_pool``, global average pooling -> 1x1
    conv -> act, broadcast back to the input size. The pooling branch has no norm layer because
    instance norm is undefined on a single voxel. The concatenation goes through a 1x1
    conv -> norm -> act to ``out_ch`` and optional dropout.

    A dilation larger than the map only wastes compute (the outer taps read padding); pick
    dilations that fit the bottleneck's size for small inputs.

    Args:
        in_ch: input channels.
        out_ch: channels of every branch and of the output.
        dilations: one branch per dilation (DeepLab v3: 1, 6, 12, 18).
        spatial_dims: 2 or 3.
        image_pool: add the global-average-pooling branch.
        norm: norm of the conv branches and the projection (see :class:`ConvNormAct`).
        act: activation.
        dropout: dropout after the projection.
    """

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int] = (1, 6, 12, 18), spatial_dims: int = 3,
                 image_pool: bool = True, norm: str | None = "instance", act: str | None = "relu",
                 dropout: float = 0.0):
        super().__init__()
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be positive integers, got {dilations!r}")
        self.spatial_dims = spatial_dims
        self.branches = nn.ModuleList(
            ConvNormAct(in_ch, out_ch, 1 if int(d) == 1 else 3, dilation=int(d), spatial_dims=spatial_dims,
                        norm=norm, act=act)
            for d in dilations
        )
        self.pool: nn.Module | None = None
        if image_pool:
            self.pool = nn.Sequential(conv_layer(spatial_dims)(in_ch, out_ch, 1, bias=True), make_act(act))
        n = len(self.branches) + (1 if image_pool else 0)
        self.project = ConvNormAct(n * out_ch, out_ch, 1, spatial_dims=spatial_dims, norm=norm, act=act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pyramid.

        Args:
            x: (B, in_ch, *S).

        Returns:
            (B, out_ch, *S).
        """
        feats = [b(x) for b in self.branches]
        if self.pool is not None:
            dims = tuple(range(2, x.ndim))
            g = self.pool(x.mean(dim=dims, keepdim=True))  # (B, out_ch, 1, ..., 1)
            feats.append(g.expand(-1, -1, *x.shape[2:]))
        return self.dropout(self.project(torch.cat(feats, dim=1)))  # (B, n*out_ch, *S) -> (B, out_ch, *S)

