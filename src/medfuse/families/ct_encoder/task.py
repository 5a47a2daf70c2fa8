"""The ct_encoder family's task: three-level contrastive alignment (global, region, CoT step), an
optional auxiliary region segmentation, report generation (seed "Multi-Task Training" objective 3)
and the CoT-anchored attention loss (seed "CoT-Anchored Learning"), with per-stage loss weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfuse.dist import global_count
from medfuse.engine.tasks import Batch, ContrastiveTask
from medfuse.errors import ConfigError, DataError
from medfuse.families.ct_encoder.generation import target_text
from medfuse.families.ct_encoder.params import LEVELS
from medfuse.losses import multi_positive_info_nce

DEFAULT_LOSS_WEIGHTS = {"global": 1.0, "region": 1.0, "step": 1.0, "seg": 0.0, "gen": 1.0, "anchor": 0.0}
"""``gen`` counts only when ``model.params.gen_decoder`` names a decoder."""


class CTEncoderTask(ContrastiveTask):
    """Volume + region mask + report -> embeddings (and a report); loss ``sum_k w_k * L_k`` over
    ``global``, ``region``, ``step``, ``seg``, ``gen`` and ``anchor``.

    The batch (see :mod:`medfuse.families.ct_encoder.data`) holds ``image`` (B, 1, D, H, W), ``mask``
    (B, 1, D, H, W) region ids, ``text`` (the impressions), ``findings`` (B strings),
    ``region_text`` (``[[region id, sentence]]`` per case), ``steps`` (``[[step text, [region
    ids]]]`` per case), ``step_lesions`` (the lesion label each step names, 0 = none) and, when the
    dataset has lesion masks, ``lesion`` (B, 1, D, H, W).

    Generation (``gen``): the generator reads the encoder's patch tokens (``gen_inputs``) and learns
    :func:`~medfuse.families.ct_encoder.generation.target_text` by next-token loss; with
    ``gen_detach`` the loss stops at the encoder and gradient norms are clipped separately for the
    generator and the rest, so the contrastive half trains exactly as without a generator (a second
    stage on a frozen encoder, run alongside). A staged run (``train.stages`` with ``trainable:
    ["generator.*"]``, ``losses: {gen: 1}``) trains it on a truly frozen encoder; frozen BatchNorm
    layers are then kept in eval mode. The scratch tokenizer is fitted on the training split's
    targets in :meth:`setup`.

    Anchor (``anchor``): a step's text-to-patch attention
    (:meth:`~medfuse.families.ct_encoder.model.CTEncoderModel.step_patch_attention`) should fall
    inside the region it names: ``-log(sum_n a_n * f_n)``, f_n the patch's voxel fraction inside the
    step's regions, averaged over steps with a present region.

    Attributes:
        loss_weights: ``model.params.loss_weights`` over the defaults (1, 1, 1, 0, 1, 0), then the
            current stage's ``losses``. Every stage's ``losses`` is checked when the task is built.
    """

    loss_terms = ("global", "region", "step", "seg", "gen", "anchor")
    # a step whose ranks hold < 2 CoT steps in all skips the step head, a rank without one the anchor
    unused_parameters = True

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
        asked = (self.params.loss_weights or {}).get("gen", 0.0) > 0 or any(
            st.losses.get("gen", 0.0) > 0 for st in self.cfg.train.stages)
        if asked and self.model.generator is None:
            raise ConfigError("model.params.gen_decoder", "is none but a gen loss weight is set",
                              "set gen_decoder=scratch (or hf:<folder>), or drop loss_weights.gen")

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

    # --- generation --------------------------------------------------------------------------------
    def gen_targets(self, batch: Batch) -> list[str]:
        """The B texts the generator learns (``model.params.gen_target``)."""
        n = len(batch["text"])
        findings = batch.get("findings") or [""] * n
        steps = batch.get("steps") or [[]] * n
        return [target_text(findings[b], batch["text"][b], steps[b], self.params.gen_target) for b in range(n)]

    def visual_tokens(self, out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generator's input: (B, N [+ R], C_f) tokens and a (B, N [+ R]) padding mask (True =
        absent region), detached with ``gen_detach``."""
        tokens, pad = out["patch"], None
        if self.params.gen_inputs == "patch+region":
            tokens = torch.cat([tokens, out["region"]], dim=1)
            pad = torch.cat([torch.zeros(tokens.shape[0], out["patch"].shape[1], dtype=torch.bool, device=tokens.device),
                             ~out["present"]], dim=1)
        if self.params.gen_detach:
            tokens = tokens.detach()
        return tokens, pad

    def generate(self, out: dict[str, Any], num_beams: int | None = None) -> list[str]:
        """Reports for the B volumes of ``out`` (:meth:`encode` outputs): greedy or beam search
        (``model.params.gen_beams``)."""
        gen = self.model.generator
        if gen is None:
            raise ConfigError("model.params.gen_decoder", "is none: this model has no report generator",
                              "train with gen_decoder=scratch (or hf:<folder>)")
        tokens, pad = self.visual_tokens(out)
        return gen.generate(tokens, num_beams=num_beams or self.params.gen_beams, key_padding_mask=pad)

    def setup(self, stage: str) -> None:
        """Fit the scratch generator's word tokenizer on the training split's targets (once: a
        loaded checkpoint brings its own)."""
        gen = self.model.generator
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if gen is not None and not gen.fitted and dm is not None:
            gen.fit_tokenizer([target_text(c.extra.get("findings", ""), c.text, c.extra.get("steps"),
                                           self.params.gen_target) for c in dm.cases["train"]])

    def on_train_epoch_start(self) -> None:
        # A frozen projection head (a stage that trains only the generator) keeps its BatchNorm
        # statistics: Lightning puts every module in train mode at the start of an epoch.
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm1d) and m.weight is not None and not m.weight.requires_grad:
                m.eval()

    def configure_optimizers(self):
        """The engine's optimizer and schedule; with ``gen_lr`` the generator's parameters move to a
        second parameter group with that learning rate and the same schedule (the first group holds
        exactly the parameters, in the order, of a model without a generator)."""
        conf = super().configure_optimizers()
        gen, lr = self.model.generator, self.params.gen_lr
        if gen is None or lr is None:
            return conf
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        ids = {id(p) for p in gen.parameters()}
        first = opt.param_groups[0]
        moved = [p for p in first["params"] if id(p) in ids]
        if not moved:
            return conf
        first["params"] = [p for p in first["params"] if id(p) not in ids]
        sched = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) else None
        factor = sched.lr_lambdas[0](sched.last_epoch) if sched is not None else 1.0
        opt.add_param_group({"params": moved, "lr": lr * factor, "initial_lr": lr})
        if sched is not None:  # the LambdaLR zips groups with base_lrs and lambdas strictly
            sched.base_lrs.append(lr)
            sched.lr_lambdas.append(sched.lr_lambdas[0])
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        return conf

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        gen = self.model.generator
        if gen is None or not self.params.gen_detach or not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        gen_ids = {id(p) for p in gen.parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for part in ([p for p in params if id(p) not in gen_ids], [p for p in params if id(p) in gen_ids]):
            torch.nn.utils.clip_grad_norm_(part, gradient_clip_val)

    # --- text-to-patch attention ---------------------------------------------------------------------
    def step_attention(self, batch: Batch, out: dict[str, Any]) -> dict[str, Any]:
        """Every CoT step's text-to-patch attention with what it should point at.

        Returns:
            ``case`` (M,) batch index, ``attn`` (M, N) attention, ``inside`` (M, N) voxel fraction of
            each patch inside the step's regions (zeros for a step without a present region),
            ``lesion`` (M,) the lesion label the step names (0 = none), ``has_region`` (M,) bool.
            Steps that name neither a present region nor a lesion are left out.
        """
        fr = out["ctx"].fractions  # (B, N, R + 1)
        n_regions = self.model.num_regions
        lesions = batch.get("step_lesions") or [[]] * len(batch["text"])
        case, texts, inside, lesion, has = [], [], [], [], []
        for b, steps in enumerate(batch.get("steps") or []):
            for j, (text, rids) in enumerate(steps):
                r = sorted({int(i) for i in rids if 1 <= int(i) <= n_regions})
                f = fr[b, :, r].sum(-1) if r else fr.new_zeros(fr.shape[1])
                les = int(lesions[b][j]) if j < len(lesions[b]) else 0
                if float(f.sum()) <= 0 and not les:
                    continue
                case.append(b)
                texts.append(str(text))
                inside.append(f)
                lesion.append(les)
                has.append(float(f.sum()) > 0)
        dev = fr.device
        if not texts:
            return {"case": torch.zeros(0, dtype=torch.long, device=dev), "attn": fr.new_zeros(0, fr.shape[1]),
                    "inside": fr.new_zeros(0, fr.shape[1]), "lesion": torch.zeros(0, dtype=torch.long, device=dev),
                    "has_region": torch.zeros(0, dtype=torch.bool, device=dev)}
        idx = torch.tensor(case, device=dev)
        attn = self.model.step_patch_attention(out["patch"][idx], self.model.embed_text(texts))
        return {"case": idx, "attn": attn, "inside": torch.stack(inside), "lesion": torch.tensor(lesion, device=dev),
                "has_region": torch.tensor(has, device=dev)}

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
        if not idx:  # zero rows, still on the graph (a DDP rank without pairs scores none)
            return out["region_emb"].flatten(0, 1)[:0], []
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
        if not feats:  # zero rows, still through the head: under DDP every rank runs the same graph
            return step_proj(out["patch"].flatten(0, 1)[:0]), []
        return step_proj(torch.stack(feats)), texts

    def compute_loss(self, batch: Batch, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted sum) and each term, detached: ``global`` (volume <-> impression),
        ``region`` and ``step`` (when weighted and the batch has two pairs or more), ``seg``
        (with ``aux_seg``, when weighted), ``anchor`` (when weighted and a step names a present
        region) and ``gen`` (with a generator, when weighted)."""
        w = self.loss_weights
        model = self.model
        texts = [str(t) for t in batch["text"]]
        losses = {"global": multi_positive_info_nce(out["image_emb"], out["text_emb"], texts,
                                                    model.temps["global"].scale)}
        for level, pairs in (("region", self.region_pairs), ("step", self.step_pairs)):
            if w.get(level, 0.0) > 0:
                img, txt = pairs(batch, out)
                # pairs over every rank under DDP, so that all ranks take the same branch
                if global_count(len(txt)) > 1:
                    emb = model.embed_text(txt) if txt else out["text_emb"][:0]
                    losses[level] = multi_positive_info_nce(img, emb, txt, model.temps[level].scale)
        if model.seg_head is not None and w.get("seg", 0.0) > 0:
            logp = model.seg_head(out["patch"]).log_softmax(-1)  # (B, N, R + 1)
            losses["seg"] = -(out["ctx"].fractions * logp).sum(-1).mean()
        if w.get("anchor", 0.0) > 0:
            sa = self.step_attention(batch, out)
            keep = sa["has_region"]
            if bool(keep.any()):
                mass = (sa["attn"][keep] * sa["inside"][keep]).sum(-1)  # (M,)
                losses["anchor"] = -mass.clamp_min(1e-6).log().mean()
        if model.generator is not None and w.get("gen", 0.0) > 0:
            tokens, pad = self.visual_tokens(out)
            losses["gen"] = model.generator.loss(tokens, self.gen_targets(batch), pad)
        total = sum(w.get(k, 0.0) * v for k, v in losses.items())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}
