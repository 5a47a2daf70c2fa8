"""Losses shared by the families: contrastive InfoNCE (plain and multi-positive, with global
negatives under DDP), NT-Xent and MONAI segmentation losses."""

from medfuse.losses.contrastive import InfoNCE, info_nce, multi_positive_info_nce
from medfuse.losses.segmentation import build_segmentation_loss

__all__ = ["InfoNCE", "info_nce", "multi_positive_info_nce", "build_segmentation_loss"]
