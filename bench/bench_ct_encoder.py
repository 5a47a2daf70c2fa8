"""Benchmark: the ct_encoder family's slice-aware attention and encoder (seed 001) on CPU (and GPU).

1. Slice-aware attention, one layer's core (B 1, 12 heads x 64 channels, the base preset), the
   tokens of 16 patch slices (N = 4,096 = 16 x 16 x 16 and N = 16,384 = 16 x 32 x 32, the seed's
   (64, 512, 512) volume): medfuse's ``fold`` and ``chunked`` paths (and ``flex`` on CUDA) against
   the seed's naive dense bias, forward and forward + backward.
2. The whole vision encoder (patch embedding, anatomical encoder, blocks, FPN, pooling) at the
   seed's (64, 512, 512) with a 20-region mask: forward time and peak memory, tiny and base presets.

Every configuration runs in a fresh subprocess. On CPU its memory is the peak resident set
(``VmHWM``) minus the resident set after building inputs and model; the parent kills a child above
``--mem-cap-gb`` (reported as OOM). On CUDA it is ``torch.cuda.max_memory_allocated`` above the
allocation before the timed call. A naive run whose dense (heads, N, N) scores alone would pass
the cap is reported as "does not fit" without being started.

Usage:
    python bench/bench_ct_encoder.py --out docs/benchmarks_ct_encoder.md [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HEADS, HEAD_DIM = 12, 64


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    if spec["kind"] == "attention":
        from medfuse.layers.slice_attention import slice_attention

        n, grad = spec["n"], spec["mode"] == "train"
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=dev, requires_grad=grad) for _ in range(3))
        table = torch.randn(HEADS, 32, device=dev, requires_grad=grad)
        z = torch.arange(n, device=dev) // (n // 16)

        def run():
            with torch.set_grad_enabled(grad):
                out = slice_attention(q, k, v, z, table, impl=spec["impl"], chunk_size=512)
                if grad:
                    out.sum().backward()
    else:
        from medfuse.families.ct_encoder.model import PRESETS, CTVisionEncoder

        size = PRESETS[spec["preset"]]
        enc = CTVisionEncoder(1, 20, size["dim"], size["depth"], size["num_heads"], (4, 16, 16), (64, 512, 512),
                              fpn_levels=3).to(dev).eval()
        image = torch.rand(1, 1, 64, 512, 512, device=dev)
        mask = torch.randint(0, 21, (1, 1, 64, 512, 512), device=dev)

        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and spec["bf16"]):
                enc(image, mask)
    times = []
    for i in range(spec["repeats"] + 1):  # the first run warms up (and compiles flex)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            base = _status_kb("VmRSS") * 1024
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _status_kb("VmHWM") * 1024 - base
        if i or spec["repeats"] == 0:
            times.append((time.perf_counter() - t0, time.process_time() - c0, peak))
    best = min(times)
    return {"time": best[0], "cpu_time": best[1], "peak_gb": max(t[2] for t in times) / 2**30,
            "runs": [round(t[0], 2) for t in times]}


# ------------------------------------------------------------------------------------ parent


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def launch(spec: dict, cap_gb: float, timeout: float) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    killed = {"why": None}

    def watch():
        t0 = time.time()
        while proc.poll() is None:
            if _rss_kb(proc.pid) > cap_gb * 2**20:
                killed["why"] = f"OOM: killed above {cap_gb:g} GB RSS"
                proc.kill()
            elif time.time() - t0 > timeout:
                killed["why"] = f"timeout after {timeout:.0f} s"
                proc.kill()
            time.sleep(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if killed["why"]:
        return {"error": killed["why"]}
    if proc.returncode != 0:
        return {"error": f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def _fmt(res: dict, key: str, digits: int = 2) -> str:
    return f"{res[key]:.{digits}f}" if "error" not in res else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/benchmarks_ct_encoder.md")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gb", type=float, default=12.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="attention at N = 4,096 only, no encoder runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    t_start, load0 = time.time(), os.getloadavg()[0]
    dev = args.device
    impls = ["flex", "fold", "chunked", "naive"] if dev == "cuda" else ["fold", "chunked", "naive"]
    cap = args.mem_cap_gb
    rows = []
    for n in (4096,) if args.quick else (4096, 16384):
        for mode in ("inference", "train"):
            for impl in impls:
                dense_gb = HEADS * n * n * 4 / 2**30 * (3 if mode == "train" else 2)  # bias + scores (+ grads)
                if impl == "naive" and dense_gb > cap:
                    res = {"error": f"does not fit: dense bias + scores need ~{dense_gb:.0f} GB"}
                else:
                    spec = {"kind": "attention", "impl": impl, "n": n, "mode": mode, "device": dev,
                            "threads": args.threads, "repeats": 2 if n <= 4096 else 1}
                    res = launch(spec, cap, args.timeout)
                print(n, mode, impl, res, flush=True)
                rows.append((n, mode, impl, res))
    enc_rows = []
    if not args.quick:
        for preset in ("tiny", "base"):
            spec = {"kind": "encoder", "preset": preset, "device": dev, "threads": args.threads, "repeats": 1,
                    "bf16": dev == "cuda"}
            res = launch(spec, cap, args.timeout * 2)
            print(preset, res, flush=True)
            enc_rows.append((preset, res))
    load1 = os.getloadavg()[0]
    lines = _markdown(rows, enc_rows, dev, args, load0, load1, time.time() - t_start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _markdown(rows, enc_rows, dev, args, load0, load1, wall) -> list[str]:
    import torch

    where = torch.cuda.get_device_name(0) if dev == "cuda" else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    lines = [
        "## ct_encoder: slice-aware attention and the 3D encoder", "",
        f"Machine: {where}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"`torch.set_num_threads({args.threads})`, fp32{' (encoder in bf16 autocast)' if dev == 'cuda' else ''}. "
        f"Load average before/after: {load0:.1f} / {load1:.1f} (a shared machine: absolute times vary). "
        f"Total wall time {wall / 60:.1f} min. Produced by `python bench/bench_ct_encoder.py`.", "",
        f"### Slice-aware attention core: B 1, {HEADS} heads x {HEAD_DIM}, 16 patch slices, |dz| clamped at 31", "",
        "| N | mode | implementation | time (s) | CPU time (s) | peak extra memory (GB) | runs (s) |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    names = {"fold": "medfuse fold (bias folded into SDPA)", "chunked": "medfuse chunked (bias per 512-row block)",
             "flex": "medfuse FlexAttention score_mod", "naive": "seed: dense (heads, N, N) bias"}
    for n, mode, impl, res in rows:
        if "error" in res:
            lines.append(f"| {n:,} | {mode} | {names[impl]} | {res['error']} | - | - | - |")
        else:
            lines.append(f"| {n:,} | {mode} | {names[impl]} | {_fmt(res, 'time')} | {_fmt(res, 'cpu_time')} | "
                         f"{_fmt(res, 'peak_gb', 3)} | {', '.join(map(str, res['runs']))} |")
    if enc_rows:
        lines += ["", "### Vision encoder forward at (64, 512, 512), (4, 16, 16) patches (N = 16,384), 20 regions",
                  "", "| preset | dim / depth / heads | time (s) | CPU time (s) | peak extra memory (GB) |",
                  "|---|---|---:|---:|---:|"]
        from medfuse.families.ct_encoder.model import PRESETS

        for preset, res in enc_rows:
            p = PRESETS[preset]
            tail = (f"{_fmt(res, 'time')} | {_fmt(res, 'cpu_time')} | {_fmt(res, 'peak_gb', 3)}" if "error" not in res
                    else f"{res['error']} | - | -")
            lines.append(f"| {preset} | {p['dim']} / {p['depth']} / {p['num_heads']} | {tail} |")
    lines += ["", "Memory is the peak above what inputs and weights already hold. The dense reference "
              "materialises the (heads, N, N) bias and the scores; at N = 16,384 that is 12.9 GB each in fp32, "
              "so it is not run where it cannot fit. `fold` appends the |dz| bias row of each query's slice to "
              "the query and a one-hot of each key's slice to the key, so one fused SDPA call computes the "
              "biased logits exactly (16 extra head channels here); `chunked` builds the bias per block of "
              "512 query rows; FlexAttention (CUDA) looks the bias up per score."]
    return lines


if __name__ == "__main__":
    main()
