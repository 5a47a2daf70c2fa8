"""Triton selective scan, forward and backward: the CUDA path when Triton imports (seed 000, Bi-Mamba).

Same recurrence and signature as :mod:`.scan_ref`::

    delta_t = softplus(delta_t + delta_bias)                        (each step optional)
    h_t     = exp(delta_t A) h_{t-1} + delta_t u_t B_t              h: (B, Dm, N), fp32
    y_t     = <h_t, C_t> + D u_t,   out_t = y_t silu(z_t)           (D and z optional)

Kernel layout (the ``@triton.jit`` kernels live in :mod:`.scan_triton_kernels`; this module is the
host side). One program owns one batch element and ``BLOCK_D`` channels (all N states of them)
and walks the sequence in chunks of ``CHUNK`` steps, carrying the state h (BLOCK_D, N) in registers
from chunk to chunk. A chunk is one (BLOCK_D, N, CHUNK) register tile: the decays
``a = exp(delta A)`` and inputs ``b = delta u B`` are built in place and the recurrence
``h_t = a_t h_{t-1} + b_t`` is solved with ``tl.associative_scan`` over the affine maps
``x -> a x + b`` (log-depth), plus the carried state times the running decay product.
Nothing of size (B, Dm, L, N) ever reaches memory. Inputs may have any strides (the Mamba block
passes (B, L, E) memory seen as (B, E, L)); u, delta, B, C and z may be fp32, bf16 or fp16 and are
read as fp32; A, D and delta_bias are read as fp32; the state and every sum are fp32.

``intra="seq"`` swaps the in-chunk associative scan for a plain step loop in the forward kernel
(one (BLOCK_D, N) update per step, every load one time step wide). Both are kept so that the GPU
benchmark can time them against each other (``MEDFUSE_SCAN_INTRA=seq|parallel``; default
``parallel``). The backward kernel always uses the associative scan.

Backward (custom autograd Function). The forward saves only its inputs and the state entering each
chunk, (B, L / CHUNK, Dm, N) fp32: training memory stays O(L Dm) (a quarter of L Dm at CHUNK 64,
N 16). The backward kernel walks the chunks in reverse, recomputes one chunk's states from the
saved entry state, and solves the adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` (g = dL/dh) with a
reverse associative scan, carrying ``a g`` of the chunk's first step into the previous chunk.
``a_{t+1}`` is rebuilt from delta at t + 1 (a shifted load) rather than shifted in registers. With
``q_t = g_t a_t h_{t-1} = g_t (h_t - b_t)``:

    dC_t = sum_d h_t dy_t            dB_t = sum_d g_t delta_t u_t          (atomic adds over d-blocks)
    du_t = delta_t sum_n g_t B_t + D dy_t
    ddelta_t = (sum_n q_t A + u_t sum_n g_t B_t) * sigmoid(pre_t)           (sigmoid only with softplus)
    dA = sum_{b,t} q_t delta_t,  dD = sum_{b,t} dy_t u_t,  ddelta_bias = sum_{b,t} ddelta_t

dA, dD and ddelta_bias are summed per program in registers and over the batch on the host, so they
are deterministic; dB and dC (shared by all channels) use fp32 atomic adds.

CPU: with ``TRITON_INTERPRET=1`` set before this module is imported, Triton's interpreter runs the
same kernels on CPU tensors (slowly): that is how the parity tests check them without a GPU.

Status: written and checked in the interpreter only; not yet compiled or timed on a GPU. The
launch defaults (:func:`default_config`) are a first guess to be replaced by the measurements of
``python bench/bench_gpu.py --sections sweep`` (docs/benchmarks_gpu.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from medfuse.ssm.scan_triton_kernels import _bwd_kernel, _fwd_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEFAULT_CHUNK = 64
_TILE_TARGET = 2048  # elements of one (BLOCK_D, BLOCK_N, CHUNK) tile: 16 fp32 registers a thread at 4 warps
_MAX_BLOCK_D = 16


def interpreter_active() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when it was first imported: Triton decides at decoration time)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class TritonScanConfig:
    """Launch shape: ``chunk`` steps per tile, ``block_d`` channels and ``block_n`` states per program."""

    chunk: int
    block_d: int
    block_n: int
    num_warps: int
    seq: bool = False


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def default_config(batch: int, dim: int, d_state: int, length: int, device: torch.device | str = "cuda",
                   chunk_size: int | None = None, block_d: int | None = None, num_warps: int | None = None,
                   seq: bool = False) -> TritonScanConfig:
    """Launch shape for a problem; any of ``chunk_size``, ``block_d``, ``num_warps`` overrides the rule.

    Rule: a chunk of 64 steps (at most the next power of two >= L, at least 2); ``block_d`` the
    largest power of two (<= 16) keeping the tile near 2048 elements, then halved while there are
    fewer than two programs per SM (Bi-Mamba at batch 1 has few channels and a long L: parallelism
    comes from channels only). ``chunk_size`` is rounded up to a power of two.
    """
    device = torch.device(device)
    block_n = max(2, _pow2_at_least(d_state))
    chunk = _pow2_at_least(chunk_size) if chunk_size else min(_DEFAULT_CHUNK, _pow2_at_least(length))
    chunk = max(2, chunk)
    if block_d is None:
        bd = max(1, _TILE_TARGET // (block_n * chunk))
        bd = min(_MAX_BLOCK_D, 1 << (bd.bit_length() - 1), _pow2_at_least(dim))
        target = 2 * _sm_count(device)
        while bd > 1 and batch * math.ceil(dim / bd) < target:
            bd //= 2
        block_d = bd
    elif block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two >= 1; got {block_d}")
    if num_warps is None:
        num_warps = 4 if block_d * block_n * chunk >= 1024 else 2
    return TritonScanConfig(chunk=chunk, block_d=block_d, block_n=block_n, num_warps=num_warps, seq=seq)


def _strides3(t: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())  # type: ignore[return-value]


def _like_blc(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty (B, X, L) tensor: contiguous when ``t`` is, else in (B, L, X) memory (the Mamba block's)."""
    dtype = dtype or t.dtype
    if t.is_contiguous():
        return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    b, x, n = t.shape
    return t.new_empty(b, n, x, dtype=dtype).transpose(1, 2)


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, cfg: TritonScanConfig,
             save_states: bool) -> tuple[Tensor, Tensor | None]:
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = math.ceil(length / cfg.chunk)
    out = u.new_empty(batch, length, dim).transpose(1, 2)  # (B, Dm, L) view of (B, L, Dm) memory
    hs = u.new_empty(batch, n_chunks, dim, n_state, dtype=torch.float32) if save_states else None
    grid = (batch, triton.cdiv(dim, cfg.block_d))
    _fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, out, hs if hs is not None else A,
        length, dim, n_state,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        SAVE_STATES=save_states, SEQ=cfg.seq,
        BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.num_warps,
    )
    return out, hs


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, hs, softplus: bool, cfg: TritonScanConfig):
    batch, dim, length = u.shape
    n_state = A.shape[1]
    f32 = torch.float32
    du, ddelta = _like_blc(u), _like_blc(delta)
    dz = _like_blc(z) if z is not None else None
    dB = u.new_zeros(batch, n_state, length, dtype=f32)
    dC = u.new_zeros(batch, n_state, length, dtype=f32)
    dA = u.new_empty(batch, dim, n_state, dtype=f32)
    dD = u.new_empty(batch, dim, dtype=f32) if D is not None else None
    dbias = u.new_empty(batch, dim, dtype=f32) if delta_bias is not None else None
    grid = (batch, triton.cdiv(dim, cfg.block_d))
    _bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, dout, hs,
        du, ddelta, dz if dz is not None else du, dB, dC, dA, dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        length, dim, n_state,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z), *dout.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.num_warps,
    )
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if dD is None else dD.sum(0).to(D.dtype), dz,
            None if dbias is None else dbias.sum(0).to(delta_bias.dtype))


def _chunked_grads(dout, inputs, softplus: bool):
    """Gradients by the pure-PyTorch chunked path (the fallback when a Triton backward fails)."""
    from medfuse.ssm.scan_chunked import selective_scan_chunked

    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        out = selective_scan_chunked(*leaves, delta_softplus=softplus)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, dout))
    return tuple(None if t is None else next(grads) for t in leaves)


class _TritonScan(torch.autograd.Function):
    """Selective scan with Triton kernels; backward recomputes chunk states from the saved entries."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, cfg: TritonScanConfig,
                on_error: Callable[[BaseException], None] | None):
        out, hs = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, cfg, save_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
        ctx.softplus, ctx.cfg, ctx.on_error = softplus, cfg, on_error
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
        try:
            grads = _backward(dout, u, delta, A, B, C, D, z, delta_bias, hs, ctx.softplus, ctx.cfg)
        except Exception as exc:  # a kernel that fails to compile or launch here: answer by the chunked path
            if ctx.on_error is None or isinstance(exc, torch.OutOfMemoryError):
                raise
            ctx.on_error(exc)
            grads = _chunked_grads(dout, (u, delta, A, B, C, D, z, delta_bias), ctx.softplus)
        return (*grads, None, None, None)


def triton_unavailable_reason(device: torch.device | str) -> str:
    """Why the Triton kernels cannot run for tensors on ``device`` (``""`` when they can)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "" if torch.cuda.is_available() else "CUDA is not available"
    if interpreter_active():
        return ""
    return (f"tensors are on {device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 set before "
            "medfuse.ssm.scan_triton is first imported, to run them slowly in Triton's CPU interpreter)")


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk_size: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    intra: str | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> Tensor:
    """Selective scan with Triton kernels; same semantics as :func:`medfuse.ssm.scan_ref.selective_scan_ref`.

    Args:
        u: input, (B, Dm, L), fp32/bf16/fp16, any strides.
        delta: step sizes before bias/softplus, (B, Dm, L).
        A: (Dm, N), normally negative.
        B: (B, N, L).
        C: (B, N, L).
        D: skip connection, (Dm,).
        z: gate, (B, Dm, L).
        delta_bias: (Dm,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk_size: steps per tile (rounded up to a power of two); default 64.
        block_d: channels per program (a power of two); default from :func:`default_config`.
        num_warps: Triton warps per program.
        intra: ``parallel`` (associative scan in a chunk, the default) or ``seq`` (step loop, forward
            only; the backward always scans); ``None`` reads ``MEDFUSE_SCAN_INTRA``; ``auto`` is parallel.
        on_error: called with the exception when the backward kernel fails; the gradients then come
            from the chunked path. ``None``: the exception propagates.

    Returns:
        (B, Dm, L) in ``u``'s dtype (a view of (B, L, Dm) memory). Differentiable.

    Raises:
        ValueError: bad shapes, or a dtype the kernels do not take (fp64: use the chunked path).
        RuntimeError: the tensors' device cannot run Triton kernels (see :func:`triton_unavailable_reason`).
    """
    from medfuse.ssm.scan_chunked import resolve_intra

    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, Dm, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (Dm={dim}, N); got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, n_state, length):
            raise ValueError(f"{name} must be (B, N, L) = {(batch, n_state, length)}; got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be (B, Dm, L) = {tuple(u.shape)}; got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be (Dm,) = ({dim},); got {tuple(t.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in SUPPORTED_DTYPES})
    if bad:
        raise ValueError(f"the Triton scan takes fp32, bf16 or fp16 tensors; got {', '.join(bad)} "
                         "(use the chunked path for fp64)")
    reason = triton_unavailable_reason(u.device)
    if reason:
        raise RuntimeError(f"Triton selective scan unavailable: {reason}")
    if length == 0:
        return u.new_zeros(u.shape)
    seq = resolve_intra("cuda", intra) == "seq"  # auto: the associative scan on any device
    cfg = default_config(batch, dim, n_state, length, u.device, chunk_size, block_d, num_warps, seq)
    A = A.float()  # (Dm, N) only: cheap, and the kernel reads it as fp32 anyway
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), cfg, on_error)
    return _forward(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), cfg, save_states=False)[0]


__all__ = ["SUPPORTED_DTYPES", "TritonScanConfig", "default_config", "interpreter_active", "selective_scan_triton",
           "triton_unavailable_reason"]

