"""Losses shared by the families: contrastive InfoNCE and MONAI segmentation losses."""

from medfuse.losses.contrastive import InfoNCE, info_nce
from medfuse.losses.segmentation import build_segmentation_loss

__all__ = ["InfoNCE", "info_nce", "build_segmentation_loss"]
