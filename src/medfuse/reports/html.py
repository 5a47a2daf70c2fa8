"""Self-contained HTML rendering of a report dict (inline CSS, PNGs as base64 data URIs, no JS).

The report dict schema is documented in :mod:`medfuse.reports.report`.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f4f4f4} td.num{font-variant-numeric:tabular-nums}
.meta{color:#555} figure{display:inline-block;margin:.5em;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555;text-align:center}
"""


def as_float(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else None."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_ci(x: Any) -> bool:
    """True for a metric entry ``{"value", ...}`` (as produced by ``medfuse.metrics``)."""
    return isinstance(x, Mapping) and "value" in x


def format_value(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (integers as is); ``n/a`` for None/NaN; other things as str."""
    if x is None:
        return "n/a"
    if isinstance(x, bool | str):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    value = as_float(x)
    if value is None:
        return "n/a" if isinstance(x, numbers.Real) else str(x)
    return f"{value:.{digits}f}"


def format_count(d: Mapping[str, Any]) -> str | None:
    """A metric entry's count: ``"40"``, or ``"4 patients, 12 cases"`` when its interval resampled
    patients (``n`` patients and ``n_items`` cases differ); None without ``n``."""
    n = d.get("n")
    if n is None:
        return None
    items = d.get("n_items")
    return f"{n} patients, {items} cases" if items is not None and items != n else str(n)


def format_ci(d: Any, digits: int = 3, paren_n: bool = False) -> str:
    """``"0.812 [0.701, 0.903] n=40"`` from ``{"value", "low", "high", "n"}``; an interval over
    patients (``n_items`` cases besides ``n`` patients) reads ``n=4 patients, 12 cases``.

    Missing or NaN bounds drop the interval, a missing ``n`` drops the count, a plain number is
    formatted alone, and an undefined value reads ``n/a``.

    Args:
        d: metric entry or number.
        digits: decimals.
        paren_n: write the count as ``(n=40)`` (used in HTML tables).
    """
    if not isinstance(d, Mapping):
        return format_value(d, digits)
    text = format_value(d.get("value"), digits)
    low, high = as_float(d.get("low")), as_float(d.get("high"))
    if low is not None and high is not None and as_float(d.get("value")) is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    count = format_count(d)
    if count is not None:
        text += f" (n={count})" if paren_n else f" n={count}"
    return text


def _cell(x: Any) -> str:
    if is_ci(x):
        return f'<td class="num">{html.escape(format_ci(x, paren_n=True))}</td>'
    if isinstance(x, list | tuple):
        return f"<td>{html.escape(', '.join(str(v) for v in x))}</td>"
    if isinstance(x, Mapping):
        return f"<td>{html.escape(str(dict(x)))}</td>"
    cls = ' class="num"' if as_float(x) is not None and not isinstance(x, str) else ""
    return f"<td{cls}>{html.escape(format_value(x))}</td>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    """``[name, entry]`` rows for the metric entries of a mapping (other keys are skipped)."""
    return [[name, entry] for name, entry in metrics.items() if is_ci(entry) or as_float(entry) is not None]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[list[Any]]:
    rows: list[list[Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            text = str(value)
            rows.append([name, text if len(text) <= 200 else text[:197] + "..."])
    return rows


def _nested_table(per: Mapping[str, Any], row_title: str) -> str:
    """Rows = keys of ``per`` (classes, splits); columns = union of their metric names."""
    columns: list[str] = []
    for entry in per.values():
        if isinstance(entry, Mapping):
            metrics = entry.get("metrics", entry)
            columns.extend(k for k, v in metrics.items() if k not in columns and not isinstance(v, list))
    rows = []
    for name, entry in per.items():
        metrics = entry.get("metrics", entry) if isinstance(entry, Mapping) else {}
        rows.append([name] + [metrics.get(c) for c in columns])
    return _table([row_title, *columns], rows)


def _ablation_table(rows: list[Any]) -> str:
    columns: list[str] = []
    for row in rows:
        if isinstance(row, Mapping):
            columns.extend(k for k in row if k != "name" and k not in columns)
    body = [
        [row.get("name", i)] + [row.get(c) for c in columns]
        for i, row in enumerate(rows)
        if isinstance(row, Mapping)
    ]
    return _table(["variant", *columns], body)


def _paired_tables(paired: Mapping[str, Any], first: str) -> list[str]:
    """One table per paired comparison of the demo (``report["paired"]``: ``{other variant: {"rows":
    [{<key>: label, "a": entry, "b": entry, "difference": entry}], <summary>: {"a", "b",
    "difference"}, "n": cases}}``), ``a`` being the first variant; comparisons without rows are skipped."""
    parts: list[str] = []
    for name, cmp in paired.items():
        if not isinstance(cmp, Mapping):
            continue
        rows = [r for r in cmp.get("rows", []) if isinstance(r, Mapping)]
        if not rows:
            continue
        key = next((k for k in rows[0] if k not in ("a", "b", "difference")), "row")
        body = [[r.get(key), r.get("a"), r.get("b"), r.get("difference")] for r in rows]
        for label, entry in cmp.items():  # summary rows: entries whose a, b and difference are all metric entries
            if label != "rows" and isinstance(entry, Mapping) and all(is_ci(entry.get(k)) for k in ("a", "b", "difference")):
                body.append([f"mean of {label}", entry["a"], entry["b"], entry["difference"]])
        n = f" (n={cmp['n']} cases)" if cmp.get("n") is not None else ""
        if cmp.get("n_patients") is not None:  # the paired intervals resampled patients
            n = f" (n={cmp['n_patients']} patients, {cmp['n']} cases)"
        parts += [f"<h3>{html.escape(first)} vs {html.escape(str(name))}{html.escape(n)}</h3>",
                  _table([key, first, str(name), f"difference ({first} - {name})"], body)]
    return parts


def _image_tag(name: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(name)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'
    )


def render_html(report: Mapping[str, Any], plots: Mapping[str, str | Path] | None = None) -> str:
    """The whole report page as one HTML string; missing keys simply drop their section.

    Args:
        report: report dict (schema in :mod:`medfuse.reports.report`).
        plots: ``{caption: png path}``; missing files are listed as missing instead of failing.
    """
    title = str(report.get("name") or "medfuse report")
    meta = [f"{k}: {report[k]}" for k in ("family", "task", "split", "n", "n_patients") if report.get(k) is not None]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(" · ".join(meta))}</p>' if meta else "",
    ]
    metrics = report.get("metrics")
    if isinstance(metrics, Mapping) and metrics:
        level = f"{100 * float(report.get('ci', 0.95)):g}%"
        parts += ["<h2>Metrics</h2>", f'<p class="meta">value [{level} bootstrap CI] (n)</p>']
        parts.append(_table(["metric", "value"], metrics_rows(metrics)))
    per_class = report.get("per_class")
    if isinstance(per_class, Mapping) and per_class:
        parts += ["<h2>Per class</h2>", _nested_table(per_class, "class")]
    per_case = report.get("per_case")
    if isinstance(per_case, Mapping) and per_case.get("rows"):
        unit = html.escape(str(per_case.get("hd95_unit") or "mm"))
        parts += ["<h2>Per case</h2>", f'<p class="meta">also in metrics_per_case.csv; HD95 in {unit} on the label grid</p>',
                  _table(list(per_case["columns"]), [list(r) for r in per_case["rows"]])]
    splits = report.get("splits")
    if isinstance(splits, Mapping) and splits:
        parts += ["<h2>Per split</h2>", _nested_table(splits, "split")]
    cm = report.get("confusion_matrix")
    cm = cm.tolist() if hasattr(cm, "tolist") else cm  # numpy array or tensor
    if isinstance(cm, list) and cm:
        names = report.get("class_names") or list(range(len(cm)))
        parts += [
            "<h2>Confusion matrix</h2>",
            '<p class="meta">rows: true class, columns: predicted class</p>',
            _table(["true \\ predicted", *names], [[names[i], *row] for i, row in enumerate(cm)]),
        ]
    ablation = report.get("ablation")
    if isinstance(ablation, list) and ablation:
        parts += ["<h2>Ablation</h2>", _ablation_table(ablation)]
    paired = report.get("paired")
    if isinstance(paired, Mapping) and paired:
        first = str(ablation[0].get("name", "a")) if isinstance(ablation, list) and ablation and \
            isinstance(ablation[0], Mapping) else "a"
        tables = _paired_tables(paired, first)
        if tables:
            parts += ["<h2>Paired comparisons</h2>",
                      '<p class="meta">the same test cases under both variants; per-case difference, '
                      'case-bootstrap CI</p>', *tables]
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, path in plots.items():
            path = Path(path)
            if path.is_file():
                parts.append(_image_tag(name, path))
            else:
                parts.append(f'<p class="meta">{html.escape(name)}: missing ({html.escape(str(path))})</p>')
    config = report.get("config")
    if isinstance(config, Mapping) and config:
        parts += ["<h2>Configuration</h2>", _table(["key", "value"], _flatten(config))]
    notes = report.get("notes")
    if notes:
        notes = [notes] if isinstance(notes, str) else list(notes)
        parts += [
            "<h2>Notes</h2>",
            "<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>",
        ]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
