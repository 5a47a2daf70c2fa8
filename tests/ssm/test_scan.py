"""Selective scan: chunked vs reference parity (outputs and gradients), stability, memory, dispatch.

Every chunked-path check runs with both intra-chunk modes, ``seq`` (the CPU default) and ``parallel``
(the Blelloch scan that is the default on CUDA), forced on CPU so that CI covers the GPU formulation.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from medfuse.errors import ConfigError
from medfuse.ssm import BiMamba
from medfuse.ssm import scan as scan_mod
from medfuse.ssm import scan_chunked as chunked_mod
from medfuse.ssm.scan import ScanFallbackWarning, available_paths, resolve_path, selective_scan
from medfuse.ssm.scan_chunked import default_chunk_size, resolve_intra, selective_scan_chunked
from medfuse.ssm.scan_parallel import (
    block_products,
    default_parallel_chunk_size,
    scan_forward_,
    scan_reverse_,
)
from medfuse.ssm.scan_ref import selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
INTRA = ("seq", "parallel")


def make_inputs(length: int, batch: int = 2, dim: int = 6, n: int = 4, seed: int = 0, dt_scale: float = 0.5,
                a_max: float = 4.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.rand(batch, dim, length, generator=g) * dt_scale,
        "A": -(0.25 + torch.rand(dim, n, generator=g) * a_max),
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.rand(dim, generator=g) * 0.3,  # >= 0: no growing states without softplus
    }


def run(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, grad_out: torch.Tensor, **kw):
    """Output and gradients w.r.t. every input, with inputs cast to ``dtype``."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out, dict(zip(leaves, grads, strict=True))


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """rtol relative elementwise, plus an atol of rtol/10 of the tensor's scale (sums that cancel)."""
    expected = expected.detach().to(torch.float64)
    atol = rtol * 0.1 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual.detach().to(torch.float64), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("intra", INTRA)
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(
    ("length", "chunk"),
    [(1, 32), (7, 32), (64, 32), (100, 32), (257, 32), (100, 512), (257, None), (300, 100)],
)
def test_chunked_matches_ref_outputs_and_grads(length, chunk, softplus, intra):
    """Chunk-boundary carries (several chunks), L not a multiple of the chunk, chunk > L, and for
    ``parallel`` a chunk that is not a power of two (padded tiles)."""
    inputs = make_inputs(length, seed=length)
    grad_out = torch.randn(2, 6, length, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out, delta_softplus=softplus)
    out, grads = run(selective_scan_chunked, inputs, torch.float32, grad_out, delta_softplus=softplus,
                     chunk_size=chunk, intra=intra)
    assert out.dtype == torch.float32 and out.shape == (2, 6, length)
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for name in NAMES:
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")


@pytest.mark.parametrize("intra", INTRA)
@pytest.mark.parametrize("optional", [(), ("D", "z", "delta_bias")])
def test_chunked_gradcheck_fp64(optional, intra):
    """fp64 inputs stay fp64 inside the chunked Function, so autograd.gradcheck applies exactly."""
    inputs = {k: v.double().requires_grad_() for k, v in make_inputs(9, batch=1, dim=3, n=2).items()}
    for k in optional:
        inputs[k] = None

    def fn(*tensors):
        kw = dict(zip(NAMES, tensors, strict=True))
        return selective_scan_chunked(**kw, delta_softplus=True, chunk_size=4, intra=intra)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in NAMES), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("intra", INTRA)
def test_bf16_inputs_match_fp32_ref(intra):
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(130, dim=8).items()}
    grad_out = torch.randn(2, 8, 130, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = run(selective_scan_ref, {k: v.float() for k, v in inputs.items()}, torch.float32, grad_out,
                             delta_softplus=True)
    out, grads = run(selective_scan_chunked, inputs, torch.bfloat16, grad_out, delta_softplus=True, chunk_size=32,
                     intra=intra)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, ref_out, 2e-2, "out")
    for name in NAMES:
        assert grads[name].dtype == torch.bfloat16
        assert_close_scaled(grads[name], ref_grads[name], 2e-2, f"d{name}")


@pytest.mark.parametrize("intra", INTRA)
def test_strong_decay_is_stable(intra):
    """delta * |A| far beyond what a chunk-level exp(-cumsum) formulation could represent in fp32."""
    inputs = make_inputs(300, dt_scale=6.0, a_max=16.0, seed=3)
    chunk = 256
    worst = float((inputs["A"].abs().max() * inputs["delta"][..., :chunk].sum(-1)).max())
    assert worst > 88.0 * 10  # exp(worst) overflows fp32 by a wide margin
    grad_out = torch.randn(2, 6, 300, generator=torch.Generator().manual_seed(4))
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out)
    out, grads = run(selective_scan_chunked, inputs, torch.float32, grad_out, chunk_size=chunk, intra=intra)
    assert torch.isfinite(out).all()
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for name in NAMES:
        assert torch.isfinite(grads[name]).all(), name
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, f"d{name}")


def test_default_chunk_size_is_bounded():
    assert default_chunk_size(1, 512, 16) == 64
    assert default_chunk_size(1, 4, 2) == 256
    assert default_chunk_size(64, 4096, 16) == 16
    # parallel: largest power of two with T * B * Dm * N <= 2^24, within [16, 4096]
    assert default_parallel_chunk_size(1, 512, 16) == 2048
    assert default_parallel_chunk_size(2, 512, 16) == 1024
    assert default_parallel_chunk_size(1, 4, 2) == 4096
    assert default_parallel_chunk_size(64, 4096, 16) == 16


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 32, 128])
def test_blelloch_scan_matches_loop(rows, reverse):
    """The in-place log-depth scans equal the step-by-step recurrence, forward and reversed."""
    g = torch.Generator().manual_seed(rows)
    a = torch.rand(rows, 5, generator=g, dtype=torch.float64)
    b = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    expected = b.clone()
    steps = range(rows - 2, -1, -1) if reverse else range(1, rows)
    for t in steps:
        expected[t] += a[t] * expected[t + 1 if reverse else t - 1]
    x, a_before = b.clone(), a.clone()
    dec = block_products(a, torch.empty(rows, 5, dtype=torch.float64))
    (scan_reverse_ if reverse else scan_forward_)(x, dec)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(a, a_before)  # the decays are kept (backward reuses them)
    for k, d in enumerate(dec):  # block products over 2^k steps
        torch.testing.assert_close(d, a.view(rows >> k, 1 << k, 5).prod(1))


def test_parallel_matches_seq_at_default_chunks():
    """Both modes at their own default chunk sizes (64 vs 4096 here) on a wider problem."""
    inputs = make_inputs(1500, batch=2, dim=16, n=8, seed=5, dt_scale=0.2)
    grad_out = torch.randn(2, 16, 1500, generator=torch.Generator().manual_seed(6))
    out_s, grads_s = run(selective_scan_chunked, inputs, torch.float32, grad_out, delta_softplus=True, intra="seq")
    out_p, grads_p = run(selective_scan_chunked, inputs, torch.float32, grad_out, delta_softplus=True,
                         intra="parallel")
    assert_close_scaled(out_p, out_s, 1e-4, "out")
    for name in NAMES:
        assert_close_scaled(grads_p[name], grads_s[name], 1e-4, f"d{name}")


@pytest.mark.parametrize("intra", INTRA)
def test_inference_matches_training_forward(intra):
    inputs = make_inputs(200, seed=7)
    with torch.no_grad():
        inference = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=48, intra=intra)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    training = selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=48, intra=intra)
    assert training.grad_fn is not None
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("intra", INTRA)
def test_training_memory_is_linear_in_length(intra):
    """Saved tensors never hold a (B, Dm, L, N)-sized activation; only inputs and chunk states."""
    batch, dim, n, length = 1, 64, 16, 16384
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g, requires_grad=True)
    delta = torch.rand(batch, dim, length, generator=g, requires_grad=True)
    A = (-torch.rand(dim, n, generator=g)).requires_grad_()
    B = torch.randn(batch, n, length, generator=g, requires_grad=True)
    C = torch.randn(batch, n, length, generator=g, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan_chunked(u, delta, A, B, C, delta_softplus=True, intra=intra)
    full = batch * dim * length * n
    assert out.shape == (batch, dim, length) and out.grad_fn is not None
    assert saved and max(saved) < full / 4
    assert sum(saved) < full / 2


@pytest.mark.parametrize("path", ["ref", "chunked"])
def test_env_var_forces_path(monkeypatch, path):
    calls = []
    for name in ("ref", "chunked"):
        real = getattr(scan_mod, f"selective_scan_{name}")
        monkeypatch.setattr(scan_mod, f"selective_scan_{name}",
                            lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("MEDFUSE_SCAN", path)
    inputs = make_inputs(5)
    out = selective_scan(**inputs, delta_softplus=True)
    assert calls == [path]
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), rtol=1e-5, atol=1e-6)


def test_default_path_on_cpu_is_chunked(monkeypatch):
    monkeypatch.delenv("MEDFUSE_SCAN", raising=False)
    assert resolve_path("cpu") == "chunked"
    assert resolve_path("cpu", "ref") == "ref"


def test_intra_mode_defaults_by_device_and_env(monkeypatch):
    monkeypatch.delenv("MEDFUSE_SCAN_INTRA", raising=False)
    assert resolve_intra("cpu") == "seq"
    assert resolve_intra("cuda") == "parallel"  # the GPU default, decided from the device alone
    assert resolve_intra("cuda", "seq") == "seq"
    monkeypatch.setenv("MEDFUSE_SCAN_INTRA", "parallel")
    assert resolve_intra("cpu") == "parallel"
    assert resolve_intra("cpu", "auto") == "seq"  # the argument wins over the variable
    monkeypatch.setenv("MEDFUSE_SCAN_INTRA", "Seq ")
    assert resolve_intra("cuda") == "seq"
    monkeypatch.setenv("MEDFUSE_SCAN_INTRA", "blelloch")
    with pytest.raises(ConfigError, match="MEDFUSE_SCAN_INTRA"):
        selective_scan(**make_inputs(3))
    with pytest.raises(ValueError, match="intra-chunk"):
        selective_scan_chunked(**make_inputs(3), intra="tree")


@pytest.mark.parametrize("intra", INTRA)
def test_intra_env_var_reaches_the_dispatcher(monkeypatch, intra):
    """``MEDFUSE_SCAN_INTRA`` picks the intra-chunk mode under ``selective_scan``, and a Bi-Mamba block
    gives the same outputs and parameter gradients either way."""
    calls = []
    real = chunked_mod.scan_parallel_time_major
    monkeypatch.setattr(chunked_mod, "scan_parallel_time_major", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("MEDFUSE_SCAN", raising=False)
    monkeypatch.setenv("MEDFUSE_SCAN_INTRA", "seq")
    torch.manual_seed(0)
    block = BiMamba(16, d_state=4)
    x = torch.randn(2, 150, 16)
    expected = block(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), list(block.parameters()))
    assert calls == []
    monkeypatch.setenv("MEDFUSE_SCAN_INTRA", intra)
    out = block(x)
    grads = torch.autograd.grad(out.pow(2).sum(), list(block.parameters()))
    assert len(calls) == (2 if intra == "parallel" else 0)  # forward and backward branch
    assert_close_scaled(out, expected, 1e-4, "out")
    for (name, _), g, e in zip(block.named_parameters(), grads, expected_grads, strict=True):
        assert_close_scaled(g, e, 1e-4, name)


def test_cuda_forced_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else CPU tensors may take the Triton path
    monkeypatch.setattr(scan_mod, "_load_triton", lambda: (None, "not wanted here"))
    monkeypatch.setenv("MEDFUSE_SCAN", "cuda")
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    inputs = make_inputs(11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = selective_scan(**inputs, delta_softplus=True)
        out2 = selective_scan(**inputs, delta_softplus=True)
    fallback = [w for w in caught if issubclass(w.category, ScanFallbackWarning)]
    assert len(fallback) == 1
    assert "chunked" in str(fallback[0].message)
    expected = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)


def test_bad_env_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("MEDFUSE_SCAN", "fast")
    with pytest.raises(ConfigError, match="MEDFUSE_SCAN"):
        selective_scan(**make_inputs(3))


def test_bad_path_argument_raises():
    with pytest.raises(ValueError, match="unknown scan path"):
        selective_scan(**make_inputs(3), path="fast")


def test_available_paths():
    paths = available_paths()
    assert paths[:2] == ["ref", "chunked"]
    assert ("cuda" in paths) == (torch.cuda.is_available() and scan_mod.cuda_scan_importable())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert ("triton" in paths) == (scan_mod.triton_scan_unavailable_reason(device) == "")


def test_importing_ssm_does_not_import_mamba_ssm():
    code = ("import sys, medfuse.ssm as s; s.available_paths(); s.resolve_path('cpu'); "
            "print('mamba_ssm' in sys.modules, 'triton' in sys.modules and not s.scan.torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False False"  # nor Triton on a CPU-only machine


def test_shape_errors_are_clear():
    inputs = make_inputs(5)
    inputs["B"] = inputs["B"][:, :, :4]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_chunked(**inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_agree(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    inputs = {k: v.cuda() for k, v in make_inputs(1000, batch=2, dim=64, n=16, dt_scale=0.1).items()}
    inputs = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    grad_out = torch.randn(2, 64, 1000, device="cuda")
    ref_out, ref_grads = run(selective_scan_ref, inputs, torch.float64, grad_out, delta_softplus=True)
    rtol = 1e-3 if dtype == torch.float32 else 3e-2
    for intra in ("auto", "seq"):  # auto is the parallel path on CUDA
        chunk_out, chunk_grads = run(selective_scan_chunked, inputs, dtype, grad_out, delta_softplus=True,
                                     intra=intra)
        assert_close_scaled(chunk_out, ref_out, rtol, f"chunked {intra} out")
        for name in NAMES:
            assert_close_scaled(chunk_grads[name], ref_grads[name], rtol, f"chunked {intra} d{name}")
    if "cuda" not in available_paths():
        pytest.skip("mamba-ssm not importable")
    cuda_out = selective_scan(**{k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v
                                 for k, v in inputs.items()}, delta_softplus=True, path="cuda")
    assert_close_scaled(cuda_out, ref_out, rtol, "cuda out")
    assert math.isfinite(float(cuda_out.float().abs().sum()))
