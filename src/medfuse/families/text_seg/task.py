"""The text_seg family's task: 2D box + text prompted segmentation, selected on validation Dice.

Training optimises Dice + BCE on the mask logits plus ``contrastive_weight`` x InfoNCE between the
image embedding pooled under the target mask and the coarse text token (seed 002 [Training
Objective]). Validation logs ``val/loss`` (Dice + BCE only: the InfoNCE term is a training
regulariser) and ``val/dice``, the mean per-image Dice of the thresholded mask logits against the
masks at ``data.params.mask_size``, on which the demo selects its checkpoint.

The engine's :class:`~medfuse.engine.tasks.SegmentationTask` scores softmax label maps of
``model(image)`` on 3D volumes with a MONAI loss chosen by ``train.seg_loss``; none of that applies
to one-channel mask logits from (image, box, text), so this task derives from
:class:`~medfuse.engine.tasks.BaseTask` with the segmentation kind.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.engine.tasks import BaseTask, Batch
from medfuse.losses import multi_positive_info_nce


class TextSegBatch(Batch, total=False):
    """A collated text_seg batch (:class:`~medfuse.families.text_seg.data.TextSegDataset`).

    Keys (besides ``case_id`` and ``text``):
        image: (B, 3, S, S) in [0, 1].
        box: (B, 4) (x0, y0, x1, y1) in model-input pixels.
        mask: (B, 1, m, m) binary float target (absent for prediction).
        orig_size: (B, 2) original (H, W).
    """

    box: torch.Tensor
    orig_size: torch.Tensor


class TextSegOutput(TypedDict, total=False):
    """mask_logits: (B, 1, m, m) sigmoid logits of the target; image_emb, text_emb: (B, E), the two
    sides of the InfoNCE term (training/validation only); gate: (B,) the gated baseline's mean image
    share (inference with ``fusion: gated`` only)."""

    mask_logits: torch.Tensor
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    gate: torch.Tensor


def binary_dice(logits: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per-image Dice of ``logits > 0`` against ``mask > 0.5``, both (B, 1, m, m) -> (B,).

    MONAI's ``compute_dice``; an empty prediction of an empty mask scores 1 (``ignore_empty=False``).
    """
    from monai.metrics import compute_dice

    pred, target = (logits.detach() > 0).float(), (mask.detach() > 0.5).float()
    return compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0].double().cpu().numpy()


class TextSegTask(BaseTask):
    """Dice + BCE + w x InfoNCE on (image, box, text) batches; validation Dice for model selection."""

    kind = "segmentation"
    val_metrics = ("dice",)
    loss_terms = ("dice_loss", "bce", "contrastive", "temperature")

    def forward_batch(self, batch: TextSegBatch) -> TextSegOutput:
        """Training/validation forward: mask logits at the masks' size and the InfoNCE embeddings."""
        model = self.model
        mask = batch.get("mask")
        out = model(batch["image"], batch["box"], batch["text"], tuple(mask.shape[-2:]) if mask is not None else None)
        logits = out["mask_logits"]
        weights = mask if (mask is not None and model.contrastive_pool == "mask") else None
        if weights is None and model.contrastive_pool == "mask":
            weights = torch.sigmoid(logits).detach()
        image_emb, text_emb = model.contrastive_embeddings(out["embedding"], out["text"], weights)
        return {"mask_logits": logits, "image_emb": image_emb, "text_emb": text_emb}

    def loss_weights(self) -> dict[str, float]:
        """``dice``, ``bce``, ``contrastive`` from the params, overridden by the stage's ``losses``."""
        p = self.params
        w = {"dice": p.dice_weight, "bce": p.bce_weight, "contrastive": p.contrastive_weight}
        if self.stage_cfg is not None and self.stage_cfg.losses:
            w.update(self.stage_cfg.losses)
        return w

    def compute_loss(self, batch: TextSegBatch, out: TextSegOutput) -> dict[str, torch.Tensor]:
        """Dice + BCE + w * InfoNCE. In eval mode ``loss`` is Dice + BCE only."""
        from monai.losses import DiceLoss

        w = self.loss_weights()
        target = batch["mask"].to(out["mask_logits"].dtype)
        logits = out["mask_logits"].float()
        dice = DiceLoss(sigmoid=True)(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        scale = self.model.contrastive.scale
        con = multi_positive_info_nce(out["image_emb"], out["text_emb"], list(batch["text"]), scale)
        seg = w["dice"] * dice + w["bce"] * bce
        total = seg + w["contrastive"] * con if self.training else seg
        return {"loss": total, "dice_loss": dice.detach(), "bce": bce.detach(), "contrastive": con.detach(),
                "temperature": (1.0 / scale).detach()}

    def collect(self, batch: TextSegBatch, out: TextSegOutput) -> dict[str, Any]:
        return {"dice": binary_dice(out["mask_logits"], batch["mask"])}

    def epoch_metrics(self, merged: dict[str, Any]) -> dict[str, float]:
        return {"dice": float(np.mean(merged["dice"]))}

    def infer(self, batch: TextSegBatch) -> TextSegOutput:
        """Evaluation/prediction forward: mask logits at the decoder's resolution (B, 1, 4h, 4w), outside
        the box prompt (grown by ``model.params.box_margin``) background, and with ``fusion: gated`` the
        mean image share ``gate`` (B,), from one forward pass."""
        out, inter = self.model.forward_intermediates(batch["image"], batch["box"], batch["text"], restrict=True)
        return {"mask_logits": out["mask_logits"], **inter}
