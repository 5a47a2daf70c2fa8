"""Wall time and peak RSS of what ``make demo`` runs (as a child process)."""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> str:
    out = Path(tempfile.mkdtemp(prefix="mf_bench_demo_"))
    exe = Path(sys.executable).with_name("medfuse")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "demo", "baseline", "--main-only", "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        return f"demo failed (exit {proc.returncode}):\n\n```\n{proc.stderr[-2000:]}\n```"
    table = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return "\n".join([
        "`medfuse demo baseline --main-only` (what `make demo` runs, set-up excluded):", "",
        "| wall time | peak RSS |", "|---|---|", f"| {wall:.0f} s | {rss_mb:.0f} MB |", "",
        "Its output:", "", "```", *table[-30:], "```"])


if __name__ == "__main__":
    print(main())
