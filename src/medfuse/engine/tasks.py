"""LightningModules, one per task kind: classification, segmentation, contrastive.

A task owns a registered model (``self.model``) built from the family's typed params
(``self.params``), its loss and its validation metric. A family that needs more than
``model(batch["image"])`` subclasses one of these and overrides, as plain methods:

* :meth:`BaseTask.forward_batch` to take the whole batch (text, modality presence, masks, ...);
* :meth:`BaseTask.compute_loss` to replace the task's loss (the dict must hold ``"loss"``);
* :meth:`BaseTask.on_stage` to react to a training stage;
* :meth:`BaseTask.infer` for inference in evaluation and prediction (e.g. sliding windows).

Every task says which metric names it logs (:meth:`BaseTask.logged_metrics`, built from the class
attributes ``val_metrics`` and ``loss_terms``), so that ``train.monitor`` is checked before
training starts; a family task that logs other names extends those attributes.

The registry's :class:`~medfuse.registry.ModelEntry` names the task class of each model. The batch
and output dictionaries (:class:`Batch`, :class:`ClassifierOutput`, :class:`SegmentationOutput`,
:class:`EmbeddingOutput`, with their shapes) and the batch helpers (:func:`pad_batch`,
:func:`merge_outputs`) are in :mod:`medfuse.engine.batch`; they stay importable from here.

Under DDP (docs/scaling.md) every logged number is the single-process one: the training terms and
the per-batch validation numbers (``val/loss``, :meth:`BaseTask.log_val`) are sample-weighted means
summed over the ranks once per epoch, and the epoch metrics are computed once, on rank 0, from the
validation outputs of every rank (:func:`medfuse.dist.gather_eval_outputs`; the engine's validation
sampler gives each case to exactly one rank), then logged with the same value on every rank, so
that checkpoint selection sees the whole validation split.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfuse import dist
from medfuse.config import Config, StageConfig, validate
from medfuse.data.datamodule import CaseDataModule, derive_seed
from medfuse.engine.batch import (  # noqa: F401 - the names that moved to batch.py stay importable here
    Batch,
    ClassifierOutput,
    EmbeddingOutput,
    SegmentationOutput,
    _batch_size,
    merge_outputs,
    pad_batch,
)
from medfuse.engine.build import build_model, family_of, model_params, resolve

log = logging.getLogger(__name__)


class BaseTask(L.LightningModule):
    """Shared optimisation, staging and seeding.

    Args:
        config: the resolved config as a plain dict (stored in checkpoints as hyper-parameters).
        auto: data-derived model arguments (``in_channels``, ``num_classes``, ``modalities``).
        stage: the current training stage, if the config declares stages.
    """

    kind: ClassVar[str] = ""
    """The task kind (``classification``, ``segmentation``, ``contrastive``): the config's ``task``."""

    val_metrics: ClassVar[tuple[str, ...]] = ()
    """Names :meth:`epoch_metrics` returns (logged as ``val/<name>``); ``<n>`` stands for 1, 2, 3, ..."""

    loss_terms: ClassVar[tuple[str, ...]] = ()
    """Keys :meth:`compute_loss` returns besides ``loss`` (logged as ``train/<name>``)."""

    unused_parameters: ClassVar[bool] = False
    """True when a training step may leave trainable parameters without a gradient: a loss level
    with no pairs in a rank's batch, a stage whose losses skip a head. Plain ``ddp`` refuses such a
    step on the next one, so under DDP the trainer then asks Lightning to find the unused
    parameters (:func:`medfuse.engine.ddp.ddp_strategy`)."""

    @classmethod
    def logged_metrics(cls, cfg: Config | None = None) -> list[str]:
        """Every metric name this task logs, any of which ``train.monitor`` may name.

        ``train/loss``, ``val/loss``, ``train/<term>`` for :attr:`loss_terms` and ``val/<name>`` for
        :attr:`val_metrics` (``<n>``: a whole number >= 1). A family task whose names depend on
        the config overrides this classmethod.
        """
        return ["val/loss", *(f"val/{m}" for m in cls.val_metrics), "train/loss",
                *(f"train/{t}" for t in cls.loss_terms)]

    @classmethod
    def logs_metric(cls, name: str, cfg: Config | None = None) -> bool:
        """Whether ``name`` is one of :meth:`logged_metrics` (``<n>`` matching 1, 2, 3, ...)."""
        import re

        for pattern in cls.logged_metrics(cfg):
            if re.fullmatch(re.escape(pattern).replace(re.escape("<n>"), "[1-9][0-9]*"), name):
                return True
        return False

    def __init__(self, config: dict[str, Any], auto: dict[str, Any] | None = None,
                 stage: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = resolve(validate(config))
        self.family, self.entry = family_of(self.cfg)
        self.params = model_params(self.cfg, auto)
        self.stage_cfg = StageConfig.model_validate(stage) if stage else None
        self.model = build_model(self.cfg, params=self.params)
        self._val_outputs: list[dict[str, Any]] = []
        self._val_seen = 0  # validation samples this rank scored this epoch
        self._val_sums: dict[str, torch.Tensor] = {}  # per-batch validation numbers (log_val), summed
        self._val_counts: dict[str, int] = {}
        self._train_sums: dict[str, torch.Tensor] = {}  # loss term -> sum over samples this epoch
        self._train_counts: dict[str, int] = {}
        if self.stage_cfg is not None:
            apply_stage(self.model, self.stage_cfg)
            self.on_stage(self.stage_cfg)

    # --- the family seam -------------------------------------------------------------------
    def forward_batch(self, batch: Batch) -> dict[str, Any]:
        """Training/validation forward: (B, M, D, H, W) image -> ``{"logits": ...}``."""
        return {"logits": self.model(batch["image"])}

    def compute_loss(self, batch: Batch, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms; ``"loss"`` is the one optimised."""
        raise NotImplementedError

    def on_stage(self, stage: StageConfig) -> None:
        """Called once after the stage's ``trainable``/``frozen`` patterns were applied."""

    def infer(self, batch: Batch) -> dict[str, Any]:
        """Inference forward for evaluation and prediction (default: :meth:`forward_batch`)."""
        return self.forward_batch(batch)

    def infer_intermediates(self, batch: Batch) -> dict[str, Any]:
        """:meth:`infer`'s outputs plus what a report shows (gates, attention maps), from the same
        single forward pass; families whose model has ``forward_intermediates`` override this."""
        return self.infer(batch)

    # --- training --------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout etc. draw from the global generator: re-seed per batch so that a resumed run
        # replays exactly what an uninterrupted one would have done, whatever else drew numbers.
        torch.manual_seed(derive_seed(self.cfg.train.seed, self._stage_name(), self.current_epoch, batch_idx))

    def _stage_name(self) -> str:
        return self.stage_cfg.name if self.stage_cfg else "main"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.forward_batch(batch)
        losses = self.compute_loss(batch, out)
        bs = _batch_size(batch)
        for k, v in losses.items():  # logged per epoch by on_train_epoch_end
            self._train_sums[k] = self._train_sums.get(k, 0.0) + v.detach().double() * bs
            self._train_counts[k] = self._train_counts.get(k, 0) + bs
        return losses["loss"]

    def on_train_epoch_end(self) -> None:
        """Log ``train/<term>``: the epoch's sample-weighted mean of each loss term, over every rank.

        Under DDP the terms are summed over the ranks in one all-reduce, in the fixed order of
        ``("loss", *loss_terms)``: a term one rank never computed (e.g. a level without pairs in
        its batches) cannot misalign the ranks. A term outside :attr:`loss_terms` is logged only in
        a single process.
        """
        sums, counts = self._train_sums, self._train_counts
        self._train_sums, self._train_counts = {}, {}
        keys = list(dict.fromkeys(("loss", *self.loss_terms)))
        if not dist.is_distributed():
            keys += sorted(k for k in sums if k not in keys)
        for k, v in self._reduce_means(sums, counts, keys).items():
            self._log_global(f"train/{k}", v, prog_bar=(k == "loss"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.forward_batch(batch)
        losses = self.compute_loss(batch, out)
        self.log_val("val/loss", losses["loss"], _batch_size(batch))
        self._val_outputs.append(self.collect(batch, out))

    def log_val(self, name: str, value: torch.Tensor | float, batch_size: int) -> None:
        """A per-batch validation number (e.g. ``val/loss``, a batch mean), logged at the epoch's end
        as its sample-weighted mean over the whole validation split (every rank's batches).

        A family's ``validation_step`` logs through this, not ``self.log``: Lightning's
        ``sync_dist`` averages the ranks' sample counts as integers, which truncates when the ranks
        score different numbers of cases (5 cases on 2 ranks: 2.5 becomes 2).
        """
        v = torch.as_tensor(value).detach().double().reshape(())
        self._val_sums[name] = self._val_sums.get(name, 0.0) + v * batch_size
        self._val_counts[name] = self._val_counts.get(name, 0) + int(batch_size)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_seen += _batch_size(batch)

    def on_validation_epoch_end(self) -> None:
        """Epoch metrics over the whole validation split, the same on every rank.

        Every rank's outputs are gathered (in the split's order) and :meth:`epoch_metrics` runs once,
        on rank 0; its values go to every rank and are logged there, so checkpoint selection and
        early stopping read the global value. In a single process: the rank's own outputs.
        """
        local = merge_outputs(self._val_outputs) if self._val_outputs else {}
        seen = self._val_seen
        self._val_outputs.clear()
        self._val_seen = 0
        batch_means = self._reduce_means(self._val_sums, self._val_counts, sorted({
            k for names in dist.all_gather_json(sorted(self._val_sums)) for k in names}))
        self._val_sums, self._val_counts = {}, {}
        merged = dist.gather_eval_outputs(local, seen)
        values: dict[str, float] = {}
        if merged and dist.rank() == 0:
            values = {f"val/{k}": float(v) for k, v in self.epoch_metrics(merged).items()
                      if v is not None and math.isfinite(v)}
        values = dist.broadcast_json(values)
        monitor = self.cfg.train.monitor
        for k, v in {**batch_means, **values}.items():
            self._log_global(k, v, prog_bar=(k == monitor))

    def _reduce_means(self, sums: dict[str, torch.Tensor], counts: dict[str, int],
                      keys: list[str]) -> dict[str, float]:
        """``sum / count`` of each key over every rank (one all-reduce; every rank passes the same keys)."""
        if not keys:
            return {}
        zero = torch.zeros((), dtype=torch.float64)
        stats = torch.stack([*(torch.as_tensor(sums.get(k, zero)).double().cpu() for k in keys),
                             *(torch.tensor(float(counts.get(k, 0)), dtype=torch.float64) for k in keys)])
        stats = dist.all_reduce_sum(stats.to(self.device)).cpu()
        n = len(keys)
        return {k: float(stats[i] / stats[n + i]) for i, k in enumerate(keys) if float(stats[n + i]) > 0}

    def _log_global(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a value that is already the same on every rank, once per epoch. ``sync_dist`` with
        ``max`` of identical values keeps it exact (and Lightning warns about an unsynced one)."""
        self.log(name, value, on_step=False, on_epoch=True, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def prepare_data(self) -> None:
        """Under DDP, build the data module's training and validation datasets on local rank 0
        first (Lightning runs this hook there while the other ranks wait): a dataset that extracts
        and caches features when it is built (context_seg) then computes them once, and the other
        ranks read the cache."""
        trainer = self._trainer
        dm = trainer.datamodule if trainer is not None else None
        if trainer is None or trainer.world_size <= 1 or not isinstance(dm, CaseDataModule):
            return
        for split in ("train", "val"):
            if dm.cases.get(split):
                dm.dataset(split)

    def collect(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What to keep from a validation batch (as numpy) for the epoch metrics."""
        raise NotImplementedError

    def epoch_metrics(self, merged: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    # --- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        t = self.cfg.train
        lr = self.stage_cfg.lr if self.stage_cfg and self.stage_cfg.lr else t.lr
        params = [p for p in self.parameters() if p.requires_grad]
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        elif t.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)
        if t.scheduler == "none":
            return opt
        epochs = self.stage_cfg.max_epochs if self.stage_cfg else t.max_epochs
        warm = min(t.warmup_epochs, max(epochs - 1, 0))

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            prog = (epoch - warm) / max(1, epochs - warm)
            return 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))) * 0.99 + 0.01

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def apply_stage(model: nn.Module, stage: StageConfig) -> None:
    """Set ``requires_grad`` from a stage's ``trainable``/``frozen`` fnmatch patterns."""
    from fnmatch import fnmatch

    for name, p in model.named_parameters():
        trainable = stage.trainable is None or any(fnmatch(name, pat) for pat in stage.trainable)
        if any(fnmatch(name, pat) for pat in stage.frozen):
            trainable = False
        p.requires_grad_(trainable)


# ----------------------------------------------------------------------------------------------


class ClassificationTask(BaseTask):
    """Case-level classification: cross-entropy, balanced accuracy / AUC / QWK per epoch."""

    kind = "classification"
    val_metrics = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "qwk")

    def compute_loss(self, batch, out):
        y = torch.as_tensor(batch["label"], device=out["logits"].device).long()
        w = self.cfg.train.class_weights
        weight = torch.tensor(w, device=y.device, dtype=out["logits"].dtype) if w else None
        return {"loss": F.cross_entropy(out["logits"].float(), y, weight=weight,
                                        label_smoothing=self.cfg.train.label_smoothing)}

    def collect(self, batch, out):
        probs = out["logits"].float().softmax(-1).detach().cpu().numpy()
        return {"probs": probs, "label": np.asarray(torch.as_tensor(batch["label"]).cpu()),
                "case_id": list(batch["case_id"])}

    def epoch_metrics(self, merged):
        from medfuse.metrics import accuracy, balanced_accuracy, macro_f1, quadratic_kappa, roc_auc

        y, p = merged["label"], merged["probs"]
        return {"accuracy": accuracy(y, p), "balanced_accuracy": balanced_accuracy(y, p),
                "macro_f1": macro_f1(y, p), "roc_auc": roc_auc(y, p), "qwk": quadratic_kappa(y, p)}

    def predict_step(self, batch, batch_idx=0):
        out = self.infer(batch)
        return {"case_id": list(batch["case_id"]), "probs": out["logits"].float().softmax(-1).cpu().numpy()}


class SegmentationTask(BaseTask):
    """Voxel-wise segmentation (softmax labels): MONAI loss, sliding-window validation, Dice."""

    kind = "segmentation"
    val_metrics = ("dice", "dice_<n>")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from medfuse.losses import build_segmentation_loss

        self.seg_loss = build_segmentation_loss(self.cfg.train.seg_loss, class_weights=self.cfg.train.class_weights)

    @property
    def size_divisor(self) -> int:
        """What every spatial size given to the network must be divisible by (default: from the
        params' ``strides``, else 16); a family task with another network overrides this."""
        from medfuse.engine.inference import size_divisor

        return size_divisor(self.params)

    def run_inference(self, fn: Any, image: torch.Tensor, sliding: bool = True, pad: bool = True) -> Any:
        """``fn`` over a whole (B, C, D, H, W) volume with the ``eval`` settings: sliding windows of
        ``eval.roi_size`` (``sw_overlap``, ``sw_mode``, ``sw_batch_size``) when set and ``sliding``,
        else one pass zero-padded to :attr:`size_divisor` and cropped back; with ``eval.tta`` the
        average over every mirroring of the spatial axes."""
        from medfuse.engine.inference import check_roi, infer_padded, mirror_tta, sliding_window

        ev = self.cfg.eval
        k = self.size_divisor

        def once(x: torch.Tensor) -> Any:
            if sliding and ev.roi_size is not None:
                check_roi(ev.roi_size, k)
                return sliding_window(fn, x, ev.roi_size, ev.sw_overlap, ev.sw_mode, ev.sw_batch_size)
            return infer_padded(fn, x, k) if pad else fn(x)

        return mirror_tta(once, image) if ev.tta else once(image)

    def infer_logits(self, image: torch.Tensor) -> torch.Tensor:
        """(B, M, D, H, W) -> logits (B, K, D, H, W) over the whole volume (:meth:`run_inference`;
        with ``eval.tta`` the mean of the mirrored passes' logits, as nnU-Net v2)."""
        return self.run_inference(self.model, image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Pads ``image`` and ``mask`` (background) to :attr:`size_divisor`, then trains."""
        return super().training_step(pad_batch(batch, self.size_divisor), batch_idx)

    def infer(self, batch) -> SegmentationOutput:
        return {"logits": self.infer_logits(batch["image"])}

    def compute_loss(self, batch, out):
        return {"loss": self.seg_loss(out["logits"].float(), batch["mask"].long())}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Refuse mask values the logits cannot index (on the CPU, before the batch moves), when this
        task's own loss reads the mask as class indices; names the case and its mask file."""
        k = dict(self.params).get("num_classes")
        mask = batch.get("mask") if isinstance(batch, dict) else None
        if type(self).compute_loss is SegmentationTask.compute_loss and k and isinstance(mask, torch.Tensor) \
                and mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= k):
            from medfuse.errors import DataError

            ids = list(batch.get("case_id") or [])
            for i, cid in enumerate(ids or [None]):
                m = mask[i] if ids else mask
                bad = sorted({int(v) for v in torch.unique(m) if not 0 <= int(v) < k})
                if bad:
                    where = self._mask_file(cid) or f"case {cid}"
                    raise DataError(where, f"mask of case '{cid}' has values {bad}, outside the model's classes "
                                    f"0..{k - 1}", "declare every mask value (mask_labels) or set data.num_classes")
        return batch

    def _mask_file(self, cid: Any) -> str | None:
        from medfuse.data.datamodule import CaseDataModule

        dm = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, CaseDataModule):
            for cases in dm.cases.values():
                for c in cases:
                    if c.case_id == cid:
                        return c.mask
        return None

    def validation_step(self, batch, batch_idx):
        out = self.infer(batch)
        self.log_val("val/loss", self.compute_loss(batch, out)["loss"], _batch_size(batch))
        self._val_outputs.append(self.collect(batch, out))

    def collect(self, batch, out):
        from medfuse.metrics import segmentation_case_metrics

        pred = out["logits"].argmax(1).cpu()
        k = out["logits"].shape[1]
        mask = batch["mask"][:, 0].long().cpu()
        shapes = batch.get("spatial_shape")
        if shapes is None:
            return {"dice": np.asarray(segmentation_case_metrics(pred, mask, num_classes=k)["dice"])}
        rows = []  # cases of different sizes: each scored on its own voxels, not the batch padding
        for i, (d, h, w) in enumerate(shapes.tolist()):
            m = segmentation_case_metrics(pred[i: i + 1, :d, :h, :w], mask[i: i + 1, :d, :h, :w], num_classes=k)
            rows.append(np.asarray(m["dice"]))
        return {"dice": np.concatenate(rows)}

    def epoch_metrics(self, merged):
        d = merged["dice"]  # (N, K-1)
        res = {"dice": float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")}
        for i in range(d.shape[1]):
            res[f"dice_{i + 1}"] = float(np.nanmean(d[:, i])) if np.isfinite(d[:, i]).any() else float("nan")
        return res

    def predict_step(self, batch, batch_idx=0):
        logits = self.infer(batch)["logits"]
        return {"case_id": list(batch["case_id"]), "probs": logits.float().softmax(1).cpu().numpy()}


class ContrastiveTask(BaseTask):
    """Image-text alignment: the model returns ``image_emb``/``text_emb`` (a family task may add
    its own loss terms); symmetric InfoNCE; Recall@k on validation."""

    kind = "contrastive"
    val_metrics = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from medfuse.losses import InfoNCE

        self.contrastive = InfoNCE()
        self._logged_trivial_ks = False  # epoch_metrics says once which Recall@k it leaves out

    def forward_batch(self, batch) -> EmbeddingOutput:
        img, txt = self.model(batch["image"], batch["text"])
        return {"image_emb": img, "text_emb": txt}

    def compute_loss(self, batch, out):
        return {"loss": self.contrastive(out["image_emb"].float(), out["text_emb"].float())}

    def collect(self, batch, out):
        return {"image_emb": F.normalize(out["image_emb"].float(), dim=-1).detach().cpu().numpy(),
                "text_emb": F.normalize(out["text_emb"].float(), dim=-1).detach().cpu().numpy()}

    val_ks = (1, 5, 10)
    """Validation Recall@k cut-offs (``val/i2t_R@k``, ``val/t2i_R@k``, averaged in ``val/mean_recall``)."""

    def epoch_metrics(self, merged):
        """Validation Recall@k both ways and their mean, k at or above the pair count left out as in
        evaluation (:func:`~medfuse.metrics.retrieval.paired_recalls`; said once); a monitored key
        whose k are all left out is still logged, as the constant (checkpointing needs the key).
        ``merged``: ``image_emb`` and ``text_emb`` (N, C), L2-normalised; pair i is (i, i)."""
        from medfuse.metrics.retrieval import paired_recalls, trivial_ks_note

        sim = merged["image_emb"] @ merged["text_emb"].T  # (N, N), rows images, columns texts
        res, left = paired_recalls(sim, self.val_ks)
        monitor = str(self.cfg.train.monitor)
        key = monitor.removeprefix("val/")
        kept_constant = False
        if left and monitor.startswith("val/") and key not in res:
            full, _ = paired_recalls(sim, self.val_ks, drop_trivial=False)
            if key in full:
                res[key], kept_constant = full[key], True
        if left and not self._logged_trivial_ks:
            self._logged_trivial_ks = True
            line = trivial_ks_note(left, sim.shape[0], "validation i2t/t2i R@k (and their share of mean_recall)")
            if kept_constant:
                line += f"; train.monitor={monitor} reads only such k: it is still logged, but constant"
            log.warning(line)
        return res

    def predict_step(self, batch, batch_idx=0):
        out = self.infer(batch)
        return {"case_id": list(batch["case_id"]),
                "image_emb": F.normalize(out["image_emb"].float(), dim=-1).cpu().numpy(),
                "text_emb": F.normalize(out["text_emb"].float(), dim=-1).cpu().numpy()}
