"""``model.params`` and ``data.params`` of the context_seg family (seed 004); ``medfuse models
context_seg`` prints them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from medfuse.config import Params
from medfuse.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]


class ContextSegParams(Params):
    """``context_seg``: 3D UNet over frozen raw features, gated at the skips by context features."""

    num_classes: int | None = Field(None, ge=2, description="K output classes incl. background (default: from the "
                                    "data's mask labels)")
    feature_channels: int = Field(32, ge=1, description="C of the raw features = the data encoder's out_channels "
                                  "(tiny: 32 unless encoder_params say otherwise; DINOv3 ViT-S 384, ViT-L 1024)")
    context_channels: int | None = Field(None, ge=1, description="C of the context features "
                                         "(default: feature_channels)")
    base: int = Field(32, ge=1, description="width of the first level; level i has base * 2^i channels, the "
                      "bottleneck base * 2^levels (seed: 128)")
    levels: int = Field(4, ge=1, description="encoder levels with a skip (seed: 4); D, H, W are padded to a "
                        "multiple of 2^levels")
    fusion: Literal["attention", "concat", "none"] = Field(
        "attention", description="attention: context gates the skips (the design); concat: one 2C-channel input "
        "(the seed's old way); none: raw features only")
    reduction: int = Field(4, ge=1, description="bottleneck ratio of the attention MLP (seed: 4)")
    norm: Literal["batch", "instance", "group"] = Field(
        "batch", description="normalisation of every block and the fusion MLP (instance/group norm erase a "
        "context that is nearly constant over a patch)")
    up_mode: Literal["trilinear", "transpose"] = Field("trilinear", description="decoder upsampling (seed: trilinear)")
    dropout: float = Field(0.0, ge=0, lt=1, description="channel dropout before the output conv")


def build_context_seg(p: ContextSegParams):
    """The context_seg model from validated params.

    Raises:
        ConfigError: fewer than 2 classes (none declared by the data and none set).
    """
    from medfuse.families.context_seg.model import ContextSegModel

    if p.num_classes is None or p.num_classes < 2:
        raise ConfigError("data.num_classes", f"context_seg needs >= 2 classes, got {p.num_classes}",
                          "declare mask_labels (background first) or set data.num_classes")
    return ContextSegModel(in_channels=p.feature_channels, num_classes=p.num_classes,
                           context_channels=p.context_channels, base=p.base, levels=p.levels, fusion=p.fusion,
                           reduction=p.reduction, norm=p.norm, up_mode=p.up_mode, dropout=p.dropout)


class ContextSegDataParams(Params):
    """``data.params`` of the context_seg family: the two streams, the frozen encoder, the training patches."""

    raw: str = Field("raw", description="modality name of the raw stream in the case table")
    context: str = Field("context", description="modality name of the context stream (paired mode)")
    context_mode: Literal["paired", "derived"] = Field(
        "paired", description="paired: a context file per case; derived: the context is made from the raw file")
    context_scale: float | tuple[float, float, float] | Literal["auto"] = Field(
        "auto", validate_default=True,
        description="context voxel size / raw voxel size, one number or (d, h, w); auto: the ratio of the files' "
                    "spacings (paired mode only)")
    context_fov: float = Field(1.0, ge=1.0, description="derived mode: the raw field of view is the central "
                               "1/context_fov of the raw file")
    label_scale: float | tuple[float, float, float] | None = Field(
        None, description="label voxels per raw voxel, one number or (d, h, w); None infers it per case "
                          "(one factor for all axes)")
    encoder: str = Field("tiny", description="registered frozen slice encoder: tiny (CPU), dinov3, ...")
    encoder_params: dict[str, Any] = Field(default_factory=dict,
                                           description="keyword arguments of the encoder (e.g. weights: a folder)")
    encoder_seed: int = Field(0, description="seed the encoder is built with (the tiny encoder's weights are random)")
    raw_input_size: int | None = Field(None, ge=1, description="slice size fed to the encoder for the raw stream "
                                       "(None: the encoder's own input_size); larger gives finer feature maps")
    context_input_size: int | None = Field(None, ge=1, description="slice size fed to the encoder for the context "
                                           "stream (None: the encoder's own input_size)")
    tri_planar: bool | Literal["raw", "context"] = Field(
        False, description="average XY, XZ and YZ passes: true for both streams, raw or context for one")
    intensity: Literal["mr", "ct"] = Field("mr", description="encoder preprocessing: mr = per-slice percentiles, "
                                           "ct = window")
    window: tuple[float, float] | None = Field(None, description="CT window (low, high) for intensity: ct")
    slice_batch_size: int = Field(16, ge=1, description="slices per encoder call")
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (32, 32, 32), description="training patch on the label grid (D, H, W)")
    foreground_ratio: float = Field(0.7, ge=0.0, le=1.0, description="fraction of patch centres on labelled voxels")
    samples_per_case: int = Field(4, ge=1, description="training patches per case per epoch")
    flip: bool = Field(True, description="random flips of training patches (both streams and labels alike)")
    classes: list[str] | None = Field(
        None, description="CellMap (layout cellmap): the classes of the label map, value k = classes[k - 1] "
                          "(e.g. [mito, er, nuc]); required there")
    raw_resolution: float | tuple[float, float, float] | None = Field(
        None, description="CellMap: target raw voxel size in nm (d, h, w); the coarsest level not coarser is read "
                          "(None: s0)")
    label_resolution: float | tuple[float, float, float] | None = Field(
        None, description="CellMap: label voxel size in nm (None: the raw level's; finer labels give label_scale > 1)")
    context_resolution: float | tuple[float, float, float] | None = Field(
        None, description="CellMap: target context voxel size in nm (None: raw voxel size x context_extent)")
    context_extent: float = Field(4.0, ge=1.0, description="CellMap: context box / crop box per axis, centred on the "
                                  "crop (read from the coarser level; padded with edge values outside the volume)")
    missing_classes: Literal["skip", "background"] = Field(
        "skip", description="CellMap: a crop that does not annotate every chosen class is left out (skip), or its "
                            "unannotated classes count as background")

    @field_validator("context_scale")
    @classmethod
    def _derived_needs_a_factor(cls, v: Any, info: ValidationInfo) -> Any:
        if v == "auto" and info.data.get("context_mode") == "derived":
            raise ValueError("derived context needs a downsampling factor: set data.params.context_scale, e.g. 4")
        return v
