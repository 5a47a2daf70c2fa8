"""Run reports: ``report.json`` + self-contained ``report.html`` (DESIGN "Run directory").

Report dict schema (loose: every key is optional and unknown keys are kept in the JSON)::

    {
      "name": str,                 # run name
      "family": str,               # model family, e.g. "staging"
      "task": str,                 # e.g. "classification", "segmentation", "retrieval"
      "split": str,                # split the metrics were computed on, e.g. "test"
      "n": int,                    # number of cases
      "n_patients": int,           # number of patients, when the CIs resampled patients (a patient
                                   # with several cases); metric entries then have n = patients and
                                   # n_items = cases
      "metrics": {name: {"value", "low", "high", "n", ...} | number},
      "per_class": {class_name: {metric: {"value", "low", "high", "n"} | number}},
      "splits": {split: {metric: {...}} | {"metrics": {metric: {...}}}},   # per-split tables
      "confusion_matrix": [[int]], "class_names": [str],
      "ablation": [{"name": variant, metric: {...} | number, ...}],
      "paired": {other variant: {"rows": [{label_key: str, "a": {...}, "b": {...}, "difference": {...}}],
                 summary: {"a", "b", "difference"}, "n": int}},   # first ablation variant = a
      "config": {...},             # resolved config (nested dicts are flattened to a.b.c in HTML)
      "notes": [str],
    }

Metric entries are what :mod:`medfuse.metrics` returns (``bootstrap_ci`` and the ``*_report``
functions); a mapping's entries without a ``"value"`` key are skipped in metric tables.

In ``report.json`` numpy/torch scalars and arrays become plain numbers and lists, paths become
strings, and NaN/inf become ``null`` (strict JSON, readable outside Python).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from medfuse.fileio import atomic_open

from .html import as_float, format_count, format_value, is_ci, render_html


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy/torch values, paths, sets and tuples to JSON types (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_report(
    run_dir: str | Path, report: Mapping[str, Any], plots: Mapping[str, str | Path] | None = None
) -> tuple[Path, Path]:
    """Write ``run_dir/report.json`` and ``run_dir/report.html``.

    Args:
        run_dir: run directory (created if missing).
        report: report dict (schema in the module docstring); not modified.
        plots: ``{caption: png path}`` embedded in the HTML; the JSON records them under ``"plots"``
            as paths relative to ``run_dir`` where possible.

    Returns:
        ``(json_path, html_path)``.
    """
    run_dir = Path(run_dir)
    data = dict(report)
    if plots:
        recorded = {}
        for name, path in plots.items():
            path = Path(path)
            try:
                recorded[name] = str(path.resolve().relative_to(run_dir.resolve()))
            except ValueError:
                recorded[name] = str(path)
        data["plots"] = recorded
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False)
    json_path = atomic_write_text(run_dir / "report.json", text + "\n")
    html_path = atomic_write_text(run_dir / "report.html", render_html(report, plots))
    return json_path, html_path


def metrics_table(report_metrics: Mapping[str, Any], title: str | None = None, digits: int = 3,
                  ci: float = 0.95) -> Table:
    """Rich table for the terminal: metric, value, CI, n (non-metric entries are skipped).

    Args:
        report_metrics: ``{name: {"value", "low", "high", "n"} | number}``.
        title: optional table title.
        digits: decimals.
        ci: the intervals' coverage (the report's ``ci``), for the column title.
    """
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column(f"{100 * ci:g}% CI", justify="right")
    table.add_column("n", justify="right")
    for name, entry in report_metrics.items():
        if is_ci(entry):
            value = format_value(entry.get("value"), digits)
            low, high = as_float(entry.get("low")), as_float(entry.get("high"))
            interval = (
                f"[{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
            )
            n = format_count(entry)
            table.add_row(escape(str(name)), value, interval, "" if n is None else n)
        elif isinstance(entry, int | float | np.number) and not isinstance(entry, bool):
            table.add_row(escape(str(name)), format_value(entry, digits), "", "")
    return table
