"""Family ``incomplete_seg``: UniMRSeg, brain-tumour segmentation from any subset of MRI modalities
(seed 003, "Understanding UniMRSeg": three stages of hierarchical self-supervised compensation).

Network. A 3D UNet whose encoder levels are conv blocks (the first at full resolution, each next one
downsampling by 2) plus a 3D ASPP bottleneck (dilations 1/6/12/18 + image pooling) as the last
level; :meth:`IncompleteSegNet.encode` exposes every level's features. Missing modalities are
zero-filled (``fill="zero"``, UniMRSeg) or replaced by a learned per-modality value
(``fill="learned"``, in the spirit of M3AE's learned fill). Outputs are nested sigmoid regions
(``output="regions"``: region r's probability is the product of the sigmoids of regions 1..r, so
WT >= TC >= ET always holds; the peer's independent sigmoids can put ET outside TC) or a softmax
over the ``R + 1`` canonical labels (``output="labels"``).

Stages (``train.stages``; the stage's ``losses`` keys say what it does):

1. ``recon`` [Multi-granular Modality Reconstruction]: hybrid shuffled masking (modality dropout,
   shuffle, voxel/patch masking; :func:`medfuse.data.incomplete_seg.hybrid_masking`) and L1 + 3D
   SSIM reconstruction of every modality the case has.
2. ``seg`` + ``ntxent`` [Modality-invariant Contrastive Learning]: a complete and an incomplete
   copy of each case; NT-Xent (``temperature``, default 0.5) on the globally pooled features of
   every encoder level, averaged over levels, plus the segmentation loss on both copies.
3. ``seg`` + ``consistency`` + ``feature`` [Incomplete Modality Adaptive Fine-tuning]: the encoder
   is frozen; a :class:`~medfuse.layers.reverse_attention.ReverseAttentionAdapter` wraps every
   level. The complete input is the teacher (segmentation loss to the ground truth); each
   incomplete combination is a student with Dice to the teacher's detached probabilities and L1 to
   its detached level features (weight 0.2 in the peer). Coverage: step ``s`` uses the
   combinations ``(s * k + j) mod (2^M - 2)``, ``j < k`` (``combos_per_step = k``; default all), so
   any ``ceil((2^M - 2) / k)`` consecutive steps, and hence every epoch with at least that many
   steps, visit all ``2^M - 2`` incomplete combinations exactly once per round.

Without stages the model trains plain segmentation, with modality dropout ``modality_dropout``
(the baselines of the demo). Model selection (``val/loss``) is ``1 - mean hard Dice`` over all
``2^M - 1`` modality combinations of the validation split; the test split is only read by
``medfuse evaluate`` (:meth:`IncompleteSegNet.evaluate_extra`: Dice + HD95 per region and
combination, a table and heatmaps).

Shapes: B batch, M modalities, R regions, C channels, ``*S`` = (D, H, W).
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfuse.data.incomplete_seg import (
    combination_mask,
    combination_name,
    hybrid_masking,
    modality_combinations,
    random_keep,
)
from medfuse.errors import ConfigError
from medfuse.layers.aspp import ASPP
from medfuse.layers.conv import ConvNormAct, DownBlock, UpBlock, conv_layer
from medfuse.layers.reverse_attention import ReverseAttentionAdapter
from medfuse.losses.ntxent import multilevel_nt_xent
from medfuse.losses.reconstruction import ReconstructionLoss
from medfuse.registry import DEMO_ABLATIONS, MODELS

LOSS_NAMES = ("seg", "recon", "ntxent", "consistency", "feature")


def hard_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice per case and channel of boolean maps (B, R, *S) -> (B, R); both empty counts as 1."""
    dims = tuple(range(2, pred.ndim))
    inter = (pred & target).sum(dims).float()
    total = pred.sum(dims).float() + target.sum(dims).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


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
    if "consistency" in losses or "feature" in losses:
        return "adapt"
    return "segment"


class IncompleteSegNet(nn.Module):
    """UniMRSeg's 3D UNet + ASPP with modality presence, stage logic and evaluation hooks.

    Args:
        modalities: modality names in channel order (auto from the data).
        in_channels: M (auto).
        num_classes: canonical labels R + 1 (auto from the data module; R regions).
        output: ``regions`` (nested sigmoids) or ``labels`` (softmax).
        widths: channels of the conv levels (peer: 64, 128, 256, 512).
        aspp_dilations: ASPP dilations (peer: 1, 6, 12, 18).
        norm: norm of every block (``instance``, ``batch``, ``group``).
        fill: ``zero`` or ``learned`` for missing modalities.
        adapters: build the stage-3 reverse attention adapters (used in an ``adapt`` stage and after).
        adapter_scale: initial layer scale of the adapters (None: the peer's gamma = 1).
        modality_dropout: plain-segmentation stage only: probability that a case loses modalities.
        mask_drop_p: stage 1: probability of modality dropout per case.
        mask_shuffle: stage 1: shuffle the kept modalities into the first channels.
        mask_ratio: stage 1: fraction of voxels/patches zeroed.
        mask_granularity: stage 1: ``voxel`` or ``patch``.
        mask_patch: stage 1: patch edge (voxels).
        ssim_window: stage 1: SSIM window.
        temperature: stage 2: NT-Xent temperature.
        combos_per_step: stage 3: incomplete combinations per step (None: all ``2^M - 2``).
        val_roi_size: sliding-window ROI of the validation criterion (None: whole volume).
        val_combos_per_case: score each validation case on this many of its modality combinations
            (a fixed random choice per case id, so epochs stay comparable); None: all of them.
        channels_last: keep 3D convolutions in ``channels_last_3d`` memory format (about 25 %
            faster on CPU; also what cuDNN prefers under mixed precision).
    """

    def __init__(self, modalities: list[str] | None = None, in_channels: int = 4, num_classes: int = 4,
                 output: str = "regions", widths: tuple[int, ...] = (64, 128, 256, 512),
                 aspp_dilations: tuple[int, ...] = (1, 6, 12, 18), norm: str = "instance", fill: str = "zero",
                 adapters: bool = True, adapter_scale: float | None = 0.1, modality_dropout: float = 0.0,
                 mask_drop_p: float = 0.5, mask_shuffle: bool = True, mask_ratio: float = 0.15,
                 mask_granularity: str = "patch", mask_patch: int = 4, ssim_window: int = 7,
                 temperature: float = 0.5, combos_per_step: int | None = None,
                 val_roi_size: tuple[int, int, int] | None = None, val_combos_per_case: int | None = None,
                 channels_last: bool = True):
        super().__init__()
        if output not in ("regions", "labels"):
            raise ConfigError("model.params.output", f"unknown output '{output}'", "use regions or labels")
        if fill not in ("zero", "learned"):
            raise ConfigError("model.params.fill", f"unknown fill '{fill}'", "use zero or learned")
        if num_classes < 2:
            raise ConfigError("data.num_classes", f"need at least one region (num_classes >= 2), got {num_classes}",
                              "check data.params.regions")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ConfigError("model.params.widths", "need at least two levels", "e.g. widths=[16, 32, 64, 128]")
        m = in_channels
        self.modalities = list(modalities or [f"m{i}" for i in range(m)])
        if len(self.modalities) != m:
            raise ConfigError("data.modalities", f"{len(self.modalities)} names for {m} channels", "fix the list")
        self.m, self.num_regions, self.output, self.fill = m, num_classes - 1, output, fill
        self.modality_dropout, self.temperature = modality_dropout, temperature
        self.mask_cfg = dict(drop_p=mask_drop_p, shuffle=mask_shuffle, mask_ratio=mask_ratio,
                             granularity=mask_granularity, patch=mask_patch)
        self.combos_per_step = combos_per_step
        self.val_roi_size = tuple(val_roi_size) if val_roi_size else None
        self.val_combos_per_case = val_combos_per_case
        self.channels_last = channels_last
        common = dict(spatial_dims=3, norm=norm)
        levels: list[nn.Module] = [nn.Sequential(ConvNormAct(m, widths[0], **common),
                                                 ConvNormAct(widths[0], widths[0], **common))]
        levels += [DownBlock(widths[i - 1], widths[i], **common) for i in range(1, len(widths))]
        levels.append(ASPP(widths[-1], widths[-1], aspp_dilations, **common))
        self.encoder = nn.ModuleList(levels)
        self.level_channels = [*widths, widths[-1]]
        self.adapters: nn.ModuleList | None = None
        if adapters:
            prev = [m, *widths[:-1], widths[-1]]
            strides = [1] + [2] * (len(widths) - 1) + [1]
            self.adapters = nn.ModuleList(
                ReverseAttentionAdapter(c, p, s, layer_scale=adapter_scale, **common)
                for c, p, s in zip(self.level_channels, prev, strides, strict=True))
        # decoder: from the ASPP output up through the skips of levels len(widths)-2 .. 0
        self.decoder = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i], **common)
                                     for i in reversed(range(len(widths) - 1)))
        conv = conv_layer(3)
        self.seg_head = conv(widths[0], self.num_regions if output == "regions" else num_classes, 1)
        self.recon_head = conv(widths[0], m, 1)
        self.fill_value = nn.Parameter(torch.zeros(m)) if fill == "learned" else None
        self.recon_loss = ReconstructionLoss(win_size=ssim_window)
        self.register_buffer("combo_step", torch.zeros((), dtype=torch.long))
        self.kind = "segment"
        self.use_adapters = False
        self.encoder_frozen = False
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------------------ network
    def fill_missing(self, image: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """(B, M, *S) input with absent channels zero-filled or set to the learned fill value."""
        if present is None:
            return image
        p = present.to(image.dtype).view(*present.shape, 1, 1, 1)  # (B, M, 1, 1, 1)
        x = image * p
        if self.fill_value is not None:
            x = x + (1 - p) * self.fill_value.view(1, -1, 1, 1, 1)
        return x

    def encode(self, image: torch.Tensor, present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-level encoder features.

        Args:
            image: (B, M, D, H, W).
            present: (B, M) modality presence (None: all present).

        Returns:
            ``len(widths) + 1`` maps (B, C_l, *S_l): the conv levels (full resolution, then /2
            each) and the ASPP output (same grid as the deepest conv level); adapted when the
            adapters are active.
        """
        h = self.fill_missing(image, present)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last_3d)
        feats = []
        for i, block in enumerate(self.encoder):
            fc = block(h)
            if self.use_adapters and self.adapters is not None:
                fc = self.adapters[i](fc, h)
            feats.append(fc)
            h = fc
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Level features -> full-resolution decoder features (B, widths[0], *S)."""
        x = feats[-1]
        skips = feats[: len(self.decoder)]
        for up, skip in zip(self.decoder, reversed(skips), strict=True):
            x = up(x, skip)
        return x

    def region_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> nested region probabilities (B, R, *S), outer (e.g. WT) to inner (ET)."""
        if self.output == "regions":
            return torch.cumsum(F.logsigmoid(logits.float()), dim=1).exp()
        p = logits.float().softmax(1)  # (B, R+1, *S)
        return p.flip(1).cumsum(1).flip(1)[:, 1:]  # q_r = sum_{k >= r} p_k

    def label_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> canonical label log-probabilities (B, R+1, *S) (argmax/softmax ready)."""
        if self.output == "labels":
            return logits
        q = self.region_probs(logits)
        ones = torch.ones_like(q[:, :1])
        q_ext = torch.cat([ones, q, torch.zeros_like(ones)], dim=1)  # (B, R+2, *S)
        p = (q_ext[:, :-1] - q_ext[:, 1:]).clamp_min(1e-8)  # P(label = k) = q_k - q_{k+1}
        return p.log()

    def seg_logits(self, image: torch.Tensor, present: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, M, *S) -> (head logits (B, R or R+1, *S), level features)."""
        feats = self.encode(image, present)
        return self.seg_head(self.decode(feats)), feats

    def forward(self, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, M, D, H, W), present (B, M) or None (all) -> label log-probs (B, R+1, D, H, W)."""
        return self.label_logits(self.seg_logits(image, present)[0])

    def predict_regions(self, image: torch.Tensor, present: torch.Tensor | None = None,
                        roi_size: tuple[int, int, int] | None = None, overlap: float = 0.25,
                        sw_batch_size: int = 4) -> torch.Tensor:
        """Region probabilities (B, R, *S), by MONAI sliding-window inference when ``roi_size`` is set.

        The presence mask rides along as M constant input channels, so windows of different cases
        in one sliding-window batch each keep their own modality subset.
        """
        b = image.shape[0]
        present = torch.ones(b, self.m, device=image.device) if present is None else present.to(image.device)
        if roi_size is None:
            return self.region_probs(self.seg_logits(image, present)[0])
        from monai.inferers import sliding_window_inference

        flags = present.to(image.dtype).view(b, self.m, 1, 1, 1).expand_as(image)
        x = torch.cat([image, flags], dim=1)  # (B, 2M, *S)

        def predictor(win: torch.Tensor) -> torch.Tensor:
            pres = win[:, self.m:].amax(dim=(2, 3, 4))  # padding is 0; every window holds real voxels
            return self.region_probs(self.seg_logits(win[:, : self.m], pres)[0])

        return sliding_window_inference(x, tuple(roi_size), sw_batch_size, predictor, overlap=overlap,
                                        mode="gaussian")

    # ------------------------------------------------------------------------------ stages
    def on_stage(self, stage) -> None:
        """Set the stage's behaviour; an ``adapt`` stage turns the adapters on and freezes the encoder."""
        self.kind = stage_kind(stage.losses if stage is not None else None)
        if self.kind == "adapt":
            if self.adapters is None:
                raise ConfigError("model.params.adapters", "an adapt stage (consistency/feature losses) needs "
                                  "the adapters", "set model.params.adapters=true")
            self.use_adapters = True
            self.encoder_frozen = True
            self.encoder.requires_grad_(False)
            if self.fill_value is not None:
                self.fill_value.requires_grad_(False)
        else:
            self.use_adapters = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.encoder_frozen:
            self.encoder.eval()  # frozen means frozen: no batch-norm statistics updates either
        return self

    def _adapt_combos(self) -> list[tuple[int, ...]]:
        combos = modality_combinations(self.m)[:-1]
        n = len(combos)
        k = n if not self.combos_per_step else min(int(self.combos_per_step), n)
        start = int(self.combo_step) * k
        if self.training:
            self.combo_step += 1
        return [combos[(start + j) % n] for j in range(k)]

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training forward for the current stage (see the module docstring)."""
        image = batch["image"]
        b = image.shape[0]
        present = batch.get("present")
        present = torch.ones(b, self.m, device=image.device) if present is None else present.to(image.device).float()
        if self.kind == "reconstruct":
            masked, chan_present, order = hybrid_masking(image, present, **self.mask_cfg)
            recon = torch.sigmoid(self.recon_head(self.decode(self.encode(masked, chan_present))))
            return {"recon": recon, "order": order}
        if self.kind == "segment":
            keep = random_keep(present, self.modality_dropout) if self.modality_dropout > 0 else present
            logits, _ = self.seg_logits(image, keep)
            return {"logits": logits}
        if self.kind == "contrast":
            keep = random_keep(present, 1.0)
            logits, feats = self.seg_logits(torch.cat([image, image]), torch.cat([present, keep]))
            return {"logits": logits, "feats": feats}
        # adapt: teacher (complete) and students (incomplete combinations) in one batch
        combos = self._adapt_combos()
        masks = combination_mask(combos, self.m).to(image.device)  # (K, M)
        keep = (masks[:, None] * present[None]).reshape(-1, self.m)  # (K*B, M)
        weight = (keep.sum(1) > 0).float() * (keep.sum(1) < present.repeat(len(combos), 1).sum(1)).float()
        images = torch.cat([image] * (len(combos) + 1))  # (B + K*B, M, *S)
        logits, feats = self.seg_logits(images, torch.cat([present, keep]))
        return {"logits": logits, "feats": feats, "student_weight": weight, "n_teacher": b}

    # ------------------------------------------------------------------------------ losses
    def _targets(self, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """Canonical labels (B, 1, *S) -> nested region targets (B, R, *S)."""
        mask = batch["mask"].to(like.device)
        r = torch.arange(1, self.num_regions + 1, device=like.device).view(1, -1, 1, 1, 1)
        return (mask >= r).float()

    def seg_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft Dice on the region probabilities + BCE (regions) or CE (labels)."""
        from monai.losses import DiceLoss

        q = self.region_probs(logits)
        r = torch.arange(1, self.num_regions + 1, device=q.device).view(1, -1, 1, 1, 1)
        target = (mask.to(q.device) >= r).float()
        dice = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(q, target)
        if self.output == "regions":
            ce = F.binary_cross_entropy(q.clamp(1e-6, 1 - 1e-6), target)
        else:
            ce = F.cross_entropy(logits.float(), mask[:, 0].long().to(logits.device))
        return dice + ce

    def loss(self, batch: dict[str, Any], out: dict[str, Any], stage=None) -> dict[str, torch.Tensor]:
        """The stage's weighted losses (``stage.losses``); in eval mode the validation criterion."""
        if not self.training:
            if self.kind == "reconstruct":  # select stage 1 on its own objective, with a fixed masking
                return {"loss": self.validation_recon(batch)}
            return {"loss": 1.0 - self.validation_dice(batch)}
        w = dict(stage.losses) if stage is not None and stage.losses else {"seg": 1.0}
        mask = batch.get("mask")
        if self.kind == "reconstruct":
            present = batch.get("present")
            rec = self.recon_loss(out["recon"], batch["image"], present)
            return {"loss": w["recon"] * rec["loss"], "recon_l1": rec["l1"], "recon_ssim": rec["ssim"]}
        if self.kind == "segment":
            seg = self.seg_loss(out["logits"], mask)
            return {"loss": w.get("seg", 1.0) * seg, "seg": seg.detach()}
        if self.kind == "contrast":
            seg = self.seg_loss(out["logits"], torch.cat([mask, mask]))
            b = mask.shape[0]
            nce = multilevel_nt_xent([f[:b] for f in out["feats"]], [f[b:] for f in out["feats"]], self.temperature)
            loss = w.get("seg", 1.0) * seg + w["ntxent"] * nce
            return {"loss": loss, "seg": seg.detach(), "ntxent": nce.detach()}
        from monai.losses import DiceLoss

        b = out["n_teacher"]
        logits = out["logits"]
        seg = self.seg_loss(logits[:b], mask)
        q = self.region_probs(logits)
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
        return {"loss": loss, "seg": seg.detach(), "consistency": cons.detach(), "feature": feat.detach()}

    @torch.no_grad()
    def validation_recon(self, batch: dict[str, Any]) -> torch.Tensor:
        """Stage-1 validation: reconstruction loss under a fixed (seeded) hybrid masking."""
        image = batch["image"]
        present = batch.get("present")
        present = torch.ones(image.shape[0], self.m) if present is None else present.float()
        g = torch.Generator().manual_seed(0)
        masked, chan_present, _ = hybrid_masking(image, present.cpu(), generator=g, **self.mask_cfg)
        recon = torch.sigmoid(self.recon_head(self.decode(self.encode(masked, chan_present))))
        return self.recon_loss(recon, image, present.to(image.device))["loss"]

    @torch.no_grad()
    def validation_dice(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean hard Dice over regions and (case, modality combination) pairs of a validation batch."""
        image = batch["image"]
        b = image.shape[0]
        present = batch.get("present")
        present = torch.ones(b, self.m) if present is None else present.cpu().float()
        target = self._targets(batch, image) > 0.5  # (B, R, *S)
        cmask = combination_mask(modality_combinations(self.m), self.m)
        pairs = []
        for i in range(b):
            avail = [c for c in range(len(cmask)) if bool((cmask[c] <= present[i]).all())]
            k = self.val_combos_per_case
            if k and k < len(avail):
                cid = str(batch["case_id"][i]) if "case_id" in batch else str(i)
                g = torch.Generator().manual_seed(zlib.crc32(cid.encode()))
                avail = [avail[j] for j in torch.randperm(len(avail), generator=g)[:k].tolist()]
            pairs += [(i, c) for c in avail]
        scores = []
        for start in range(0, len(pairs), 8):
            chunk = pairs[start: start + 8]
            idx = torch.tensor([i for i, _ in chunk], device=image.device)
            q = self.predict_regions(image[idx], cmask[[c for _, c in chunk]].to(image.device), self.val_roi_size)
            scores.append(hard_dice(q > 0.5, target[idx]))  # (n, R)
        return torch.cat(scores).mean().float()

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_extra(self, task, dm, split: str, run_dir: Path) -> dict[str, Any]:
        """Dice and HD95 per region for every modality combination of ``split``; table + heatmaps."""
        return evaluate_combinations(self, task, dm, split, Path(run_dir))

    @torch.no_grad()
    def predict_inputs(self, task, cfg, dm, inputs: list[str], out: Path, modalities: list[str] | None) -> Path:
        """``medfuse predict RUN FILES... [--modalities a,b]`` with any non-empty modality subset."""
        return predict_case(self, task, cfg, dm, inputs, Path(out), modalities)



# ---------------------------------------------------------------------------------- evaluation


def _spacing(batch: dict[str, Any], i: int) -> tuple[float, float, float] | None:
    """Voxel size (D, H, W) in mm from a batch item's affine (columns are the w, h, d axes)."""
    if "affine" not in batch:
        return None
    sw, sh, sd = np.linalg.norm(np.asarray(batch["affine"][i])[:3, :3], axis=0)
    return float(sd), float(sh), float(sw)


def _ci(values: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean over cases with a percentile-bootstrap CI; NaN cases are left out."""
    from medfuse.metrics.bootstrap import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bootstrap_ci(lambda x: x.mean(-1), v, n_boot=n_boot, seed=seed, vectorized=True)


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN on purpose
        return np.nanmean(x, axis=axis)


def _num(entry: dict[str, Any], digits: int) -> str:
    v = entry.get("value")
    return f"{v:.{digits}f}" if v is not None and np.isfinite(v) else "n/a"


def evaluate_combinations(model: IncompleteSegNet, task, dm, split: str, run_dir: Path) -> dict[str, Any]:
    """Dice + HD95 per region for each of the ``2^M - 1`` modality combinations of ``split``.

    Every case runs once per combination of modalities it has (sliding window with ``eval.roi_size``).
    Returns report entries: ``metrics`` (means over all / incomplete / complete combinations and
    per region, with bootstrap CIs over cases), ``per_class`` (per region), ``modality_combinations``
    (the table) and heatmap PNGs under ``run_dir/plots``; the table is also printed.
    """
    from rich.console import Console
    from rich.table import Table

    from medfuse.metrics import segmentation_case_metrics
    from medfuse.reports import format_ci
    from medfuse.reports.plots import plot_heatmap

    cfg = task.cfg
    n_boot, seed = cfg.eval.n_boot, cfg.train.seed
    combos = modality_combinations(model.m)
    cmask = combination_mask(combos, model.m)
    nc, nr = len(combos), model.num_regions
    regions = list(getattr(dm, "region_names", None) or [f"region{r + 1}" for r in range(nr)])
    names = [combination_name(c, list(dm.modalities)) for c in combos]
    device = next(model.parameters()).device
    dice_rows, hd_rows = [], []
    for batch in dm.loader(split):
        image = batch["image"].to(device)
        present = batch.get("present")
        present = torch.ones(image.shape[0], model.m) if present is None else present.cpu().float()
        target = model._targets(batch, image).cpu() > 0.5  # (B, R, *S)
        for j in range(image.shape[0]):
            dice, hd = np.full((nc, nr), np.nan), np.full((nc, nr), np.nan)
            ok = [c for c in range(nc) if bool((cmask[c] <= present[j]).all())]
            for start in range(0, len(ok), 5):  # 5 combinations per forward bounds the memory
                idx = ok[start: start + 5]
                q = model.predict_regions(image[j: j + 1].expand(len(idx), -1, -1, -1, -1), cmask[idx].to(device),
                                          cfg.eval.roi_size, cfg.eval.sw_overlap)
                m = segmentation_case_metrics((q > 0.5).cpu(), target[j: j + 1].expand(len(idx), -1, -1, -1, -1),
                                              nr, spacing=_spacing(batch, j), region_mode=True)
                dice[idx], hd[idx] = m["dice"], m["hd95"]
            dice_rows.append(dice)
            hd_rows.append(hd)
    dice, hd = np.stack(dice_rows), np.stack(hd_rows)  # (N, C, R)
    full, inc = [nc - 1], list(range(nc - 1))
    metrics = {"dice_all_combinations": _ci(_nanmean(dice, (1, 2)), n_boot, seed),
               "dice_incomplete": _ci(_nanmean(dice[:, inc], (1, 2)), n_boot, seed),
               "dice_complete": _ci(_nanmean(dice[:, full], (1, 2)), n_boot, seed)}
    metrics.update({f"dice_{r}": _ci(_nanmean(dice[:, :, i], 1), n_boot, seed) for i, r in enumerate(regions)})
    metrics["hd95_all_combinations"] = _ci(_nanmean(hd, (1, 2)), n_boot, seed)
    metrics["hd95_incomplete"] = _ci(_nanmean(hd[:, inc], (1, 2)), n_boot, seed)
    per_region = {r: {"dice": metrics[f"dice_{r}"], "hd95": _ci(_nanmean(hd[:, :, i], 1), n_boot, seed),
                      "dice_complete": _ci(dice[:, -1, i], n_boot, seed)} for i, r in enumerate(regions)}
    columns = ["combination", "n", *[f"dice_{r}" for r in regions], "dice_mean", *[f"hd95_{r}" for r in regions],
               "hd95_mean"]
    rows, heat_d, heat_h = [], np.full((nc, nr + 1), np.nan), np.full((nc, nr + 1), np.nan)
    for c in range(nc):
        d_mean, h_mean = _nanmean(dice[:, c], 1), _nanmean(hd[:, c], 1)
        cells = [_ci(dice[:, c, i], n_boot, seed) for i in range(nr)] + [_ci(d_mean, n_boot, seed)]
        hcells = [_ci(hd[:, c, i], n_boot, seed) for i in range(nr)] + [_ci(h_mean, n_boot, seed)]
        rows.append([names[c], int(np.isfinite(d_mean).sum()), *cells, *hcells])
        heat_d[c] = [x["value"] for x in cells]
        heat_h[c] = [x["value"] for x in hcells]
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    cols = [*regions, "mean"]
    png_d = plot_heatmap(heat_d, names, cols, plots_dir / "combinations_dice.png",
                         title=f"Dice per modality combination ({split})")
    png_h = plot_heatmap(heat_h, names, cols, plots_dir / "combinations_hd95.png",
                         title=f"HD95 (mm) per modality combination ({split})")
    table = Table("combination", "n", *[f"Dice {r}" for r in regions], "Dice mean [95% CI]", "HD95 mean",
                  title=f"{cfg.name}: {split} split, {len(dice)} cases, {nc} modality combinations")
    for row in rows:
        table.add_row(row[0], str(row[1]), *[_num(x, 3) for x in row[2: 2 + nr]],
                      format_ci(row[2 + nr]).split(" n=")[0], _num(row[-1], 1))
    Console(width=max(120, Console().width)).print(table)
    return {"metrics": metrics, "per_class": per_region, "class_names": regions, "n": len(dice),
            "modality_combinations": {"columns": columns, "rows": rows},
            "combination_plots": {"dice": str(png_d.relative_to(run_dir)), "hd95": str(png_h.relative_to(run_dir))},
            "selection": "val/loss = 1 - mean Dice over all modality combinations of the val split"}


def predict_case(model: IncompleteSegNet, task, cfg, dm, inputs: list[str], out: Path,
                 modalities: list[str] | None) -> Path:
    """Segment one case from the modalities it has; writes ``<case>_pred.nii.gz`` (raw label values
    when the regions allow it, else canonical labels) and ``<case>_regions.nii.gz`` (R probabilities)."""
    from medfuse.data.incomplete_seg import canonical_to_raw, resolve_predict_inputs
    from medfuse.data.io import write_nifti
    from medfuse.data.layouts import Case
    from medfuse.data.transforms import build_transforms, case_to_item

    mods = list(dm.modalities)
    case_id, files = resolve_predict_inputs(list(inputs), modalities, mods)
    case = Case(case_id=case_id, patient_id=case_id, images=files)
    item = build_transforms(cfg.data.transforms, mods, train=False, has_mask=False)(case_to_item(case, mods))
    device = next(model.parameters()).device
    q = model.predict_regions(item["image"][None].to(device), item["present"][None].float().to(device),
                              cfg.eval.roi_size, cfg.eval.sw_overlap).cpu()  # (1, R, *S)
    label = (q[0] > 0.5).sum(0).numpy()  # canonical labels (nested regions)
    raw = canonical_to_raw(dm.raw_regions) if hasattr(dm, "raw_regions") else None
    if raw is not None:
        label = np.vectorize(raw.get)(label)
    affine = np.asarray(item["affine"])
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(label[None].astype(np.uint8), out / f"{case_id}_pred.nii.gz", affine=affine)
    write_nifti(q[0].numpy().astype(np.float32), out / f"{case_id}_regions.nii.gz", affine=affine)
    csv_path = out / "predictions.csv"
    if not csv_path.exists():
        csv_path.write_text("case_id,modalities,prediction\n")
    with csv_path.open("a") as f:
        f.write(f"{case_id},{'+'.join(m for m in mods if m in files)},{case_id}_pred.nii.gz\n")
    return out


# The class itself is the registered factory: its keyword arguments are ``model.params``.
incomplete_seg = MODELS.register(
    "incomplete_seg", help="UniMRSeg: 3D UNet + ASPP, 3-stage training for any modality subset")(IncompleteSegNet)


# Demo variants (``medfuse demo incomplete_seg``); the first is the full model. The baselines are
# single-stage runs with the demo config's ``train.max_epochs`` (as many epochs as the three stages
# together) and the same selection rule (mean validation Dice over the modality combinations).
DEMO_ABLATIONS["incomplete_seg"] = [
    ("UniMRSeg, 3 stages", []),
    ("UNet + modality dropout", ["train.stages=[]", "model.params.modality_dropout=0.5", "model.params.adapters=false"]),
]
