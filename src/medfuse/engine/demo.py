"""The demo harness behind ``medfuse demo FAMILY`` and ``make demo``.

A demo generates its family's procedural data (whose task needs the family's key idea), trains
each ablation variant of the family's demo config with the same split and seed, selects each on
validation, evaluates the selected checkpoints once on the test split, and writes one report with
the ablation table.

**Evaluation-only variants.** A variant whose overrides hold ``demo.weights_from=<variant name>``
is not trained: its run directory gets its own config (the variant's overrides) and a checkpoint
made of the named, earlier variant's trained weights (every weight of the new model must be found
there; weights the new model lacks, e.g. an adapter it does not have, are left out). The text_seg
demo uses this for its wrong-text rows (the same model, other text) and for MedSAM as it is (the
same image side and decoder, no adapter). ``demo.*`` overrides belong to the harness; the config
never sees them.

**Reuse.** Rerunning a demo into the same ``--out`` reuses a finished run only when the
``config.yaml`` it was trained with equals the variant's config now; otherwise it retrains (and
says which keys changed). Each family's phantom has its own folder, a ``--quick`` demo keeps its
phantom and runs apart (:func:`demo_paths`), and the phantom folder records the parameters it was made with
(:func:`~medfuse.engine.build.prepare_demo_data` refuses a folder made with others).

**Seeds.** ``run_demo(family, out, seeds=[0, 1, 2])`` runs the family's key comparison
(:data:`KEY_COMPARISONS`: a headline metric and the variants that form the comparison) once per
``train.seed``, with the phantom and the split fixed, and writes ``<out>/seeds.md`` and
``<out>/seeds.json``: per variant the mean ± sd over seeds and each seed's value with its
bootstrap CI.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medfuse.config import load_config
from medfuse.engine.build import demo_family
from medfuse.engine.environment import environment, summary_line
from medfuse.errors import ConfigError

HARNESS_KEYS = ("demo.weights_from",)
"""Overrides read by the harness, never by the config."""

KEY_COMPARISONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "staging": ("balanced_accuracy", ("BGAMF (T2W + DWI)", "concat (T2W + DWI)", "sum (T2W + DWI, no gate)",
                                      "gate only (no alignment, no per-modality Bi-Mamba)")),
    "incomplete_seg": ("dice_incomplete", ("UniMRSeg, 3 stages", "UNet + modality dropout")),
    "text_seg": ("dice", ("hierarchical fusion", "single-level gated fusion", "no text (box only)")),
    "ct_encoder": ("image_to_text/R@5", ("full: slice + region attention (log)", "region attention off")),
    "context_seg": ("mean_iou", ("attention fusion", "concat (seed's old way)")),
}
"""Per family: the headline test metric and the demo variants (names in ``Family.demo_ablations``)
whose comparison carries the family's claim. A family not listed compares its first two variants
on the first metric of its report."""


def ablations(family: str) -> list[tuple[str, list[str]]]:
    """The family's demo variants (``Family.demo_ablations``); the first is the full model."""
    return [(name, list(over)) for name, over in demo_family(family).demo_ablations]


def key_comparison(family: str) -> tuple[str | None, list[str]]:
    """(headline metric or None = the report's first, variant names) of a family's key comparison."""
    names = [n for n, _ in ablations(family)]
    metric, variants = KEY_COMPARISONS.get(family, (None, tuple(names[:2])))
    unknown = [v for v in variants if v not in names]
    if unknown:  # a renamed variant: a bug in this table, caught by tests
        raise ValueError(f"{family}: key comparison names unknown demo variants {unknown}; variants: {names}")
    return metric, list(variants)


def split_harness(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate the harness's ``demo.*`` overrides from the config's.

    Raises:
        ConfigError: an unknown ``demo.*`` key.
    """
    config, harness = [], {}
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip().startswith("demo."):
            if key.strip() not in HARNESS_KEYS:
                raise ConfigError(key.strip(), "unknown demo harness option", f"use one of: {', '.join(HARNESS_KEYS)}")
            harness[key.strip()] = value.strip()
        else:
            config.append(o)
    return config, harness


QUICK = ["data.demo_params.quick=true", "train.max_epochs=2", "eval.n_boot=50"]


def quick_overrides(family: str, quick: bool) -> list[str]:
    """``--quick``'s config overrides: :data:`QUICK`, then the family's own (``Family.demo_quick``)."""
    return [*QUICK, *demo_family(family).demo_quick] if quick else []


def demo_paths(out: Path, family: str, quick: bool) -> list[str]:
    """Where a demo keeps its phantom, feature cache and runs under ``out``: the phantom in
    ``data/<family>`` (``data/<family>-quick`` for ``--quick``), so that demos of several families, or
    a quick and a full demo, can share one ``--out`` (the default) without reading each other's
    phantom; the cache (keyed by content) is shared; quick runs are named ``..._quick``."""
    return [f"data.root={out / 'data' / (family + ('-quick' if quick else ''))}", f"data.cache_dir={out / 'cache'}",
            f"output_dir={out}"]


def _suffix(quick: bool) -> str:
    return "_quick" if quick else ""


def _trained(run_dir: Path) -> bool:
    """A finished training: ``best.ckpt`` and the ``done`` marker of the run (or of every stage)."""
    ck = run_dir / "checkpoints"
    if not (ck / "best.ckpt").exists():
        return False
    stage_dirs = [d for d in ck.iterdir() if d.is_dir()]
    return (ck / "done").exists() or (bool(stage_dirs) and all((d / "done").exists() for d in stage_dirs))


def config_changes(run_dir: Path, cfg: Any) -> list[str]:
    """The config keys (dotted) whose values differ between ``run_dir/config.yaml`` (what the run
    was trained with) and ``cfg`` resolved; every key when the run has no readable config. Empty:
    the finished run may be reused for ``cfg``."""
    import yaml

    from medfuse.config import absolute_paths, config_to_dict
    from medfuse.engine.build import resolve

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ["config.yaml"]
    want = config_to_dict(absolute_paths(resolve(cfg)))  # a run saves its paths absolute

    def diff(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b), key=str) for d in diff(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))]
        return [] if a == b else [key or "config"]

    return diff(saved, want, "")


def reuse_weights(cfg: Any, source_run: Path) -> Path:
    """Make ``cfg.run_dir`` an evaluation-only run holding ``source_run``'s trained weights.

    The run gets ``config.yaml`` (``cfg``), the source's ``splits.csv`` and ``checkpoints/best.ckpt``
    with the weights of ``cfg``'s model taken from the source's best checkpoint (the source's extra
    weights are left out).

    Raises:
        ConfigError: the source lacks weights the model needs, or has them in another shape.
    """
    from medfuse.config import save_config
    from medfuse.engine.build import build_datamodule, resolve
    from medfuse.engine.checkpoint import atomic_torch_save, find_checkpoint, read_checkpoint
    from medfuse.engine.trainer import build_task

    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    if (source_run / "splits.csv").exists():
        shutil.copyfile(source_run / "splits.csv", run_dir / "splits.csv")
    src_path = find_checkpoint(source_run, "best")
    src = read_checkpoint(src_path)["state_dict"]
    dm = build_datamodule(cfg, run_dir)
    stages = cfg.train.stages
    task = build_task(cfg, dm, stages[-1] if stages else None)
    own = task.state_dict()
    missing = [k for k in own if k not in src]
    shapes = [k for k in own if k in src and tuple(src[k].shape) != tuple(own[k].shape)]
    if missing or shapes:
        bad = (missing or shapes)[:3]
        raise ConfigError("demo.weights_from", f"{src_path} lacks {len(missing)} weights of this variant's model "
                          f"and has {len(shapes)} in another shape (e.g. {', '.join(bad)})",
                          "take the weights from a variant with the same network")
    state = {k: src[k] for k in own}
    atomic_torch_save({"state_dict": state, "epoch": 0, "global_step": 0, "weights_from": str(src_path)},
                      run_dir / "checkpoints" / "best.ckpt")
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "checkpoints" / "done").write_text("evaluation only: weights from " + str(src_path) + "\n")
    return run_dir


def _run_variants(family: str, cfg_path: Path, base: list[str], variants: list[tuple[int, str, list[str]]],
                  slug: str, console: Console) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train (or reuse) and evaluate ``(index, name, overrides)`` variants; rows and reports by name."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    runs: dict[str, Path] = {}
    for i, vname, extra in variants:
        config_over, harness = split_harness(extra)
        cfg = load_config(cfg_path, [*base, f"name={slug.format(i=i)}", *config_over])
        run_dir = cfg.run_dir
        source = harness.get("demo.weights_from")
        if source is not None:
            if source not in runs:
                raise ConfigError("demo.weights_from", f"variant '{vname}' takes its weights from '{source}', "
                                  "which is not an earlier variant of this demo", "name an earlier variant")
            console.print(f"[bold]demo {family}[/]: variant '{vname}' (no training: weights of '{source}') -> {run_dir}")
            reuse_weights(cfg, runs[source])
        else:
            console.print(f"[bold]demo {family}[/]: training variant '{vname}' -> {run_dir}")
            changed = config_changes(run_dir, cfg) if _trained(run_dir) else None
            if changed == []:
                console.print("  (already trained with this config; reusing it)")
            else:
                if changed:  # a finished run of another config (e.g. other overrides): never report its numbers
                    console.print(f"  (trained with another config: {', '.join(changed[:4])}"
                                  f"{' ...' if len(changed) > 4 else ''}; retraining)")
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                fit(cfg)
        runs[vname] = run_dir
        rep = evaluate(run_dir, split="test")
        reports[vname] = rep
        row = {"name": vname, "run": str(run_dir), "n": rep.get("n")}
        if rep.get("n_patients") is not None:  # the CIs resampled patients (some have several cases)
            row["n_patients"] = rep["n_patients"]
        if source is not None:
            row["weights_from"] = source
        for k, v in rep.get("metrics", {}).items():
            if isinstance(v, dict) and "value" in v:
                row[k] = v
        rows.append(row)
    return rows, reports


def _with_sources(family: str, names: list[str]) -> list[tuple[int, str, list[str]]]:
    """The variants called ``names`` plus the earlier variants they take weights from, in demo order."""
    allv = ablations(family)
    keep = set(names)
    for name, over in reversed(allv):
        if name in keep:
            src = split_harness(over)[1].get("demo.weights_from")
            if src is not None:
                keep.add(src)
    return [(i, n, o) for i, (n, o) in enumerate(allv) if n in keep]


def run_demo(family: str, out: str | Path, quick: bool = False, overrides: list[str] | None = None,
             console: Console | None = None, main_only: bool = False,
             seeds: list[int] | None = None) -> dict[str, Any]:
    """Run a family's demo end to end; return the combined report.

    Args:
        family: the family.
        out: output folder (data, cache and runs).
        quick: tiny data and few epochs (smoke test).
        overrides: config overrides for every variant.
        console: where tables go.
        main_only: only the full model.
        seeds: run only the key comparison (:func:`key_comparison`), once per ``train.seed`` in
            ``seeds``, and write ``<out>/seeds.md`` and ``<out>/seeds.json`` (see
            :func:`run_seeds`); the return value is then the seeds summary.
    """
    if seeds is not None:
        return run_seeds(family, out, seeds, quick=quick, overrides=overrides, console=console)
    from medfuse.reports import write_report

    console = console or Console()
    out = Path(out)
    cfg_path = demo_family(family).demo_config
    base = [*demo_paths(out, family, quick), *quick_overrides(family, quick), *(overrides or [])]
    variants = [(i, n, o) for i, (n, o) in enumerate(ablations(family))]
    if main_only:
        variants = variants[:1]
    t0 = time.perf_counter()
    rows, reports = _run_variants(family, cfg_path, base, variants, f"{family}_{{i}}{_suffix(quick)}", console)
    main_run = Path(rows[0]["run"])
    combined = dict(reports[variants[0][1]])
    combined["ablation"] = rows
    compare = demo_family(family).demo_compare
    if compare is not None and not main_only:  # paired per-case comparisons of the trained variants
        combined["paired"] = compare([r for r in rows if "weights_from" not in r])
        for c in combined["paired"].values():
            console.print(c["markdown"])
    # the main variant's own evaluation notes stay; another variant's are kept under its name,
    # unless the main variant has the same note (the data set's description, say)
    main_notes = list(reports[variants[0][1]].get("notes", []))
    combined["notes"] = [*main_notes,
                         *(f"{name}: {note}" for _, name, _ in variants[1:]
                           for note in reports[name].get("notes", []) if note not in main_notes),
                         f"demo wall time {time.perf_counter() - t0:.0f} s",
                         "each variant selected on validation; test evaluated once per variant"]
    if any("weights_from" in r for r in rows):
        combined["notes"].append("variants with weights_from are not trained: they evaluate another "
                                 "variant's weights under their own config")
    plots = {p.stem: p for p in sorted((main_run / "plots").glob("*.png"))}
    write_report(main_run, combined, plots)
    from rich.markup import escape
    from rich.table import Table

    keys = [k for k in rows[0] if k not in ("name", "run", "n", "n_patients", "weights_from")]
    title = f"{family} demo: test split, {100 * float(combined.get('ci', 0.95)):g}% bootstrap CI"
    if len(keys) <= 3:
        table = Table("variant", "n", *[escape(k) for k in keys], title=title)
        for r in rows:
            table.add_row(escape(r["name"]), row_count(r), *[table_cell(r, k) for k in keys])
    else:  # many metrics: one row per metric, one column per variant, so that the CIs stay readable
        table = Table("metric", *[escape(r["name"]) for r in rows], title=title)
        table.add_row("n", *[row_count(r) for r in rows])
        for k in keys:
            table.add_row(escape(k), *[table_cell(r, k) for r in rows])
    console.print(table)
    console.print(f"report: {main_run / 'report.html'}")
    return combined


def row_count(row: dict[str, Any]) -> str:
    """A demo row's n: ``"53"``, or ``"50 patients, 53 cases"`` when its CIs resampled patients."""
    n, patients = row.get("n"), row.get("n_patients")
    return f"{patients} patients, {n} cases" if patients is not None and patients != n else str(n)


def table_cell(row: dict[str, Any], key: str) -> str:
    """A demo row's metric as value [CI], with its n only where it differs from the variant's n
    (the console table has an n of its own); ``-`` where the variant lacks the metric."""
    from medfuse.reports import format_ci

    if key not in row:
        return "-"
    entry = row[key]
    if isinstance(entry, dict):
        plain = "n_items" not in entry and entry.get("n") == row.get("n")
        clustered = entry.get("n_items") == row.get("n") and entry.get("n") == row.get("n_patients")
        if plain or clustered:
            entry = {k: v for k, v in entry.items() if k not in ("n", "n_items")}
    return format_ci(entry)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (the CLI's ``--seeds``).

    Raises:
        ConfigError: not a comma-separated list of distinct non-negative integers.
    """
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError("--seeds", f"'{text}' is not a list of distinct seeds", "e.g. --seeds 0,1,2")
    return [int(p) for p in parts]


def seeds_summary(family: str, metric: str, seeds: list[int], per_seed: dict[int, list[dict[str, Any]]],
                  command: str) -> dict[str, Any]:
    """The seeds table as a dict: per variant, each seed's metric entry, the mean and sd over seeds,
    and the mean and sd of the per-seed difference to the first variant.

    Args:
        family: the family.
        metric: the metric key in each row.
        seeds: the seeds, in order.
        per_seed: seed -> rows of :func:`_run_variants` (same variant order for every seed).
        command: the command that reproduces it.
    """
    import numpy as np

    names = [r["name"] for r in per_seed[seeds[0]]]
    variants = []
    first = np.array([per_seed[s][0].get(metric, {}).get("value", np.nan) for s in seeds], dtype=np.float64)
    for j, name in enumerate(names):
        entries = {str(s): per_seed[s][j].get(metric) for s in seeds}
        vals = np.array([e["value"] if e and e.get("value") is not None else np.nan for e in entries.values()],
                        dtype=np.float64)
        diff = vals - first
        variants.append({"name": name, "per_seed": entries, "mean": float(np.nanmean(vals)),
                         "sd": float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else None,
                         "diff_to_first_mean": float(np.nanmean(diff)) if j else None,
                         "diff_to_first_sd": float(np.nanstd(diff, ddof=1)) if j and np.isfinite(diff).sum() > 1 else None,
                         "runs": {str(s): per_seed[s][j]["run"] for s in seeds}})
    return {"family": family, "metric": metric, "split": "test", "seeds": list(seeds), "varies": "train.seed",
            "fixed": "the phantom (data.demo_params) and the split (data.split.seed)", "variants": variants,
            "command": command}


def seeds_markdown(summary: dict[str, Any], ci: float = 0.95) -> str:
    """``seeds.md``: one row per variant, mean ± sd over seeds, then each seed's value [CI]."""
    from medfuse.reports import format_ci

    seeds = summary["seeds"]
    first = summary["variants"][0]["name"]
    lines = [f"# {summary['family']}: key comparison over {len(seeds)} seeds", "",
             f"Test-split `{summary['metric']}`; each seed's value with its {100 * ci:g}% bootstrap CI over cases; "
             f"mean ± sd (sample sd) over seeds. Varies: `{summary['varies']}`; fixed: {summary['fixed']}.",
             f"Reproduce: `{summary['command']}`",
             *([f"Measured on: {summary_line(summary['environment'])}"] if summary.get("environment") else []), "",
             f"| variant | mean ± sd | diff. to {first} (mean ± sd) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]

    def pm(m: float | None, s: float | None) -> str:
        if m is None:
            return "-"
        return f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")

    for v in summary["variants"]:
        cells = [format_ci(v["per_seed"][str(s)], paren_n=True) if v["per_seed"][str(s)] else "-" for s in seeds]
        lines.append(f"| {v['name']} | {pm(v['mean'], v['sd'])} | {pm(v['diff_to_first_mean'], v['diff_to_first_sd'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_seeds(family: str, out: str | Path, seeds: list[int], quick: bool = False,
              overrides: list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """The family's key comparison once per ``train.seed``; writes ``<out>/seeds.md`` and ``seeds.json``.

    Runs are ``<out>/<family>_<variant index>_seed<seed>`` (``..._quick`` with ``quick``; a finished
    run is reused only when its ``config.yaml`` is this variant's config); the phantom
    (``<out>/data/<family>``, or ``<family>-quick``) and the split are the same for every seed. Returns the summary
    (:func:`seeds_summary`).
    """
    from medfuse.fileio import atomic_open

    if not seeds:
        raise ConfigError("--seeds", "no seed given", "e.g. --seeds 0,1,2")
    console = console or Console()
    out = Path(out)
    cfg_path = demo_family(family).demo_config
    metric, names = key_comparison(family)
    variants = _with_sources(family, names)
    per_seed: dict[int, list[dict[str, Any]]] = {}
    ci = 0.95
    t0 = time.perf_counter()
    for s in seeds:
        base = [*demo_paths(out, family, quick), *quick_overrides(family, quick), *(overrides or []),
                f"train.seed={s}"]
        rows, reports = _run_variants(family, cfg_path, base, variants, f"{family}_{{i}}_seed{s}{_suffix(quick)}",
                                      console)
        per_seed[s] = [r for r in rows if r["name"] in names]
        if metric is None:
            metric = next(k for k, v in per_seed[s][0].items() if isinstance(v, dict) and "value" in v)  # first metric
        ci = float(next(iter(reports.values())).get("ci", ci))
    extra = " ".join(overrides or [])
    command = (f"medfuse demo {family} --seeds {','.join(map(str, seeds))} --out {out}"
               + (" --quick" if quick else "") + (f" {extra}" if extra else ""))
    summary = seeds_summary(family, metric, list(seeds), per_seed, command)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["environment"] = environment()
    out.mkdir(parents=True, exist_ok=True)
    md = seeds_markdown(summary, ci)
    with atomic_open(out / "seeds.md", "w", encoding="utf-8") as f:
        f.write(md)
    with atomic_open(out / "seeds.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    console.print(md)
    console.print(f"seeds table: {out / 'seeds.md'}")
    return summary
