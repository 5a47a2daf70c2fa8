"""Retrieval metrics for image-text contrastive models (ct_encoder family, CT-CLIP style Recall@k).

``sim`` is a similarity matrix (Nq, Ng): rows are queries, columns gallery items, larger is more
similar. By default query i matches gallery item i (paired volumes and reports).

Ties count against the query: a query's rank is the number of gallery items scoring *at least* as
high as its best positive, other than that positive. A collapsed model (all similarities equal)
therefore gets the worst rank, never a perfect one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import bootstrap_ci, to_numpy


def retrieval_ranks(sim: Any, gt: Any = None) -> np.ndarray:
    """0-based rank of the best-scoring positive for every query.

    Args:
        sim: similarity matrix (Nq, Ng), array or tensor.
        gt: positives: ``None`` (query i <-> gallery i; needs Nq <= Ng), an int array (Nq,) of
            gallery indices, or a boolean matrix (Nq, Ng) allowing several positives per query.

    Returns:
        int array (Nq,); rank 0 means retrieved first. A query without any positive, or with a
        NaN score, gets rank Ng (not retrieved).
    """
    s = to_numpy(sim).astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"sim must be (Nq, Ng); got shape {s.shape}")
    nq, ng = s.shape
    if gt is None:
        if nq > ng:
            raise ValueError(f"default pairing needs Nq <= Ng; got {nq} queries and {ng} gallery items")
        positive = np.zeros_like(s, dtype=bool)
        positive[np.arange(nq), np.arange(nq)] = True
    else:
        g = to_numpy(gt)
        if g.ndim == 1:
            if g.shape[0] != nq:
                raise ValueError(f"gt has {g.shape[0]} entries for {nq} queries")
            positive = np.zeros_like(s, dtype=bool)
            positive[np.arange(nq), g.astype(np.int64)] = True
        elif g.shape == s.shape:
            positive = g.astype(bool)
        else:
            raise ValueError(f"gt must be (Nq,) indices or a (Nq, Ng) mask; got shape {g.shape}")
    best_pos = np.where(positive, s, -np.inf).max(axis=1, keepdims=True)  # (Nq, 1)
    # items (positives excluded) that score at least as high as the best positive
    ahead = ((s >= best_pos) & ~positive).sum(axis=1)
    # a query with a NaN score cannot be ranked: it counts as not retrieved (NaN compared False
    # everywhere, so a NaN model used to score a perfect recall and win model selection); -inf is
    # a legitimate "never retrieve this item" (e.g. the query itself)
    rankable = positive.any(axis=1) & ~np.isnan(s).any(axis=1)
    return np.where(rankable, ahead, ng).astype(np.int64)


def _recall(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k))


def recall_at_k(sim: Any, ks: Sequence[int] = (1, 5, 10, 50), gt: Any = None) -> dict[str, float]:
    """Fraction of queries with a positive among the top k, for each k.

    Args:
        sim: similarity matrix (Nq, Ng).
        ks: cut-offs; those larger than the gallery (trivially 1.0) are left out.
        gt: positives, as in :func:`retrieval_ranks`.

    Returns:
        ``{"R@k": recall}``.
    """
    ranks = retrieval_ranks(sim, gt)
    ng = to_numpy(sim).shape[1]
    return {f"R@{k}": _recall(ranks, k) for k in ks if k <= ng}


def trivial_ks(ks: Sequence[int], gallery: int) -> list[int]:
    """The cut-offs of ``ks`` at or above the ``gallery`` size: every ranked query has a rank below
    ``gallery`` (at most ``gallery - 1`` items ahead of it), so R@k is 1.0 for any model, random or
    collapsed (a gallery of 1 makes even R@1 trivial). :func:`retrieval_report` leaves them out."""
    return [int(k) for k in ks if k >= gallery]


def trivial_ks_note(left: Sequence[int], gallery: int, what: str = "image_to_text/text_to_image R@k") -> str:
    """The one line that says which cut-offs were left out (:func:`trivial_ks`) and why; the
    evaluation report's ``notes`` and the training log of validation Recall@k both use it."""
    return (f"{what} left out for k = {', '.join(map(str, left))}: k at or above the split size "
            f"({gallery} pair{'s' if gallery != 1 else ''}) gives 1.0 for any model")


def paired_recalls(sim: Any, ks: Sequence[int] = (1, 5, 10), drop_trivial: bool = True) -> tuple[dict[str, float], list[int]]:
    """Point Recall@k both ways of a paired (N, N) matrix (no CIs: the per-epoch validation numbers),
    with the rule of :func:`retrieval_report`: cut-offs at or above N are left out (:func:`trivial_ks`).

    Args:
        sim: paired similarity matrix (N, N); rows are images, columns texts, pair i is (i, i).
        ks: cut-offs.
        drop_trivial: False keeps every k, trivial or not (R@k = 1.0 for every ranked query when
            k >= N).

    Returns:
        ``({"i2t_R@k": r, "t2i_R@k": r, ..., "mean_recall": mean of those}, left out ks)``; without
        any kept k the dict is empty (no ``mean_recall``).
    """
    s = to_numpy(sim)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"paired_recalls needs a paired square matrix (N, N); got {s.shape}")
    left = trivial_ks(ks, s.shape[1]) if drop_trivial else []
    kept = [int(k) for k in ks if k not in left]
    out: dict[str, float] = {}
    for direction, matrix in (("i2t", s), ("t2i", s.T)):
        ranks = retrieval_ranks(matrix)
        out.update({f"{direction}_R@{k}": _recall(ranks, k) for k in kept})
    if out:
        out["mean_recall"] = float(np.mean(list(out.values())))
    return out, left


def same_text_positives(texts: Sequence[str]) -> np.ndarray | None:
    """(N, N) bool: pair j's text is the same as pair i's (whitespace-normalised), or None when
    every text is unique. Identical reports (several reconstructions of one scan share their
    report) cannot be told apart, so retrieving any of them is a hit; without this the twin that
    ties with the true pair counted against the query (R@1 = 0 for every such pair)."""
    norm = [" ".join(str(t).split()) for t in texts]
    if len(set(norm)) == len(norm):
        return None
    arr = np.asarray(norm, dtype=object)
    return arr[:, None] == arr[None, :]


def retrieval_report(
    sim: Any, ks: Sequence[int] = (1, 5, 10, 50), n_boot: int = 1000, seed: int = 0,
    groups: Sequence[str] | None = None, positives: Any = None,
) -> dict[str, Any]:
    """Image->text and text->image Recall@k with bootstrap CIs over queries, or over patients.

    Args:
        sim: paired similarity matrix (N, N); rows are images, columns texts, pair i is (i, i).
        ks: cut-offs; those at or above N are left out (:func:`trivial_ks`: 1.0 for any model).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        groups: (N,) the patient of each pair when a patient has several (CT-RATE scans): every
            rank is still computed against the whole gallery, but the bootstrap over the (N,)
            per-query hits resamples patients (``n`` = patients, ``n_items`` = queries). None:
            queries are independent.
        positives: (N, N) bool, image i <-> text j also a correct match (e.g.
            :func:`same_text_positives`; its diagonal must be True); None: pair i only.

    Returns:
        ``{"image_to_text/R@k": ci, "text_to_image/R@k": ci, ..., "n": N}`` (plus ``"n_patients"``
        with ``groups``), each ``ci`` being ``{"value", "low", "high", "n", "n_boot"}``.
    """
    s = to_numpy(sim)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"retrieval_report needs a paired square matrix (N, N); got {s.shape}")
    groups = None if groups is None else [str(g) for g in groups]
    if groups is not None and len(groups) != s.shape[0]:
        raise ValueError(f"{len(groups)} groups for {s.shape[0]} pairs")
    gt = None
    if positives is not None:
        gt = to_numpy(positives).astype(bool)
        if gt.shape != s.shape or not gt.diagonal().all():
            raise ValueError(f"positives must be an (N, N) mask holding every pair i <-> i; got shape {gt.shape}")
    out: dict[str, Any] = {}
    trivial = trivial_ks(ks, s.shape[1])
    for direction, matrix, pos in (("image_to_text", s, gt), ("text_to_image", s.T, None if gt is None else gt.T)):
        ranks = retrieval_ranks(matrix, pos)
        for k in ks:
            if k not in trivial:
                out[f"{direction}/R@{k}"] = bootstrap_ci(
                    lambda r, k=k: (r < k).mean(-1), ranks, n_boot=n_boot, seed=seed, vectorized=True, groups=groups
                )
    out["n"] = int(s.shape[0])
    if groups is not None:
        out["n_patients"] = len(set(groups))
    return out
