"""``medfuse evaluate``: best checkpoint -> one inference pass over a split -> metrics with CIs, report.

The test split is only ever read here, never during training or model selection (DESIGN
"Evaluation honesty"). An :class:`Evaluator` runs inference over the split exactly once; every
batch's outputs go to :meth:`Evaluator.update`, where the generic metrics and a family's extra
metrics (a subclass extending ``update``/``compute``) both read them. A family names its evaluator
in its :class:`~medfuse.registry.ModelEntry`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.config import Config
from medfuse.data.paths import output_path
from medfuse.engine.build import check_postprocess, family_of, resolve
from medfuse.engine.checkpoint import find_checkpoint, load_model_weights
from medfuse.engine.tasks import BaseTask
from medfuse.engine.trainer import build_task, load_run
from medfuse.errors import ConfigError, DataError


def check_eval_overrides(overrides: list[str] | None) -> list[str]:
    """``key=value`` overrides of a trained run: ``eval.*`` keys; ``data.dicom.*``, which changes only
    how DICOM files are read (e.g. ``data.dicom.on_gap=resample`` for a test series with a missing
    slice, which training never read); and ``data.root``, where the run's dataset now lies (the
    saved split names its cases). The model and its preprocessing are fixed by training."""
    out = list(overrides or [])
    for o in out:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or not (key.startswith(("eval.", "data.dicom.")) or key == "data.root"):
            raise ConfigError(key or o, "only eval.*, data.dicom.* and data.root can be overridden for a trained run",
                              "e.g. eval.tta=true eval.sw_overlap=0.5 data.dicom.on_gap=resample data.root=/new/place")
    return out


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
    if cfg.data.root and not cfg.data.demo and not Path(cfg.data.root).exists():
        raise DataError(cfg.data.root, f"the training data of run {run_dir} is not here (a run reads it for its "
                        "split, modalities and label values)", "give its new place (data.root=PATH), or predict from a "
                        "package (`medfuse export RUN`, where the data is), which needs no training data")
    dm = build_datamodule(cfg, run_dir)
    stages = cfg.train.stages
    task = build_task(cfg, dm, stages[-1] if stages else None)
    load_model_weights(task.model, ckpt)
    task.eval()
    return cfg, dm, task.to(device_for(cfg))


def case_patients(cases: Mapping[str, Any], case_ids: Iterable[str]) -> list[str]:
    """The patient id of each case id: ``cases[case_id].patient_id``, or the case id itself when
    ``cases`` (case id -> case) lacks the case or the case has no patient id."""
    found = [(str(c), cases.get(str(c))) for c in case_ids]
    return [(case.patient_id if case is not None else None) or c for c, case in found]


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
        self.case_ids: list[str] = []  # the scored cases in order, filled by update()
        (self.run_dir / "plots").mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> torch.device:
        return self.task.device

    def out_path(self, *parts: str) -> Path:
        """``run_dir/<parts>`` (e.g. ``"plots", f"overlay_{case_id}.png"``), refused unless inside the run."""
        return output_path(self.run_dir, *parts)

    @cached_property
    def _cases(self) -> dict[str, Any]:
        """case id -> case of the evaluated split (built once)."""
        return {c.case_id: c for c in self.dm.cases.get(self.split, [])}

    def patients_of(self, case_ids: Iterable[str]) -> list[str]:
        """The patient id of each case of the split (:func:`case_patients` over the split's cases)."""
        return case_patients(self._cases, case_ids)

    def patient_groups(self, case_ids: Iterable[str] | None = None) -> list[str] | None:
        """The patient of each scored case (default: :attr:`case_ids`, the evaluated order) when
        some patient has several (BraTS follow-ups, repeat scans, CT-RATE scans): the bootstrap
        then resamples patients, since one patient's cases are not independent. None when every
        case is its own patient (the plain bootstrap over cases is then the same)."""
        from medfuse.metrics import repeated_groups

        return repeated_groups(case_patients(self._cases, self.case_ids if case_ids is None else case_ids))

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
        groups = self.patient_groups()  # a patient's repeat scans are resampled together
        rep = classification_report(y, probs, class_names=names, n_boot=self.n_boot, seed=self.seed, groups=groups)
        cm = rep.pop("confusion_matrix")
        self.plots["confusion matrix"] = plot_confusion(np.asarray(cm), names, self.out_path("plots", "confusion.png"))
        self.plots["ROC"] = plot_roc(y, probs, names, self.out_path("plots", "roc.png"))
        out_dir = self.run_dir / "predictions"
        out_dir.mkdir(exist_ok=True)
        with self.out_path("predictions", f"{self.split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "label", "pred", *[f"p_{n}" for n in names]])
            for cid, yt, p in zip(self.case_ids, y, probs, strict=True):
                w.writerow([cid, names[yt], names[int(p.argmax())], *[f"{v:.5f}" for v in p]])
        n = rep.pop("n", len(y))
        per_class = rep.pop("per_class", None)
        rep.pop("class_names", None)
        extra = {"n_patients": rep.pop("n_patients")} if "n_patients" in rep else {}
        return {"metrics": rep, "per_class": per_class, "confusion_matrix": cm, "class_names": names, "n": n, **extra}


class RetrievalEvaluator(Evaluator):
    """Image and text embeddings -> Recall@k both ways with CIs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_emb: list[torch.Tensor] = []
        self.text_emb: list[torch.Tensor] = []
        self.case_ids: list[str] = []
        self.texts: list[str] = []  # each pair's text, when the batches carry it

    def update(self, batch, out):
        self.image_emb.append(F.normalize(out["image_emb"].float(), dim=-1).cpu())  # (B, E)
        self.text_emb.append(F.normalize(out["text_emb"].float(), dim=-1).cpu())
        self.case_ids += [str(c) for c in batch["case_id"]]
        if "text" in batch:
            self.texts += [str(t) for t in batch["text"]]

    def positives(self):
        """(N, N) bool: pairs whose texts are identical also match (several reconstructions of one
        scan share a report), or None (:func:`~medfuse.metrics.retrieval.same_text_positives`)."""
        from medfuse.metrics.retrieval import same_text_positives

        return same_text_positives(self.texts) if len(self.texts) == len(self.case_ids) else None

    def similarity(self) -> np.ndarray:
        """(N, N) cosine similarity of every image to every text of the split."""
        return (torch.cat(self.image_emb) @ torch.cat(self.text_emb).t()).numpy()

    def compute(self):
        from medfuse.metrics import retrieval_report

        rep = retrieval_report(self.similarity(), n_boot=self.n_boot, seed=self.seed, groups=self.patient_groups(),
                               positives=self.positives())
        n = rep.pop("n", len(torch.cat(self.image_emb)))
        extra = {"n_patients": rep.pop("n_patients")} if "n_patients" in rep else {}
        return {"metrics": rep, "n": n, **extra}


def evaluate(run_dir: str | Path, split: str = "test", n_boot: int | None = None,
             counterfactual: list[str] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on a split; write ``report.json``/``report.html``/plots.

    Args:
        run_dir: a trained run.
        split: which split to evaluate (the test split is touched only here).
        n_boot: bootstrap resamples (default ``cfg.eval.n_boot``).
        counterfactual: ``FIELD=shuffle|VALUE`` specs, run by the family's evaluator
            (:meth:`Evaluator.counterfactual`; families without one refuse the option).
        overrides: ``eval.*=value`` overrides (ROI, overlap, TTA, ...).

    Returns:
        The report dict (also written to disk).
    """
    from medfuse.engine.lock import RunLock

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        load_run(run_dir)  # the one-line "not a run directory" error, before a lock file is made
    with RunLock(run_dir, "evaluate"):
        return _evaluate(run_dir, split, n_boot, counterfactual, overrides)


def _evaluate(run_dir: Path, split: str, n_boot: int | None, counterfactual: list[str] | None,
              overrides: list[str] | None = None) -> dict[str, Any]:
    from medfuse.reports import write_report

    cfg, dm, task = load_trained(run_dir, overrides=check_eval_overrides(overrides))
    _, entry = family_of(cfg)
    check_postprocess(cfg, entry.predictor.postprocess_keys)  # a family's evaluator applies its predictor's
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    evaluator: Evaluator = entry.evaluator(task, dm, cfg, run_dir, split, n_boot)
    report: dict[str, Any] = {"name": cfg.name, "family": cfg.family, "task": cfg.task, "split": split,
                              "checkpoint": "best.ckpt",
                              "selection": f"{cfg.train.monitor} ({cfg.train.mode}) on the val split",
                              "config": {"model": cfg.model.name, **cfg.model.params},
                              "ci": cfg.eval.ci, "n_boot": n_boot}
    from medfuse.metrics import ci_level

    with ci_level(cfg.eval.ci):  # every bootstrap interval of this evaluation covers eval.ci
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
