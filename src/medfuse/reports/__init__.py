"""Run reports: report.json, self-contained report.html and PNG plots (DESIGN "Run directory")."""

from .html import format_ci, format_value, render_html
from .plots import (
    plot_bar_ci,
    plot_confusion,
    plot_curves,
    plot_heatmap,
    plot_overlay,
    plot_roc,
    read_metrics_csv,
)
from .report import atomic_write_text, metrics_table, to_jsonable, write_report

__all__ = [
    "atomic_write_text",
    "format_ci",
    "format_value",
    "metrics_table",
    "plot_bar_ci",
    "plot_confusion",
    "plot_curves",
    "plot_heatmap",
    "plot_overlay",
    "plot_roc",
    "read_metrics_csv",
    "render_html",
    "to_jsonable",
    "write_report",
]
