"""An interval that resampled patients says so: ``n`` patients and ``n_items`` cases in the CI text,
the console table, report.html's header and its paired comparisons."""

from __future__ import annotations

from rich.console import Console

from medfuse.reports import format_ci, metrics_table
from medfuse.reports.html import render_html

CLUSTERED = {"value": 0.8123, "low": 0.7012, "high": 0.9031, "n": 4, "n_boot": 100, "n_items": 12}


def test_format_ci_names_patients_and_cases_when_clustered():
    assert format_ci(CLUSTERED) == "0.812 [0.701, 0.903] n=4 patients, 12 cases"
    assert format_ci(CLUSTERED, paren_n=True) == "0.812 [0.701, 0.903] (n=4 patients, 12 cases)"
    # one case per patient, or no n_items: the plain count
    assert format_ci({**CLUSTERED, "n_items": 4}) == "0.812 [0.701, 0.903] n=4"
    assert format_ci({k: v for k, v in CLUSTERED.items() if k != "n_items"}) == "0.812 [0.701, 0.903] n=4"


def test_console_table_and_html_show_patients_and_cases():
    console = Console(width=120, record=True)
    console.print(metrics_table({"balanced_accuracy": CLUSTERED}))
    assert "4 patients, 12 cases" in console.export_text()

    def e(v):
        return {"value": v, "low": v - 0.01, "high": v + 0.01, "n": 5, "n_items": 12}

    report = {"name": "r", "n": 12, "n_patients": 5, "metrics": {"dice": e(0.7)},
              "ablation": [{"name": "full"}, {"name": "dropout"}],
              "paired": {"dropout": {"rows": [{"combination": "T1", "a": e(0.6), "b": e(0.5), "difference": e(0.1)}],
                                     "n": 12, "n_patients": 5}}}
    page = render_html(report)
    assert "n_patients: 5" in page
    assert "0.700 [0.690, 0.710] (n=5 patients, 12 cases)" in page
    assert "<h3>full vs dropout (n=5 patients, 12 cases)</h3>" in page
