"""The demo harness behind ``medfuse demo FAMILY`` and ``make demo``.

A demo generates its family's procedural data (whose task needs the family's key idea), trains
each ablation variant of the family's demo config with the same split and seed, selects each on
validation, evaluates the selected checkpoints once on the test split, and writes one report with
the ablation table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medfuse.config import load_config
from medfuse.engine.build import demo_family


def ablations(family: str) -> list[tuple[str, list[str]]]:
    """The family's demo variants (``Family.demo_ablations``); the first is the full model."""
    return [(name, list(over)) for name, over in demo_family(family).demo_ablations]


QUICK = ["data.demo_params.quick=true", "train.max_epochs=2", "eval.n_boot=50"]


def run_demo(family: str, out: str | Path, quick: bool = False, overrides: list[str] | None = None,
             console: Console | None = None, main_only: bool = False) -> dict[str, Any]:
    """Run a family's demo end to end; return the combined report."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit
    from medfuse.reports import format_ci, write_report

    console = console or Console()
    out = Path(out)
    cfg_path = demo_family(family).demo_config
    base = [f"data.root={out / 'data'}", f"data.cache_dir={out / 'cache'}", f"output_dir={out}",
            *(QUICK if quick else []), *(overrides or [])]
    variants = ablations(family)
    if main_only:
        variants = variants[:1]
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    t0 = time.perf_counter()
    for i, (vname, extra) in enumerate(variants):
        slug = f"{family}_{i}"
        cfg = load_config(cfg_path, [*base, f"name={slug}", *extra])
        console.print(f"[bold]demo {family}[/]: training variant '{vname}' -> {cfg.run_dir}")
        run_dir = cfg.run_dir
        if (run_dir / "checkpoints" / "best.ckpt").exists() and (run_dir / "checkpoints" / "done").exists():
            console.print("  (already trained; reusing it)")
        else:
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            fit(cfg)
        rep = evaluate(run_dir, split="test")
        reports[vname] = rep
        row = {"name": vname, "run": str(run_dir), "n": rep.get("n")}
        for k, v in rep.get("metrics", {}).items():
            if isinstance(v, dict) and "value" in v:
                row[k] = v
        rows.append(row)
    main_run = Path(rows[0]["run"])
    combined = dict(reports[variants[0][0]])
    combined["ablation"] = rows
    combined["notes"] = [f"demo wall time {time.perf_counter() - t0:.0f} s",
                         "each variant selected on validation; test evaluated once per variant"]
    plots = {p.stem: p for p in sorted((main_run / "plots").glob("*.png"))}
    write_report(main_run, combined, plots)
    from rich.markup import escape
    from rich.table import Table

    keys = [k for k in rows[0] if k not in ("name", "run", "n")]
    title = f"{family} demo: test split, {100 * float(combined.get('ci', 0.95)):g}% bootstrap CI"
    if len(keys) <= 3:
        table = Table("variant", "n", *[escape(k) for k in keys], title=title)
        for r in rows:
            table.add_row(escape(r["name"]), str(r["n"]), *[format_ci(r[k]) if k in r else "-" for k in keys])
    else:  # many metrics: one row per metric, one column per variant, so that the CIs stay readable
        table = Table("metric", *[escape(r["name"]) for r in rows], title=title)
        table.add_row("n", *[str(r["n"]) for r in rows])
        for k in keys:
            table.add_row(escape(k), *[format_ci(r[k]) if k in r else "-" for r in rows])
    console.print(table)
    console.print(f"report: {main_run / 'report.html'}")
    return combined
