"""Modality reconstruction loss of UniMRSeg stage 1 (seed 003, "Multi-granular Modality
Reconstruction"): L1 + (1 - SSIM), weighted 1:1 as in the peer, with MONAI's 3D SSIM.

Only modalities that the case really has are scored: a channel whose ``present`` flag is 0 has no
ground truth to reconstruct (real data sets miss modalities too).

Shapes: B batch, M modalities, ``*S`` spatial axes ((D, H, W) in 3D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``w_l1 * L1 + w_ssim * (1 - SSIM)`` averaged over the present (case, modality) channels.

    SSIM is MONAI's :class:`monai.losses.SSIMLoss` (Gaussian window, per-channel), applied to each
    present channel as its own one-channel image. The window shrinks to the smallest spatial size
    (odd) so that small crops work.

    Args:
        spatial_dims: 2 or 3.
        data_range: intensity range of the targets (1.0 for intensities scaled to [0, 1]).
        win_size: SSIM window size (MONAI's default is 11; the peer used 7 on 128^3 crops).
        l1_weight: weight of the L1 term.
        ssim_weight: weight of the 1 - SSIM term.
    """

    def __init__(self, spatial_dims: int = 3, data_range: float = 1.0, win_size: int = 7,
                 l1_weight: float = 1.0, ssim_weight: float = 1.0):
        super().__init__()
        self.spatial_dims, self.data_range, self.win_size = spatial_dims, data_range, win_size
        self.l1_weight, self.ssim_weight = l1_weight, ssim_weight
        self._ssim: dict[int, nn.Module] = {}

    def _ssim_loss(self, win: int) -> nn.Module:
        if win not in self._ssim:
            from monai.losses import SSIMLoss

            self._ssim[win] = SSIMLoss(spatial_dims=self.spatial_dims, data_range=self.data_range, win_size=win)
        return self._ssim[win]

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Score a reconstruction.

        Args:
            pred: reconstructed modalities (B, M, *S), in the target's intensity range.
            target: the unmasked, complete input (B, M, *S).
            present: (B, M) 1 where the case has the modality (default: all).

        Returns:
            ``{"loss", "l1", "ssim"}`` scalars (``ssim`` is the SSIM value, not the loss); all zero
            with a graph when no channel is present.
        """
        b, m = pred.shape[:2]
        if present is None:
            present = torch.ones(b, m, device=pred.device)
        keep = present.reshape(-1) > 0.5  # (B*M,)
        p = pred.float().reshape(b * m, 1, *pred.shape[2:])[keep]  # (N, 1, *S)
        t = target.float().reshape(b * m, 1, *target.shape[2:])[keep]
        if p.shape[0] == 0:
            zero = pred.sum() * 0.0
            return {"loss": zero, "l1": zero, "ssim": zero + 1.0}
        l1 = F.l1_loss(p, t)
        win = min(self.win_size, *p.shape[2:])
        win = win if win % 2 == 1 else win - 1
        ssim_loss = self._ssim_loss(max(win, 1))(p, t)
        loss = self.l1_weight * l1 + self.ssim_weight * ssim_loss
        return {"loss": loss, "l1": l1.detach(), "ssim": (1.0 - ssim_loss).detach()}
