"""MedSAM2 image encoder: SAM2.1 Hiera-Tiny trunk + FPN neck (REFERENCE.md "MedSAM2").

The trunk is timm's ``sam2_hiera_tiny`` (HieraDet), read through ``forward_intermediates`` (4
stages, highest resolution first: 96@S/4, 192@S/8, 384@S/16, 768@S/32). The neck is our own
:class:`FpnNeck`, whose parameter names match SAM2's ``image_encoder.neck.convs.N.conv.*``, so a
MedSAM2 / SAM2.1 checkpoint (``{"model": state_dict}``) loads strictly into
:class:`MedSAM2Encoder`. The encoder returns SAM2's ``vision_features``: (N, 256, S/16, S/16),
i.e. (N, 256, 32, 32) at the native 512 input.

This module also holds the MedSAM/MedSAM2 intensity pipeline (clip, min-max to [0, 255], uint8,
bicubic resize, re-quantise), shared with the MedSAM ViT-B encoder, and
:func:`load_encoder_checkpoint`, which loads the image-encoder part of a full SAM-style checkpoint
and counts the keys it ignores.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfuse.encoders.base import CT_DEFAULT_WINDOW, MR_PERCENTILES, SliceEncoder
from medfuse.encoders.weights import LoadReport, load_weights
from medfuse.errors import WeightsError
from medfuse.registry import ENCODERS

__all__ = [
    "EncoderLoadReport",
    "FpnNeck",
    "MedSAM2Encoder",
    "intensity_to_uint8",
    "load_encoder_checkpoint",
    "resize_uint8",
]

TRUNK_PREFIX = "image_encoder.trunk."
NECK_PREFIX = "image_encoder.neck."


# ---------------------------------------------------------------------------------------------
# MedSAM / MedSAM2 intensity pipeline
# ---------------------------------------------------------------------------------------------
def intensity_to_uint8(
    x: torch.Tensor,
    modality: str = "mr",
    window: tuple[float, float] | None = None,
    per_volume: bool = True,
) -> torch.Tensor:
    """Clip raw intensities and min-max scale them to uint8 grey levels, as MedSAM/MedSAM2 do.

    - CT (or any ``window``): clip to ``[level - width/2, level + width/2]`` (default
      :data:`~medfuse.encoders.base.CT_DEFAULT_WINDOW`), then min-max scale the clipped values.
    - MR (no window): clip to the 0.5-99.5 percentiles of the nonzero voxels, min-max scale, and set
      voxels that were exactly 0 (background) back to 0.

    Scaling maps [min, max] of the clipped values to [0, 255]; the result is truncated to integers
    (``np.uint8`` semantics). A group whose clipped range is empty becomes all zeros.

    Args:
        x: (N, H, W) raw intensities (N slices of one volume, or N unrelated slices).
        modality: ``"mr"`` or ``"ct"`` (case-insensitive); other names are treated as MR.
        window: ``(level, width)`` in the image's units; overrides the modality default.
        per_volume: compute percentiles and min/max over all N slices together (MedSAM2's
            per-volume recipe) instead of per slice.

    Returns:
        (N, H, W) float32 holding integers in [0, 255], on ``x``'s device.
    """
    x = torch.as_tensor(x)
    if x.ndim != 3:
        raise ValueError(f"expected slices of shape (N, H, W), got {tuple(x.shape)}")
    x = x.float()
    groups = [x] if per_volume else list(x.unbind(0))
    use_window = window is not None or modality.lower() == "ct"
    if use_window:
        level, width = (float(v) for v in (window if window is not None else CT_DEFAULT_WINDOW))
    out = []
    for g in groups:  # g: (D, H, W) for a volume or (H, W) for a slice
        if use_window:
            lo, hi = level - width / 2, level + width / 2
        else:
            vals = g[g != 0]
            if vals.numel() == 0:
                out.append(torch.zeros_like(g))
                continue
            # numpy: torch.quantile refuses inputs above 16M elements (a 300x512x512 CT has 78M).
            lo, hi = np.percentile(vals.cpu().numpy().astype(np.float64), MR_PERCENTILES).tolist()
        c = g.clamp(min=lo, max=hi)
        cmin, cmax = c.min(), c.max()
        if not bool(cmax > cmin):
            out.append(torch.zeros_like(g))
            continue
        u = ((c - cmin) / (cmax - cmin) * 255.0).floor_()
        if not use_window:
            u = torch.where(g == 0, torch.zeros_like(u), u)
        out.append(u)
    return out[0] if per_volume else torch.stack(out)


def resize_uint8(u: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic-resize uint8 grey levels to ``size`` x ``size`` and re-quantise them, like PIL.

    MedSAM2 resizes its uint8 RGB slices with PIL's bicubic filter and gets uint8 back. PIL resizes
    in two passes, width first, rounding and clamping to uint8 after each; it antialiases when
    shrinking. ``F.interpolate(mode="bicubic", antialias=True)`` uses the same kernel (a = -0.5), so
    the same two quantised passes match PIL to within one or two grey levels on under 1% of the
    pixels, while running batched on any device.

    Args:
        u: (N, H, W) integer grey levels in [0, 255] (any float dtype).
        size: S, the output side length.

    Returns:
        (N, 1, S, S) float32 integers in [0, 255].
    """
    v = u.float().unsqueeze(1)  # (N, 1, H, W)
    for target in ((v.shape[-2], size), (size, size)):  # width pass, then height pass
        if tuple(v.shape[-2:]) != target:
            v = F.interpolate(v, size=target, mode="bicubic", align_corners=False, antialias=True)
            v = v.round_().clamp_(0.0, 255.0)
    return v


def _normalise(v: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 1, S, S) in [0, 1] -> (N, 3, S, S) normalised with per-channel mean/std."""
    m = torch.tensor(mean, dtype=v.dtype, device=v.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=v.dtype, device=v.device).view(1, 3, 1, 1)
    return ((v.expand(-1, 3, -1, -1) - m) / s).contiguous()


# ---------------------------------------------------------------------------------------------
# Checkpoint loading shared with the SAM ViT-B encoder
# ---------------------------------------------------------------------------------------------
@dataclass
class EncoderLoadReport(LoadReport):
    """A :class:`~medfuse.encoders.weights.LoadReport` plus the checkpoint keys that were skipped.

    Attributes:
        ignored: checkpoint keys outside the image encoder (memory attention, prompt encoder,
            mask decoder, ...); they are not the encoder's business and never fail a load.
    """

    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = super().summary()
        if self.ignored:
            text += f"; {len(self.ignored)} non-encoder keys ignored"
        return text


def load_encoder_checkpoint(
    model: nn.Module,
    path: str | Path,
    rename: Callable[[str], str | None],
    *,
    strict: bool = True,
    allow_missing: Sequence[str] = (),
    expected: str = "image_encoder.*",
) -> EncoderLoadReport:
    """Load the image-encoder part of a SAM-style checkpoint into ``model``.

    Args:
        model: the encoder module.
        path: local checkpoint (safetensors or torch; a ``{"model": ...}`` wrapper is unwrapped).
        rename: checkpoint key -> model key, or ``None`` for a key outside the encoder (ignored and
            counted in :attr:`EncoderLoadReport.ignored`).
        strict: fail on missing, unexpected or mismatched encoder keys.
        allow_missing: fnmatch patterns of model keys that may be absent.
        expected: what the encoder keys look like, for the error message when there are none.

    Returns:
        The :class:`EncoderLoadReport`.

    Raises:
        WeightsError: unreadable file, no encoder key at all, or (``strict``) a mismatch.
    """
    ignored: list[str] = []
    kept: list[str] = []

    def remap(key: str) -> str | None:
        new = rename(key)
        (ignored if new is None else kept).append(key)
        return new

    try:
        report = load_weights(model, path, remap=remap, strict=strict, allow_missing=allow_missing)
    except WeightsError:
        # Only a checkpoint that was read (its keys went through ``remap``) and held no encoder key
        # gets this message; a missing, unreadable or non-checkpoint file keeps load_weights' own.
        if ignored and not kept:
            raise WeightsError(
                path,
                f"no image-encoder keys ({expected}) among its {len(ignored)} keys "
                f"(e.g. {', '.join(ignored[:2])})",
                f"pass a checkpoint of this encoder ({type(model).__name__})",
            ) from None
        raise
    return EncoderLoadReport(**asdict(report), ignored=ignored)


def _rename_sam2_key(key: str) -> str | None:
    """MedSAM2/SAM2 checkpoint key -> :class:`MedSAM2Encoder` key (``None``: not the encoder)."""
    if key.startswith(TRUNK_PREFIX):
        from timm.models.hieradet_sam2 import checkpoint_filter_fn

        # timm's own SAM2 -> HieraDet mapping (strips the prefix, mlp.layers.0/1 -> mlp.fc1/fc2).
        (new,) = checkpoint_filter_fn({key: None}, prefix=TRUNK_PREFIX)
        return "trunk." + new
    if key.startswith(NECK_PREFIX):
        return "neck." + key[len(NECK_PREFIX) :]
    if key.startswith(("trunk.", "neck.")):  # our own state dict (e.g. save_safetensors(encoder))
        return key
    return None


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class FpnNeck(nn.Module):
    """SAM2's feature-pyramid neck (1x1 laterals, top-down fusion at selected levels).

    Levels are numbered like the trunk's outputs, highest resolution first (level 0 = stride 4).
    ``convs`` are listed from the *lowest* resolution level: ``convs[0]`` is the lateral of the last
    trunk stage. Going from the lowest resolution up, a level in ``top_down_levels`` adds the
    2x-upsampled output of the level below it to its lateral; every other level is lateral only
    (and restarts the top-down chain). Parameter names are ``convs.{i}.conv.{weight,bias}``, as in
    SAM2 checkpoints under ``image_encoder.neck.``.

    Args:
        d_model: output channels of every level.
        backbone_channel_list: trunk channels, lowest resolution first (e.g. ``[768, 384, 192, 96]``).
        top_down_levels: levels that receive top-down features.
        interp: upsampling mode of the top-down path (``"nearest"`` for SAM2.1).
    """

    def __init__(
        self,
        d_model: int = 256,
        backbone_channel_list: Sequence[int] = (768, 384, 192, 96),
        top_down_levels: Sequence[int] = (2, 3),
        interp: str = "nearest",
    ):
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)
        self.top_down_levels = set(top_down_levels)
        self.interp = interp
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, d_model, kernel_size=1)))
            for c in self.backbone_channel_list
        )

    def forward(self, xs: Sequence[torch.Tensor], min_level: int = 0) -> list[torch.Tensor | None]:
        """Fuse trunk features.

        Args:
            xs: L trunk maps, highest resolution first; ``xs[i]`` is (N, C_i, H_i, W_i) with C_i =
                ``backbone_channel_list[L - 1 - i]`` and H_i = 2 H_{i+1}.
            min_level: skip levels below this one (their outputs are ``None``); the top-down path
                runs from the lowest resolution up, so higher levels never need lower ones.

        Returns:
            L maps (N, d_model, H_i, W_i), highest resolution first (``None`` below ``min_level``).
        """
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"FpnNeck expects {n} feature maps, got {len(xs)}")
        out: list[torch.Tensor | None] = [None] * n
        prev: torch.Tensor | None = None
        for i in range(n - 1, min_level - 1, -1):  # lowest resolution first
            lateral = self.convs[n - 1 - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                kw = {} if self.interp == "nearest" else {"align_corners": False}
                # SAM2 upsamples in float32 (matters under autocast); the sum promotes accordingly.
                up = F.interpolate(prev.float(), scale_factor=2.0, mode=self.interp, **kw)
                prev = lateral + up
            else:
                prev = lateral
            out[i] = prev
        return out


@ENCODERS.register("medsam2")
class MedSAM2Encoder(SliceEncoder):
    """MedSAM2 / SAM2.1 Hiera-T image encoder: (N, 3, S, S) -> (N, 256, S/16, S/16).

    The output is SAM2's ``vision_features`` with ``scalp=1``: the neck's lowest-resolution level
    (S/32) is discarded and the last remaining level (S/16, the sum of its lateral and the
    upsampled S/32 lateral) is returned. The two high-resolution laterals (``neck.convs.2`` and
    ``neck.convs.3``) only feed :meth:`forward_pyramid`; they are loaded and saved with the rest
    but kept frozen (also by :meth:`unfreeze`), since :meth:`forward` never uses them.

    Preprocessing is MedSAM2's: :meth:`preprocess_volume` computes the MR percentiles (or the CT
    min/max after windowing) over the whole volume, as MedSAM2 does; :meth:`preprocess` is the
    per-slice API and computes them per slice. Both then quantise to uint8, resize bicubically to
    ``input_size``, divide by 255 and apply the ImageNet mean/std. For a single slice the two agree.

    Args:
        weights: local MedSAM2/SAM2.1 checkpoint (``{"model": state_dict}`` with
            ``image_encoder.trunk.*`` and ``image_encoder.neck.*`` keys), or ``None`` for random
            initialisation. Other keys in the file are ignored and counted in :attr:`load_report`.
        input_size: native input size S (512 for MedSAM2, 1024 for SAM2.1).
        strict: fail when an image-encoder key is missing, unexpected or mismatched.
    """

    name = "medsam2"
    out_channels = 256
    stride = 16
    scalp = 1

    def __init__(self, weights: str | Path | None = None, input_size: int = 512, strict: bool = True):
        super().__init__()
        import timm

        self.input_size = int(input_size)
        self.trunk = timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=0)
        # The classifier head (only its norm exists at num_classes=0) is not part of SAM2's trunk.
        self.trunk.prune_intermediate_layers(indices=4, prune_head=True)
        channels = [f["num_chs"] for f in self.trunk.feature_info][::-1]  # [768, 384, 192, 96]
        self.neck = FpnNeck(256, channels, top_down_levels=(2, 3), interp="nearest")
        self._freeze_unused()
        self.load_report: EncoderLoadReport | None = None
        if weights is not None:
            self.load_report = self.load_checkpoint(weights, strict=strict)

    # ------------------------------------------------------------------ weights
    def load_checkpoint(self, path: str | Path, strict: bool = True) -> EncoderLoadReport:
        """Load a MedSAM2/SAM2 checkpoint (or this encoder's own state dict) from a local file.

        Args:
            path: the checkpoint.
            strict: fail when an image-encoder key is missing, unexpected or mismatched.

        Returns:
            The load report (non-encoder keys are listed in ``ignored``).
        """
        report = load_encoder_checkpoint(
            self,
            path,
            _rename_sam2_key,
            strict=strict,
            allow_missing=("trunk.head.norm.*",),
            expected=f"{TRUNK_PREFIX}* / {NECK_PREFIX}*",
        )
        self.load_report = report
        return report

    def sam2_state_dict(self) -> dict[str, torch.Tensor]:
        """This encoder's weights in SAM2's checkpoint layout (``image_encoder.trunk/neck.*``).

        Wrap it as ``{"model": ...}`` and ``torch.save`` it to get a MedSAM2-style checkpoint.
        """
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("trunk."):
                k = TRUNK_PREFIX + k[len("trunk.") :].replace("mlp.fc1", "mlp.layers.0").replace(
                    "mlp.fc2", "mlp.layers.1"
                )
            else:
                k = "image_encoder." + k
            out[k] = v
        return out

    # ------------------------------------------------------------------ forward
    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """SAM2's ``backbone_fpn`` after the scalp.

        Args:
            x: (N, 3, S, S) preprocessed slices.

        Returns:
            3 maps (N, 256, S/4, S/4), (N, 256, S/8, S/8), (N, 256, S/16, S/16); the last one is
            :meth:`forward`'s output.
        """
        feats = self.trunk.forward_intermediates(x, indices=4, intermediates_only=True)
        out = self.neck(feats)
        return out[: len(out) - self.scalp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed slices.

        Args:
            x: (N, 3, H, W), H and W multiples of 32 (S x S from :meth:`preprocess`).

        Returns:
            (N, 256, H / 16, W / 16): SAM2's ``vision_features``.
        """
        feats = self.trunk.forward_intermediates(x, indices=4, intermediates_only=True)
        level = len(feats) - 1 - self.scalp
        return self.neck(feats, min_level=level)[level]

    # ------------------------------------------------------------------ preprocessing
    @torch.no_grad()
    def preprocess_volume(
        self, volume: torch.Tensor, modality: str = "mr", window: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """MedSAM2 preprocessing of one volume (percentiles / min-max over the whole volume).

        Args:
            volume: (D, H, W) raw intensities of one modality.
            modality: ``"mr"`` or ``"ct"``.
            window: ``(level, width)``; CT defaults to (40, 400).

        Returns:
            (D, 3, S, S) float32, S = ``input_size``.
        """
        u = intensity_to_uint8(volume, modality, window, per_volume=True)
        return _normalise(resize_uint8(u, self.input_size) / 255.0, self.mean, self.std)

    @torch.no_grad()
    def preprocess(
        self, slices: torch.Tensor, modality: str = "mr", window: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """MedSAM2 preprocessing with per-slice statistics (see :meth:`preprocess_volume`).

        Args:
            slices: (N, H, W) raw intensities.
            modality: ``"mr"`` or ``"ct"``.
            window: ``(level, width)``; CT defaults to (40, 400).

        Returns:
            (N, 3, S, S) float32.
        """
        u = intensity_to_uint8(slices, modality, window, per_volume=False)
        return _normalise(resize_uint8(u, self.input_size) / 255.0, self.mean, self.std)

    # ------------------------------------------------------------------ freezing
    def _freeze_unused(self) -> None:
        # forward() uses the laterals of the S/32 and S/16 levels only: convs[0] and convs[1].
        for conv in self.neck.convs[self.scalp + 1 :]:
            conv.requires_grad_(False)

    def unfreeze(self) -> MedSAM2Encoder:
        """Make the encoder trainable, except the laterals :meth:`forward` does not use."""
        super().unfreeze()
        self._freeze_unused()
        return self
