"""Family ``context_seg``: a 3D UNet over frozen foundation features with context fusion (seed 004).

Seed sections: "New (Correct) Implementation", "Attention Fusion Mechanism", "Testing & Validation".

Pipeline:

1. :mod:`medfuse.families.context_seg.data` extracts raw and context features slice by slice with a frozen
   2D encoder (DINOv3 or the tiny CPU encoder), resamples both onto the label grid and keeps them
   as two streams (the extraction is in :mod:`medfuse.families.context_seg.features`).
2. :class:`~medfuse.families.context_seg.network.ContextUNet3D`: the raw stream runs a 1x1 input conv, four
   encoder levels, a bottleneck and a trilinear decoder; the context stream (own 1x1 conv,
   avg-pool and 1x1 projection per level) gates the four encoder skips through
   :class:`~medfuse.families.context_seg.fusion.ContextAttentionFusion`, ``raw + raw * att(context)``.
3. Softmax over K classes, trained with MONAI Dice + Focal loss (``train.seg_loss: dice_focal``,
   ``train.class_weights``) on foreground-biased patches, inferred with MONAI's sliding window
   (:class:`~medfuse.families.context_seg.task.ContextSegTask`).
4. Evaluation (:class:`~medfuse.families.context_seg.evaluate.ContextSegEvaluator`): per-class
   precision, recall, F1, IoU and Dice from voxel counts pooled over cases, their means over the
   foreground classes, all with case-bootstrap 95% CIs, in the same pass as the generic Dice/HD95.

Ablations are the ``fusion`` switch: ``attention`` (the design), ``concat`` (the seed's "old, wrong
way": one 2C-channel input) and ``none`` (raw features only).
"""

from __future__ import annotations

import torch

from medfuse.families.context_seg.network import ContextUNet3D

__all__ = ["ContextSegModel"]


class ContextSegModel(ContextUNet3D):
    """:class:`ContextUNet3D` that also takes the engine's stacked item.

    The engine hands a segmentation model one tensor, ``batch["image"]`` (MONAI's sliding window
    crops one tensor); for this family it holds the raw and the context features stacked on the
    channel axis (see :mod:`medfuse.families.context_seg.data`), and :meth:`forward` splits them
    before any layer.
    """

    def split(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_in + C_ctx, D, H, W) -> raw (B, C_in, D, H, W), context (B, C_ctx, D, H, W) (views)."""
        want = self.in_channels + self.context_channels
        if image.shape[1] != want:
            raise ValueError(f"expected {self.in_channels} raw + {self.context_channels} context channels, "
                             f"got {image.shape[1]}")
        return image[:, : self.in_channels], image[:, self.in_channels :]

    def _streams(self, raw: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if context is None and raw.shape[1] != self.in_channels:
            return self.split(raw)
        return raw, context

    def forward(self, raw: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Segment; ``raw`` alone may be the stacked (B, C_in + C_ctx, D, H, W) item -> logits (B, K, D, H, W)."""
        return super().forward(*self._streams(raw, context))

    def forward_intermediates(self, raw: torch.Tensor, context: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Logits and, with attention fusion, the per-level gates ``{"attention": [...]}``, from one pass
        (see :meth:`ContextUNet3D.forward_intermediates`); ``raw`` may be the stacked item."""
        return super().forward_intermediates(*self._streams(raw, context))
