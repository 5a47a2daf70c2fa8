"""Benchmark: the incomplete_seg family (seed 003, UniMRSeg) at the demo's width.

Measures, fp32, with ``--threads`` CPU threads (or on CUDA with ``--device cuda``):

- one training step (forward + loss + backward + AdamW step) per stage kind for a batch of one
  4 x 96^3 crop: plain segmentation, stage 1 (hybrid masking + L1/SSIM reconstruction), stage 2
  (complete + incomplete copy, NT-Xent + Dice), stage 3 (frozen encoder + adapters, teacher + k
  incomplete students, for k = 2 and k = 14);
- sliding-window inference (MONAI, ROI 96^3, overlap 0.25, Gaussian blending) of one
  4 x 155 x 240 x 240 case (BraTS size), for the complete modality set and for all 15 combinations.

Every configuration runs in a fresh subprocess. CPU memory is the peak resident set (``VmHWM``)
minus the resident set just before the timed work; CUDA memory is ``torch.cuda.max_memory_allocated``.

Usage:
    python bench/bench_incomplete_seg.py [--device cuda] [--out docs/benchmarks_incomplete_seg.md]
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

MODS = ["flair", "t1", "t1ce", "t2"]
WIDTHS = (8, 16, 32, 48)  # the demo config's width
DILATIONS = (1, 2, 3)
CROP = (96, 96, 96)
CASE = (155, 240, 240)
STAGES = {
    "plain segmentation": ({"seg": 1.0}, None),
    "stage 1 reconstruct": ({"recon": 1.0}, None),
    "stage 2 contrast": ({"seg": 1.0, "ntxent": 1.0}, None),
    "stage 3 adapt, k=2": ({"seg": 1.0, "consistency": 1.0, "feature": 0.2}, 2),
    "stage 3 adapt, k=14": ({"seg": 1.0, "consistency": 1.0, "feature": 0.2}, 14),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict) -> dict:
    import torch

    import medfuse.families  # noqa: F401  (registers the families)
    from medfuse.config import StageConfig
    from medfuse.families.incomplete_seg.task import IncompleteSegTask

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    losses, k = STAGES.get(spec.get("stage", ""), ({"seg": 1.0}, None))
    stage = StageConfig(name="bench", losses=losses)
    task = IncompleteSegTask({"name": "bench", "model": {"name": "incomplete_seg", "params": {
        "widths": list(WIDTHS), "aspp_dilations": list(DILATIONS), "ssim_window": 5, "combos_per_step": k}}},
        auto={"in_channels": 4, "num_classes": 4, "modalities": list(MODS)},
        stage=stage.model_dump() if spec["what"] == "train" else None).to(dev)
    net = task.model

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if spec["what"] == "train":
        task.train()
        mask = torch.zeros(1, 1, *CROP, dtype=torch.long, device=dev)
        mask[:, :, 30:70, 30:70, 30:70] = 1
        mask[:, :, 40:60, 40:60, 40:60] = 2
        mask[:, :, 45:55, 45:55, 45:55] = 3
        batch = {"image": torch.rand(1, 4, *CROP, device=dev), "mask": mask, "present": torch.ones(1, 4, device=dev)}
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)

        def step():
            out = task.forward_batch(batch)
            task.compute_loss(batch, out)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up (allocator, oneDNN/cuDNN plans)
        n = spec["repeats"]
    else:
        net.eval()
        image = torch.rand(1, 4, *CASE, device=dev)
        combos = 15 if spec["what"] == "infer15" else 1

        def step():
            from medfuse.families.incomplete_seg.data import combination_mask, modality_combinations

            masks = combination_mask(modality_combinations(4), 4)[-combos:].to(dev)
            with torch.no_grad():
                for c in range(combos):
                    net.predict_regions(image, masks[c: c + 1], roi_size=CROP, overlap=0.25, sw_batch_size=2)

        n = 1
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    dt = (time.perf_counter() - t0) / n
    mem_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else (_status_kb("VmHWM") - base) / 1024
    return {"seconds": dt, "mem_mb": mem_mb}


def run(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    common = {"device": args.device, "threads": args.threads, "repeats": args.repeats}
    mem = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS increase"
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none"
    lines = [f"`bench/bench_incomplete_seg.py --device {args.device}`: widths {list(WIDTHS)}, ASPP dilations "
             f"{list(DILATIONS)}, fp32, {args.threads} CPU threads, GPU: {gpu}, torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}.", "",
             f"| training step, batch 1 x 4 x {'x'.join(map(str, CROP))} | seconds | {mem} (MB) |", "|---|---|---|"]
    for name in STAGES:
        r = run({**common, "what": "train", "stage": name}, args.timeout)
        lines.append(f"| {name} | " + (f"{r['seconds']:.2f} | {r['mem_mb']:.0f} |" if "error" not in r
                                        else f"{r['error']} | |"))
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"| sliding-window inference, 4 x {'x'.join(map(str, CASE))}, ROI {'x'.join(map(str, CROP))} "
                  f"| seconds | {mem} (MB) |", "|---|---|---|"]
    for what, label in (("infer1", "complete modalities (1 combination)"), ("infer15", "all 15 combinations")):
        r = run({**common, "what": what}, args.timeout)
        lines.append(f"| {label} | " + (f"{r['seconds']:.1f} | {r['mem_mb']:.0f} |" if "error" not in r
                                         else f"{r['error']} | |"))
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
