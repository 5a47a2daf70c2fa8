"""Run the benchmarks and write docs/benchmarks.md (``make bench``).

Each ``bench_*.py`` prints a markdown section. Sections that need a GPU are skipped without one.
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
EXTRA = [("Selective scan and Bi-Mamba", "bench_ssm.py"), ("Slice-wise encoder features", "bench_slicewise.py")]


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
    args = ap.parse_args()
    parts = ["# Benchmarks", "", f"Machine: {machine()}.", "",
             "Produced by `make bench` (bench/run_all.py). Targets live here, never in timed unit tests.", ""]
    for title, script in SECTIONS + EXTRA:
        if args.only and script not in args.only:
            continue
        if not (HERE / script).exists():
            continue
        print(f"[bench] {script}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        body = proc.stdout.strip() if proc.returncode == 0 else f"failed (exit {proc.returncode}):\n\n```\n{proc.stderr[-1500:]}\n```"
        parts += [f"## {title}", "", body, ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
