"""The incomplete_seg family's evaluation and prediction (seed 003, UniMRSeg).

:class:`IncompleteSegEvaluator` infers every batch of the split once per modality combination
(``2^M - 1`` masked forwards per batch, sliding window with ``eval.roi_size``) and nothing else:
Dice and HD95 per region for every combination (bootstrap CIs over cases, or over patients when a
patient has several cases; a table, heatmaps), and, from each case's own modality set (the complete
combination when it has all modalities), the generic segmentation outputs: NIfTI predictions (the
data set's own label values, as ``predict`` writes them), overlays and canonical-label metrics.
Every label map, scored or written, comes from the region probabilities by
:func:`~medfuse.families.incomplete_seg.data.region_labels`, the rule ``predict`` uses, so one
model gives one prediction.

:class:`IncompleteSegPredictor` segments a case from whichever modalities it has.

Both apply the optional small-ET post-processing (:func:`suppress_small_et`,
``eval.postprocess.min_et_voxels``, off by default) to every prediction before it is scored or written.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from medfuse.engine.segmentation_evaluator import SegmentationEvaluator, spacing_of
from medfuse.families.incomplete_seg.compare import COMBINATIONS_FILE, save_combination_dice
from medfuse.families.incomplete_seg.data import (
    REGION_THRESHOLD,
    combination_mask,
    combination_name,
    modality_combinations,
    raw_label_values,
    region_labels,
)
from medfuse.families.incomplete_seg.task import region_targets


def _ci(values: np.ndarray, n_boot: int, seed: int, groups: list[str] | None = None) -> dict[str, Any]:
    """Mean over cases of ``values`` (N,) with a percentile-bootstrap CI; NaN cases are left out.

    ``groups`` (N,): the patient of each case when a patient has several (follow-up scans): the
    bootstrap resamples patients (:func:`~medfuse.metrics.bootstrap.mean_ci`; ``n`` = patients,
    ``n_items`` = cases). None: over cases, as before.
    """
    from medfuse.metrics.bootstrap import mean_ci

    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    g = None if groups is None else np.asarray(groups, dtype=str)[ok]
    return mean_ci(v[ok], g, n_boot=n_boot, seed=seed)


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN on purpose
        return np.nanmean(x, axis=axis)


def _num(entry: dict[str, Any], digits: int) -> str:
    v = entry.get("value")
    return f"{v:.{digits}f}" if v is not None and np.isfinite(v) else "n/a"


def suppress_small_et(q: torch.Tensor, min_voxels: int, shapes: torch.Tensor | None = None) -> torch.Tensor:
    """Small-ET post-processing: nested region probabilities (B, R, *S) with the innermost region
    (enhancing tumour, ET) emptied in every case whose predicted ET (``q > 0.5``) has fewer than
    ``min_voxels`` voxels; its voxels then fall to the region around it (TC without ET = necrosis,
    NCR), as in the BraTS 2020 winning nnU-Net (Isensee et al. 2021, "nnU-Net for Brain Tumor
    Segmentation", BraTS 2020 proceedings, LNCS 12659).

    ``eval.postprocess.min_et_voxels`` (0 = off) sets ``min_voxels``; voxels are counted on the
    network's output grid, within each case's own ``shapes`` (B, 3) when the batch padded cases of
    different sizes. Returns a new tensor (``q`` itself when nothing changes).
    """
    if min_voxels <= 0 or q.shape[1] < 2:
        return q
    out = q
    for b in range(q.shape[0]):
        et = q[b, -1]
        if shapes is not None:
            d, h, w = (int(v) for v in shapes[b].tolist())
            et = et[..., :d, :h, :w]
        if int((et > REGION_THRESHOLD).sum()) < min_voxels:
            out = q.clone() if out is q else out
            out[b, -1] = 0.0
    return out


class IncompleteSegEvaluator(SegmentationEvaluator):
    """Dice + HD95 per region for each of the ``2^M - 1`` modality combinations, in one pass.

    Report entries: ``metrics`` (means over all / incomplete / complete combinations and per
    region, with bootstrap CIs over cases, or over patients when one has several cases),
    ``per_class`` (per region), ``class_names`` (regions), ``n`` (cases), ``n_patients`` (only when
    clustered), ``modality_combinations`` (the table, also printed), ``combination_plots`` (heatmaps
    under ``plots/``), ``selection``, and ``full_input``: the generic segmentation report
    (canonical labels) of each case's own modality set, from the same forwards.

    The generic segmentation path gets each case's region probabilities (moved between grids as
    probabilities, as ``predict`` does) and makes labels with :meth:`labels_of` (the family's
    :func:`~medfuse.families.incomplete_seg.data.region_labels`); the written files hold the data
    set's own label values (:meth:`file_values`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        net = self.task.model
        self.combos = modality_combinations(net.m)
        self.cmask = combination_mask(self.combos, net.m)  # (C, M)
        self.num_regions = net.num_regions
        self.regions = list(self.dm.region_names)
        self.names = [combination_name(c, list(self.dm.modalities)) for c in self.combos]
        self.dice_rows: list[np.ndarray] = []  # per case (C, R)
        self.hd_rows: list[np.ndarray] = []

    def label_values(self, mask):
        """A raw label file (e.g. BraTS 0/1/2/4) -> canonical nested labels 0..R."""
        from medfuse.families.incomplete_seg.data import canonical_labels

        return canonical_labels(torch.from_numpy(mask), self.dm.raw_regions, "label file").numpy()

    def num_classes_of(self, logits):
        """Region probabilities (B, R, *S) score R + 1 canonical labels (background included)."""
        return int(logits.shape[1]) + 1

    def labels_of(self, logits):
        """A case's region probabilities (R, *S) -> canonical labels (*S), by the family's one rule."""
        return region_labels(logits, dim=0)

    def file_values(self, labels):
        """Canonical labels -> the data set's own label values (e.g. BraTS 0/1/2/4), as ``predict`` writes."""
        return raw_label_values(labels, self.dm.raw_regions)

    def infer(self, batch):
        """One masked forward per modality combination that some case of the batch has.

        Returns ``regions``: {combination index: (B, R, *S) bool on the CPU, region r = canonical
        label >= r}, ``available`` (C, B) bool, and ``own_regions``: region probabilities
        (B, R, *S) of each case's own modality set (the generic segmentation outputs).
        """
        image = batch["image"]
        b = image.shape[0]
        present = batch.get("present")
        present = torch.ones(b, self.task.model.m) if present is None else present.cpu().float()
        available = (self.cmask[:, None, :] <= present[None]).all(-1)  # (C, B)
        own = (self.cmask[:, None, :] == (present[None] > 0.5).float()).all(-1)  # (C, B)
        regions: dict[int, torch.Tensor] = {}
        main: torch.Tensor | None = None
        min_et = self.cfg.eval.postprocess.min_et_voxels
        for c in range(len(self.combos)):
            if not bool(available[c].any()):
                continue
            mask = self.cmask[c].expand(b, -1).to(image.device)  # (B, M)
            q = self.task.predict_regions(batch, mask)  # (B, R, *S)
            q = suppress_small_et(q, min_et, batch.get("spatial_shape"))  # off unless eval.postprocess asks
            labels = region_labels(q)[:, None]  # (B, 1, *S) canonical, the rule predict writes
            regions[c] = (region_targets(labels, self.num_regions) > 0.5).cpu()
            if bool(own[c].any()):
                main = torch.zeros_like(q) if main is None else main
                sel = own[c].to(q.device)
                main[sel] = q[sel]
        if main is None:  # no case has any modality: nothing found
            main = torch.zeros(b, self.num_regions, *image.shape[2:], device=image.device)
        return {"regions": regions, "available": available, "own_regions": main}

    def update(self, batch, out):
        from medfuse.metrics import segmentation_case_metrics

        b = batch["image"].shape[0]
        nc, nr = len(self.combos), self.num_regions
        target = region_targets(batch["mask"].cpu(), nr) > 0.5  # (B, R, *S)
        dice, hd = np.full((b, nc, nr), np.nan), np.full((b, nc, nr), np.nan)
        spacing = [spacing_of(batch, j) for j in range(b)]
        for c, pred in out["regions"].items():
            cases = [j for j in range(b) if bool(out["available"][c, j])]
            for sp in dict.fromkeys(spacing[j] for j in cases):  # one metrics call per voxel size
                js = [j for j in cases if spacing[j] == sp]
                m = segmentation_case_metrics(pred[js], target[js], nr, spacing=sp, region_mode=True)
                dice[js, c], hd[js, c] = m["dice"], m["hd95"]
        self.dice_rows += list(dice)
        self.hd_rows += list(hd)
        # predictions, overlays, label metrics: labels_of/file_values turn the probabilities into labels
        super().update(batch, {"logits": out["own_regions"]})

    def compute(self):
        from rich.console import Console
        from rich.table import Table

        from medfuse.reports import format_ci
        from medfuse.reports.plots import plot_heatmap

        full_input = super().compute()
        n_boot, seed, split, regions, names = self.n_boot, self.seed, self.split, self.regions, self.names
        nc, nr = len(self.combos), self.num_regions
        dice, hd = np.stack(self.dice_rows), np.stack(self.hd_rows)  # (N, C, R)
        patients = self.patients_of(self.case_ids)  # (N,)
        groups = self.patient_groups()  # None unless a patient has several cases
        # per case and combination, for paired comparisons between runs (compare.demo_comparison)
        save_combination_dice(self.out_path("predictions", split, COMBINATIONS_FILE), self.case_ids, names, regions, dice,
                              patient_ids=patients)

        def ci(values: np.ndarray) -> dict[str, Any]:
            return _ci(values, n_boot, seed, groups)

        full, inc = [nc - 1], list(range(nc - 1))
        metrics = {"dice_all_combinations": ci(_nanmean(dice, (1, 2))),
                   "dice_incomplete": ci(_nanmean(dice[:, inc], (1, 2))),
                   "dice_complete": ci(_nanmean(dice[:, full], (1, 2)))}
        metrics.update({f"dice_{r}": ci(_nanmean(dice[:, :, i], 1)) for i, r in enumerate(regions)})
        metrics["hd95_all_combinations"] = ci(_nanmean(hd, (1, 2)))
        metrics["hd95_incomplete"] = ci(_nanmean(hd[:, inc], (1, 2)))
        per_region = {r: {"dice": metrics[f"dice_{r}"], "hd95": ci(_nanmean(hd[:, :, i], 1)),
                          "dice_complete": ci(dice[:, -1, i])} for i, r in enumerate(regions)}
        columns = ["combination", "n", *[f"dice_{r}" for r in regions], "dice_mean",
                   *[f"hd95_{r}" for r in regions], "hd95_mean"]
        rows, heat_d, heat_h = [], np.full((nc, nr + 1), np.nan), np.full((nc, nr + 1), np.nan)
        for c in range(nc):
            d_mean, h_mean = _nanmean(dice[:, c], 1), _nanmean(hd[:, c], 1)
            cells = [ci(dice[:, c, i]) for i in range(nr)] + [ci(d_mean)]
            hcells = [ci(hd[:, c, i]) for i in range(nr)] + [ci(h_mean)]
            rows.append([names[c], int(np.isfinite(d_mean).sum()), *cells, *hcells])
            heat_d[c] = [x["value"] for x in cells]
            heat_h[c] = [x["value"] for x in hcells]
        plots_dir = self.run_dir / "plots"
        cols = [*regions, "mean"]
        png_d = plot_heatmap(heat_d, names, cols, plots_dir / "combinations_dice.png",
                             title=f"Dice per modality combination ({split})")
        png_h = plot_heatmap(heat_h, names, cols, plots_dir / "combinations_hd95.png",
                             title=f"HD95 (mm) per modality combination ({split})")
        self.plots["combinations dice"] = png_d
        self.plots["combinations hd95"] = png_h
        cases = f"{len(dice)} cases" + ("" if groups is None else f" of {len(set(groups))} patients (CIs over patients)")
        table = Table("combination", "n", *[f"Dice {r}" for r in regions], "Dice mean [95% CI]", "HD95 mean",
                      title=f"{self.cfg.name}: {split} split, {cases}, {nc} modality combinations")
        for row in rows:
            table.add_row(row[0], str(row[1]), *[_num(x, 3) for x in row[2: 2 + nr]],
                          format_ci(row[2 + nr]).split(" n=")[0], _num(row[-1], 1))
        Console(width=max(120, Console().width)).print(table)
        run_dir = self.run_dir
        extra = {} if groups is None else {"n_patients": len(set(groups))}
        return {"metrics": metrics, "per_class": per_region, "class_names": regions, "n": len(dice), **extra,
                "modality_combinations": {"columns": columns, "rows": rows},
                "combination_plots": {"dice": str(png_d.relative_to(run_dir)), "hd95": str(png_h.relative_to(run_dir))},
                "selection": "val/loss = 1 - mean Dice over all modality combinations of the val split",
                "full_input": full_input}
