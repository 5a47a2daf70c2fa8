"""The ct_encoder family's task: three-level contrastive alignment (global, region, CoT step) plus
an optional auxiliary region segmentation, with per-stage loss weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medfuse.engine.tasks import Batch, ContrastiveTask
from medfuse.errors import ConfigError, DataError
from medfuse.families.ct_encoder.params import LEVELS

DEFAULT_LOSS_WEIGHTS = {"global": 1.0, "region": 1.0, "step": 1.0, "seg": 0.0}


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, texts: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where identical strings are all positives of each other.

    Args:
        img: (M, E) visual embeddings.
        txt: (M, E) text embeddings; row i describes row i of ``img``.
        texts: the M strings (equal strings, e.g. "Heart: normal size.", are not negatives).
        scale: 1 / temperature.

    Returns:
        Scalar: mean of the image->text and text->image soft cross-entropies.
    """
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tid = torch.tensor([ids[t] for t in texts], device=img.device)
    pos = (tid[:, None] == tid[None, :]).to(img.dtype)  # (M, M), symmetric
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


class CTEncoderTask(ContrastiveTask):
    """Volume + region mask + report -> embeddings; loss ``sum_k w_k * L_k`` over ``global``,
    ``region``, ``step`` and ``seg``.

    The batch (see :mod:`medfuse.families.ct_encoder.data`) holds ``image`` (B, 1, D, H, W), ``mask``
    (B, 1, D, H, W) region ids, ``text`` (the impressions), ``region_text`` (``[[region id,
    sentence]]`` per case) and ``steps`` (``[[step text, [region ids]]]`` per case).

    Attributes:
        loss_weights: ``model.params.loss_weights`` over the defaults (1, 1, 1, 0), then the current
            stage's ``losses``. Every stage's ``losses`` is checked when the task is built.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for stage in [*self.cfg.train.stages, *([self.stage_cfg] if self.stage_cfg is not None else [])]:
            unknown = sorted(set(stage.losses) - set(LEVELS))
            if unknown:
                raise ConfigError(f"train.stages.{stage.name}.losses.{unknown[0]}", "unknown loss",
                                  f"use some of: {', '.join(LEVELS)}")
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(self.params.loss_weights or {})}
        if self.stage_cfg is not None:
            self.loss_weights.update(self.stage_cfg.losses)

    # --- forward ---------------------------------------------------------------------------------
    @staticmethod
    def _check_mask(batch: Batch) -> None:
        if batch.get("mask") is None:
            raise DataError(batch.get("case_id", ["?"])[0], "has no region mask",
                            "ct_encoder needs a region mask per volume (data.params.masks)")

    def encode(self, batch: Batch) -> dict[str, Any]:
        """The vision side only: :meth:`CTEncoderModel.forward` outputs (``image_emb`` (B, E),
        ``region_emb`` (B, R, E), ``present`` (B, R), ``global``, ``patch``, ``region``, ``mass``,
        ``ctx``, ``grid``)."""
        self._check_mask(batch)
        return self.model(batch["image"], batch["mask"])

    def forward_batch(self, batch: Batch) -> dict[str, Any]:
        """:meth:`encode` plus ``text_emb`` (B, E) of the impressions."""
        out = self.encode(batch)
        out["text_emb"] = self.model.embed_text([str(t) for t in batch["text"]])
        return out

    def infer_intermediates(self, batch: Batch) -> dict[str, Any]:
        """:meth:`forward_batch`'s outputs plus ``region_attn`` (B, H, N, R + 1), the last block's
        region attention (region-aware variants only), from one forward pass."""
        self._check_mask(batch)
        out, inter = self.model.forward_intermediates(batch["image"], batch["mask"])
        out["text_emb"] = self.model.embed_text([str(t) for t in batch["text"]])
        return {**out, **inter}

    # --- loss ------------------------------------------------------------------------------------
    def region_pairs(self, batch: Batch, out: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """(M, E) region embeddings of present regions that have a sentence, and the M sentences."""
        idx, texts = [], []
        present = out["present"]
        n_regions = self.model.num_regions
        for b, pairs in enumerate(batch.get("region_text") or []):
            for rid, text in pairs:
                if 1 <= int(rid) <= n_regions and bool(present[b, int(rid) - 1]):
                    idx.append((b, int(rid) - 1))
                    texts.append(str(text))
        if not idx:
            return out["region_emb"].new_zeros(0, out["region_emb"].shape[-1]), []
        bi, ri = torch.tensor(idx, device=present.device).unbind(1)
        return out["region_emb"][bi, ri], texts

    def step_pairs(self, batch: Batch, out: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """(M, E) step embeddings and the M step texts.

        A step's visual feature is the mass-weighted mean of the region features of its
        ``mask_region`` (a union of regions); a step with no (present) region uses the global mean.
        """
        feats, texts = [], []
        region, mass = out["region"], out["mass"]  # (B, R, C_f), (B, R)
        n_regions = self.model.num_regions
        for b, steps in enumerate(batch.get("steps") or []):
            for text, rids in steps:
                r = [int(i) - 1 for i in rids if 1 <= int(i) <= n_regions]
                w = mass[b, r] if r else mass.new_zeros(0)
                if r and float(w.sum()) > 0:
                    feats.append((w[:, None] * region[b, r]).sum(0) / w.sum())
                else:
                    feats.append(out["patch"][b].mean(0))
                texts.append(str(text))
        step_proj = self.model.step_proj
        if not feats:
            return region.new_zeros(0, step_proj[-1].out_features), []
        return step_proj(torch.stack(feats)), texts

    def compute_loss(self, batch: Batch, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted sum) and each term, detached: ``global`` (volume <-> impression),
        ``region`` and ``step`` (when weighted and the batch has two pairs or more), ``seg``
        (with ``aux_seg``, when weighted)."""
        w = self.loss_weights
        model = self.model
        texts = [str(t) for t in batch["text"]]
        losses = {"global": contrastive_loss(out["image_emb"], out["text_emb"], texts, model.temps["global"].scale)}
        for level, pairs in (("region", self.region_pairs), ("step", self.step_pairs)):
            if w.get(level, 0.0) > 0:
                img, txt = pairs(batch, out)
                if len(txt) > 1:
                    losses[level] = contrastive_loss(img, model.embed_text(txt), txt, model.temps[level].scale)
        if model.seg_head is not None and w.get("seg", 0.0) > 0:
            logp = model.seg_head(out["patch"]).log_softmax(-1)  # (B, N, R + 1)
            losses["seg"] = -(out["ctx"].fractions * logp).sum(-1).mean()
        total = sum(w.get(k, 0.0) * v for k, v in losses.items())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}
