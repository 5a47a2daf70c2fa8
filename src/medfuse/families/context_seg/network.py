"""3D UNet over frozen foundation features with context fusion at the skips (seed 004).

Seed sections: "New (Correct) Implementation", "Architecture Flow", "Context Processing Pipeline".

Raw (high resolution) and context (low resolution, wide field of view) features arrive as two
separate tensors on one grid. The raw stream goes through a 1x1 input conv (C_feat -> base), four
encoder levels and a bottleneck; the decoder upsamples (trilinear) and concatenates a skip per
level. With ``fusion="attention"`` the context has its own stream: a 1x1 input conv, then per
level an average pooling (x2) and a 1x1 projection to that level's width, and a
:class:`~medfuse.families.context_seg.fusion.ContextAttentionFusion` gates each of the four encoder skips,
``skip = raw + raw * sigmoid(MLP(context))``. The encoder path never sees the context: the two
streams meet only at the skips. ``fusion="concat"`` is the seed's "old, wrong way" (one tensor
``cat([raw, context])`` into the first conv) and ``fusion="none"`` ignores the context; both are
ablation baselines.

Normalisation defaults to batch norm, as in the reference code: instance norm (or group norm)
inside the fusion bottleneck would subtract the per-sample mean of the projected context, which
erases a context that is nearly constant over a patch, exactly the case of a coarse context
resampled to a fine grid.

This module is the plain network: it imports nothing above ``medfuse.layers`` besides its family's
fusion block (no encoders, no engine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.families.context_seg.fusion import ContextAttentionFusion
from medfuse.layers.conv import ConvNormAct, DownBlock, UpBlock

__all__ = ["FUSIONS", "ContextStream", "ContextUNet3D"]

FUSIONS = ("attention", "concat", "none")


class ContextStream(nn.Module):
    """The context path: 1x1 input conv, then per level avg-pool x2 and a 1x1 projection.

    Args:
        in_channels: C_ctx of the context features.
        base: width after the input conv.
        widths: output width of each level's projection (the raw encoder widths).
        norm: normalisation after the input conv.
    """

    def __init__(self, in_channels: int, base: int, widths: list[int], norm: str = "batch"):
        super().__init__()
        self.input_conv = ConvNormAct(in_channels, base, kernel_size=1, spatial_dims=3, norm=norm, act="relu")
        self.proj = nn.ModuleList([nn.Conv3d(base, w, kernel_size=1) for w in widths])

    def forward(self, context: torch.Tensor) -> list[torch.Tensor]:
        """context (B, C_ctx, D, H, W) -> per level i: (B, widths[i], D / 2^i, H / 2^i, W / 2^i)."""
        x = self.input_conv(context)  # (B, base, D, H, W)
        out = []
        for i, proj in enumerate(self.proj):
            if i:
                x = F.avg_pool3d(x, 2)  # (B, base, D / 2^i, ...)
            out.append(proj(x))
        return out


class ContextUNet3D(nn.Module):
    """UNet over raw features, gated at the skips by context features.

    Args:
        in_channels: C_feat of the raw features.
        num_classes: K output classes (softmax over K; class 0 is background).
        context_channels: C_ctx of the context features (default ``in_channels``).
        base: width of the first level; level i has ``base * 2^i`` channels and the bottleneck
            ``base * 2^levels`` (seed: base 128 -> 128/256/512/1024 and a 2048 bottleneck).
        levels: encoder levels with a skip (seed: 4).
        fusion: ``attention`` | ``concat`` | ``none``.
        reduction: bottleneck ratio of the attention MLP (seed: 4).
        norm: ``batch`` (default), ``instance`` or ``group``, for every block and the fusion MLP.
        up_mode: decoder upsampling, ``trilinear`` (seed) or ``transpose``.
        dropout: channel dropout before the output conv.
    """

    def __init__(self, in_channels: int, num_classes: int, context_channels: int | None = None, base: int = 32,
                 levels: int = 4, fusion: str = "attention", reduction: int = 4, norm: str = "batch",
                 up_mode: str = "trilinear", dropout: float = 0.0):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.in_channels = int(in_channels)
        self.context_channels = int(context_channels or in_channels)
        self.fusion, self.levels = fusion, int(levels)
        widths = [base * 2**i for i in range(levels)]
        self.widths = widths
        common = dict(spatial_dims=3, norm=norm, act="relu")
        first_in = self.in_channels + (self.context_channels if fusion == "concat" else 0)
        self.input_conv = ConvNormAct(first_in, base, kernel_size=1, **common)
        self.enc = nn.ModuleList([nn.Sequential(ConvNormAct(base, widths[0], 3, **common),
                                                ConvNormAct(widths[0], widths[0], 3, **common))])
        for i in range(1, levels):
            self.enc.append(DownBlock(widths[i - 1], widths[i], mode="maxpool", **common))
        self.bottleneck = DownBlock(widths[-1], base * 2**levels, mode="maxpool", **common)
        ups, cin = [], base * 2**levels
        for w in reversed(widths):
            ups.append(UpBlock(cin, w, w, mode=up_mode, **common))
            cin = w
        self.dec = nn.ModuleList(ups)  # coarsest first
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(widths[0], num_classes, kernel_size=1)
        if fusion == "attention":
            self.context = ContextStream(self.context_channels, base, widths, norm=norm)
            self.fusions = nn.ModuleList([ContextAttentionFusion(w, reduction, spatial_dims=3, norm=norm)
                                          for w in widths])

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded up to a multiple of this (one pooling per level)."""
        return 2**self.levels

    def encode(self, raw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Raw path only: raw (B, C_in, D, H, W) -> (skips, bottleneck); skip i is (B, widths[i], D/2^i, ...)."""
        x = self.input_conv(raw)  # (B, base, D, H, W)
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        return skips, self.bottleneck(x)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        size = tuple(x.shape[2:])
        m = self.multiple
        pad = [(-s) % m for s in size]
        if any(pad):
            x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")  # high end of W, H, D
        return x, size  # type: ignore[return-value]

    def forward(self, raw: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Segment.

        Args:
            raw: raw features (B, C_in, D, H, W).
            context: context features (B, C_ctx, D, H, W) on the same grid; required unless
                ``fusion="none"`` (where it is ignored).

        Returns:
            logits (B, K, D, H, W). Sizes that are not multiples of ``2^levels`` are padded
            (replicate) on the way in and cropped on the way out.
        """
        return self._run(raw, context, keep=False)[0]

    def forward_intermediates(self, raw: torch.Tensor, context: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """:meth:`forward` plus what evaluation shows, from the same pass.

        Returns:
            logits (B, K, D, H, W) and, with ``fusion="attention"``, ``{"attention": gates}``:
            the fusion gate of every level i, (B, widths[i], ceil(D/2^i), ceil(H/2^i), ceil(W/2^i))
            in (0, 1) (the padding's share removed); ``{}`` for the other fusions.
        """
        return self._run(raw, context, keep=True)

    def _run(self, raw: torch.Tensor, context: torch.Tensor | None, keep: bool
             ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        if self.fusion != "none":
            if context is None:
                raise ValueError(f"fusion='{self.fusion}' needs context features")
            if context.shape[2:] != raw.shape[2:] or context.shape[0] != raw.shape[0]:
                raise ValueError(f"raw {tuple(raw.shape)} and context {tuple(context.shape)} must share B and grid")
        raw, size = self._pad(raw)
        if self.fusion == "concat":
            # the seed's "old, wrong way": one tensor, the first conv mixes both streams
            skips, x = self.encode(torch.cat([raw, self._pad(context)[0]], dim=1))  # (B, C_in + C_ctx, ...)
        else:
            skips, x = self.encode(raw)
        inter: dict[str, list[torch.Tensor]] = {}
        if self.fusion == "attention":
            ctx = self.context(self._pad(context)[0])
            if keep:
                pairs = [f.forward_intermediates(s, c) for f, s, c in zip(self.fusions, skips, ctx, strict=True)]
                skips = [fused for fused, _ in pairs]
                gates = []
                for i, (_, att) in enumerate(pairs):
                    d, h, w = (-(-n // 2**i) for n in size)  # the padding's share removed
                    gates.append(att[:, :, :d, :h, :w])
                inter["attention"] = gates
            else:
                skips = [f(s, c) for f, s, c in zip(self.fusions, skips, ctx, strict=True)]  # raw + raw * att
        for up, skip in zip(self.dec, reversed(skips), strict=True):
            x = up(x, skip)
        logits = self.head(self.dropout(x))  # (B, K, D', H', W')
        d, h, w = size
        return logits[:, :, :d, :h, :w], inter
