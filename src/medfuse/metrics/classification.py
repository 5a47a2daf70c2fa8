"""Classification metrics with bootstrap CIs (staging family and zero-shot abnormality heads).

Every function takes integer labels ``y_true`` (N,) and class probabilities ``probs`` (N, K); the
predicted class is ``argmax(probs, 1)``. The computations are scikit-learn's; this module only fixes
conventions for edge cases:

* ROC-AUC is one-vs-rest macro over the classes that are present in ``y_true`` *and* absent from some
  case (a class with no positives or no negatives has no AUC); NaN when no class qualifies.
  Binary problems (K == 2) use ``probs[:, 1]``.
* Quadratic weighted kappa uses all K labels; it is NaN when undefined (e.g. one class everywhere).
* Macro-F1 averages over the labels that occur in ``y_true`` or the predictions.

Intervals resample cases, or patients when :func:`classification_report` is given ``groups``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from .bootstrap import bootstrap_ci, to_numpy


def _check(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = to_numpy(y_true).astype(np.int64).reshape(-1)
    p = to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected y_true (N,) and probs (N, K); got {y.shape} and {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}]; got min {y.min()} and max {y.max()}")
    return y, p


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else math.nan


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def accuracy(y_true: Any, probs: Any) -> float:
    """Fraction of cases whose argmax class equals the label."""
    y, p = _check(y_true, probs)
    return float(skm.accuracy_score(y, p.argmax(1)))


def balanced_accuracy(y_true: Any, probs: Any) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    y, p = _check(y_true, probs)
    return float(_quiet(skm.balanced_accuracy_score, y, p.argmax(1)))


def macro_f1(y_true: Any, probs: Any) -> float:
    """Unweighted mean of per-class F1 (labels seen in ``y_true`` or the predictions)."""
    y, p = _check(y_true, probs)
    return float(_quiet(skm.f1_score, y, p.argmax(1), average="macro", zero_division=0))


def per_class_auc(y_true: Any, probs: Any) -> np.ndarray:
    """One-vs-rest ROC-AUC of each class, shape (K,); NaN where a class lacks positives or negatives.

    For K == 2 both entries are the binary AUC of ``probs[:, 1]`` (class 0's curve is its mirror).
    """
    y, p = _check(y_true, probs)
    k = p.shape[1]
    out = np.full(k, math.nan)
    for c in range(k):
        positives = y == c
        if 0 < positives.sum() < y.size:
            out[c] = skm.roc_auc_score(positives, p[:, c])
    if k == 2 and not np.isnan(out[1]):
        out[0] = out[1]
    return out


def roc_auc(y_true: Any, probs: Any) -> float:
    """Binary AUC of ``probs[:, 1]`` for K == 2, else one-vs-rest macro AUC (NaN when undefined)."""
    y, p = _check(y_true, probs)
    if p.shape[1] == 2:
        return float(skm.roc_auc_score(y, p[:, 1])) if 0 < y.sum() < y.size else math.nan
    aucs = per_class_auc(y, p)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan


def quadratic_kappa(y_true: Any, probs: Any) -> float:
    """Cohen's kappa with quadratic weights over labels 0..K-1 (ordinal stages)."""
    y, p = _check(y_true, probs)
    labels = np.arange(p.shape[1])
    value = _quiet(skm.cohen_kappa_score, y, p.argmax(1), labels=labels, weights="quadratic")
    return float(value)


def confusion_matrix(y_true: Any, probs: Any) -> np.ndarray:
    """Counts (K, K): rows are true classes, columns predicted classes."""
    y, p = _check(y_true, probs)
    return skm.confusion_matrix(y, p.argmax(1), labels=np.arange(p.shape[1]))


# --- vectorised bootstrap path -------------------------------------------------------------------
# Calling scikit-learn once per resample costs ~4 ms per metric (input validation), i.e. ~20 s for a
# 1000-resample report. These batch versions compute the same quantities for R resamples at once,
# from confusion matrices and Mann-Whitney ranks; tests check them against scikit-learn.


def _batch_cm(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Confusion matrices (R, K, K) of labels (R, n) against argmax of probs (R, n, K)."""
    r, _, k = p.shape
    pred = p.argmax(-1)
    flat = np.arange(r)[:, None] * k * k + y * k + pred
    return np.bincount(flat.reshape(-1), minlength=r * k * k).reshape(r, k, k).astype(np.float64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the entries where ``mask``; NaN where none."""
    count = mask.sum(-1)
    return _safe_div(np.where(mask, values, 0.0).sum(-1), count)


def _batch_accuracy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (p.argmax(-1) == y).mean(-1)


def _batch_balanced_accuracy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    cm = _batch_cm(y, p)
    support = cm.sum(-1)
    recall = _safe_div(np.diagonal(cm, axis1=1, axis2=2), support)
    return _masked_mean(recall, support > 0)


def _batch_macro_f1(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    cm = _batch_cm(y, p)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    seen = cm.sum(-1) + cm.sum(-2)  # 2tp + fp + fn; > 0 for labels in y_true or predictions
    return _masked_mean(np.nan_to_num(_safe_div(2 * tp, seen)), seen > 0)


def _batch_qwk(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    cm = _batch_cm(y, p)
    k = cm.shape[-1]
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    expected = cm.sum(-2)[:, :, None] * cm.sum(-1)[:, None, :] / cm.sum((-1, -2))[:, None, None]
    observed = (weights * cm).sum((-1, -2))
    chance = (weights * expected).sum((-1, -2))
    return 1.0 - _safe_div(observed, chance)


def _batch_class_auc(y: np.ndarray, scores: np.ndarray, c: int) -> np.ndarray:
    """One-vs-rest AUC of class ``c`` for each resample (Mann-Whitney U with mid-ranks)."""
    positive = y == c
    n_pos = positive.sum(-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    ranks = rankdata(scores, axis=-1)
    u = np.where(positive, ranks, 0.0).sum(-1) - n_pos * (n_pos + 1) / 2
    return _safe_div(u, n_pos * n_neg)


def _batch_roc_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    k = p.shape[-1]
    if k == 2:
        return _batch_class_auc(y, p[..., 1], 1)
    aucs = np.stack([_batch_class_auc(y, p[..., c], c) for c in range(k)], -1)  # (R, K)
    return _masked_mean(np.nan_to_num(aucs), np.isfinite(aucs))


CLASSIFICATION_METRICS = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
    "roc_auc": roc_auc,
    "qwk": quadratic_kappa,
}

_BATCH_METRICS = {
    "accuracy": _batch_accuracy,
    "balanced_accuracy": _batch_balanced_accuracy,
    "macro_f1": _batch_macro_f1,
    "roc_auc": _batch_roc_auc,
    "qwk": _batch_qwk,
}


def classification_report(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All classification metrics with bootstrap CIs over cases, or over patients.

    Args:
        y_true: integer labels, shape (N,).
        probs: class probabilities, shape (N, K).
        class_names: K display names (default ``"0"..."K-1"``).
        n_boot: bootstrap resamples per metric.
        seed: bootstrap seed (the same for every metric, so intervals are paired).
        groups: (N,) the patient of each case when a patient has several cases (repeat scans):
            the bootstrap resamples patients and takes all their cases
            (:func:`~medfuse.metrics.bootstrap.bootstrap_ci` with ``groups``); each metric's ``n``
            then counts patients and ``n_items`` cases. None: cases are independent.

    Returns:
        ``{metric: {"value", "low", "high", "n", "n_boot"}}`` for accuracy, balanced_accuracy,
        macro_f1, roc_auc and qwk (plus ``"n_items"`` with ``groups``), ``"confusion_matrix"``
        (K x K list of lists), ``"per_class"`` (``{name: {"precision", "recall", "f1", "auc",
        "support"}}``, point values), ``"class_names"``, ``"n"`` (cases) and, with ``groups``,
        ``"n_patients"``.
    """
    y, p = _check(y_true, probs)
    if y.size == 0:
        raise ValueError("classification_report needs at least one case")
    k = p.shape[1]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    group = None if groups is None else [str(g) for g in groups]
    if group is not None and len(group) != y.size:
        raise ValueError(f"{len(group)} groups for {y.size} cases")
    out: dict[str, Any] = {}
    for name, fn in CLASSIFICATION_METRICS.items():
        # Intervals from the vectorised path; the point value is scikit-learn's own.
        out[name] = bootstrap_ci(_BATCH_METRICS[name], y, p, n_boot=n_boot, seed=seed, vectorized=True,
                                 groups=group)
        out[name]["value"] = _finite(fn(y, p))
    pred = p.argmax(1)
    precision, recall, f1, support = _quiet(
        skm.precision_recall_fscore_support, y, pred, labels=np.arange(k), zero_division=0
    )
    aucs = per_class_auc(y, p)
    out["per_class"] = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auc": float(aucs[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(names)
    }
    out["confusion_matrix"] = confusion_matrix(y, p).tolist()
    out["class_names"] = names
    out["n"] = int(y.size)
    if group is not None:
        out["n_patients"] = len(set(group))
    return out
