"""Run the benchmarks and write docs/benchmarks.md (``make bench``).

``bench_data.py`` and ``bench_demo.py`` print markdown sections collected here. The long family
benchmarks (``bench_ssm.py``, ``bench_slicewise.py``, each several minutes) write their own pages
(docs/benchmarks_ssm.md, docs/benchmarks_slicewise.md) and run with ``--all``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SECTIONS = [("Data loading", "bench_data.py"), ("Demo", "bench_demo.py")]
EXTRA = [("bench_ssm.py", "docs/benchmarks_ssm.md"), ("bench_slicewise.py", "docs/benchmarks_slicewise.md"),
         ("bench_ct_encoder.py", "docs/benchmarks_ct_encoder.md"),
         ("bench_context_seg.py", "docs/benchmarks_context_seg.md"),
         ("bench_incomplete_seg.py", "docs/benchmarks_incomplete_seg.md")]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} CPU cores ({cpu}), GPU: {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--only", nargs="*", help="script names to run")
    ap.add_argument("--all", action="store_true", help="also run the long family benchmarks")
    args = ap.parse_args()
    parts = ["# Benchmarks", "", f"Machine: {machine()}.", "",
             "Produced by `make bench` (bench/run_all.py). Targets live here, never in timed unit tests.", ""]
    for script, page in EXTRA:
        if args.all:
            print(f"[bench] {script}", flush=True)
            subprocess.run([sys.executable, str(HERE / script), "--out", page], check=False)
    for title, script in SECTIONS:
        if args.only and script not in args.only:
            continue
        if not (HERE / script).exists():
            continue
        print(f"[bench] {script}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        body = proc.stdout.strip() if proc.returncode == 0 else f"failed (exit {proc.returncode}):\n\n```\n{proc.stderr[-1500:]}\n```"
        parts += [f"## {title}", "", body, ""]
    parts += ["## Family benchmarks", "",
              "- Selective scan / Bi-Mamba vs mambapy: [benchmarks_ssm.md](benchmarks_ssm.md)",
              "- MedSAM2 slice-wise features, memory per slice_batch_size, feature cache: "
              "[benchmarks_slicewise.md](benchmarks_slicewise.md)", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
