"""The platform's baselines: a 3D CNN classifier, a MONAI UNet and a 3D CNN + bag-of-words CLIP.

They use the engine's generic tasks, evaluators and predictors unchanged; every family's
classifier, segmenter or encoder is compared against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medfuse.config import Params
from medfuse.engine.evaluate import ClassificationEvaluator, RetrievalEvaluator
from medfuse.engine.predictors import ClassificationPredictor, EmbeddingPredictor, SegmentationPredictor
from medfuse.engine.segmentation_evaluator import SegmentationEvaluator
from medfuse.engine.tasks import ClassificationTask, ContrastiveTask, SegmentationTask
from medfuse.registry import Family, ModelEntry


class CNN3dParams(Params):
    """``baseline_cnn3d``: small 3D CNN classifier with modalities stacked as channels."""

    in_channels: int | None = Field(None, description="stacked modalities M (default: from the data)")
    num_classes: int | None = Field(None, description="classes K (default: from the data)")
    widths: tuple[int, ...] = Field((16, 32, 64), description="channels of the stem and each residual stage")
    dropout: float = Field(0.1, description="dropout before the head")
    spatial_dims: Literal[2, 3] = Field(3, description="3 for volumes, 2 for images")
    norm: Literal["instance", "batch", "group"] | None = Field("instance", description="normalisation of every block")
    pool: Literal["avg", "max", "avgmax"] = Field("avgmax", description="global pooling before the head")


class UNet3dParams(Params):
    """``baseline_unet3d``: MONAI residual UNet; D, H, W divisible by prod(strides)."""

    in_channels: int | None = Field(None, description="stacked modalities M (default: from the data)")
    num_classes: int | None = Field(None, description="output classes K incl. background (default: from the data)")
    channels: tuple[int, ...] = Field((8, 16, 32), description="channels per level")
    strides: tuple[int, ...] = Field((2, 2), description="downsampling stride between levels")
    num_res_units: int = Field(1, description="residual units per level")


class Clip3dParams(Params):
    """``baseline_clip3d``: 3D CNN image embedding + hashed bag-of-words text embedding."""

    in_channels: int | None = Field(None, description="stacked modalities M (default: from the data)")
    dim: int = Field(32, description="embedding width E")
    widths: tuple[int, ...] = Field((8, 16), description="CNN channels per stage")


def _need(p: Params, *keys: str) -> None:
    from medfuse.errors import ConfigError

    for k in keys:
        if getattr(p, k) is None:
            raise ConfigError(f"model.params.{k}", "not set and not derivable from the data", f"set model.params.{k}=...")


def build_cnn3d(p: CNN3dParams):
    from medfuse.families.baseline.model import BaselineCNN

    _need(p, "in_channels", "num_classes")
    return BaselineCNN(p.in_channels, p.num_classes, tuple(p.widths), p.dropout, p.spatial_dims, p.norm, p.pool)


def build_unet3d(p: UNet3dParams):
    """MONAI ``UNet``: (B, M, D, H, W) -> logits (B, K, D, H, W)."""
    from monai.networks.nets import UNet

    _need(p, "in_channels", "num_classes")
    return UNet(spatial_dims=3, in_channels=p.in_channels, out_channels=p.num_classes, channels=tuple(p.channels),
                strides=tuple(p.strides), num_res_units=p.num_res_units)


def build_clip3d(p: Clip3dParams):
    """``forward(image, text) -> (image_emb (B, E), text_emb (B, E))``."""
    from medfuse.families.baseline.clip import Clip3d

    _need(p, "in_channels")
    return Clip3d(p.in_channels, p.dim, tuple(p.widths))


FAMILY = Family(
    name="baseline",
    help="platform baselines: 3D CNN classifier, MONAI UNet, 3D CNN + bag-of-words CLIP",
    models=(
        ModelEntry("baseline_cnn3d", CNN3dParams, build_cnn3d, ClassificationTask, ClassificationEvaluator,
                   ClassificationPredictor, help="small 3D CNN classifier; modalities stacked as channels"),
        ModelEntry("baseline_unet3d", UNet3dParams, build_unet3d, SegmentationTask, SegmentationEvaluator,
                   SegmentationPredictor, help="MONAI residual UNet (segmentation baseline)"),
        ModelEntry("baseline_clip3d", Clip3dParams, build_clip3d, ContrastiveTask, RetrievalEvaluator,
                   EmbeddingPredictor, help="3D CNN + hashed bag-of-words text (contrastive baseline)"),
    ),
    make_demo=None,
    demo_ablations=(
        ("3D CNN, T2W + DWI", ()),
        ("3D CNN, T2W only", ("data.modalities=[t2w]",)),
        ("3D CNN, DWI only", ("data.modalities=[dwi]",)),
    ),
)
