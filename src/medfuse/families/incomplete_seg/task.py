"""The incomplete_seg family's task (seed 003, UniMRSeg): three training stages and the validation
criterion over modality combinations.

Stages (``train.stages``; the stage's ``losses`` keys say what it does, :func:`stage_kind`):

1. ``recon`` [Multi-granular Modality Reconstruction]: hybrid shuffled masking (modality dropout,
   shuffle, voxel/patch masking; :func:`medfuse.families.incomplete_seg.data.hybrid_masking`) and
   L1 + 3D SSIM reconstruction of every modality the case has.
2. ``seg`` + ``ntxent`` [Modality-invariant Contrastive Learning]: a complete and an incomplete
   copy of each case; NT-Xent (``temperature``, default 0.5) on the globally pooled features of
   every encoder level, averaged over levels, plus the segmentation loss on both copies.
3. ``seg`` + ``consistency`` + ``feature`` [Incomplete Modality Adaptive Fine-tuning]: the encoder
   is frozen; a :class:`~medfuse.layers.reverse_attention.ReverseAttentionAdapter` wraps every
   level. The complete input is the teacher (segmentation loss to the ground truth); each
   incomplete combination is a student with Dice to the teacher's detached probabilities and L1 to
   its detached level features (weight 0.2 in the peer). The optional ``student_seg`` weight
   (0 when absent: the seed's students learn from the teacher only) adds the segmentation loss of
   every student to the ground truth, the supervision a modality-dropout network gets; without it
   a student whose input cannot reach the teacher's confidence (T1 alone on the demo phantom)
   stays below 0.5 on the inner regions and predicts none of them. Coverage: step ``s`` uses the
   combinations ``(s * k + j) mod (2^M - 2)``, ``j < k`` (``combos_per_step = k``; default all), so
   any ``ceil((2^M - 2) / k)`` consecutive steps, and hence every epoch with at least that many
   steps, visit all ``2^M - 2`` incomplete combinations exactly once per round.

Without stages the model trains plain segmentation, with modality dropout ``modality_dropout``
(the baselines of the demo).

Validation runs one pass per batch (:meth:`IncompleteSegTask.validate_batch`): ``val/loss``
(monitored) is ``1 - mean hard Dice`` over regions and (case, modality combination) pairs, the
per-region means are logged as ``val/dice_<r>`` (r = 1..R, outer to inner) and ``val/dice``; in a
reconstruction stage ``val/loss`` is the reconstruction loss under a fixed masking.

Shapes: B batch, M modalities, R regions, ``*S`` = (D, H, W).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F

from medfuse.config import StageConfig
from medfuse.engine.inference import infer_padded
from medfuse.engine.tasks import Batch, SegmentationTask
from medfuse.errors import ConfigError
from medfuse.families.incomplete_seg.data import (
    combination_mask,
    hybrid_masking,
    modality_combinations,
    random_keep,
    region_labels,
)
from medfuse.losses.ntxent import multilevel_nt_xent
from medfuse.losses.reconstruction import ReconstructionLoss

LOSS_NAMES = ("seg", "recon", "ntxent", "consistency", "feature", "student_seg")
VAL_CHUNK = 8
"""(case, combination) pairs per forward in validation (bounds the memory)."""


def stage_kind(losses: dict[str, float] | None) -> str:
    """``reconstruct`` | ``contrast`` | ``adapt`` | ``segment`` from a stage's loss names."""
    losses = losses or {}
    unknown = sorted(set(losses) - set(LOSS_NAMES))
    if unknown:
        raise ConfigError(f"train.stages.losses.{unknown[0]}", "unknown loss of the incomplete_seg family",
                          f"use some of: {', '.join(LOSS_NAMES)}")
    if "recon" in losses:
        return "reconstruct"
    if "ntxent" in losses:
        return "contrast"
    if "consistency" in losses or "feature" in losses or "student_seg" in losses:
        return "adapt"
    return "segment"


def hard_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice per case and channel of boolean maps (B, R, *S) -> (B, R); both empty counts as 1."""
    dims = tuple(range(2, pred.ndim))
    inter = (pred & target).sum(dims).float()
    total = pred.sum(dims).float() + target.sum(dims).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def region_targets(mask: torch.Tensor, num_regions: int, device: Any = None) -> torch.Tensor:
    """Canonical labels (B, 1, *S) -> nested region targets (B, R, *S) float: region r is ``mask >= r``."""
    mask = mask.to(device) if device is not None else mask
    r = torch.arange(1, num_regions + 1, device=mask.device).view(1, -1, *([1] * (mask.ndim - 2)))
    return (mask >= r).float()


class IncompleteSegTask(SegmentationTask):
    """UniMRSeg training: the stage's forward and losses, and validation over modality combinations.

    The training and validation options (masking, temperature, combinations per step, validation
    ROI and combinations) come from the typed ``self.params``; the network from ``self.model``.
    """

    loss_terms = ("recon_l1", "recon_ssim", "seg", "ntxent", "consistency", "feature", "student_seg")
    unused_parameters = True  # stages 1-2 leave the adapters without a gradient, stage 3 the recon head

    stage_mode: str = "segment"
    """What the current stage does: ``segment`` | ``reconstruct`` | ``contrast`` | ``adapt``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recon_loss = ReconstructionLoss(win_size=self.params.ssim_window)

    # ------------------------------------------------------------------------------ stages
    def on_stage(self, stage: StageConfig) -> None:
        """Set the stage's behaviour; an ``adapt`` stage turns the adapters on and freezes the encoder."""
        self.stage_mode = stage_kind(stage.losses if stage is not None else None)
        if self.stage_mode == "contrast" and self.cfg.data.batch_size < 2:
            raise ConfigError("data.batch_size", f"is {self.cfg.data.batch_size}: NT-Xent in stage '{stage.name}' "
                              "has no negatives with one case per batch (its loss is exactly 0)",
                              "set data.batch_size=2 or more")
        self.model.set_stage_kind(self.stage_mode)

    @property
    def size_divisor(self) -> int:
        """2^(levels - 1): one 2x downsampling per encoder level after the first."""
        return int(self.model.size_divisor)

    @property
    def mask_cfg(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hybrid_masking` (stage 1)."""
        p = self.params
        return dict(drop_p=p.mask_drop_p, shuffle=p.mask_shuffle, mask_ratio=p.mask_ratio,
                    granularity=p.mask_granularity, patch=p.mask_patch)

    def _present(self, batch: Batch, image: torch.Tensor) -> torch.Tensor:
        present = batch.get("present")
        m = self.model.m
        return torch.ones(image.shape[0], m, device=image.device) if present is None else present.to(image.device).float()

    def forward_batch(self, batch: Batch) -> dict[str, Any]:
        """One training forward for the current stage (see the module docstring)."""
        net = self.model
        image = batch["image"]
        b = image.shape[0]
        present = self._present(batch, image)
        if self.stage_mode == "reconstruct":
            masked, chan_present, order = hybrid_masking(image, present, **self.mask_cfg)
            return {"recon": net.reconstruct(masked, chan_present), "order": order}
        if self.stage_mode == "segment":
            p = self.params.modality_dropout
            keep = random_keep(present, p) if p > 0 else present
            logits, _ = net.seg_logits(image, keep)
            return {"logits": logits}
        if self.stage_mode == "contrast":
            keep = random_keep(present, 1.0)
            logits, feats = net.seg_logits(torch.cat([image, image]), torch.cat([present, keep]))
            return {"logits": logits, "feats": feats}
        # adapt: teacher (complete) and students (incomplete combinations) in one batch
        combos = net.adapt_combos(self.params.combos_per_step)
        masks = combination_mask(combos, net.m).to(image.device)  # (K, M)
        keep = (masks[:, None] * present[None]).reshape(-1, net.m)  # (K*B, M)
        weight = (keep.sum(1) > 0).float() * (keep.sum(1) < present.repeat(len(combos), 1).sum(1)).float()
        images = torch.cat([image] * (len(combos) + 1))  # (B + K*B, M, *S)
        logits, feats = net.seg_logits(images, torch.cat([present, keep]))
        return {"logits": logits, "feats": feats, "student_weight": weight, "n_teacher": b}

    # ------------------------------------------------------------------------------ losses
    def seg_loss_of(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft Dice on the region probabilities + BCE (regions) or CE (labels)."""
        from monai.losses import DiceLoss

        net = self.model
        q = net.region_probs(logits)
        target = region_targets(mask, net.num_regions, q.device)
        dice = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(q, target)
        if net.output == "regions":
            ce = F.binary_cross_entropy(q.clamp(1e-6, 1 - 1e-6), target)
        else:
            ce = F.cross_entropy(logits.float(), mask[:, 0].long().to(logits.device))
        return dice + ce

    def seg_loss_per_case(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`seg_loss_of` per case: logits (N, R or R+1, *S), mask (N, 1, *S) -> (N,).

        Dice is per case and region (averaged over regions), the cross-entropy term per case
        averaged over voxels, so the mean over N equals :meth:`seg_loss_of` (up to rounding).
        """
        from monai.losses import DiceLoss

        net = self.model
        q = net.region_probs(logits)
        target = region_targets(mask, net.num_regions, q.device)
        dice = DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        per = dice(q, target).flatten(1).mean(1)  # (N,)
        if net.output == "regions":
            ce = F.binary_cross_entropy(q.clamp(1e-6, 1 - 1e-6), target, reduction="none").flatten(1).mean(1)
        else:
            ce = F.cross_entropy(logits.float(), mask[:, 0].long().to(logits.device), reduction="none").flatten(1).mean(1)
        return per + ce

    def compute_loss(self, batch: Batch, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The stage's weighted losses (``stage.losses``); for :meth:`validate_batch`'s output the
        validation criterion."""
        if "val_dice" in out:
            return {"loss": 1.0 - out["val_dice"].mean().float()}
        if "val_recon" in out:
            return {"loss": out["val_recon"]}
        stage = self.stage_cfg
        w = dict(stage.losses) if stage is not None and stage.losses else {"seg": 1.0}
        mask = batch.get("mask")
        if self.stage_mode == "reconstruct":
            present = batch.get("present")
            rec = self.recon_loss(out["recon"], batch["image"], present)
            return {"loss": w["recon"] * rec["loss"], "recon_l1": rec["l1"], "recon_ssim": rec["ssim"]}
        if self.stage_mode == "segment":
            seg = self.seg_loss_of(out["logits"], mask)
            return {"loss": w.get("seg", 1.0) * seg, "seg": seg.detach()}
        if self.stage_mode == "contrast":
            seg = self.seg_loss_of(out["logits"], torch.cat([mask, mask]))
            b = mask.shape[0]
            nce = multilevel_nt_xent([f[:b] for f in out["feats"]], [f[b:] for f in out["feats"]],
                                     self.params.temperature)
            loss = w.get("seg", 1.0) * seg + w["ntxent"] * nce
            return {"loss": loss, "seg": seg.detach(), "ntxent": nce.detach()}
        from monai.losses import DiceLoss

        b = out["n_teacher"]
        logits = out["logits"]
        seg = self.seg_loss_of(logits[:b], mask)
        q = self.model.region_probs(logits)
        teacher = q[:b].detach()
        k = (q.shape[0] - b) // b
        wt = out["student_weight"]
        denom = wt.sum().clamp_min(1.0)
        dice = DiceLoss(include_background=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        per = dice(q[b:], teacher.repeat(k, 1, 1, 1, 1)).flatten(1).mean(1)  # (K*B,)
        cons = (per * wt).sum() / denom
        feat = torch.stack([
            ((f[b:] - f[:b].detach().repeat(k, 1, 1, 1, 1)).abs().flatten(1).mean(1) * wt).sum() / denom
            for f in out["feats"]]).mean()
        loss = w.get("seg", 1.0) * seg + w.get("consistency", 1.0) * cons + w.get("feature", 0.2) * feat
        out_losses = {"seg": seg.detach(), "consistency": cons.detach(), "feature": feat.detach()}
        if w.get("student_seg", 0.0):
            # the students' own segmentation loss to the ground truth, over the same weighted students
            stud = (self.seg_loss_per_case(logits[b:], mask.repeat(k, 1, 1, 1, 1)) * wt).sum() / denom
            loss = loss + w["student_seg"] * stud
            out_losses["student_seg"] = stud.detach()
        return {"loss": loss, **out_losses}

    # ------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The validation pass of one batch, run once: ``{"val_recon": loss}`` in a reconstruction
        stage, else ``{"val_dice": (pairs, R)}`` hard Dice per (case, modality combination) pair."""
        if self.stage_mode == "reconstruct":
            return {"val_recon": self._validation_recon(batch)}
        return {"val_dice": self._validation_dice(batch)}

    def _validation_recon(self, batch: Batch) -> torch.Tensor:
        """Stage-1 validation: reconstruction loss under a fixed (seeded) hybrid masking."""
        image = batch["image"]
        present = batch.get("present")
        present = torch.ones(image.shape[0], self.model.m) if present is None else present.float()
        g = torch.Generator().manual_seed(0)
        masked, chan_present, _ = hybrid_masking(image, present.cpu(), generator=g, **self.mask_cfg)
        recon = self.model.reconstruct(masked, chan_present)
        return self.recon_loss(recon, image, present.to(image.device))["loss"]

    def _validation_dice(self, batch: Batch) -> torch.Tensor:
        """Hard Dice (pairs, R) over the (case, modality combination) pairs of a validation batch."""
        net = self.model
        image = batch["image"]
        b = image.shape[0]
        present = batch.get("present")
        present = torch.ones(b, net.m) if present is None else present.cpu().float()
        target = region_targets(batch["mask"], net.num_regions, image.device) > 0.5  # (B, R, *S)
        cmask = combination_mask(modality_combinations(net.m), net.m)
        pairs = []
        for i in range(b):
            avail = [c for c in range(len(cmask)) if bool((cmask[c] <= present[i]).all())]
            k = self.params.val_combos_per_case
            if k and k < len(avail):
                cid = str(batch["case_id"][i]) if "case_id" in batch else str(i)
                g = torch.Generator().manual_seed(zlib.crc32(cid.encode()))
                avail = [avail[j] for j in torch.randperm(len(avail), generator=g)[:k].tolist()]
            pairs += [(i, c) for c in avail]
        scores = []
        for start in range(0, len(pairs), VAL_CHUNK):
            chunk = pairs[start: start + VAL_CHUNK]
            idx = torch.tensor([i for i, _ in chunk], device=image.device)
            pres = cmask[[c for _, c in chunk]].to(image.device)
            roi = self.params.val_roi_size
            q = infer_padded(lambda x, pres=pres, roi=roi: net.predict_regions(x, pres, roi), image[idx],
                             1 if roi is not None else self.size_divisor)
            pred = region_targets(region_labels(q)[:, None], net.num_regions) > 0.5  # evaluate's and predict's rule
            scores.append(hard_dice(pred, target[idx]))  # (n, R)
        return torch.cat(scores)

    def validation_step(self, batch, batch_idx):
        out = self.validate_batch(batch)
        loss = self.compute_loss(batch, out)["loss"]
        self.log_val("val/loss", loss, int(batch["image"].shape[0]))
        if "val_dice" in out:
            self._val_outputs.append({"dice": out["val_dice"].double().cpu().numpy()})

    # epoch_metrics (SegmentationTask): ``dice`` and ``dice_<r>`` from the (pairs, R) hard Dice.

    # ------------------------------------------------------------------------------ inference
    def predict_regions(self, batch: Batch, present: torch.Tensor | None = None) -> torch.Tensor:
        """Region probabilities (B, R, *S) of a batch with the evaluation settings (``eval.roi_size``,
        ``eval.sw_overlap``); ``present`` (B, M) defaults to the batch's own modalities."""
        image = batch["image"]
        present = self._present(batch, image) if present is None else present
        ev = self.cfg.eval
        if ev.roi_size is not None:
            from medfuse.engine.inference import check_roi

            check_roi(ev.roi_size, self.size_divisor)

        def fn(x: torch.Tensor) -> torch.Tensor:
            # the network's own sliding window carries the presence flags into every window
            return self.model.predict_regions(x, present, ev.roi_size, ev.sw_overlap, ev.sw_batch_size,
                                              mode=ev.sw_mode)

        # one call over the whole volume: padded to the divisor without an ROI; mirroring TTA
        return self.run_inference(fn, image, sliding=False, pad=ev.roi_size is None)

    def infer(self, batch: Batch) -> dict[str, Any]:
        """The batch with the modalities it has: ``logits`` = canonical label log-probabilities
        (B, R+1, *S), ``regions`` = region probabilities (B, R, *S)."""
        q = self.predict_regions(batch)
        return {"logits": self.model.labels_from_regions(q), "regions": q}
