"""The context_seg family's evaluation: the generic segmentation report plus per-class precision,
recall, F1, IoU and Dice from pooled voxel counts, overlays and attention maps, in one pass.

Every batch of the split is inferred once (:meth:`ContextSegEvaluator.infer`); the generic
:class:`~medfuse.engine.segmentation_evaluator.SegmentationEvaluator` consumes it (per-case Dice/IoU/HD95, NIfTI
predictions, overlays) and this evaluator adds, from the same logits, the case's true/false
positive and false negative voxel counts per class. The first cases of the split are inferred with
the attention gates (:meth:`~medfuse.families.context_seg.task.ContextSegTask.infer_intermediates`)
for the attention figures.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from medfuse.data.paths import output_path
from medfuse.engine.segmentation_evaluator import SegmentationEvaluator

SCORES = ("precision", "recall", "f1", "iou", "dice")


def class_names(dm: Any) -> list[str]:
    """The K class names ordered by label value (background first)."""
    labels = dm.table.mask_labels
    if labels:
        return [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    return [str(i) for i in range(dm.num_classes)]


def pooled_scores(counts: np.ndarray, score: str, classes: list[int]) -> np.ndarray:
    """counts (..., n, K, 3) -> ``score`` averaged over ``classes`` (NaN-skipping) after pooling cases: (...,)."""
    tot = counts.sum(axis=-3).astype(np.float64)  # (..., K, 3)
    tp, fp, fn = tot[..., 0], tot[..., 1], tot[..., 2]
    num, den = {"precision": (tp, tp + fp), "recall": (tp, tp + fn), "iou": (tp, tp + fp + fn),
                "f1": (2 * tp, 2 * tp + fp + fn), "dice": (2 * tp, 2 * tp + fp + fn)}[score]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)[..., classes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples are skipped by bootstrap_ci
            return np.nanmean(val, axis=-1)


def pooled_ci(counts: np.ndarray, score: str, classes: list[int], n_boot: int, seed: int,
              groups: list[str] | None = None) -> dict[str, Any]:
    """Bootstrap CI of :func:`pooled_scores` over the cases of ``counts`` (n, K, 3), or over their
    ``groups`` (n,) (CellMap: the crops of one dataset are resampled together)."""
    from medfuse.metrics import bootstrap_ci

    return bootstrap_ci(lambda c: pooled_scores(c, score, classes), counts, n_boot=n_boot, seed=seed, vectorized=True,
                        groups=groups)


class ContextSegEvaluator(SegmentationEvaluator):
    """Adds to the generic report (see the module doc):

    * ``metrics``: ``mean_iou``, ``mean_f1``, ``f1[<class>]``, ``mean_precision``, ``mean_recall``,
      ``mean_dice`` from voxel counts pooled over cases (means over the foreground classes);
    * ``per_class``: those five scores per class, plus the generic per-case ``hd95``;
    * ``case_metrics``: the generic per-case ``dice``, ``iou`` and ``hd95`` means;
    * ``context_seg``: the fusion, how the scores are computed, the HD95 unit (``hd95_unit``) and
      the figures (overlays on the raw intensities and, with attention fusion, the level-1
      attention map);
    * ``notes``: the HD95 unit, in words.

    HD95 is in mm, the affines' unit, unless every label grid voxel of the split is under a
    micrometre (EM from OME-Zarr in nm, whose 8 nm voxels are 8e-06 mm): then it is in nm, and its
    key says so everywhere (``hd95_nm`` in ``per_class``, ``case_metrics`` and the
    ``metrics_per_case.csv`` columns ``hd95_nm_<class>``); :func:`~medfuse.families.context_seg.units.length_unit`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts: list[np.ndarray] = []  # per case: (K, 3) tp, fp, fn
        self.ids: list[str] = []
        self.figures: dict[str, str] = {}  # title -> png path relative to the run
        self.spacings: list[tuple[float, float, float]] = []  # per case: the label grid's (D, H, W) voxel size, mm
        self.hd95_unit = "mm"

    @property
    def fusion(self) -> str:
        return self.task.model.fusion

    def _more_figures(self) -> bool:
        return len(self.figures) < 2 * self.cfg.eval.overlays

    def class_names(self) -> list[str]:
        return class_names(self.dm)

    def reference(self, batch, i):
        """The family's items already lie on the label grid (its data module resamples the raw and
        context streams onto it): score there. The generic writer still puts each prediction on
        the raw file's grid (the items' ``orig_affine``/``orig_shape``), as ``medfuse predict`` does."""
        return None

    def infer(self, batch):
        if self.fusion == "attention" and self._more_figures():
            return self.task.infer_intermediates(batch)  # logits + attention gates, one pass
        return self.task.infer(batch)

    @property
    def hd95_key(self) -> str:
        """``hd95`` in mm (the platform's unit), ``hd95_<unit>`` otherwise."""
        return "hd95" if self.hd95_unit == "mm" else f"hd95_{self.hd95_unit}"

    def per_case_table(self, names: list[str]) -> dict[str, Any]:
        """The generic table, its HD95 columns named by :attr:`hd95_key` (``hd95_nm_<class>``)."""
        table = super().per_case_table(names)
        if self.hd95_key != "hd95":
            table["columns"] = [self.hd95_key + c[len("hd95"):] if c.startswith("hd95_") else c
                                for c in table["columns"]]
        return {**table, "hd95_unit": self.hd95_unit}  # the report's caption (reports.html) names it

    def update(self, batch, out):
        super().update(batch, out)  # scores on the label grid of batch["affine"] (reference() is None)
        from medfuse.engine.segmentation_evaluator import spacing_of

        for i in range(len(batch["case_id"])):
            spacing = spacing_of(batch, i)
            if spacing is not None:
                self.spacings.append(spacing)
        from medfuse.metrics import confusion_stats
        from medfuse.reports.plots import plot_gate_overlay, plot_overlay

        k = len(self.class_names())
        pred = out["logits"].argmax(1).cpu()  # (B, D, H, W)
        mask = batch["mask"][:, 0].long().cpu()
        plots = self.run_dir / "plots"
        for i, cid in enumerate(batch["case_id"]):
            s = confusion_stats(pred[i], mask[i], k)
            self.counts.append(np.stack([s["tp"], s["fp"], s["fn"]], axis=-1))  # (K, 3)
            self.ids.append(cid)
            if not self._more_figures():
                continue
            intensity = batch["intensity"][i, 0].float().cpu().numpy()  # (D, H, W) raw, for display
            png = plot_overlay(intensity, pred[i].numpy(), mask[i].numpy(), output_path(plots, f"context_overlay_{cid}.png"),
                               title=f"{cid}: raw, pred, truth")
            self.figures[f"overlay {cid}"] = str(png.relative_to(self.run_dir))
            self.plots[f"context overlay {cid}"] = png
            if "attention" in out:
                att = out["attention"][i, 0].float().cpu().numpy()  # (D, H, W) level-1 gate, channel mean
                png = plot_gate_overlay(intensity, att, output_path(plots, f"attention_{cid}.png"),
                                        title=f"{cid}: level-1 context attention (channel mean)")
                self.figures[f"attention {cid}"] = str(png.relative_to(self.run_dir))
                self.plots[f"attention {cid}"] = png

    def compute(self):
        from medfuse.families.context_seg.units import length_unit

        unit, factor = length_unit(v for s in self.spacings for v in s)
        if unit != self.hd95_unit and "hd95" in self.per_case:  # before the generic report and metrics_per_case.csv
            self.per_case["hd95"] = [np.asarray(v) * factor for v in self.per_case["hd95"]]  # once: unit is now set
        self.hd95_unit = unit
        rep = super().compute()  # per-case Dice/IoU/HD95 of the same pass
        hd = self.hd95_key
        names = self.class_names()
        n_boot, seed = self.n_boot, self.seed
        c = np.stack(self.counts)  # (N, K, 3)
        fg = list(range(1, len(names)))
        g = self.patient_groups(self.ids)  # CellMap crops of one dataset (its patient id) go together

        def ci(score: str, classes: list[int]) -> dict[str, Any]:
            return pooled_ci(c, score, classes, n_boot, seed, g)

        metrics: dict[str, Any] = {"mean_iou": ci("iou", fg), "mean_f1": ci("f1", fg)}
        for j in fg:
            metrics[f"f1[{names[j]}]"] = ci("f1", [j])
        for score in ("precision", "recall", "dice"):
            metrics[f"mean_{score}"] = ci(score, fg)
        per_class = {names[j]: {s: ci(s, [j]) for s in SCORES} for j in fg}
        for name in names[1:]:
            per_class[name][hd] = rep["per_class"][name]["hd95"]
        where = "nm: every label grid voxel is under 1 um (EM), so mm would read ~1e-05" if hd != "hd95" else \
            "mm, the unit of the label grid's affine (world units; for files without a voxel size, voxels)"
        return {
            **rep,
            "metrics": metrics,
            "per_class": per_class,
            "n": len(self.ids),
            "case_metrics": {"dice": rep["metrics"]["dice"], "iou": rep["metrics"]["iou"], hd: rep["metrics"]["hd95"]},
            "context_seg": {"fusion": self.fusion, "scores": "voxel counts pooled over cases; mean over "
                            "foreground classes; case-bootstrap 95% CI", "hd95_unit": self.hd95_unit,
                            "plots": dict(self.figures)},
            "notes": [*rep.get("notes", []), f"HD95 ({hd} in case_metrics, per_class and metrics_per_case.csv) in {where}"],
        }
