"""Evaluation metrics: classification, segmentation, retrieval, all with bootstrap CIs.

DESIGN "Evaluation honesty": every reported metric carries ``n`` and a bootstrap 95% CI, given as
``{"value", "low", "high", "n", "n_boot"}`` by :func:`bootstrap_ci` and the ``*_report`` functions.
"""

from .bootstrap import bootstrap_ci, ci_level, cluster_mean_ci, default_ci, mean_ci, repeated_groups, to_numpy
from .classification import (
    CLASSIFICATION_METRICS,
    accuracy,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    macro_f1,
    per_class_auc,
    quadratic_kappa,
    roc_auc,
)
from .retrieval import recall_at_k, retrieval_ranks, retrieval_report
from .segmentation import (
    SEG_METRICS,
    concat_case_metrics,
    confusion_stats,
    scores_from_stats,
    segmentation_case_metrics,
    segmentation_report,
)

__all__ = [
    "ci_level",
    "default_ci",
    "CLASSIFICATION_METRICS",
    "SEG_METRICS",
    "accuracy",
    "balanced_accuracy",
    "bootstrap_ci",
    "classification_report",
    "cluster_mean_ci",
    "concat_case_metrics",
    "confusion_matrix",
    "confusion_stats",
    "macro_f1",
    "mean_ci",
    "per_class_auc",
    "quadratic_kappa",
    "recall_at_k",
    "repeated_groups",
    "retrieval_ranks",
    "retrieval_report",
    "roc_auc",
    "scores_from_stats",
    "segmentation_case_metrics",
    "segmentation_report",
    "to_numpy",
]
