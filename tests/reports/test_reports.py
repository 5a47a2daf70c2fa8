"""Tests for medfuse.reports: PNG plots, report.json / report.html, CI formatting, rich table."""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from medfuse.errors import RunDirError
from medfuse.reports import (
    format_ci,
    metrics_table,
    plot_bar_ci,
    plot_confusion,
    plot_curves,
    plot_heatmap,
    plot_overlay,
    plot_roc,
    to_jsonable,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics_csv(path: Path) -> Path:
    """A sparse metrics.csv shaped like Lightning's CSVLogger output."""
    columns = ["epoch", "step", "train/loss", "val/loss", "val/balanced_accuracy"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for epoch in range(3):
            for step in range(epoch * 4, epoch * 4 + 4):
                writer.writerow({"epoch": epoch, "step": step, "train/loss": 1.0 / (step + 1)})
            writer.writerow(
                {
                    "epoch": epoch,
                    "step": epoch * 4 + 3,
                    "val/loss": 0.9 - 0.1 * epoch,
                    "val/balanced_accuracy": 0.5,
                }
            )
    return path


def probs_problem(n: int = 40, k: int = 3):
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    return y, p


def volume_case():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 16, 16))
    target = np.zeros((6, 16, 16), dtype=np.int64)
    target[2:4, 4:10, 4:10] = 1
    pred = np.roll(target, 1, axis=2) * 2
    return image, pred, target


def _plot_cases(tmp_path: Path):
    y, p = probs_problem()
    image, pred, target = volume_case()
    rows = [{"name": "full", "value": 0.8, "low": 0.7, "high": 0.9}, {"name": "no text", "value": 0.6}]
    return {
        "curves_csv": lambda out: plot_curves(write_metrics_csv(tmp_path / "metrics.csv"), out),
        "curves_rows": lambda out: plot_curves(
            [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": 0.5}], out
        ),
        "curves_empty": lambda out: plot_curves([], out),
        "confusion": lambda out: plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], out),
        "roc_multi": lambda out: plot_roc(y, p, ["a", "b", "c"], out),
        "roc_binary": lambda out: plot_roc(y % 2, np.stack([1 - p[:, 0], p[:, 0]], 1), None, out),
        "overlay": lambda out: plot_overlay(image, pred, target, out, n_slices=2),
        "overlay_no_target_empty": lambda out: plot_overlay(image[None], np.zeros_like(pred), None, out),
        "bar_ci": lambda out: plot_bar_ci(rows, out, "Dice"),
        "heatmap": lambda out: plot_heatmap(
            [[0.2, np.nan], [0.7, 0.1]], ["T1", "T2"], ["WT", "ET"], out, "gates"
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "curves_csv",
        "curves_rows",
        "curves_empty",
        "confusion",
        "roc_multi",
        "roc_binary",
        "overlay",
        "overlay_no_target_empty",
        "bar_ci",
        "heatmap",
    ],
)
def test_plot_writes_png(tmp_path, kind):
    out = tmp_path / "plots" / f"{kind}.png"
    returned = _plot_cases(tmp_path)[kind](out)
    assert Path(returned) == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_curves_missing_file_is_user_error(tmp_path):
    with pytest.raises(RunDirError, match="metrics file not found"):
        plot_curves(tmp_path / "nope.csv", tmp_path / "c.png")


def test_plot_overlay_shape_mismatch(tmp_path):
    image, pred, _ = volume_case()
    with pytest.raises(ValueError, match="one shape"):
        plot_overlay(image, pred[:, :8], None, tmp_path / "o.png")


@pytest.mark.parametrize(
    "entry,expected",
    [
        ({"value": 0.8123, "low": 0.7012, "high": 0.9031, "n": 40}, "0.812 [0.701, 0.903] n=40"),
        ({"value": np.float32(0.5), "low": float("nan"), "high": 0.6, "n": np.int64(3)}, "0.500 n=3"),
        ({"value": None, "low": 0.1, "high": 0.2}, "n/a"),
        (0.25, "0.250"),
        (np.int64(7), "7"),
    ],
)
def test_format_ci(entry, expected):
    assert format_ci(entry) == expected


def test_to_jsonable_converts_numpy_torch_and_nan():
    data = {
        "a": np.float32(0.5),
        "b": np.int64(3),
        "c": np.arange(3),
        "d": torch.tensor([1.5, 2.5]),
        "e": float("nan"),
        "f": Path("x/y.png"),
        "g": (np.bool_(True), {1: np.float64(np.inf)}),
    }
    out = to_jsonable(data)
    assert json.loads(json.dumps(out, allow_nan=False)) == {
        "a": 0.5,
        "b": 3,
        "c": [0, 1, 2],
        "d": [1.5, 2.5],
        "e": None,
        "f": "x/y.png",
        "g": [True, {"1": None}],
    }


def full_report():
    return {
        "name": "staging_demo",
        "family": "staging",
        "task": "classification",
        "split": "test",
        "n": np.int64(40),
        "metrics": {
            "balanced_accuracy": {"value": np.float64(0.8123), "low": 0.70, "high": 0.90, "n": np.int64(40)},
            "roc_auc": {"value": np.float32(0.9), "low": float("nan"), "high": float("nan"), "n": 40},
            "qwk": 0.5,
        },
        "per_class": {"stage I": {"f1": 0.7, "auc": {"value": 0.8, "low": 0.6, "high": 0.9, "n": 20}}},
        "splits": {"val": {"metrics": {"accuracy": {"value": 0.75, "low": 0.6, "high": 0.85, "n": 20}}}},
        "confusion_matrix": np.array([[10, 2], [3, 25]]),
        "class_names": ["stage I", "stage II"],
        "ablation": [
            {"name": "full", "dice": {"value": 0.81, "low": 0.78, "high": 0.84, "n": 12}},
            {"name": "no_gate", "dice": {"value": 0.74, "low": 0.70, "high": 0.78, "n": 12}},
        ],
        "config": {"model": {"name": "staging_tiny", "dim": 64}, "seed": 0},
        "notes": ["demo data <synthetic>"],
    }


def test_write_report_round_trip_and_html(tmp_path):
    y, p = probs_problem()
    png = plot_roc(y, p, None, tmp_path / "plots" / "roc.png")
    json_path, html_path = write_report(tmp_path, full_report(), {"ROC": png})
    assert (json_path, html_path) == (tmp_path / "report.json", tmp_path / "report.html")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["n"] == 40
    assert data["metrics"]["balanced_accuracy"]["value"] == pytest.approx(0.8123)
    assert data["metrics"]["roc_auc"]["low"] is None
    assert data["confusion_matrix"] == [[10, 2], [3, 25]]
    assert data["plots"] == {"ROC": "plots/roc.png"}
    page = html_path.read_text(encoding="utf-8")
    for text in (
        "balanced_accuracy",
        "roc_auc",
        "qwk",
        "stage I",
        "no_gate",
        "model.dim",
        "Per split",
        "Confusion",
    ):
        assert text in page
    assert "0.812 [0.700, 0.900] (n=40)" in page
    assert "demo data &lt;synthetic&gt;" in page  # escaped
    assert "data:image/png;base64," in page
    encoded = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(encoded) == png.read_bytes()
    assert "<script" not in page and "<link" not in page  # self-contained
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_write_report_tolerates_minimal_dict(tmp_path):
    json_path, html_path = write_report(tmp_path / "run", {"metrics": {"dice": {"value": math.nan}}})
    assert json.loads(json_path.read_text(encoding="utf-8")) == {"metrics": {"dice": {"value": None}}}
    assert "n/a" in html_path.read_text(encoding="utf-8")


def test_write_report_overwrites(tmp_path):
    write_report(tmp_path, {"name": "first"})
    json_path, _ = write_report(tmp_path, {"name": "second"})
    assert json.loads(json_path.read_text(encoding="utf-8"))["name"] == "second"


def test_metrics_table_renders_cis_and_skips_non_metrics():
    table = metrics_table(
        {"dice": {"value": 0.8, "low": 0.7, "high": 0.9, "n": 12}, "hd95": 3.25, "class_names": ["a"]},
        title="test",
    )
    assert table.row_count == 2
    console = Console(width=100, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.800" in text and "[0.700, 0.900]" in text and "3.250" in text and "class_names" not in text


def test_metrics_table_shows_per_class_names_in_brackets():
    """``f1[mito]`` is a metric name, not rich markup (it used to print as ``f1``)."""
    table = metrics_table({"f1[mito]": {"value": 0.5, "low": 0.4, "high": 0.6, "n": 3}, "f1[er]": 0.25})
    console = Console(width=100, record=True)
    console.print(table)
    text = console.export_text()
    assert "f1[mito]" in text and "f1[er]" in text


def test_paired_comparisons_render_as_tables():
    """A demo's paired comparisons (first variant vs another, per-row differences with CIs, summary
    rows) appear in report.html under the variants' names."""
    from medfuse.reports.html import render_html

    def e(v):
        return {"value": v, "low": v - 0.01, "high": v + 0.01, "n": 12}

    report = {"ablation": [{"name": "full"}, {"name": "dropout"}],
              "paired": {"dropout": {"rows": [{"combination": "T1", "a": e(0.6), "b": e(0.5), "difference": e(0.1)}],
                                     "incomplete": {"a": e(0.61), "b": e(0.55), "difference": e(0.06)},
                                     "a_better": ["T1"], "n": 12, "a": "runs/a", "b": "runs/b"},
                         "no rows": {"markdown": "| x |"}}}
    page = render_html(report)
    assert "<h2>Paired comparisons</h2>" in page and "<h3>full vs dropout (n=12 cases)</h3>" in page
    assert "<th>combination</th><th>full</th><th>dropout</th><th>difference (full - dropout)</th>" in page
    assert "0.100 [0.090, 0.110] (n=12)" in page and "<td>mean of incomplete</td>" in page
    assert "no rows" not in page
    assert "Paired comparisons" not in render_html({"ablation": [{"name": "full"}]})


def test_plots_save_under_a_run_folder_given_with_dotdot(tmp_path, monkeypatch):
    """`medfuse evaluate ../runs/x` failed: any '..' in the plot's full path was refused."""
    import matplotlib.pyplot as plt

    from medfuse.errors import RunDirError
    from medfuse.reports.plots import _save

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    fig = plt.figure()
    out = _save(fig, Path("..") / "runs" / "x" / "plots" / "a.png")
    assert (tmp_path / "runs" / "x" / "plots" / "a.png").is_file() and out.name == "a.png"
    with pytest.raises(RunDirError, match="file name"):
        _save(fig, Path("runs") / "..")
    plt.close(fig)
