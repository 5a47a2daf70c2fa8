"""Percentile bootstrap confidence intervals (DESIGN "Evaluation honesty": every metric carries n and a CI).

Cases are resampled with replacement, jointly across all arrays (the same indices for labels and
scores), with a seeded :class:`numpy.random.Generator`, so an interval is reproducible from its seed.
When one patient contributes several cases (scans, slices, reconstructions), the cases are not
independent: ``bootstrap_ci(..., groups=)`` then resamples patients and takes all of their cases
(any statistic), :func:`cluster_mean_ci` does the same for a mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """Convert a tensor (any device, with or without grad), list or array to a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _finite_float(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _index_chunks(rng: np.random.Generator, n: int, n_boot: int, width: int | None = None):
    """Resample indices in row chunks (bounded memory); the same stream for both code paths.

    Each row draws ``n`` indices in [0, n); ``width`` (default ``n``) is the length of the index
    rows that a chunk turns into (the case count when ``n`` counts groups), which sets its size.
    """
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n if width is None else width, 1)))
    done = 0
    while done < n_boot:
        rows = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(rows, n))
        done += rows


_CHUNK_ELEMENTS = 4_000_000

_CI_LEVEL: ContextVar[float] = ContextVar("medfuse_ci_level", default=0.95)


def default_ci() -> float:
    """The interval coverage :func:`bootstrap_ci` uses when it is not given one (0.95 unless set)."""
    return _CI_LEVEL.get()


@contextmanager
def ci_level(level: float) -> Iterator[float]:
    """Inside the block, every :func:`bootstrap_ci` without an explicit ``ci`` covers ``level``
    (``medfuse evaluate`` sets it from ``eval.ci``, so every report function honours it)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {level}")
    token = _CI_LEVEL.set(float(level))
    try:
        yield float(level)
    finally:
        _CI_LEVEL.reset(token)


def bootstrap_ci(
    metric_fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    ci: float | None = None,
    seed: int = 0,
    vectorized: bool = False,
    groups: Any = None,
) -> dict[str, float | int]:
    """Point estimate and percentile bootstrap interval of ``metric_fn`` over cases, or over groups
    of cases (patients).

    The first axis of every array indexes cases; one resample draws ``n`` case indices with
    replacement and applies them to all arrays. A resample on which the metric is undefined
    (``metric_fn`` raises ``ValueError``/``ZeroDivisionError`` or returns NaN/inf, e.g. ROC-AUC on a
    single class) is skipped; ``n_boot`` in the result says how many resamples were used.

    Args:
        metric_fn: called as ``metric_fn(*arrays)``; returns a scalar. With ``vectorized=True`` it
            must also accept arrays with a leading resample axis, (R, n, ...), and return (R,)
            values; resamples are then evaluated in chunks instead of one call each.
        *arrays: one or more arrays (or tensors) with the same length along axis 0.
        n_boot: number of resamples to draw.
        ci: coverage of the interval (0.95 -> 2.5th and 97.5th percentiles); None: the level
            set by :func:`ci_level` (0.95 by default).
        seed: seed of the numpy Generator. For a given seed and n, both code paths draw the same
            resamples.
        vectorized: see ``metric_fn``.
        groups: None (cases are independent), or (N,) the group (patient id) of each case: a
            cluster bootstrap. One resample then draws G groups with replacement (G = the number
            of distinct groups, numbered in order of first appearance) and concatenates all cases
            of the drawn groups, so its length varies from resample to resample. The point
            estimate is still ``metric_fn`` on all N cases. With ``vectorized=True`` the resamples
            of one chunk are batched by length, (R_len, len, ...) per call, so every row of a
            batch is a whole resample (no padding). When every group holds one case the resamples,
            and so the result, are those of ``groups=None`` (plus ``n_items``).

    Returns:
        ``{"value", "low", "high", "n", "n_boot"}``: ``value`` is ``metric_fn`` on the full data
        (NaN when undefined), ``low``/``high`` the interval (NaN when no resample was usable, or
        when a single case or a single group is resampled: every resample would be the data itself),
        ``n`` the number of cases (of groups with ``groups``) and ``n_boot`` the number of
        resamples used; with ``groups`` also ``n_items``, the number of cases.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    ci = default_ci() if ci is None else ci
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    data = [to_numpy(a) for a in arrays]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError(f"arrays differ in length along axis 0: {[len(a) for a in data]}")
    members = None if groups is None else _group_members(groups, n)
    if n == 0:
        out: dict[str, float | int] = {"value": math.nan, "low": math.nan, "high": math.nan, "n": 0, "n_boot": 0}
        if members is not None:
            out["n_items"] = 0
        return out

    rng = np.random.default_rng(seed)
    stats: list[float] = []
    with warnings.catch_warnings():
        # Undefined resamples are expected (and skipped); their library warnings are noise.
        warnings.simplefilter("ignore")
        try:
            if vectorized:
                value = _finite_float(np.asarray(metric_fn(*(a[None] for a in data))).reshape(-1)[0])
            else:
                value = _finite_float(metric_fn(*data))
        except (ValueError, ZeroDivisionError):
            value = math.nan
        units = n if members is None else len(members)
        # one case (one patient) resamples to itself every time: a zero-width "interval" that says
        # nothing about the uncertainty, so none is given (low/high NaN; reports drop the interval)
        batches = [] if units < 2 else _index_chunks(rng, n, int(n_boot)) if members is None else \
            _cluster_chunks(rng, members, int(n_boot))
        for idx in batches:  # (rows, length) case indices, one resample per row
            if vectorized:
                values = np.asarray(metric_fn(*(a[idx] for a in data)), dtype=np.float64).reshape(-1)
                stats.extend(values[np.isfinite(values)].tolist())
                continue
            for row in idx:
                try:
                    stat = _finite_float(metric_fn(*(a[row] for a in data)))
                except (ValueError, ZeroDivisionError):
                    continue
                if not math.isnan(stat):
                    stats.append(stat)

    if stats:
        alpha = (1.0 - ci) / 2.0
        low, high = np.percentile(np.asarray(stats), [100 * alpha, 100 * (1 - alpha)])
        low, high = float(low), float(high)
    else:
        low = high = math.nan
    if members is not None:
        return {"value": value, "low": low, "high": high, "n": len(members), "n_boot": len(stats),
                "n_items": int(n)}
    return {"value": value, "low": low, "high": high, "n": int(n), "n_boot": len(stats)}


def _group_members(groups: Any, n: int) -> list[np.ndarray]:
    """The case indices of each group, groups in order of first appearance; ``groups`` (N,)."""
    g = [str(x) for x in to_numpy(groups).reshape(-1)]
    if len(g) != n:
        raise ValueError(f"{len(g)} groups for {n} cases")
    index: dict[str, list[int]] = {}
    for i, key in enumerate(g):
        index.setdefault(key, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in index.values()]


def _cluster_chunks(rng: np.random.Generator, members: list[np.ndarray], n_boot: int) -> Iterator[np.ndarray]:
    """Cluster resamples as (rows, length) case-index arrays, one resample per row.

    Each resample draws G = len(members) group indices with replacement (G per row, in the chunks
    of :func:`_index_chunks`) and takes all cases of the drawn groups, in draw order, so its length
    is the sum of the drawn groups' sizes. The resamples of one chunk are yielded by length, one
    array per distinct length (a vectorised metric sees whole resamples, never padding); the order
    in which values are collected does not change a percentile.
    """
    sizes = np.asarray([len(m) for m in members], dtype=np.int64)  # (G,)
    flat = np.concatenate(members)  # (N,) case indices, grouped
    starts = np.cumsum(sizes) - sizes  # (G,) where each group begins in ``flat``
    for draws in _index_chunks(rng, len(members), n_boot, width=int(sizes.sum())):  # (rows, G)
        lens = sizes[draws.reshape(-1)]  # (rows * G,) size of each drawn group
        row_len = lens.reshape(draws.shape).sum(1)  # (rows,)
        # position in ``flat`` of every drawn case: its group's start + 0..size-1
        pos = np.repeat(starts[draws.reshape(-1)] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        rows = np.split(flat[pos], np.cumsum(row_len)[:-1])  # one (row_len[r],) array per resample
        for length in np.unique(row_len):
            yield np.stack([rows[r] for r in np.nonzero(row_len == length)[0]])


def _ratio_of_sums(x: np.ndarray) -> np.ndarray:
    """(R, G, 2) per-group [sum, count] -> (R,) pooled means."""
    return x[..., 0].sum(-1) / x[..., 1].sum(-1)


def cluster_mean_ci(values: Any, groups: Any, n_boot: int = 1000, ci: float | None = None,
                    seed: int = 0) -> dict[str, float | int]:
    """Mean of ``values`` with a bootstrap interval that resamples whole groups (patients).

    Several scored items of one patient (NSCLC slices, BUS-BRA images) are not independent: a
    bootstrap over items would pretend they are and give too narrow an interval. Each resample
    draws patients with replacement and pools all their items; the point estimate is the plain mean
    over items, as without groups.

    Args:
        values: (N,) item scores (finite).
        groups: (N,) the group (patient id) of each item.

    Returns:
        :func:`bootstrap_ci`'s dict with ``n`` = the number of groups, plus ``n_items`` = N.
    """
    v = to_numpy(values).astype(np.float64).reshape(-1)
    g = np.asarray([str(x) for x in to_numpy(groups).reshape(-1)]) if len(v) else np.empty(0, dtype=str)
    if len(g) != len(v):
        raise ValueError(f"{len(g)} groups for {len(v)} values")
    keys, inverse = np.unique(g, return_inverse=True)
    sums = np.bincount(inverse, weights=v, minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    out = bootstrap_ci(_ratio_of_sums, np.stack([sums, counts], axis=-1), n_boot=n_boot, ci=ci, seed=seed,
                       vectorized=True)
    out["n_items"] = int(len(v))
    return out


def repeated_groups(groups: Any) -> list[str] | None:
    """``groups`` as strings when some group (patient) holds several items, else None: with one
    item per group the plain bootstrap over items is the same as over groups."""
    g = [str(x) for x in groups]
    return g if len(set(g)) < len(g) else None


def mean_ci(values: Any, groups: Any = None, n_boot: int = 1000, ci: float | None = None,
            seed: int = 0) -> dict[str, float | int]:
    """Mean of ``values`` (N,) with its bootstrap interval: over items, or over groups (patients)
    when ``groups`` (N,) is given (:func:`cluster_mean_ci`)."""
    if groups is not None:
        return cluster_mean_ci(values, groups, n_boot=n_boot, ci=ci, seed=seed)
    return bootstrap_ci(lambda x: x.mean(-1), values, n_boot=n_boot, ci=ci, seed=seed, vectorized=True)
