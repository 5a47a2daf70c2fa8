"""Data-loading throughput (volumes/s) with and without the PersistentDataset disk cache.

Writes a markdown table to stdout (``run_all.py`` collects it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from medfuse.config import TransformsConfig
    from medfuse.data.cache import build_dataset
    from medfuse.data.layouts import load_cases
    from medfuse.data.transforms import build_transforms, case_to_item
    from medfuse.families.staging.demo import make_staging_demo

    tmp = Path(tempfile.mkdtemp(prefix="mf_bench_data_"))
    try:
        make_staging_demo(tmp / "data", n_patients=args.patients, shape=tuple(args.shape))
        table = load_cases(tmp / "data")
        tcfg = TransformsConfig(spacing=(3.0, 1.0, 1.0), spatial_size=tuple(args.shape))
        tf = build_transforms(tcfg, table.modalities, train=False, has_mask=False)
        items = [case_to_item(c, table.modalities) for c in table.cases]
        rows = []
        for label, cache in (("no cache", None), ("PersistentDataset", tmp / "cache")):
            ds = build_dataset(items, tf, cache_dir=cache)
            for epoch in (1, 2):
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                dt = time.perf_counter() - t0
                rows.append((label, epoch, len(ds) * len(table.modalities) / dt))
        n_mod = len(table.modalities)  # each case is n_mod volumes
        lines = [f"Data loading: {len(items)} cases x {n_mod} modalities, {tuple(args.shape)} (D,H,W) NIfTI.gz, "
                 "eval chain (orientation, spacing resample, percentile normalisation, pad/crop), "
                 "single process.", "",
                 "| dataset | epoch | volumes/s |", "|---|---|---|"]
        lines += [f"| {a} | {e} | {v:.1f} |" for a, e, v in rows]
        speedup = rows[3][2] / rows[1][2]
        lines += ["", f"Cached epoch 2 vs uncached epoch 2: {speedup:.1f}x."]
        return "\n".join(lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(main())
