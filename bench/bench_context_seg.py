"""Benchmark: memory and step time of context fusion by attention vs concatenation (seed 004).

The seed claims that attention fusion at the skips needs *less* memory than the "old" way of
concatenating raw and context features into one 2C-channel input (its "Memory Footprint
Comparison"). This measures it for :class:`~medfuse.families.context_seg.network.ContextUNet3D` at the
seed's width (base 128: 128/256/512/1024 channels, a 2048-channel bottleneck, trilinear decoder)
on 1024-channel feature inputs (DINOv3 ViT-L), batch 1.

Each row runs in a fresh subprocess:

- *training step*: forward, cross-entropy against random labels, backward and a plain SGD step
  (no optimiser state, so the optimiser does not dominate); two steps, the second is timed;
- *inference*: one forward under ``torch.no_grad``.

Memory on CPU is the process's peak resident set (VmHWM) and the resident set after building the
model and the two input tensors (VmRSS), so the step's own share is peak - base. On CUDA it is
``torch.cuda.max_memory_allocated`` with the model and inputs resident before the reset.

Run: ``python bench/bench_context_seg.py`` (CPU; sizes with ``--sizes``), ``--device cuda`` on a GPU.
Writes ``docs/benchmarks_context_seg.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(fusion: str, size: int, base: int, channels: int, mode: str, device: str) -> dict:
    import torch

    from medfuse.families.context_seg.params import ContextSegParams, build_context_seg

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_context_seg(ContextSegParams(num_classes=5, feature_channels=channels, base=base, levels=4,
                                               fusion=fusion)).to(dev)
    raw = torch.randn(1, channels, size, size, size, device=dev)  # frozen features: no grad
    ctx = torch.randn(1, channels, size, size, size, device=dev)
    target = torch.randint(0, 5, (1, size, size, size), device=dev)
    params = sum(p.numel() for p in model.parameters())
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base_mb = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mb = _status_kb("VmRSS") / 1024
    times = []
    if mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        model.train()
        for _ in range(2):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(raw, ctx), target)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    else:
        model.eval()
        with torch.no_grad():
            for _ in range(2 if cuda else 1):  # on CUDA the first call also selects kernels: time the second
                t = time.perf_counter()
                model(raw, ctx)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_kb("VmHWM") / 1024
    return {"fusion": fusion, "size": size, "base": base, "channels": channels, "mode": mode, "params": params,
            "base_mb": base_mb, "peak_mb": peak_mb, "seconds": times[-1], "first_seconds": times[0]}


def dinov3_worker(slices: int, size: int) -> dict:
    """DINOv3 ViT-S/16 (random weights, 4 registers) features of one case (raw + context streams,
    ``slices`` slices each, resized to ``size``): epoch 1 computes and caches, epoch 2 reads the cache."""
    import csv
    import tempfile

    import numpy as np
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    import medfuse.families  # noqa: F401  (registers the families)
    from medfuse.config import load_config
    from medfuse.data.io import write_nifti
    from medfuse.engine.build import build_datamodule

    tmp = Path(tempfile.mkdtemp(prefix="bench_ctx_"))
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4)).save_pretrained(tmp / "dinov3s")  # ViT-S/16
    rng = np.random.default_rng(0)
    write_nifti(rng.random((1, slices, 64, 64), dtype=np.float32) + 0.1, tmp / "raw.nii.gz")
    write_nifti(rng.random((1, slices, 64, 64), dtype=np.float32) + 0.1, tmp / "ctx.nii.gz",
                affine=np.diag([4.0, 4.0, 4.0, 1.0]))
    write_nifti(np.zeros((1, slices, 64, 64), np.uint8), tmp / "lab.nii.gz")
    with open(tmp / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["case_id", "image_raw", "image_context", "mask", "split"],
                                 ["c0", "raw.nii.gz", "ctx.nii.gz", "lab.nii.gz", "train"]])
    (tmp / "dataset.json").write_text(json.dumps({"mask_labels": {"background": 0, "a": 1}}))
    cfg = load_config(base={"family": "context_seg", "task": "segmentation", "output_dir": str(tmp),
                            "data": {"root": str(tmp), "cache_dir": str(tmp / "cache"), "params": {
                                "encoder": "dinov3", "encoder_params": {"weights": str(tmp / "dinov3s")},
                                "raw_input_size": size, "context_input_size": size, "slice_batch_size": 8}},
                            "model": {"name": "context_seg", "params": {"feature_channels": 384}}})
    dm = build_datamodule(cfg, None)
    t = time.perf_counter()
    dm.builder  # noqa: B018 - load the encoder outside the timed epochs
    load_s = time.perf_counter() - t
    case = dm.cases["train"][0]
    t = time.perf_counter()
    path = dm.case_tensors(case)  # epoch 1: encoder on 2 x slices slices, features written
    first = time.perf_counter() - t
    t = time.perf_counter()
    dm.case_tensors(case)
    from safetensors.torch import load_file

    for v in load_file(str(path)).values():  # epoch 2: key + read the whole cached case; touching every value
        float(v.float().sum())  # makes the memory-mapped file really be read
    second = time.perf_counter() - t
    n = 2 * slices
    return {"slices": n, "size": size, "load_s": load_s, "first_s": first, "second_s": second,
            "slices_per_s_nocache": n / first, "slices_per_s_cache": n / second,
            "cache_mb": path.stat().st_size / 2**20}


def run_row(fusion: str, size: int, base: int, channels: int, mode: str, device: str, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([fusion, size, base, channels, mode, device])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"fusion": fusion, "size": size, "base": base, "mode": mode, "error": f"timeout after {timeout} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        why = "killed (out of memory?)" if proc.returncode < 0 else last[:160]
        return {"fusion": fusion, "size": size, "base": base, "mode": mode, "error": why}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimate_mb(size: int, base: int, channels: int) -> float:
    """Rough training-step peak (MB) to skip rows that cannot fit: inputs, weights x2, activations."""
    vox = size**3
    inputs = 2 * channels * vox * 4
    weights = 2 * 4 * 27 * (base**2) * 4**4 * 1.6  # ~ widest levels dominate
    acts = 40 * base * vox * 4  # ~40 full-resolution base-width tensors kept for backward
    return (inputs + weights + acts) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_context_seg.md"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--sizes", default="32x128,64x32,64x128", help="comma list of SIZExBASE")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--dinov3", default="32x224", help="SLICESxSIZE of the DINOv3-S extraction row ('' to skip)")
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(dinov3_worker(*spec[1:]) if spec[0] == "dinov3" else worker(*spec)))
        return
    import torch

    rows, t0 = [], time.perf_counter()
    load0 = os.getloadavg()
    for spec in args.sizes.split(","):
        size, base = (int(v) for v in spec.split("x"))
        need = _estimate_mb(size, base, args.channels)
        avail = _mem_available_mb()
        for mode in ("train", "infer"):
            for fusion in ("attention", "concat"):
                if args.device == "cpu" and mode == "train" and need > 0.85 * avail:
                    rows.append({"fusion": fusion, "size": size, "base": base, "mode": mode,
                                 "error": f"skipped: needs ~{need / 1024:.0f} GB, {avail / 1024:.0f} GB available"})
                    continue
                print(f"[bench] {fusion} {mode} {size}^3 base {base}", flush=True)
                rows.append(run_row(fusion, size, base, args.channels, mode, args.device, args.timeout))
                print("  ", rows[-1], flush=True)
    ratios = []
    for r in rows:
        if r.get("fusion") != "attention" or "error" in r:
            continue
        c = next((x for x in rows if x.get("fusion") == "concat" and x.get("mode") == r["mode"]
                  and x.get("size") == r["size"] and x.get("base") == r["base"] and "error" not in x), None)
        if c is not None:
            ratios.append(f"{r['size']}^3, base {r['base']}, {r['mode']}: attention / concat = "
                          f"{(r['peak_mb'] - r['base_mb']) / max(c['peak_mb'] - c['base_mb'], 1e-9):.2f}x the memory "
                          f"(peak - base), {r['seconds'] / c['seconds']:.2f}x the time")
    dino = None
    if args.dinov3:
        slices, size = (int(v) for v in args.dinov3.split("x"))
        print(f"[bench] dinov3-s extraction {slices} slices x 2 streams at {size}", flush=True)
        cmd = [sys.executable, __file__, "--worker", json.dumps(["dinov3", slices, size])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))})
        dino = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
            {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        print("  ", dino, flush=True)
    load1 = os.getloadavg()
    lines = ["# Context fusion: attention vs concatenation (memory and step time)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device "
             f"`{args.device}`" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
             + ". Generated by `python bench/bench_context_seg.py`.", "",
             f"Model: ContextUNet3D, 4 levels, trilinear decoder, 5 classes, batch 1; raw and context inputs of "
             f"{args.channels} channels each ({'DINOv3 ViT-L features' if args.channels == 1024 else 'features'}). "
             "`attention` = separate streams, context gates the 4 skips (the seed's design); `concat` = one "
             f"(2 x {args.channels})-channel input (the seed's \"old way\").", "",
             "Training step = forward + cross-entropy + backward + SGD step (no optimiser state); the second "
             "of two steps is timed. *base* = resident memory after building the model and the inputs; "
             "*peak* = peak resident memory (CPU: VmHWM of a fresh process; CUDA: max allocated).", "",
             "| input | base width | mode | fusion | params (M) | base (MB) | peak (MB) | peak - base (MB) | time (s) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['size']}^3 | {r['base']} | {r['mode']} | {r['fusion']} |"
        if "error" in r:
            lines.append(f"{head} - | - | - | - | {r['error']} |")
            continue
        lines.append(f"{head} {r['params'] / 1e6:.1f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] - r['base_mb']:.0f} | {r['seconds']:.2f} |")
    if ratios:
        lines += ["", *(f"- {x}" for x in ratios)]
    if dino is not None:
        lines += ["", "## DINOv3 ViT-S/16 feature extraction, with and without the feature cache", ""]
        if "error" in dino:
            lines.append(f"failed: {dino['error']}")
        else:
            lines += [f"One case, raw + context streams of {dino['slices'] // 2} slices each, every slice resized "
                      f"to {dino['size']} x {dino['size']} (random ViT-S/16 weights, 4 registers; slice_batch_size 8) "
                      f"through `ContextSegDataModule`. Epoch 1 runs the encoder and writes the case's float16 "
                      f"label-grid features ({dino['cache_mb']:.1f} MB); epoch 2 only hashes the key and reads the "
                      f"file. Loading the encoder took {dino['load_s']:.1f} s (not counted).", "",
                      "| | time (s) | slices/s |", "|---|---:|---:|",
                      f"| no cache (epoch 1) | {dino['first_s']:.2f} | {dino['slices_per_s_nocache']:.1f} |",
                      f"| cache (epoch 2) | {dino['second_s']:.3f} | {dino['slices_per_s_cache']:.0f} |"]
    lines += ["", f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load0)}; after: "
              f"{', '.join(f'{v:.1f}' for v in load1)} (2 cores: times above 2 mean other jobs shared the CPU; "
              "memory is not affected). Total benchmark time: "
              f"{time.perf_counter() - t0:.0f} s.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
