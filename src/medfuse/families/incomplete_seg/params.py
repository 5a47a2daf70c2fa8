"""``model.params`` and ``data.params`` of the incomplete_seg family (seed 003, UniMRSeg);
``medfuse models incomplete_seg`` prints them.

The network takes the architecture fields (:data:`NETWORK_FIELDS`); the others are training and
validation options that :class:`~medfuse.families.incomplete_seg.task.IncompleteSegTask` reads
from its typed ``params``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from medfuse.config import Params

REGION_PRESETS: dict[str, dict[str, list[int]]] = {
    "brats": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},  # BraTS <= 2021: NCR 1, ED 2, ET 4
    "brats2023": {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]},  # BraTS 2023+: ET is label 3
    "msd": {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]},  # MSD Task01 / nnU-Net: ED 1, NET 2, ET 3
}
"""Region presets of ``data.params.regions``: ordered outer -> inner, raw label values."""

NETWORK_FIELDS = ("modalities", "in_channels", "num_classes", "output", "widths", "aspp_dilations", "norm", "fill",
                  "adapters", "adapter_scale", "channels_last")
"""The :class:`IncompleteSegParams` fields that are arguments of the network's constructor."""


class IncompleteSegParams(Params):
    """UniMRSeg: 3D UNet + ASPP with modality presence; three-stage training for any modality subset."""

    # --- the network
    modalities: list[str] | None = Field(None, description="modality names in channel order (default: from the data)")
    in_channels: int = Field(4, ge=1, description="M modalities (from the data)")
    num_classes: int = Field(4, description="canonical labels R + 1 for R nested regions (from the data module)")
    output: Literal["regions", "labels"] = Field(
        "regions", description="nested sigmoid regions (WT >= TC >= ET always) or a softmax over the R + 1 labels")
    widths: tuple[int, ...] = Field((64, 128, 256, 512), description="channels of the conv levels (peer: 64..512)")
    aspp_dilations: tuple[int, ...] = Field((1, 6, 12, 18), description="dilations of the ASPP bottleneck (peer: 1/6/12/18)")
    norm: Literal["instance", "batch", "group"] = Field("instance", description="normalisation of every block")
    fill: Literal["zero", "learned"] = Field("zero", description="missing modalities: zeros or a learned value per modality")
    adapters: bool = Field(True, description="build the stage-3 reverse attention adapters (an adapt stage needs them)")
    adapter_scale: float | None = Field(0.1, description="initial layer scale of the adapters (None: the peer's gamma = 1)")
    channels_last: bool = Field(True, description="channels_last_3d memory format (faster on CPU, preferred by cuDNN)")
    # --- training
    modality_dropout: float = Field(0.0, ge=0, le=1,
                                    description="plain segmentation (no stages) only: probability that a case loses modalities")
    mask_drop_p: float = Field(0.5, ge=0, le=1, description="stage 1: probability of modality dropout per case")
    mask_shuffle: bool = Field(True, description="stage 1: pack the kept modalities into the first channels in random order")
    mask_ratio: float = Field(0.15, ge=0, le=1, description="stage 1: fraction of voxels/patches zeroed")
    mask_granularity: Literal["voxel", "patch"] = Field("patch", description="stage 1: spatial masking unit")
    mask_patch: int = Field(4, ge=1, description="stage 1: patch edge (voxels)")
    ssim_window: int = Field(7, ge=1, description="stage 1: SSIM window of the reconstruction loss")
    temperature: float = Field(0.5, gt=0, description="stage 2: NT-Xent temperature")
    combos_per_step: int | None = Field(None, ge=1,
                                        description="stage 3: incomplete combinations per step, round-robin (None: all 2^M - 2)")
    # --- validation
    val_roi_size: tuple[int, int, int] | None = Field(None, description="sliding-window ROI of the validation criterion (None: whole volume)")
    val_combos_per_case: int | None = Field(
        None, ge=1, description="score each validation case on this many of its modality combinations (fixed per case id; None: all)")

    def network_kwargs(self) -> dict[str, Any]:
        """The network's constructor arguments."""
        return self.model_dump(include=set(NETWORK_FIELDS))


class IncompleteSegDataParams(Params):
    """``data.params`` of the incomplete_seg data module."""

    regions: str | dict[str, list[int]] = Field(
        "auto", description="nested regions outer to inner: auto (from the data set's label names), brats, "
                            "brats2023, msd, or {name: [raw label values]}")

    @field_validator("regions", mode="wrap")
    @classmethod
    def _regions(cls, v: Any, handler: Any) -> Any:
        """One message for every malformed value (not one per member of the union)."""
        fix = f"give auto, {', '.join(REGION_PRESETS)} or {{name: [positive label values]}}, outer to inner"
        if isinstance(v, str):
            if v != "auto" and v not in REGION_PRESETS:
                raise ValueError(f"unknown preset '{v}': {fix}")
            return v
        if not isinstance(v, dict) or not v or not all(
                isinstance(vals, list) and vals and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                        for x in vals) for vals in v.values()):
            raise ValueError(f"invalid regions {v!r}: {fix}")
        return handler(v)


def build_incomplete_seg(p: IncompleteSegParams):
    """The UniMRSeg network from validated params (its architecture fields)."""
    from medfuse.families.incomplete_seg.model import IncompleteSegNet

    return IncompleteSegNet(**p.network_kwargs())
