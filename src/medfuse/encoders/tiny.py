"""A tiny CNN slice encoder for CPU tests and demos (DESIGN "encoders/tiny.py").

It stands in for the foundation encoders (MedSAM2, SAM ViT-B, DINOv3) wherever real weights are
not available: every family's tests run forward and backward through it on CPU in milliseconds.
Three strided conv blocks with kernel 4 halve H and W exactly, so the output is (H // 8, W // 8)
for any input size of at least 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfuse.encoders.base import SliceEncoder
from medfuse.layers.conv import ConvNormAct
from medfuse.registry import ENCODERS

__all__ = ["TinySliceEncoder"]


@ENCODERS.register("tiny")
class TinySliceEncoder(SliceEncoder):
    """Tiny 3-level CNN slice encoder: (N, 3, H, W) -> (N, C, H // 8, W // 8).

    Initialisation is torch's default, so it is deterministic given ``torch.manual_seed``.

    Args:
        out_channels: C, channels of the output feature map.
        hidden: channels of the first two levels.
        norm: normalisation of each block (group norm by default: independent of the batch size).
        act: activation of each block.
        input_size: native square input size for :meth:`preprocess` (``None`` keeps slice size).
    """

    name = "tiny"
    stride = 8

    def __init__(
        self,
        out_channels: int = 32,
        hidden: Sequence[int] = (8, 16),
        norm: str | None = "group",
        act: str | None = "gelu",
        input_size: int | None = None,
    ):
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"hidden must have 2 channel counts, got {list(hidden)}")
        self.out_channels = int(out_channels)
        self.input_size = input_size
        chans = [3, *hidden, self.out_channels]
        # kernel 4, stride 2, padding 1 gives exactly floor(S / 2) per level.
        self.blocks = nn.Sequential(
            *(
                ConvNormAct(
                    chans[i], chans[i + 1], kernel_size=4, stride=2, spatial_dims=2, norm=norm, act=act
                )
                for i in range(3)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed slices.

        Args:
            x: (N, 3, H, W) with H, W >= 8.

        Returns:
            (N, C, H // 8, W // 8).
        """
        return self.blocks(x)
