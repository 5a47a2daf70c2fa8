"""``medfuse evaluate``: best checkpoint -> one inference pass over a split -> metrics with CIs, report.

The test split is only ever read here, never during training or model selection (DESIGN
"Evaluation honesty"). An :class:`Evaluator` runs inference over the split exactly once; every
batch's outputs go to :meth:`Evaluator.update`, where the generic metrics and a family's extra
metrics (a subclass extending ``update``/``compute``) both read them. A family names its evaluator
in its :class:`~medfuse.registry.ModelEntry`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.config import Config
from medfuse.data.paths import output_path
from medfuse.engine.build import family_of, resolve
from medfuse.engine.checkpoint import find_checkpoint, load_model_weights
from medfuse.engine.tasks import BaseTask
from medfuse.engine.trainer import build_task, load_run
from medfuse.errors import ConfigError


def device_for(cfg: Config) -> torch.device:
    if cfg.train.accelerator in ("cpu",) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_trained(run_dir: str | Path, which: str = "best", overrides: list[str] | None = None) -> tuple[Config, Any, BaseTask]:
    """Config, data module (with the run's saved split) and task with trained weights, in eval mode."""
    from medfuse.engine.build import build_datamodule

    run_dir = Path(run_dir)
    cfg = resolve(load_run(run_dir, overrides))
    ckpt = find_checkpoint(run_dir, which)
    dm = build_datamodule(cfg, run_dir)
    stages = cfg.train.stages
    task = build_task(cfg, dm, stages[-1] if stages else None)
    load_model_weights(task.model, ckpt)
    task.eval()
    return cfg, dm, task.to(device_for(cfg))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Evaluator:
    """One split of a trained run -> report entries, with one inference pass over the split.

    Every file an evaluator writes is built with :meth:`out_path` (inside the run directory, or
    refused: case ids never escape it).

    Subclasses implement :meth:`update` (consume one batch and its outputs) and :meth:`compute`
    (report entries: ``metrics`` with CIs, ``n``, ``per_class``, ...). A family extends a generic
    evaluator by calling ``super().update``/``super().compute`` and adding its own entries; it may
    override :meth:`infer` to ask the task for intermediates (gates, attention maps) in the same pass.

    Args:
        task: the trained task in eval mode.
        dm: the run's data module (with its saved split).
        cfg: the run's resolved config.
        run_dir: where plots and predictions go.
        split: the split to evaluate.
        n_boot: bootstrap resamples.
    """

    def __init__(self, task: BaseTask, dm: Any, cfg: Config, run_dir: Path, split: str, n_boot: int):
        self.task, self.dm, self.cfg, self.run_dir, self.split, self.n_boot = task, dm, cfg, Path(run_dir), split, n_boot
        self.seed = cfg.train.seed
        self.plots: dict[str, Path] = {}
        (self.run_dir / "plots").mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> torch.device:
        return self.task.device

    def out_path(self, *parts: str) -> Path:
        """``run_dir/<parts>`` (e.g. ``"plots", f"overlay_{case_id}.png"``), refused unless inside the run."""
        return output_path(self.run_dir, *parts)

    def batches(self, loader: Any = None) -> Iterator[dict[str, Any]]:
        """The batches of ``loader`` (default: the split's loader), on the task's device."""
        for batch in loader if loader is not None else self.dm.loader(self.split):
            yield to_device(batch, self.device)

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One forward pass over a batch (the task's inference path)."""
        return self.task.infer(batch)

    def update(self, batch: dict[str, Any], out: dict[str, Any]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        """Infer every batch of the split once, then compute the report entries."""
        with torch.no_grad():
            for batch in self.batches():
                self.update(batch, self.infer(batch))
        return self.compute()

    def counterfactual(self, specs: list[str]) -> dict[str, Any]:
        """Rerun the split with a wrong input (``FIELD=shuffle|VALUE``); families with text override this."""
        raise ConfigError("--counterfactual", f"model '{self.cfg.model.name}' has no counterfactual evaluation",
                          "drop --counterfactual (it applies to text-conditioned families such as text_seg)")


class ClassificationEvaluator(Evaluator):
    """Class probabilities -> accuracy/balanced accuracy/F1/AUC/QWK with CIs, confusion, ROC, predictions CSV."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probs: list[np.ndarray] = []
        self.case_ids: list[str] = []

    def update(self, batch, out):
        self.probs.append(out["logits"].float().softmax(-1).cpu().numpy())  # (B, K)
        self.case_ids += list(batch["case_id"])

    def compute(self):
        from medfuse.metrics import classification_report
        from medfuse.reports.plots import plot_confusion, plot_roc

        probs = np.concatenate(self.probs)
        labels = {c.case_id: c.label for c in self.dm.cases[self.split]}
        y = np.array([int(labels[c]) for c in self.case_ids])
        names = self.dm.table.class_names or [str(i) for i in range(probs.shape[1])]
        rep = classification_report(y, probs, class_names=names, n_boot=self.n_boot, seed=self.seed)
        cm = rep.pop("confusion_matrix")
        self.plots["confusion matrix"] = plot_confusion(np.asarray(cm), names, self.out_path("plots", "confusion.png"))
        self.plots["ROC"] = plot_roc(y, probs, names, self.out_path("plots", "roc.png"))
        out_dir = self.run_dir / "predictions"
        out_dir.mkdir(exist_ok=True)
        with self.out_path("predictions", f"{self.split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "label", "pred", *[f"p_{n}" for n in names]])
            for cid, yt, p in zip(self.case_ids, y, probs, strict=True):
                w.writerow([cid, names[yt], names[int(p.argmax())], *[f"{v:.5f}" for v in p]])
        n = rep.pop("n", len(y))
        per_class = rep.pop("per_class", None)
        rep.pop("class_names", None)
        return {"metrics": rep, "per_class": per_class, "confusion_matrix": cm, "class_names": names, "n": n}


def spacing_of(batch: dict[str, Any], i: int = 0) -> tuple[float, float, float] | None:
    """(D, H, W) voxel spacing of a batch item's affine (columns are the w, h, d axes), or None without affines."""
    if "affine" not in batch:
        return None
    a = np.asarray(torch.as_tensor(batch["affine"][i]).cpu())[:3, :3]
    sw, sh, sd = np.linalg.norm(a, axis=0)
    return (float(sd), float(sh), float(sw))


class SegmentationEvaluator(Evaluator):
    """Label maps -> per-case Dice/HD95 (whole volumes) with CIs, NIfTI predictions, overlays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_case: dict[str, list[np.ndarray]] = {}
        self.num_classes: int | None = None
        self.shown = 0
        self.out_dir = self.run_dir / "predictions" / self.split
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def update(self, batch, out):
        from medfuse.data.io import write_nifti
        from medfuse.metrics import segmentation_case_metrics
        from medfuse.reports.plots import plot_overlay

        logits = out["logits"]  # (B, K, D, H, W)
        self.num_classes = logits.shape[1]
        pred = logits.argmax(1).cpu()
        mask = batch["mask"][:, 0].long().cpu()
        m = segmentation_case_metrics(pred, mask, num_classes=self.num_classes, spacing=spacing_of(batch))
        for key, v in m.items():
            self.per_case.setdefault(key, []).append(np.asarray(v))
        image = batch["image"].cpu()
        for i, cid in enumerate(batch["case_id"]):
            affine = np.asarray(batch["affine"][i].cpu()) if "affine" in batch else np.eye(4)
            write_nifti(pred[i][None].numpy().astype(np.uint8), output_path(self.out_dir, f"{cid}.nii.gz"),
                        affine=affine)
            if self.shown < self.cfg.eval.overlays:
                self.plots[f"overlay {cid}"] = plot_overlay(image[i, 0].numpy(), pred[i].numpy(), mask[i].numpy(),
                                                            self.out_path("plots", f"overlay_{cid}.png"))
                self.shown += 1

    def class_names(self) -> list[str]:
        k = self.num_classes or 0
        return list(self.dm.table.mask_labels) if self.dm.table.mask_labels else [str(i) for i in range(k)]

    def compute(self):
        from medfuse.metrics import segmentation_report

        merged = {key: np.concatenate(v) for key, v in self.per_case.items()}
        rep = segmentation_report(merged, self.class_names()[1:], n_boot=self.n_boot, seed=self.seed)
        extra = {k: rep.pop(k) for k in ("per_class", "class_names", "n") if k in rep}
        return {"metrics": rep, **extra}


class RetrievalEvaluator(Evaluator):
    """Image and text embeddings -> Recall@k both ways with CIs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_emb: list[torch.Tensor] = []
        self.text_emb: list[torch.Tensor] = []

    def update(self, batch, out):
        self.image_emb.append(F.normalize(out["image_emb"].float(), dim=-1).cpu())  # (B, E)
        self.text_emb.append(F.normalize(out["text_emb"].float(), dim=-1).cpu())

    def similarity(self) -> np.ndarray:
        """(N, N) cosine similarity of every image to every text of the split."""
        return (torch.cat(self.image_emb) @ torch.cat(self.text_emb).t()).numpy()

    def compute(self):
        from medfuse.metrics import retrieval_report

        rep = retrieval_report(self.similarity(), n_boot=self.n_boot, seed=self.seed)
        n = rep.pop("n", len(torch.cat(self.image_emb)))
        return {"metrics": rep, "n": n}


def evaluate(run_dir: str | Path, split: str = "test", n_boot: int | None = None,
             counterfactual: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on a split; write ``report.json``/``report.html``/plots.

    Args:
        run_dir: a trained run.
        split: which split to evaluate (the test split is touched only here).
        n_boot: bootstrap resamples (default ``cfg.eval.n_boot``).
        counterfactual: ``FIELD=shuffle|VALUE`` specs, run by the family's evaluator
            (:meth:`Evaluator.counterfactual`; families without one refuse the option).

    Returns:
        The report dict (also written to disk).
    """
    from medfuse.engine.lock import RunLock

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        load_run(run_dir)  # the one-line "not a run directory" error, before a lock file is made
    with RunLock(run_dir, "evaluate"):
        return _evaluate(run_dir, split, n_boot, counterfactual)


def _evaluate(run_dir: Path, split: str, n_boot: int | None, counterfactual: list[str] | None) -> dict[str, Any]:
    from medfuse.reports import write_report

    cfg, dm, task = load_trained(run_dir)
    _, entry = family_of(cfg)
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    evaluator: Evaluator = entry.evaluator(task, dm, cfg, run_dir, split, n_boot)
    report: dict[str, Any] = {"name": cfg.name, "family": cfg.family, "task": cfg.task, "split": split,
                              "checkpoint": "best.ckpt",
                              "selection": f"{cfg.train.monitor} ({cfg.train.mode}) on the val split",
                              "config": {"model": cfg.model.name, **cfg.model.params}}
    report.update(evaluator.run())
    if counterfactual:
        report.update(evaluator.counterfactual(list(counterfactual)) or {})
    plots = dict(evaluator.plots)
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.exists():
        from medfuse.reports.plots import plot_curves

        plots["training curves"] = plot_curves(metrics_csv, output_path(run_dir, "plots", "curves.png"))
    known = {Path(p).resolve() for p in plots.values()}
    for png in sorted((run_dir / "plots").glob("*.png")):  # figures the family's evaluator wrote
        if png.resolve() not in known:
            plots[png.stem.replace("_", " ")] = png
    write_report(run_dir, report, plots)
    return report
