"""``medfuse evaluate`` and ``medfuse predict``: best checkpoint -> metrics with CIs, report, files.

The test split is only ever read here, never during training or model selection (DESIGN
"Evaluation honesty"). Families add their own evaluations (counterfactual text, modality subsets)
through a model method ``evaluate_extra(task, dm, split, run_dir) -> dict`` whose result is merged
into the report.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.config import Config
from medfuse.engine.checkpoint import find_checkpoint, load_model_weights
from medfuse.engine.data import CaseDataModule, build_datamodule, collate
from medfuse.engine.tasks import BaseTask, merge_outputs
from medfuse.engine.trainer import build_task, load_run
from medfuse.errors import ConfigError, DataError


def device_for(cfg: Config) -> torch.device:
    if cfg.train.accelerator in ("cpu",) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_trained(run_dir: str | Path, which: str = "best") -> tuple[Config, CaseDataModule, BaseTask]:
    """Config, data module (with the run's saved split) and task with trained weights, in eval mode."""
    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    dm = build_datamodule(cfg, run_dir)
    stages = cfg.train.stages
    task = build_task(cfg, dm, stages[-1] if stages else None)
    load_model_weights(task.model, ckpt)
    task.eval()
    return cfg, dm, task.to(device_for(cfg))


@torch.no_grad()
def run_predictions(task: BaseTask, loader) -> dict[str, Any]:
    outs = []
    for batch in loader:
        batch = {k: v.to(task.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        outs.append(task.predict_step(batch, 0))
    return merge_outputs(outs)


def evaluate(run_dir: str | Path, split: str = "test", n_boot: int | None = None,
             counterfactual: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on a split; write ``report.json``/``report.html``/plots.

    Args:
        run_dir: a trained run.
        split: which split to evaluate (the test split is touched only here).
        n_boot: bootstrap resamples (default ``cfg.eval.n_boot``).
        counterfactual: ``FIELD=shuffle|VALUE`` specs; the model's ``evaluate_counterfactual(task,
            dm, split, run_dir, specs, n_boot)`` hook reruns the split with that wrong input and
            returns report entries (families without the hook refuse the option).

    Returns:
        The report dict (also written to disk).
    """
    from medfuse.reports import write_report

    run_dir = Path(run_dir)
    cfg, dm, task = load_trained(run_dir)
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    preds = run_predictions(task, dm.loader(split))
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    report: dict[str, Any] = {"name": cfg.name, "family": cfg.family, "task": cfg.task, "split": split,
                              "n": len(preds["case_id"]), "checkpoint": "best.ckpt",
                              "selection": f"{cfg.train.monitor} ({cfg.train.mode}) on the val split",
                              "config": {"model": cfg.model.name, **cfg.model.params}}
    plots: dict[str, Path] = {}
    if cfg.task == "classification":
        report.update(_classification(cfg, dm, task, preds, split, n_boot, run_dir, plots))
    elif cfg.task == "segmentation":
        report.update(_segmentation(cfg, dm, task, split, n_boot, run_dir, plots))
    else:
        from medfuse.metrics import retrieval_report

        sim = preds["image_emb"] @ preds["text_emb"].T
        rep = retrieval_report(sim, n_boot=n_boot, seed=cfg.train.seed)
        report["n"] = rep.pop("n", report["n"])
        report["metrics"] = rep
    if hasattr(task.model, "evaluate_extra"):
        report.update(task.model.evaluate_extra(task, dm, split, run_dir) or {})
    if counterfactual:
        if not hasattr(task.model, "evaluate_counterfactual"):
            raise ConfigError("--counterfactual", f"model '{cfg.model.name}' has no counterfactual evaluation",
                              "drop --counterfactual (it applies to text-conditioned families such as text_seg)")
        report.update(task.model.evaluate_counterfactual(task, dm, split, run_dir, list(counterfactual), n_boot) or {})
    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.exists():
        from medfuse.reports.plots import plot_curves

        plots["training curves"] = plot_curves(metrics_csv, plots_dir / "curves.png")
    known = {Path(p).resolve() for p in plots.values()}
    for png in sorted(plots_dir.glob("*.png")):  # figures a family's evaluate_extra wrote
        if png.resolve() not in known:
            plots[png.stem.replace("_", " ")] = png
    write_report(run_dir, report, plots)
    return report


def _classification(cfg, dm, task, preds, split, n_boot, run_dir, plots) -> dict[str, Any]:
    from medfuse.metrics import classification_report
    from medfuse.reports.plots import plot_confusion, plot_roc

    labels = {c.case_id: c.label for c in dm.cases[split]}
    y = np.array([int(labels[c]) for c in preds["case_id"]])
    names = dm.table.class_names or [str(i) for i in range(preds["probs"].shape[1])]
    rep = classification_report(y, preds["probs"], class_names=names, n_boot=n_boot, seed=cfg.train.seed)
    cm = rep.pop("confusion_matrix")
    plots["confusion matrix"] = plot_confusion(np.asarray(cm), names, run_dir / "plots" / "confusion.png")
    plots["ROC"] = plot_roc(y, preds["probs"], names, run_dir / "plots" / "roc.png")
    out_dir = run_dir / "predictions"
    out_dir.mkdir(exist_ok=True)
    with (out_dir / f"{split}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "label", "pred", *[f"p_{n}" for n in names]])
        for cid, yt, p in zip(preds["case_id"], y, preds["probs"], strict=True):
            w.writerow([cid, names[yt], names[int(p.argmax())], *[f"{v:.5f}" for v in p]])
    n = rep.pop("n", len(y))
    per_class = rep.pop("per_class", None)
    rep.pop("class_names", None)
    return {"metrics": rep, "per_class": per_class, "confusion_matrix": cm, "class_names": names, "n": n}


def _segmentation(cfg, dm, task, split, n_boot, run_dir, plots) -> dict[str, Any]:
    from medfuse.data.io import write_nifti
    from medfuse.metrics import segmentation_case_metrics, segmentation_report
    from medfuse.reports.plots import plot_overlay

    out_dir = run_dir / "predictions" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    k = None
    per_case: dict[str, list[np.ndarray]] = {}
    shown = 0
    with torch.no_grad():
        for batch in dm.loader(split):
            image = batch["image"].to(task.device)
            probs = task.infer(image).float().softmax(1)  # (B, K, D, H, W)
            k = probs.shape[1]
            pred = probs.argmax(1).cpu()
            m = segmentation_case_metrics(pred, batch["mask"][:, 0].long(), num_classes=k,
                                          spacing=_spacing(batch))
            for key, v in m.items():
                per_case.setdefault(key, []).append(np.asarray(v))
            for i, cid in enumerate(batch["case_id"]):
                affine = np.asarray(batch["affine"][i]) if "affine" in batch else np.eye(4)
                write_nifti(pred[i][None].numpy().astype(np.uint8), out_dir / f"{cid}.nii.gz", affine=affine)
                if shown < cfg.eval.overlays:
                    plots[f"overlay {cid}"] = plot_overlay(batch["image"][i, 0].numpy(), pred[i].numpy(),
                                                           batch["mask"][i, 0].numpy(),
                                                           run_dir / "plots" / f"overlay_{cid}.png")
                    shown += 1
    merged = {key: np.concatenate(v) for key, v in per_case.items()}
    names = list(dm.table.mask_labels) if dm.table.mask_labels else [str(i) for i in range(k or 0)]
    rep = segmentation_report(merged, names[1:], n_boot=n_boot, seed=cfg.train.seed)
    extra = {k: rep.pop(k) for k in ("per_class", "class_names", "n") if k in rep}
    return {"metrics": rep, **extra}


def _spacing(batch) -> tuple[float, float, float] | None:
    if "affine" not in batch:
        return None
    a = np.asarray(batch["affine"][0])[:3, :3]
    sw, sh, sd = np.linalg.norm(a, axis=0)
    return (float(sd), float(sh), float(sw))


def predict(run_dir: str | Path, inputs: list[str], out: str | Path,
            modalities: list[str] | None = None) -> Path:
    """Run a trained model on new files.

    Args:
        run_dir: a trained run.
        inputs: one image path per modality, in the run's modality order (or the subset named by
            ``modalities``), or a single manifest/dataset path (every case in it is predicted).
        out: output folder: ``predictions.csv`` for classification, one NIfTI per case for
            segmentation (with the processed grid's affine).
        modalities: which modalities ``inputs`` are, when not all of them.

    A model with a ``predict_inputs(task, cfg, dm, inputs, out, modalities) -> Path`` hook handles
    its own inputs and outputs instead.
    """
    from medfuse.data.layouts import Case, load_cases
    from medfuse.data.transforms import build_transforms, case_to_item

    cfg, dm, task = load_trained(run_dir)
    mods = dm.modalities
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(task.model, "predict_inputs"):
        # a family with its own inputs (text + boxes from a CSV, any subset of modalities, ...)
        return task.model.predict_inputs(task, cfg, dm, list(inputs), out, modalities)
    if len(inputs) == 1 and (Path(inputs[0]).is_dir() or Path(inputs[0]).suffix in (".csv", ".json")):
        cases = load_cases(inputs[0], modalities=mods).cases
    else:
        given = modalities or mods[: len(inputs)]
        if len(given) != len(inputs):
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for modalities {given}",
                            f"give one file per modality in the order {mods} or name them with --modalities")
        unknown = [m for m in given if m not in mods]
        if unknown:
            raise DataError(unknown[0], "not a modality of this run", f"use some of: {', '.join(mods)}")
        for p in inputs:
            if not Path(p).exists():
                raise DataError(p, "file not found", "check the path")
        name = Path(inputs[0]).name.split(".")[0]
        cases = [Case(case_id=name, patient_id=name, images=dict(zip(given, inputs, strict=True)))]
    tf = build_transforms(cfg.data.transforms, mods, train=False, has_mask=False)
    items = [tf(case_to_item(c, mods)) for c in cases]
    preds = []
    with torch.no_grad():
        for i in range(0, len(items), max(1, cfg.data.batch_size)):
            batch = collate(items[i: i + cfg.data.batch_size])
            batch = {k: v.to(task.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if cfg.task == "segmentation":
                from medfuse.data.io import write_nifti

                pred = task.infer(batch["image"]).argmax(1).cpu().numpy().astype(np.uint8)
                for j, cid in enumerate(batch["case_id"]):
                    write_nifti(pred[j][None], out / f"{cid}_pred.nii.gz", affine=np.asarray(batch["affine"][j].cpu()))
            else:
                preds.append(task.predict_step(batch, 0))
    if cfg.task == "classification" and preds:
        merged = merge_outputs(preds)
        names = dm.table.class_names or [str(i) for i in range(merged["probs"].shape[1])]
        with (out / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "pred", *[f"p_{n}" for n in names]])
            for cid, p in zip(merged["case_id"], merged["probs"], strict=True):
                w.writerow([cid, names[int(p.argmax())], *[f"{v:.5f}" for v in p]])
    return out
