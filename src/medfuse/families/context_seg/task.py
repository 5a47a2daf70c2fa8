"""The context_seg family's task: voxel-wise segmentation of stacked raw + context features.

An item's ``image`` is (C_raw + C_ctx, D, H, W) (see :mod:`medfuse.families.context_seg.data`);
the model splits the two streams itself, so training, validation and the sliding-window
inference of :class:`~medfuse.engine.tasks.SegmentationTask` run unchanged. This task adds the
inference that also returns the attention gates, for evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from medfuse.engine.tasks import Batch, SegmentationTask


class ContextSegTask(SegmentationTask):
    """MONAI segmentation loss (``train.seg_loss``) on (B, K, D, H, W) logits from stacked features."""

    @property
    def size_divisor(self) -> int:
        """1: the network pads D, H, W to a multiple of 2^levels itself."""
        return 1

    def infer_intermediates(self, batch: Batch) -> dict[str, Any]:
        """Inference that also keeps what evaluation shows, from one (sliding-window) pass.

        Returns:
            ``logits`` (B, K, D, H, W), the same as :meth:`infer`, and with attention fusion
            ``attention`` (B, 1, D, H, W): the level-1 context gate averaged over its channels
            (stitched like the logits when ``eval.roi_size`` is set).
        """

        def predictor(image: torch.Tensor) -> dict[str, torch.Tensor]:
            logits, inter = self.model.forward_intermediates(image)
            out = {"logits": logits}
            if "attention" in inter:
                out["attention"] = inter["attention"][0].mean(1, keepdim=True)  # (B, 1, D, H, W)
            return out

        return dict(self.run_inference(predictor, batch["image"]))  # eval.roi_size / tta, padded to the divisor
