"""GPU benchmark of the staging family: scan paths and end-to-end training throughput (bf16).

Run on a CUDA machine (``python bench/bench_gpu.py --out docs/benchmarks_gpu.md``); on a machine
without CUDA it says so and exits 0. Rows:

1. **Bi-Mamba block, fwd + bwd** at d_model 256, batch 1, L = 16,384 and 65,536, under bf16
   autocast (scan accumulation stays fp32) and in fp32: medfuse's chunked scan against the
   pure-PyTorch peer ``mambapy`` (its parallel ``pscan``; two blocks, the second on the flipped
   sequence, as in bench_ssm.py) and against ``mamba-ssm``'s CUDA kernel where it is importable.
   Time is the median of CUDA-event-timed repeats after warm-up; memory is
   ``torch.cuda.max_memory_allocated`` above the memory held before the step.
2. **End-to-end training volumes/s** of the staging model (the demo's tiny-encoder config on
   2 x 16 x 64 x 64 volumes, and the MedSAM2 Hiera-T encoder, frozen, on 2 x 32 x 512 x 512 volumes),
   bf16 autocast, AdamW step included, data already on the GPU (the loader is not timed).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

D_MODEL = 256


def _timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` over ``repeats`` (CUDA events) and peak extra GB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def _mambapy_bi():
    from mambapy.mamba import MambaBlock, MambaConfig

    cfg = MambaConfig(d_model=D_MODEL, n_layers=1, d_state=16, expand_factor=2, d_conv=4, pscan=True)

    class Bi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.b = MambaBlock(cfg), MambaBlock(cfg)

        def forward(self, x):
            return self.f(x) + self.b(x.flip(1)).flip(1)

    return Bi()


def scan_rows(lengths: list[int], repeats: int) -> list[dict]:
    import os

    from medfuse.ssm import BiMamba
    from medfuse.ssm.scan_cuda import cuda_scan_importable

    impls = [("medfuse chunked", "chunked")]
    if cuda_scan_importable():
        impls.append(("medfuse -> mamba-ssm CUDA kernel", "cuda"))
    try:
        import mambapy  # noqa: F401

        impls.append(("mambapy 2x MambaBlock (pscan)", None))
    except ImportError:
        pass
    rows = []
    for dtype in ("bf16", "fp32"):
        for L in lengths:
            for name, path in impls:
                torch.manual_seed(0)
                if path is None:
                    model = _mambapy_bi().cuda()
                else:
                    os.environ["MEDFUSE_SCAN"] = path
                    model = BiMamba(D_MODEL, d_state=16, d_conv=4, expand=2).cuda()
                x = torch.randn(1, L, D_MODEL, device="cuda")

                def step(model=model, x=x, dtype=dtype):
                    model.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        y = model(x)
                    y.float().pow(2).mean().backward()

                try:
                    t, mem = _timed(step, warmup=2, repeats=repeats)
                    rows.append({"impl": name, "dtype": dtype, "L": L, "time_s": t, "mem_gb": mem})
                except torch.OutOfMemoryError:
                    rows.append({"impl": name, "dtype": dtype, "L": L, "time_s": None, "mem_gb": None})
                del model, x
                torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    os.environ.pop("MEDFUSE_SCAN", None)
    return rows


def e2e_rows(repeats: int) -> list[dict]:
    from medfuse.config import validate_params
    from medfuse.families.staging.params import StagingParams, build_staging

    configs = [
        ("tiny encoder (demo config)", dict(encoder="tiny", encoder_params={"out_channels": 32, "hidden": [16, 32]},
                                             dim=32, token_pool=4, memory_mode="full", num_prototypes=8, d_state=8,
                                             pool="avgmax"), (8, 2, 16, 64, 64)),
        ("MedSAM2 Hiera-T, frozen, token_pool 16", dict(encoder="medsam2", freeze_encoder=True, dim=256, token_pool=16,
                                                       slice_batch_size=32, num_prototypes=16),
         (1, 2, 32, 512, 512)),
    ]
    rows = []
    for name, kw, shape in configs:
        torch.manual_seed(0)
        model = build_staging(validate_params(StagingParams, kw, "model.params")).cuda()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.rand(shape, device="cuda")
        y = torch.randint(0, 4, (shape[0],), device="cuda")

        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()

        t, mem = _timed(step, warmup=2, repeats=repeats)
        rows.append({"config": name, "input": "x".join(map(str, shape)), "step_s": t, "volumes_per_s": shape[0] / t,
                     "mem_gb": mem})
        print(rows[-1], flush=True)
        del model, opt, x
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks_gpu.md"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        return
    t0 = time.time()
    scan = scan_rows(args.lengths, args.repeats)
    e2e = e2e_rows(args.repeats)
    dev = torch.cuda.get_device_name(0)
    lines = [
        "## Staging family on GPU (bf16)",
        "",
        f"Machine: {dev}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Produced by `python bench/bench_gpu.py` in {time.time() - t0:.0f} s. "
        "Times are medians of CUDA-event-timed repeats after 2 warm-ups; memory is peak allocated above the "
        "memory held before the step.",
        "",
        "### Bi-Mamba block, training step (fwd + bwd), d_model 256, batch 1",
        "",
        "| implementation | dtype | L | time (ms) | peak extra memory (GB) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in scan:
        tm = f"{r['time_s'] * 1e3:.1f}" if r["time_s"] is not None else "OOM"
        mem = f"{r['mem_gb']:.2f}" if r["mem_gb"] is not None else "-"
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['L']:,} | {tm} | {mem} |")
    names = {r["impl"] for r in scan}
    if not any("mamba-ssm" in n for n in names):
        lines += ["", "mamba-ssm was not importable on this machine (it has no network and mamba-ssm ships no "
                      "prebuilt wheel for this torch), so the CUDA-kernel row is absent."]
    lines += ["", "### End-to-end training throughput (bf16 autocast, AdamW, data on the GPU)", "",
              "| model | input (B x M x D x H x W) | step (ms) | volumes/s | peak extra memory (GB) |",
              "|---|---|---:|---:|---:|"]
    for r in e2e:
        lines.append(f"| staging, {r['config']} | {r['input']} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['volumes_per_s']:.1f} | {r['mem_gb']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
