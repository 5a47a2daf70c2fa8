"""Reverse attention adapter around a frozen encoder block (seed 003, UniMRSeg stage 3,
"Incomplete Modality Adaptive Fine-tuning": the specialist helper).

For one encoder level with frozen block output ``Fc`` and block input ``prev``::

    H    = cbr(Fc) + cbr_down(prev)          # conv-norm-act; cbr_down matches prev to Fc's grid
    T    = block(H)
    m    = mean over channels of T           # (B, 1, *S); the peer also averages over depth
    next = Fc + gamma * (1 - sigmoid(m)) * H

``1 - sigmoid(m)`` is the *reverse* attention: it is large where the adapter's own response is
weak, i.e. where the frozen features miss something (weak perceptual semantics) when modalities
are absent, and the compensation ``H`` is added there. ``gamma`` is a per-channel layer scale;
the peer's formula is ``gamma = 1`` (``layer_scale=None``). A small initial ``gamma`` makes stage 3
start from the stage-2 network instead of from features perturbed by randomly initialised
branches.

Shapes: B batch, C channels, ``*S`` spatial axes ((H, W) or (D, H, W)).
This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

import torch
from torch import nn

from medfuse.layers.conv import ConvNormAct

__all__ = ["ReverseAttentionAdapter"]


class ReverseAttentionAdapter(nn.Module):
    """One level's adapter (see the module docstring).

    Args:
        channels: C of the frozen block output ``Fc`` (and of the adapter output).
        prev_channels: channels of the block input ``prev``.
        stride: stride from ``prev``'s grid to ``Fc``'s (2 for a downsampling block, 1 otherwise).
        spatial_dims: 2 or 3.
        norm: norm of the conv blocks (see :class:`~medfuse.layers.conv.ConvNormAct`).
        act: activation.
        layer_scale: initial value of the per-channel ``gamma``; ``None`` fixes ``gamma = 1`` (the
            peer's formula, no parameter).
        reduce_depth: also average ``m`` over the first spatial axis (the peer's 3D code averages
            over channels and depth); default False keeps a full (D, H, W) attention map.
    """

    def __init__(self, channels: int, prev_channels: int, stride: int = 2, spatial_dims: int = 3,
                 norm: str | None = "instance", act: str | None = "relu", layer_scale: float | None = 0.1,
                 reduce_depth: bool = False):
        super().__init__()
        common = dict(spatial_dims=spatial_dims, norm=norm, act=act)
        self.cbr_f = ConvNormAct(channels, channels, 3, **common)
        self.cbr_p = ConvNormAct(prev_channels, channels, 3, stride=stride, **common)
        self.block = nn.Sequential(ConvNormAct(channels, channels, 3, **common),
                                   ConvNormAct(channels, channels, 3, spatial_dims=spatial_dims, norm=norm, act=None))
        shape = (1, channels) + (1,) * spatial_dims
        self.gamma = nn.Parameter(torch.full(shape, float(layer_scale))) if layer_scale is not None else None
        self.reduce_depth = reduce_depth and spatial_dims == 3

    def forward(self, fc: torch.Tensor, prev: torch.Tensor,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Adapt one level.

        Args:
            fc: frozen block output (B, C, *S).
            prev: the block's input (B, C_prev, *S_prev) with ``S = ceil(S_prev / stride)``.
            return_attention: also return the reverse attention ``1 - sigmoid(m)`` (B, 1, *S), detached.

        Returns:
            Adapted features (B, C, *S), and the reverse attention when ``return_attention``.
        """
        p = self.cbr_p(prev)
        if p.shape[2:] != fc.shape[2:]:
            raise ValueError(f"prev maps to {tuple(p.shape[2:])}, not to the block output's {tuple(fc.shape[2:])}")
        h = self.cbr_f(fc) + p  # (B, C, *S)
        t = self.block(h)
        m = t.mean(dim=(1, 2) if self.reduce_depth else 1, keepdim=True)  # (B, 1, *S) or (B, 1, 1, H, W)
        rev = 1.0 - torch.sigmoid(m)
        comp = rev * h
        if self.gamma is not None:
            comp = self.gamma * comp
        return (fc + comp, rev.detach()) if return_attention else fc + comp
