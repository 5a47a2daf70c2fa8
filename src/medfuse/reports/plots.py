"""PNG plots for run reports: training curves, confusion matrix, ROC, overlays, CI bars, heatmaps.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``: no global backend is switched, no GUI is needed, and no figure outlives its call (safe in
threads and notebooks). Every function writes ``out_png`` (creating its folder) and returns its path.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import RunDirError

_X_COLUMNS = ("step", "epoch")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png``: callers build it with :func:`medfuse.data.paths.output_path`
    inside the run (which refuses a case id that climbs out); a file name that is itself ``..`` or
    empty is refused here too. A run folder given as ``../runs/x`` is fine."""
    out = Path(out_png)
    if out.name in ("", ".", ".."):
        raise RunDirError(out, "a plot path must end in a file name", "use plain file names")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``CSVLogger`` metrics.csv as floats (blank cells -> NaN)."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(
            path, "metrics file not found", "train the run first or pass the right run directory"
        )
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _to_float(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]


def _curve_group(column: str) -> str:
    """Panel key: ``train/loss_epoch`` and ``val/loss`` share the panel ``loss``."""
    base = column.rsplit("/", 1)[-1]
    for suffix in ("_epoch", "_step"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def plot_curves(
    metrics: str | Path | Iterable[Mapping[str, Any]], out_png: str | Path, max_panels: int = 12
) -> Path:
    """Training curves, one panel per metric with train and val series together.

    Args:
        metrics: path to a Lightning CSVLogger ``metrics.csv``, or its rows as dicts. Rows are
            sparse (a value is missing/NaN where it was not logged at that step).
        out_png: output file.
        max_panels: at most this many panels (the first metrics in column order).
    """
    rows = read_metrics_csv(metrics) if isinstance(metrics, str | Path) else list(metrics)
    rows = [{k: _to_float(v) for k, v in row.items()} for row in rows]
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    x_name = next((c for c in _X_COLUMNS if c in columns), None)
    series = [
        c for c in columns if c not in _X_COLUMNS and any(math.isfinite(r.get(c, math.nan)) for r in rows)
    ]
    groups: dict[str, list[str]] = {}
    for column in series:
        groups.setdefault(_curve_group(column), []).append(column)
    panels = list(groups.items())[:max_panels]

    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (group, cols) in zip(axes, panels, strict=False):
        for column in cols:
            points = [
                (r.get(x_name, math.nan) if x_name else i, r[column])
                for i, r in enumerate(rows)
                if math.isfinite(r.get(column, math.nan))
            ]
            xs, ys = zip(*points, strict=True)
            style = "-" if len(points) > 20 else "o-"
            ax.plot(xs, ys, style, label=column, markersize=3, linewidth=1.2)
        ax.set_title(group)
        ax.set_xlabel(x_name or "row")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) or 1 :]:
        ax.set_axis_off()
    return _save(fig, out_png)


def plot_confusion(cm: Any, class_names: Sequence[str] | None, out_png: str | Path, title: str = "") -> Path:
    """Confusion matrix: colour is the row-normalised rate (recall), text the count.

    Args:
        cm: counts (K, K), rows true classes, columns predicted.
        class_names: K labels (default 0..K-1).
        out_png: output file.
        title: optional title.
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = counts.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = np.nan_to_num(counts / counts.sum(1, keepdims=True))
    size = 2.5 + 0.45 * k
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    if k <= 25:
        for i, j in np.ndindex(k, k):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, out_png)


def plot_roc(y_true: Any, probs: Any, class_names: Sequence[str] | None, out_png: str | Path) -> Path:
    """One-vs-rest ROC curves (binary: the positive class only); classes without both outcomes are skipped.

    Args:
        y_true: integer labels (N,).
        probs: class probabilities (N, K).
        class_names: K labels.
        out_png: output file.
    """
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    fig = _figure(5.0, 4.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    for c in [1] if k == 2 else range(k):
        positive = y == c
        if not 0 < positive.sum() < y.size:
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {auc(fpr, tpr):.3f})", linewidth=1.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (one-vs-rest)" if k > 2 else "ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out_png)


def _overlay(ax, image: np.ndarray, labels: np.ndarray | None, title: str, n_classes: int) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
    if labels is not None and labels.any():
        ax.imshow(
            np.ma.masked_equal(labels, 0),
            cmap="tab10",
            vmin=0,
            vmax=max(9, n_classes),
            alpha=0.45,
            interpolation="nearest",
        )
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def plot_overlay(
    image: Any, pred: Any, target: Any, out_png: str | Path, n_slices: int = 3, title: str = ""
) -> Path:
    """Axial slices with label overlays: image, prediction, and reference (when given).

    Slices are those with the most foreground (prediction or reference); with none, evenly spaced
    ones. The image is scaled to its 1st-99th percentile.

    Args:
        image: volume (D, H, W), or (C, D, H, W) of which channel 0 is shown.
        pred: integer labels (D, H, W); 0 is background.
        target: integer labels (D, H, W) or None.
        out_png: output file.
        n_slices: number of slices (rows).
        title: optional figure title.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 4:
        img = img[0]
    pr = np.asarray(pred).astype(np.int64)
    tg = None if target is None else np.asarray(target).astype(np.int64)
    if img.ndim != 3 or pr.shape != img.shape or (tg is not None and tg.shape != img.shape):
        shapes = (img.shape, pr.shape, None if tg is None else tg.shape)
        raise ValueError(f"image, pred and target must be (D, H, W) of one shape; got {shapes}")
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    img = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)

    depth = img.shape[0]
    foreground = ((pr > 0) | (tg > 0 if tg is not None else False)).reshape(depth, -1).sum(1)
    n = max(1, min(n_slices, depth))
    if foreground.any():
        slices = sorted(np.argsort(-foreground, kind="stable")[:n].tolist())
    else:
        slices = sorted(set(np.linspace(0, depth - 1, n + 2).round().astype(int)[1:-1].tolist())) or [0]
    n_classes = int(max(pr.max(initial=0), tg.max(initial=0) if tg is not None else 0)) + 1

    ncols = 3 if tg is not None else 2
    fig = _figure(2.6 * ncols, 2.6 * len(slices))
    axes = fig.subplots(len(slices), ncols, squeeze=False)
    for row, z in enumerate(slices):
        _overlay(axes[row, 0], img[z], None, f"image z={z}", n_classes)
        _overlay(axes[row, 1], img[z], pr[z], f"prediction z={z}", n_classes)
        if tg is not None:
            _overlay(axes[row, 2], img[z], tg[z], f"reference z={z}", n_classes)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_bar_ci(rows: Sequence[Mapping[str, Any]], out_png: str | Path, title: str = "") -> Path:
    """Horizontal bars with CI whiskers, e.g. one bar per ablation variant.

    Args:
        rows: dicts with ``name``, ``value`` and optionally ``low``/``high`` (missing/NaN -> no whisker).
        out_png: output file.
        title: plot title (typically the metric name).
    """
    names = [str(r.get("name", i)) for i, r in enumerate(rows)]
    values = np.array([_to_float(r.get("value")) for r in rows])
    lows = np.array([_to_float(r.get("low")) for r in rows])
    highs = np.array([_to_float(r.get("high")) for r in rows])
    fig = _figure(6.0, 1.2 + 0.45 * max(1, len(rows)))
    ax = fig.add_subplot()
    pos = np.arange(len(rows))
    ax.barh(pos, np.nan_to_num(values), color="#4c78a8", alpha=0.85)
    has_ci = np.isfinite(values) & np.isfinite(lows) & np.isfinite(highs)
    if has_ci.any():
        err = np.stack([values - lows, highs - values])[:, has_ci].clip(min=0.0)
        ax.errorbar(values[has_ci], pos[has_ci], xerr=err, fmt="none", ecolor="black", capsize=3)
    for y, v in zip(pos, values, strict=True):
        ax.text(0, y, f" {v:.3f}" if math.isfinite(v) else " n/a", va="center", fontsize=7, color="white")
    ax.set_yticks(pos, names)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return _save(fig, out_png)


def plot_heatmap(
    matrix: Any,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    out_png: str | Path,
    title: str = "",
    annotate: bool | None = None,
) -> Path:
    """Annotated heatmap (e.g. gate weights per modality and region, or metric per class and variant).

    Args:
        matrix: values (R, C); NaN cells are left blank.
        row_labels: R labels (default indices).
        col_labels: C labels (default indices).
        out_png: output file.
        title: plot title.
        annotate: write values in cells; default when the matrix has at most 400 cells.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim == 1:
        m = m[None]
    r, c = m.shape
    rows = [str(x) for x in (row_labels if row_labels is not None else range(r))]
    cols = [str(x) for x in (col_labels if col_labels is not None else range(c))]
    fig = _figure(min(16.0, 2.5 + 0.6 * c), min(16.0, 1.5 + 0.4 * r))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    if annotate if annotate is not None else m.size <= 400:
        finite = m[np.isfinite(m)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i, j in np.ndindex(r, c):
            if math.isfinite(m[i, j]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if m[i, j] > mid else "white",
                )
    ax.set_xticks(range(c), cols, rotation=45, ha="right")
    ax.set_yticks(range(r), rows)
    ax.set_title(title)
    return _save(fig, out_png)


def plot_gate_overlay(image: Any, gate: Any, out_png: str | Path, n_slices: int = 4, title: str = "",
                      center: float | None = None) -> Path:
    """A continuous per-position map (e.g. the BGAMF gate, (D, h, w) in [0, 1]) over image slices.

    The map is upsampled (nearest) to the image grid; slices are evenly spaced through the volume.
    By default the colour scale is fixed at [0, 1]. With ``center`` it is diverging and centred
    there (e.g. the case's mean gate), spanning the largest deviation from it in the map, so that
    a gate that varies by a few hundredths around 0.49 is still visible; the range is printed.

    Args:
        image: volume (D, H, W).
        gate: map (D, h, w) with values in [0, 1].
        out_png: output file.
        n_slices: number of slices shown.
        title: figure title.
        center: centre of a diverging colour scale (None: the fixed [0, 1] scale).
    """
    img = np.asarray(image, dtype=np.float64)
    g = np.asarray(gate, dtype=np.float64)
    if img.ndim != 3 or g.ndim != 3 or g.shape[0] != img.shape[0]:
        raise ValueError(f"image (D, H, W) and gate (D, h, w) must share D; got {img.shape}, {g.shape}")
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    img = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    if center is None:
        vmin, vmax, label = 0.0, 1.0, "gate"
    else:
        half = float(np.nanmax(np.abs(g - center))) if g.size else 0.0
        half = max(half, 1e-4)  # a constant map still gets a (tiny) scale
        vmin, vmax = center - half, center + half
        label = "gate"
        note = (f"diverging scale centred at {center:.3f}, colours {vmin:.3f} to {vmax:.3f}; "
                f"values {np.nanmin(g):.3f} to {np.nanmax(g):.3f}")
    depth = img.shape[0]
    n = max(1, min(n_slices, depth))
    slices = np.linspace(0, depth - 1, n).round().astype(int).tolist()
    fig = _figure(2.6 * n, 3.1)
    axes = fig.subplots(1, n, squeeze=False)[0]
    extent = (0, img.shape[2], img.shape[1], 0)
    im = None
    for ax, z in zip(axes, slices, strict=True):
        ax.imshow(img[z], cmap="gray", extent=extent)
        im = ax.imshow(g[z], cmap="coolwarm", vmin=vmin, vmax=vmax, alpha=0.55 if center is not None else 0.45,
                       extent=extent, interpolation="nearest")
        ax.set_title(f"z={z} mean={g[z].mean():.3f}" if center is not None else f"z={z} mean={g[z].mean():.2f}",
                     fontsize=8)
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label=label)
    if center is not None:
        title = f"{title}\n" if title else ""
        title += note
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out_png)
