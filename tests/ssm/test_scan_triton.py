"""Triton selective scan: parity with the reference (outputs and every input gradient), dispatch, fallback.

The kernels run wherever Triton can run them: in this process when ``TRITON_INTERPRET=1`` was set
before Triton compiled them (``TRITON_INTERPRET=1 pytest -k triton``), and otherwise, on CPU, in a
subprocess started with that variable by :func:`test_triton_kernels_in_interpreter_subprocess`, so
that a plain ``pytest`` (``make test``) checks them too. ``@pytest.mark.gpu`` tests run them on CUDA.
Sizes are small (the interpreter runs a tile op by op): several L not divisible by the chunk,
batch 2, odd d_state, channel blocks that do not divide Dm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_scan import NAMES, assert_close_scaled, make_inputs, run

from medfuse.ssm import BiMamba
from medfuse.ssm import scan as scan_mod
from medfuse.ssm.scan import ScanFallbackWarning, resolve_path, selective_scan
from medfuse.ssm.scan_chunked import selective_scan_chunked
from medfuse.ssm.scan_ref import selective_scan_ref

scan_triton = pytest.importorskip("medfuse.ssm.scan_triton", reason="Triton is not importable")

IN_PROCESS = scan_triton.interpreter_active()
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="kernels run in Triton's interpreter: covered by the subprocess test "
                           "(or run TRITON_INTERPRET=1 pytest -k triton)")


def triton_scan(**kw):
    return scan_triton.selective_scan_triton(**kw)


# --------------------------------------------------------------------------- interpreter parity (CPU)
@needs_interpreter
@pytest.mark.parametrize(
    ("length", "chunk", "block_d", "n", "softplus"),
    [(1, 4, None, 3, True), (37, 8, 4, 3, True), (50, 16, 2, 5, False), (21, 4, 8, 1, True), (16, 16, None, 4, True)],
)
def test_triton_matches_ref_outputs_and_grads(length, chunk, block_d, n, softplus):
    """Chunk carries forward and backward, a partial last chunk, a partial last channel block (Dm 6),
    odd d_state (padded state lanes), batch 2; every gradient including dA, dD, ddelta_bias."""
    inputs = make_inputs(length, batch=2, dim=6, n=n, seed=length)
    grad_out = torch.randn(2, 6, length, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out, delta_softplus=softplus)
    out, grads = run(triton_scan, inputs, torch.float32, grad_out, delta_softplus=softplus, chunk_size=chunk,
                     block_d=block_d)
    assert out.dtype == torch.float32 and out.shape == (2, 6, length)
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for name in NAMES:
        assert grads[name].dtype == torch.float32 and grads[name].shape == inputs[name].shape, name
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")


@needs_interpreter
def test_triton_optional_inputs_absent():
    """No D, no z, no delta_bias: the kernels' constexpr branches without them."""
    inputs = make_inputs(19, batch=2, dim=5, n=3, seed=11)
    for k in ("D", "z", "delta_bias"):
        del inputs[k]
    grad_out = torch.randn(2, 5, 19, generator=torch.Generator().manual_seed(2))
    names = list(inputs)
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out, delta_softplus=True)
    out, grads = run(triton_scan, inputs, torch.float32, grad_out, delta_softplus=True, chunk_size=8, block_d=2)
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for name in names:
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")


@needs_interpreter
def test_triton_bf16_inputs_fp32_state():
    """bf16 u/delta/B/C/z (fp32 A, D, bias as the Mamba block passes them): bf16 out and grads, close to
    the fp32 reference on the same (bf16-rounded) inputs."""
    inputs = make_inputs(27, batch=2, dim=6, n=3, seed=3)
    low = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    grad_out = torch.randn(2, 6, 27, generator=torch.Generator().manual_seed(3))
    ref_out, ref_grads = run(selective_scan_ref, {k: v.float() for k, v in low.items()}, torch.float64, grad_out,
                             delta_softplus=True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in low.items()}
    out = triton_scan(**leaves, delta_softplus=True, chunk_size=8, block_d=4)
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype)), strict=True))
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, ref_out, 2e-2, "out")
    for name in NAMES:
        assert grads[name].dtype == low[name].dtype, name
        assert_close_scaled(grads[name], ref_grads[name], 2e-2, f"d{name}")


@needs_interpreter
def test_triton_strong_decay_is_stable():
    """delta * |A| summed over a chunk far beyond exp's fp32 range: decays only multiply, nothing overflows."""
    inputs = make_inputs(40, batch=2, dim=4, n=3, dt_scale=6.0, a_max=16.0, seed=4)
    grad_out = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(4))
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out)
    out, grads = run(triton_scan, inputs, torch.float32, grad_out, chunk_size=16)
    assert torch.isfinite(out).all()
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for name in NAMES:
        assert torch.isfinite(grads[name]).all(), name
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")


@needs_interpreter
@pytest.mark.parametrize("length", [13, 32])
def test_triton_seq_forward_and_inference_match(length):
    """The step-loop forward kernel (``intra="seq"``) and the no-grad forward equal the training forward."""
    inputs = make_inputs(length, batch=2, dim=6, n=3, seed=5)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    training = triton_scan(**leaves, delta_softplus=True, chunk_size=8, block_d=4)
    assert training.grad_fn is not None
    with torch.no_grad():
        scanned = triton_scan(**inputs, delta_softplus=True, chunk_size=8, block_d=4, intra="parallel")
        looped = triton_scan(**inputs, delta_softplus=True, chunk_size=8, block_d=4, intra="seq")
    torch.testing.assert_close(scanned, training.detach(), rtol=0, atol=0)
    torch.testing.assert_close(looped, scanned, rtol=1e-5, atol=1e-6)
    assert_close_scaled(looped, selective_scan_ref(**inputs, delta_softplus=True), 1e-4, "seq out")


@needs_interpreter
def test_triton_saves_only_chunk_states():
    """Training memory O(L Dm): the saved tensors are the inputs plus (B, L / chunk, Dm, N) fp32 states."""
    inputs = {k: v.requires_grad_() for k, v in make_inputs(64, batch=1, dim=4, n=4, seed=6).items()}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = triton_scan(**inputs, delta_softplus=True, chunk_size=16, block_d=4)
    assert out.grad_fn is not None
    assert (1, 4, 4, 4) in saved  # 64 / 16 chunk-entry states
    assert max(int(torch.tensor(s).prod()) for s in saved) <= 64 * 4  # nothing (B, Dm, L, N)-sized


@needs_interpreter
def test_triton_bimamba_block_through_dispatcher(monkeypatch):
    """A Bi-Mamba block with ``MEDFUSE_SCAN=triton``: the scan gets (B, L, E)-memory views, a gate slice
    and a flipped branch; outputs and every parameter gradient match the chunked path."""
    calls = []
    real = scan_triton.selective_scan_triton
    monkeypatch.setattr(scan_triton, "selective_scan_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    block = BiMamba(8, d_state=3)
    x = torch.randn(2, 23, 8)
    monkeypatch.setenv("MEDFUSE_SCAN", "chunked")
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), list(block.parameters()))
    monkeypatch.setenv("MEDFUSE_SCAN", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanFallbackWarning)
        out = block(x)
        grads = torch.autograd.grad(out.pow(2).sum(), list(block.parameters()))
    assert len(calls) == 2  # both directions went through the Triton kernels
    assert_close_scaled(out, expected, 1e-4, "out")
    for (name, _), g, e in zip(block.named_parameters(), grads, expected_grads, strict=True):
        assert_close_scaled(g, e, 1e-4, name)


@needs_interpreter
def test_triton_backward_failure_falls_back_to_chunked_grads(monkeypatch):
    """A backward kernel that fails (compile or launch) hands its gradients to the chunked path."""
    errors = []

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(scan_triton, "_backward", broken)
    inputs = make_inputs(12, batch=2, dim=4, n=3, seed=7)
    grad_out = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(7))
    out, grads = run(triton_scan, inputs, torch.float32, grad_out, delta_softplus=True, chunk_size=4,
                     on_error=errors.append)
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out, delta_softplus=True)
    assert len(errors) == 1 and "PTX" in str(errors[0])
    for name in NAMES:
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")
    monkeypatch.setattr(scan_triton, "_backward", broken)
    with pytest.raises(RuntimeError, match="PTX"):  # without on_error the failure is not hidden
        run(triton_scan, inputs, torch.float32, grad_out, delta_softplus=True, chunk_size=4)


@needs_interpreter
def test_triton_fp64_goes_to_chunked_with_one_warning(monkeypatch):
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    inputs = {k: v.double() for k, v in make_inputs(9, seed=8).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = selective_scan(**inputs, delta_softplus=True, path="triton")
        selective_scan(**inputs, delta_softplus=True, path="triton")
    assert len([w for w in caught if issubclass(w.category, ScanFallbackWarning)]) == 1
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True))
    with pytest.raises(ValueError, match="fp64"):
        triton_scan(**inputs)


# --------------------------------------------------------------------------- the subprocess runner
def test_triton_kernels_in_interpreter_subprocess():
    """Run this file's interpreter tests in a child process with ``TRITON_INTERPRET=1`` (Triton reads it
    when the kernels are defined, so it cannot be switched on inside this process once they are)."""
    if IN_PROCESS:
        pytest.skip("the interpreter tests already run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MEDFUSE_SCAN": "",
           "MEDFUSE_SCAN_INTRA": ""}
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(here),
           "-k", "triton and not subprocess and not forced_on_cpu", "-m", "not gpu and not slow"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=here.parents[2])
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail


# --------------------------------------------------------------------------- dispatch (no kernels run)
def test_triton_forced_on_cpu_falls_back_with_one_warning(monkeypatch):
    if IN_PROCESS:
        pytest.skip("CPU runs the Triton path in this process (interpreter)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MEDFUSE_SCAN", "triton")
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    inputs = make_inputs(11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = selective_scan(**inputs, delta_softplus=True)
        out2 = selective_scan(**inputs, delta_softplus=True)
    fallback = [w for w in caught if issubclass(w.category, ScanFallbackWarning)]
    assert len(fallback) == 1 and "'triton' cannot run" in str(fallback[0].message)
    expected = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)


def test_triton_runtime_failure_falls_back_once(monkeypatch):
    """A Triton kernel that raises at its first call (compile error, old GPU): one warning, the chunked
    result, and the path stays off for the process."""
    class Broken:
        calls = 0

        @staticmethod
        def triton_unavailable_reason(device):
            return ""

        @classmethod
        def selective_scan_triton(cls, *a, **k):
            cls.calls += 1
            raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4")

    monkeypatch.setattr(scan_mod, "_load_triton", lambda: (Broken, ""))
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    monkeypatch.setattr(scan_mod, "_TRITON_BROKEN", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # let CPU tensors reach the (fake) Triton path
    monkeypatch.setenv("MEDFUSE_SCAN", "triton")
    inputs = make_inputs(10, seed=9)
    assert resolve_path("cpu") == "triton"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = selective_scan(**inputs, delta_softplus=True)
        out2 = selective_scan(**inputs, delta_softplus=True)
    fallback = [w for w in caught if issubclass(w.category, ScanFallbackWarning)]
    assert Broken.calls == 1
    assert len(fallback) == 1 and "CompilationError" in str(fallback[0].message)
    expected = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)
    assert resolve_path("cpu", warn=False) == "chunked"


def test_triton_shape_errors_are_clear():
    inputs = make_inputs(5)
    inputs["z"] = inputs["z"][:, :, :4]
    with pytest.raises(ValueError, match="z must be"):
        scan_triton.selective_scan_triton(**inputs)


def test_triton_auto_order_on_cuda(monkeypatch):
    """auto on CUDA: mamba-ssm's kernel when it imports (an explicit install), else Triton, else chunked;
    auto on CPU stays chunked even under the interpreter."""
    monkeypatch.delenv("MEDFUSE_SCAN", raising=False)
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    monkeypatch.setattr(scan_mod, "cuda_scan_unavailable_reason", lambda device=None: "")
    assert resolve_path("cuda") == "cuda"
    monkeypatch.setattr(scan_mod, "cuda_scan_unavailable_reason", lambda device=None: "mamba-ssm missing")
    monkeypatch.setattr(scan_mod, "triton_scan_unavailable_reason", lambda device: "")
    assert resolve_path("cuda") == "triton"
    assert resolve_path("cuda", "cuda", warn=False) == "triton"
    monkeypatch.setattr(scan_mod, "triton_scan_unavailable_reason", lambda device: "Triton cannot be imported")
    with pytest.warns(ScanFallbackWarning, match="chunked"):
        assert resolve_path("cuda") == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_path("cpu") == "chunked"


def test_triton_default_config_rule(monkeypatch):
    """Chunk 64 (capped by L), tile near 2048 elements, block_d halved until two programs per SM."""
    monkeypatch.setattr(scan_triton, "_sm_count", lambda device: 132)  # an H100
    cfg = scan_triton.default_config(1, 512, 16, 16384, "cpu")
    assert (cfg.chunk, cfg.block_n, cfg.block_d) == (64, 16, 1)  # 512 channels: 512 programs >= 264
    cfg = scan_triton.default_config(8, 512, 16, 16384, "cpu")
    assert cfg.block_d == 2  # tile 2 x 16 x 64 = 2048 elements, 2048 programs
    cfg = scan_triton.default_config(2, 6, 3, 10, "cpu", chunk_size=5)
    assert (cfg.chunk, cfg.block_n) == (8, 4)  # powers of two: padded lanes are masked
    with pytest.raises(ValueError, match="block_d"):
        scan_triton.default_config(1, 8, 4, 8, "cpu", block_d=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_ref(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    inputs = {k: v.cuda() for k, v in make_inputs(1000, batch=2, dim=64, n=16, dt_scale=0.1).items()}
    low = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    grad_out = torch.randn(2, 64, 1000, device="cuda")
    ref_out, ref_grads = run(selective_scan_ref, {k: v.float() for k, v in low.items()}, torch.float64, grad_out,
                             delta_softplus=True)
    rtol = 1e-3 if dtype == torch.float32 else 3e-2
    for intra in ("parallel", "seq"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in low.items()}
        out = scan_triton.selective_scan_triton(**leaves, delta_softplus=True, intra=intra)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
        assert out.dtype == dtype
        assert_close_scaled(out, ref_out, rtol, f"triton {intra} out")
        for name, g in zip(leaves, grads, strict=True):
            assert_close_scaled(g, ref_grads[name], rtol, f"triton {intra} d{name}")
