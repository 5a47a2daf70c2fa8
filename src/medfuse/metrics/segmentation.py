"""Segmentation metrics: per-case Dice / IoU / HD95 (MONAI) and per-class confusion counts.

Used by the text_seg, incomplete_seg and context_seg families. Two input modes:

* label mode: ``pred`` and ``target`` are integer label maps (B, D, H, W); they are one-hot encoded
  to (B, K, D, H, W) and, unless ``include_background``, class 0 is dropped.
* region mode: ``pred`` and ``target`` are binary multi-label maps (B, K, D, H, W), e.g. BraTS
  WT/TC/ET. Channels are regions, not classes: all K are kept and ``include_background`` is ignored.

Empty conventions (per case, per class):

* Dice and IoU: empty prediction and empty target -> 1.0 (nothing to find, nothing found);
  exactly one of them empty -> 0.0.
* HD95: undefined when the prediction or the target is empty (including both) -> NaN. NaNs are
  excluded from means, and :func:`segmentation_report` reports how many were excluded (``n_nan``).
  MONAI's own values for these cases (0 or inf) are replaced, so the convention does not depend on
  the MONAI version.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .bootstrap import mean_ci, to_numpy

SEG_METRICS = ("dice", "iou", "hd95")


def _as_tensor(x: Any) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _binary_channels(
    pred: Any, target: Any, num_classes: int, include_background: bool, region_mode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as boolean (B, K', *spatial) with the channels that are scored."""
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    if region_mode:
        if p.ndim < 4:
            raise ValueError(f"region mode expects (B, K, *spatial); got {tuple(p.shape)}")
        return p > 0, t > 0
    if p.ndim < 3:
        raise ValueError(f"label mode expects integer maps (B, *spatial); got {tuple(p.shape)}")
    p, t = p.long(), t.long()
    for name, x in (("pred", p), ("target", t)):
        if x.numel() and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]")
    classes = torch.arange(0 if include_background else 1, num_classes, device=p.device)
    shape = (1, -1) + (1,) * (p.ndim - 1)
    # (B, *S) -> (B, K', *S) booleans
    return p.unsqueeze(1) == classes.view(shape), t.unsqueeze(1) == classes.view(shape)


def segmentation_case_metrics(
    pred: Any,
    target: Any,
    num_classes: int,
    include_background: bool = False,
    spacing: Sequence[float] | float | None = None,
    region_mode: bool = False,
) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 for every case and scored class.

    Args:
        pred: predicted label map (B, D, H, W) ints, or in region mode binary (B, K, D, H, W).
        target: reference with the same shape as ``pred``.
        num_classes: K in label mode, including background (ignored in region mode).
        include_background: score class 0 too (label mode only).
        spacing: voxel size per spatial axis in (D, H, W) order (e.g. mm), or one number; HD95 is in
            these units. ``None`` means unit spacing.
        region_mode: inputs are multi-label channels (see the module docstring).

    Returns:
        ``{"dice", "iou", "hd95"}`` -> float arrays (B, K') where K' is the number of scored classes;
        HD95 is NaN where undefined (empty prediction or target).
    """
    # imported here: monai.metrics takes seconds to import and most callers never need it
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    p, t = _binary_channels(pred, target, num_classes, include_background, region_mode)
    pf, tf = p.double(), t.double()
    # Channels were already selected above, so MONAI must not drop channel 0 again.
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pf, tf)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pf, tf)
    hd_kwargs = {} if spacing is None else {"spacing": spacing}
    with warnings.catch_warnings():
        # MONAI warns about every empty mask; our convention (NaN, counted) is applied below.
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            pf, tf, **hd_kwargs
        )

    spatial = tuple(range(2, p.ndim))
    undefined = ~(p.any(dim=spatial) & t.any(dim=spatial))  # (B, K')
    hd = torch.where(undefined.to(hd.device), torch.full_like(hd, math.nan), hd)
    return {
        "dice": dice.cpu().numpy().astype(np.float64),
        "iou": iou.cpu().numpy().astype(np.float64),
        "hd95": hd.cpu().numpy().astype(np.float64),
    }


def concat_case_metrics(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack the outputs of several :func:`segmentation_case_metrics` calls along the case axis."""
    if not batches:
        return {}
    return {key: np.concatenate([to_numpy(b[key]) for b in batches], axis=0) for key in batches[0]}


def segmentation_report(
    per_case: dict[str, Any],
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Mean and bootstrap CI (over cases) of every per-case metric, per class and overall.

    Args:
        per_case: ``{metric: (N, K')}`` from :func:`segmentation_case_metrics` /
            :func:`concat_case_metrics`.
        class_names: K' names of the scored classes (default ``"1"...`` numbering the columns).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        groups: (N,) the patient of each case when a patient has several scored cases (slices,
            images): the bootstrap resamples patients (:func:`~medfuse.metrics.bootstrap.cluster_mean_ci`),
            ``n`` counts patients and ``n_items`` the cases. None: cases are independent.

    Returns:
        ``{metric: ci, "per_class": {name: {metric: ci}}, "class_names", "n"}`` where each ``ci`` is
        ``{"value", "low", "high", "n", "n_boot", "n_nan"}``. Per class, NaN cases are dropped:
        ``n`` counts the cases used and ``n_nan`` those dropped. Overall, each case is first
        averaged over its non-NaN classes; ``n`` counts cases with at least one value and ``n_nan``
        the NaN (case, class) entries.
    """
    arrays = {k: to_numpy(v).astype(np.float64) for k, v in per_case.items()}
    if not arrays:
        return {"per_class": {}, "class_names": [], "n": 0}
    first = next(iter(arrays.values()))
    if first.ndim == 1:
        arrays = {k: v[:, None] for k, v in arrays.items()}
        first = first[:, None]
    n_cases, n_cls = first.shape
    names = [str(c) for c in (class_names if class_names is not None else range(1, n_cls + 1))]
    if len(names) != n_cls:
        raise ValueError(f"{len(names)} class names for {n_cls} scored classes")

    out: dict[str, Any] = {}
    per_class: dict[str, dict[str, Any]] = {name: {} for name in names}
    group = None if groups is None else np.asarray([str(g) for g in groups])
    if group is not None and len(group) != n_cases:
        raise ValueError(f"{len(group)} groups for {n_cases} cases")

    def ci_of(vals: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
        return mean_ci(vals, None if group is None else group[keep], n_boot=n_boot, seed=seed)

    for metric, values in arrays.items():
        values = np.where(np.isfinite(values), values, np.nan)
        for c, name in enumerate(names):
            col = values[:, c]
            keep = ~np.isnan(col)
            entry = ci_of(col[keep], keep)
            entry["n_nan"] = int(col.size - keep.sum())
            per_class[name][metric] = entry
        has_value = ~np.isnan(values).all(axis=1)
        case_means = np.nanmean(values[has_value], axis=1) if has_value.any() else np.empty(0)
        entry = ci_of(case_means, has_value)
        entry["n_nan"] = int(np.isnan(values).sum())
        out[metric] = entry
    out["per_class"] = per_class
    out["class_names"] = names
    out["n"] = int(n_cases)
    if group is not None:
        out["n_patients"] = int(len(set(group.tolist())))
    return out


def confusion_stats(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> dict:
    """Per-class true-positive, false-positive and false-negative voxel counts over a batch.

    Args:
        pred: integer label map of any shape (e.g. (B, D, H, W) or (B, H, W)); tensor or array.
        target: integer label map with the same shape.
        num_classes: K, including background.
        ignore_index: target value whose voxels are left out (e.g. 255 for "unlabelled").

    Returns:
        ``{"tp", "fp", "fn"}`` -> int64 arrays (K,). Counts add across batches, so sum them over an
        epoch and call :func:`scores_from_stats` once.
    """
    p = _as_tensor(pred).long().reshape(-1)
    t = _as_tensor(target).long().reshape(-1).to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"pred and target sizes differ: {p.numel()} vs {t.numel()}")
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    # joint histogram: row = target class, column = predicted class
    cm = torch.bincount(t[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(num_classes, -1)
    cm = cm.cpu().numpy().astype(np.int64)
    tp = np.diag(cm).copy()
    return {"tp": tp, "fp": cm.sum(0) - tp, "fn": cm.sum(1) - tp}


def scores_from_stats(stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """Precision, recall, F1, IoU and Dice per class from :func:`confusion_stats` counts.

    A score whose denominator is zero (e.g. recall of a class absent from the target) is NaN rather
    than 0 or 1, so that averaging with ``np.nanmean`` skips it. F1 equals Dice for these counts;
    both names are given for readability.
    """
    tp, fp, fn = (to_numpy(stats[k]).astype(np.float64) for k in ("tp", "fp", "fn"))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": f1,
        "iou": ratio(tp, tp + fp + fn),
        "dice": f1.copy(),
    }
