"""Convolutional building blocks shared by every family (DESIGN "layers/conv.py").

One class per block, with a ``spatial_dims`` argument (2 or 3) instead of twin 2D/3D classes, in
the style of MONAI and nnU-Net's dynamic-network-architectures. Plain torch: the blocks are small
enough that wrapping MONAI's ``Convolution`` would not make them simpler.

Shapes use DESIGN's alphabet: B batch, C channels, and ``*S`` for the spatial axes, which are
(H, W) when ``spatial_dims=2`` and (D, H, W) when ``spatial_dims=3``.

This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNormAct",
    "DownBlock",
    "ResBlock",
    "UpBlock",
    "conv_layer",
    "make_act",
    "make_norm",
]

NORMS = ("instance", "batch", "group")
ACTS = ("relu", "gelu", "leakyrelu", "silu")


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_layer(spatial_dims: int, transpose: bool = False) -> type[nn.Module]:
    """The torch convolution class for ``spatial_dims`` (``nn.Conv2d``, ``nn.ConvTranspose3d``, ...)."""
    _check_dims(spatial_dims)
    if transpose:
        return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def make_norm(norm: str | None, channels: int, spatial_dims: int, groups: int = 8) -> nn.Module:
    """Build a normalisation layer.

    Args:
        norm: ``"instance"`` (affine), ``"batch"``, ``"group"`` or ``None`` (identity).
        channels: number of channels normalised.
        spatial_dims: 2 or 3.
        groups: wanted number of groups for ``"group"``; the largest divisor of ``channels`` not
            above it is used, so any channel count works.
    """
    _check_dims(spatial_dims)
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "group":
        g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
        return nn.GroupNorm(g, channels)
    raise ValueError(f"unknown norm {norm!r}; use one of {NORMS} or None")


def make_act(act: str | None) -> nn.Module:
    """Build an activation: ``"relu"``, ``"gelu"``, ``"leakyrelu"`` (slope 0.01), ``"silu"`` or ``None``."""
    if act is None or act == "none":
        return nn.Identity()
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "gelu":
        return nn.GELU()
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if act == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation {act!r}; use one of {ACTS} or None")


class ConvNormAct(nn.Module):
    """Convolution -> normalisation -> activation.

    Padding is ``dilation * (kernel_size - 1) // 2``, so an odd kernel keeps the size at stride 1
    and a stride-``s`` conv gives ``ceil(S / s)``; ``kernel_size=4, stride=2`` gives exactly
    ``S // 2``. The conv has a bias only when there is no norm after it.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: kernel size (int, same for every axis).
        stride: stride.
        spatial_dims: 2 or 3.
        norm: ``"instance"``, ``"batch"``, ``"group"`` or ``None``.
        act: ``"relu"``, ``"gelu"``, ``"leakyrelu"``, ``"silu"`` or ``None``.
        dilation: dilation of the conv.
        groups: number of groups for group norm (see :func:`make_norm`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        spatial_dims: int = 3,
        norm: str | None = "instance",
        act: str | None = "relu",
        dilation: int = 1,
        groups: int = 8,
    ):
        super().__init__()
        self.spatial_dims = _check_dims(spatial_dims)
        self.conv = conv_layer(spatial_dims)(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            bias=norm is None or norm == "none",
        )
        self.norm = make_norm(norm, out_ch, spatial_dims, groups)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, in_ch, *S).

        Returns:
            (B, out_ch, *S') with ``S'`` as described in the class docstring.
        """
        return self.act(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """Residual block: two convs plus a shortcut, then the activation.

    ``out = act(norm(conv(ConvNormAct(x))) + shortcut(x))``. The shortcut is the identity when
    the shape is unchanged, else a strided 1x1 conv + norm (projection shortcut).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the first conv (and of the shortcut projection).
        spatial_dims: 2 or 3.
        norm: see :class:`ConvNormAct`.
        act: see :class:`ConvNormAct`.
        kernel_size: kernel of both convs (odd).
        dilation: dilation of both convs.
        groups: number of groups for group norm.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        spatial_dims: int = 3,
        norm: str | None = "instance",
        act: str | None = "relu",
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 8,
    ):
        super().__init__()
        common = dict(spatial_dims=spatial_dims, norm=norm, groups=groups)
        self.conv1 = ConvNormAct(in_ch, out_ch, kernel_size, stride, act=act, dilation=dilation, **common)
        self.conv2 = ConvNormAct(out_ch, out_ch, kernel_size, 1, act=None, dilation=dilation, **common)
        if in_ch != out_ch or stride != 1:
            self.shortcut: nn.Module = ConvNormAct(in_ch, out_ch, 1, stride, act=None, **common)
        else:
            self.shortcut = nn.Identity()
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, in_ch, *S).

        Returns:
            (B, out_ch, *S') with ``S' = ceil(S / stride)``.
        """
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class DownBlock(nn.Module):
    """Downsample by ``factor`` then refine: one encoder level of a UNet.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        spatial_dims: 2 or 3.
        mode: ``"strided"`` (the first conv has stride ``factor``), ``"maxpool"`` or ``"avgpool"``
            (pool, then convs at stride 1).
        factor: downsampling factor.
        num_convs: number of :class:`ConvNormAct` (``residual=False``) or :class:`ResBlock`
            (``residual=True``) after/including the downsampling.
        residual: use residual blocks instead of plain conv blocks.
        norm: see :class:`ConvNormAct`.
        act: see :class:`ConvNormAct`.
        groups: number of groups for group norm.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        spatial_dims: int = 3,
        mode: str = "strided",
        factor: int = 2,
        num_convs: int = 2,
        residual: bool = False,
        norm: str | None = "instance",
        act: str | None = "relu",
        groups: int = 8,
    ):
        super().__init__()
        _check_dims(spatial_dims)
        if mode not in ("strided", "maxpool", "avgpool"):
            raise ValueError(f"unknown DownBlock mode {mode!r}; use 'strided', 'maxpool' or 'avgpool'")
        if num_convs < 1:
            raise ValueError("num_convs must be >= 1")
        if mode == "maxpool":
            self.pool: nn.Module = (nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d)(factor)
        elif mode == "avgpool":
            self.pool = (nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d)(factor)
        else:
            self.pool = nn.Identity()
        first_stride = factor if mode == "strided" else 1
        common = dict(spatial_dims=spatial_dims, norm=norm, act=act, groups=groups)
        blocks: list[nn.Module] = []
        for i in range(num_convs):
            cin, stride = (in_ch, first_stride) if i == 0 else (out_ch, 1)
            if residual:
                blocks.append(ResBlock(cin, out_ch, stride=stride, **common))
            else:
                blocks.append(ConvNormAct(cin, out_ch, 3, stride, **common))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, in_ch, *S).

        Returns:
            (B, out_ch, *S') with ``S' = S // factor`` for pooling and ``ceil(S / factor)`` for
            ``"strided"`` (equal when ``S`` is divisible by ``factor``).
        """
        return self.blocks(self.pool(x))


class UpBlock(nn.Module):
    """Upsample by ``factor``, concatenate a skip connection, then two conv blocks: one decoder level.

    If the upsampled map and the skip differ in size (odd sizes on the way down), the upsampled
    map is zero-padded or cropped at the high end of each axis to the skip's size.

    Args:
        in_ch: channels of the coarse input.
        skip_ch: channels of the skip (0 for no skip; ``forward`` then takes ``skip=None``).
        out_ch: output channels.
        spatial_dims: 2 or 3.
        mode: ``"transpose"`` (learned transposed conv to ``out_ch`` channels), or an
            interpolation: ``"trilinear"`` (linear interpolation; bilinear when 2D; ``"linear"``
            and ``"bilinear"`` are accepted as aliases) or ``"nearest"``. Interpolation keeps
            ``in_ch`` channels before the concatenation.
        factor: upsampling factor.
        norm: see :class:`ConvNormAct`.
        act: see :class:`ConvNormAct`.
        groups: number of groups for group norm.
    """

    def __init__(
        self,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        spatial_dims: int = 3,
        mode: str = "transpose",
        factor: int = 2,
        norm: str | None = "instance",
        act: str | None = "relu",
        groups: int = 8,
    ):
        super().__init__()
        self.spatial_dims = _check_dims(spatial_dims)
        self.factor = factor
        self.skip_ch = skip_ch
        if mode == "transpose":
            self.up: nn.Module | None = conv_layer(spatial_dims, transpose=True)(
                in_ch, out_ch, kernel_size=factor, stride=factor
            )
            self.interp_mode: str | None = None
            up_ch = out_ch
        elif mode in ("trilinear", "bilinear", "linear", "nearest"):
            self.up = None
            self.interp_mode = "nearest" if mode == "nearest" else ("bilinear", "trilinear")[spatial_dims - 2]
            up_ch = in_ch
        else:
            raise ValueError(f"unknown UpBlock mode {mode!r}; use 'transpose', 'trilinear' or 'nearest'")
        common = dict(spatial_dims=spatial_dims, norm=norm, act=act, groups=groups)
        self.conv1 = ConvNormAct(up_ch + skip_ch, out_ch, 3, 1, **common)
        self.conv2 = ConvNormAct(out_ch, out_ch, 3, 1, **common)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)
        align = False if self.interp_mode != "nearest" else None
        return F.interpolate(x, scale_factor=self.factor, mode=self.interp_mode, align_corners=align)

    @staticmethod
    def _match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        pad: list[int] = []
        for have, want in zip(reversed(x.shape[2:]), reversed(tuple(size)), strict=True):
            pad += [0, want - have]  # negative padding crops
        return F.pad(x, pad)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: coarse features (B, in_ch, *S).
            skip: encoder features (B, skip_ch, *S_skip), usually ``S_skip = factor * S``; ``None``
                only when ``skip_ch == 0``.

        Returns:
            (B, out_ch, *S_skip), or (B, out_ch, *(factor * S)) without a skip.
        """
        if (skip is None) != (self.skip_ch == 0):
            raise ValueError(
                f"UpBlock built with skip_ch={self.skip_ch} but got skip={'None' if skip is None else 'a tensor'}"
            )
        x = self._upsample(x)
        if skip is not None:
            x = torch.cat([self._match_size(x, skip.shape[2:]), skip], dim=1)  # (B, up_ch + skip_ch, *S_skip)
        return self.conv2(self.conv1(x))
