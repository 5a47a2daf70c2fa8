"""3D patch embedding with a 3D position encoding (seed 001, "1. 3D Patch Embedding").

A Conv3d with kernel = stride = patch size (default (4, 16, 16): 4 slices x 16 x 16 pixels) turns a
(B, C, D, H, W) volume into a (d, h, w) grid of patch tokens, flattened slice-major (DESIGN
"Arrays": z outermost). The seed's position table is a fixed-size learned parameter that breaks
on any other volume size; here it is :class:`~medfuse.layers.pos_embed.PosEmbed3d`, learned (and
trilinearly interpolated to new grids) or fixed sin-cos, and the patch (z, y, x) coordinates are
returned with the tokens so that slice-aware attention and region assignment use the same grid.

A volume whose size is not a multiple of the patch size is zero-padded at the far end of each
axis (the region mask gets the same padding, see :mod:`medfuse.layers.region_attention`).

This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from medfuse.layers.pos_embed import PosEmbed3d, token_coords

__all__ = ["PatchEmbed3d", "pad_to_patches"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(s) for s in v)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name} must be three positive sizes (D, H, W), got {v}")
    return t  # type: ignore[return-value]


def pad_to_patches(x: torch.Tensor, patch_size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Zero-pad the last three axes of ``x`` (..., D, H, W) up to multiples of ``patch_size``."""
    pads: list[int] = []
    for size, p in zip(reversed(x.shape[-3:]), reversed(tuple(patch_size)), strict=True):
        pads += [0, (-size) % p]  # F.pad lists the last axis first
    return F.pad(x, pads, value=value) if any(pads) else x


class PatchEmbed3d(nn.Module):
    """Conv3d patches + 3D position encoding.

    Args:
        in_channels: input channels (1 for CT).
        dim: embedding width C.
        patch_size: (pd, ph, pw) voxels per patch.
        img_size: the configured volume size (D, H, W); sets the learned table's grid
            (D/pd, H/ph, W/pw). Other sizes interpolate it.
        pos_embed: ``"learned"`` (the seed's, interpolated) or ``"sincos"`` (fixed).
    """

    def __init__(self, in_channels: int = 1, dim: int = 768, patch_size: int | Sequence[int] = (4, 16, 16),
                 img_size: int | Sequence[int] = (64, 512, 512), pos_embed: str = "learned"):
        super().__init__()
        self.patch_size = _triple(patch_size, "patch_size")
        self.img_size = _triple(img_size, "img_size")
        grid = tuple(-(-s // p) for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.grid = grid
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos = PosEmbed3d(dim, kind=pos_embed, grid=grid if pos_embed == "learned" else None)

    def grid_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (d, h, w) of a volume of spatial size ``shape`` (D, H, W), after padding."""
        return tuple(-(-int(s) // p) for s, p in zip(shape[-3:], self.patch_size, strict=True))  # type: ignore

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Embed a volume.

        Args:
            x: (B, C_in, D, H, W).

        Returns:
            ``(tokens, coords, grid)``: tokens (B, N, C) with N = d * h * w slice-major, coords
            (N, 3) int64 patch indices (z, y, x) of every token, grid (d, h, w).
        """
        pd, ph, pw = self.patch_size
        x = pad_to_patches(x, self.patch_size)
        grid = (x.shape[-3] // pd, x.shape[-2] // ph, x.shape[-1] // pw)
        # The Conv3d with kernel = stride as one matmul over flattened patches: the same numbers,
        # and on CPU about 10x faster in the backward pass than the convolution kernels.
        patches = rearrange(x, "b c (d pd) (h ph) (w pw) -> b (d h w) (c pd ph pw)", pd=pd, ph=ph, pw=pw)
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, C)
        tokens = self.pos(tokens, grid)
        return tokens, token_coords(*grid, device=x.device), grid
