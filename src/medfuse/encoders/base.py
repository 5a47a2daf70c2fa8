"""The slice-encoder protocol (DESIGN "encoders/"): one interface for every 2D foundation encoder.

A :class:`SliceEncoder` maps a batch of preprocessed slices (N, 3, H, W) to a feature map
(N, C, h, w) with ``h = H // stride``. MedSAM2 (Hiera-T + FPN neck), SAM ViT-B, DINOv3 and the
tiny CPU encoder all implement it, so ``encoders/slicewise.py`` and the model families never care
which one is in use.

Preprocessing follows the MedSAM/MedSAM2 recipe (REFERENCE.md "Preprocessing, MR/CT"): MR slices
are clipped to the 0.5-99.5 percentiles of their nonzero voxels, CT slices to an intensity
window, then scaled to [0, 1], repeated to 3 channels, resized to the encoder's native size and
normalised with the encoder's mean/std.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.errors import ConfigError
from medfuse.registry import ENCODERS

__all__ = ["CT_DEFAULT_WINDOW", "IMAGENET_MEAN", "IMAGENET_STD", "SliceEncoder", "build_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CT_DEFAULT_WINDOW = (40.0, 400.0)  # (level, width): soft-tissue window, as in MedSAM/MedSAM2
MR_PERCENTILES = (0.5, 99.5)


class SliceEncoder(nn.Module):
    """Base class of frozen or trainable 2D slice encoders.

    Subclasses set :attr:`out_channels`, :attr:`stride`, :attr:`input_size` and :attr:`name`
    (class or instance attributes), may override :attr:`mean` / :attr:`std`, and implement
    :meth:`forward`.

    Attributes:
        name: registry name of the encoder (e.g. ``"tiny"``, ``"medsam2"``).
        out_channels: C, channels of the output feature map.
        stride: total downsampling; the output is (h, w) = (H // stride, W // stride).
        input_size: native square input size S used by :meth:`preprocess`, or ``None`` to keep
            the slice size.
        mean: per-channel normalisation mean (ImageNet by default).
        std: per-channel normalisation std (ImageNet by default).
        frozen: whether :meth:`freeze` was called; a frozen encoder stays in eval mode.
    """

    name: str = "base"
    out_channels: int = 0
    stride: int = 1
    input_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Encode preprocessed slices.

        Args:
            x: (N, 3, H, W), the output of :meth:`preprocess`.

        Returns:
            (N, C, h, w) with C = ``out_channels`` and (h, w) = (H // stride, W // stride).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def feature_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature map for an (H, W) input."""
        return height // self.stride, width // self.stride

    # ------------------------------------------------------------------ preprocessing
    @torch.no_grad()
    def preprocess(
        self,
        slices: torch.Tensor,
        modality: str = "mr",
        window: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Turn raw-intensity slices into encoder input.

        Steps, per slice:

        1. Clip: to ``window`` when given; else for ``"ct"`` to :data:`CT_DEFAULT_WINDOW`; else
           (``"mr"``) to the 0.5-99.5 percentiles of the slice's nonzero voxels.
        2. Scale the clip range to [0, 1]. For MR, voxels that were exactly 0 (background) stay 0.
           A slice with an empty range (e.g. all background) becomes all zeros.
        3. Repeat to 3 channels and resize (bilinear, antialiased) to ``input_size`` if set.
        4. Normalise with ``(x - mean) / std``.

        Args:
            slices: (N, H, W) raw intensities (any real dtype; NaN is not allowed).
            modality: ``"mr"`` or ``"ct"`` (case-insensitive); other names are treated as MR.
            window: ``(level, width)`` intensity window in the image's units (HU for CT), e.g.
                ``(40, 400)`` clips to [-160, 240]. Overrides the modality default.

        Returns:
            (N, 3, S, S) float32 on the input's device, S = ``input_size`` (or (N, 3, H, W) when
            ``input_size`` is None).
        """
        x = torch.as_tensor(slices)
        if x.ndim != 3:
            raise ValueError(f"preprocess expects slices of shape (N, H, W), got {tuple(x.shape)}")
        x = x.float()
        lo, hi = self._clip_bounds(x, modality, window)  # (N, 1, 1) each
        scale = hi - lo
        empty = scale <= 0
        out = (x.clamp(min=lo, max=hi) - lo) / torch.where(empty, torch.ones_like(scale), scale)
        out = torch.where(empty, torch.zeros_like(out), out)
        if window is None and modality.lower() != "ct":
            out = torch.where(x == 0, torch.zeros_like(out), out)
        out = out.unsqueeze(1).expand(-1, 3, -1, -1)  # (N, 3, H, W)
        if self.input_size is not None and tuple(out.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
        return ((out - mean) / std).contiguous()

    @staticmethod
    def _clip_bounds(
        x: torch.Tensor, modality: str, window: tuple[float, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if window is None and modality.lower() == "ct":
            window = CT_DEFAULT_WINDOW
        if window is not None:
            level, width = float(window[0]), float(window[1])
            lo = torch.full((n, 1, 1), level - width / 2, dtype=x.dtype, device=x.device)
            return lo, lo + width
        lo = torch.zeros(n, 1, 1, dtype=x.dtype, device=x.device)
        hi = torch.zeros_like(lo)
        q = torch.tensor([p / 100 for p in MR_PERCENTILES], dtype=x.dtype, device=x.device)
        for i in range(n):  # per slice: torch.quantile has a size limit and needs the nonzero subset
            vals = x[i][x[i] != 0]
            if vals.numel():
                lo[i, 0, 0], hi[i, 0, 0] = torch.quantile(vals, q)
        return lo, hi

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> SliceEncoder:
        """Stop training this encoder: no gradients, eval mode, and :meth:`train` keeps eval.

        Returns:
            ``self``, for chaining.
        """
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        super().train(False)
        return self

    def unfreeze(self) -> SliceEncoder:
        """Undo :meth:`freeze` (parameters trainable again; mode is left as is)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> SliceEncoder:
        """Set training mode; a frozen encoder stays in eval mode (its norms keep their statistics)."""
        return super().train(mode and not getattr(self, "frozen", False))

    # ------------------------------------------------------------------ identity
    def weights_id(self) -> str:
        """Short content hash of the weights, used as a feature-cache key.

        The hash covers the encoder's name and every state-dict entry (name, dtype, shape and
        bytes), so any change to a weight or buffer gives a different id.

        Returns:
            The first 16 hex digits of a sha256.
        """
        h = hashlib.sha256(self.name.encode())
        for key, t in sorted(self.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}, "
            f"input_size={self.input_size}, frozen={self.frozen}"
        )


def build_encoder(name: str, **kwargs: Any) -> SliceEncoder:
    """Build a registered slice encoder by name.

    Args:
        name: registry name, e.g. ``"tiny"`` (unknown names raise a ConfigError listing the valid ones).
        **kwargs: passed to the encoder's factory.

    Returns:
        The encoder (not frozen; call :meth:`SliceEncoder.freeze` to freeze it).
    """
    factory = ENCODERS.get(name)
    check_encoder_params(name, factory, kwargs)
    enc = factory(**kwargs)
    if not isinstance(enc, SliceEncoder):
        raise TypeError(f"encoder factory '{name}' returned {type(enc).__name__}, not a SliceEncoder")
    return enc


def check_encoder_params(name: str, factory: Any, params: dict[str, Any]) -> None:
    """Refuse ``encoder_params`` keys the encoder does not take, in one line (a traceback before).

    A YAML flow mapping without a space after the colon, ``{out_channels:16}``, reads as the key
    ``"out_channels:16"`` with no value: the message names the key and says so.

    Raises:
        ConfigError: naming ``encoder_params``, the unknown keys, the accepted ones and the fix.
    """
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = [k for k in params if k not in accepted]
    if not unknown:
        return
    hint = ("; YAML needs a space after each colon ({out_channels: 16})" if any(":" in str(k) for k in unknown)
            else "")
    raise ConfigError("encoder_params", f"encoder '{name}' takes no {', '.join(repr(k) for k in unknown)}{hint}",
                      f"use some of: {', '.join(accepted)}")
