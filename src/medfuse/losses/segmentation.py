"""Segmentation losses: thin, config-driven wrappers over MONAI's Dice/CE/Focal losses."""

from __future__ import annotations

from torch import nn


def build_segmentation_loss(kind: str = "dice_ce", *, sigmoid: bool = False, include_background: bool = True,
                            focal_gamma: float = 2.0, class_weights: list[float] | None = None) -> nn.Module:
    """Build a MONAI segmentation loss.

    Args:
        kind: ``dice_ce`` (Dice + cross-entropy), ``dice_focal`` or ``dice``.
        sigmoid: multi-label regions with sigmoid outputs (targets one-hot (B, K, ...)); otherwise
            softmax over classes with integer targets (B, 1, ...).
        include_background: whether channel 0 counts in the Dice term.
        focal_gamma: focusing parameter of the focal term.
        class_weights: per-class weights of the CE/focal term.

    Returns:
        A module ``loss(logits (B, K, *spatial), target) -> scalar``.
    """
    import torch
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss

    common = dict(include_background=include_background, sigmoid=sigmoid, softmax=not sigmoid,
                  to_onehot_y=not sigmoid)
    w = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if kind == "dice_ce":
        return DiceCELoss(**common, weight=w)
    if kind == "dice_focal":
        return DiceFocalLoss(**common, gamma=focal_gamma, weight=w)
    if kind == "dice":
        return DiceLoss(**common)
    from medfuse.errors import ConfigError

    raise ConfigError("train.seg_loss", f"unknown segmentation loss '{kind}'", "use dice_ce, dice_focal or dice")
