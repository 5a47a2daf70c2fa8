"""Chunked selective scan in pure PyTorch: the default path on CPU and GPU (seed 000, Bi-Mamba).

The sequence is cut into chunks of ``chunk_size`` steps. For one chunk, every per-element quantity
is built with large vectorised ops on a (T, B, Dm, N) tile, in time-major layout:

    a_t = exp(delta_t * A)          one multiply and one exp2 pass over the tile
    b_t = delta_t * u_t * B_t       one multiply pass
    h_t = a_t * h_{t-1} + b_t       T in-place ``addcmul_`` calls, each on a contiguous (B, Dm, N) slice
    y_t = <h_t, C_t>                one batched matrix-vector product

and the state h (B, Dm, N) is carried from chunk to chunk.

Why this form and not a log-space cumsum: ``h_t = exp(S_t) * cumsum(exp(-S_s) b_s)`` overflows as
soon as ``|A| * sum(delta)`` over a chunk passes ~88 (common: A = -16, delta = 0.1, 64 steps), and
``torch.cumsum`` is slower on CPU than the recurrence. The recurrence only multiplies by decays in
[0, 1] (delta >= 0, A <= 0), so it cannot overflow, and each step is one fused kernel on data that
sits in cache. A Hillis-Steele or Blelloch scan over the tile would be stable too but costs
log2(T) or 2x more passes over memory; the sequential steps cost about as much as one such pass.

Memory: the forward pass holds two (T, B, Dm, N) tiles (backward: four), never (B, Dm, L, N). For
training, the autograd Function stores only its inputs and the state entering each chunk,
(L / T, B, Dm, N); backward walks the chunks in reverse, recomputes the states of one chunk and
runs the adjoint recurrence ``g_t = C_t * dy_t + a_{t+1} * g_{t+1}`` on the same tile, carrying
``a_{t+1} g_{t+1}`` across chunk boundaries. Training memory is therefore O(L * Dm) plus
O(L * Dm * N / T) (a quarter of L * Dm at the default chunk of 64 and N = 16).

Intra-chunk mode: that sequential loop is the fastest form on CPU, but on a GPU each step is a tiny
kernel and the scan is launch-bound (L kernels forward, 2 L backward). :mod:`.scan_parallel` keeps
the same chunking, carry and recomputation but scans each chunk with a log-depth Blelloch scan
(~3 log2(T) large kernels per chunk, chunks of up to 4096 steps). ``intra="seq"`` or ``"parallel"``
(or the ``MEDFUSE_SCAN_INTRA`` environment variable) forces one; the default (``auto``) is
``parallel`` for CUDA tensors and ``seq`` otherwise.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from medfuse.errors import ConfigError
from medfuse.ssm.scan_parallel import default_parallel_chunk_size, scan_parallel_time_major

INTRA_ENV_VAR = "MEDFUSE_SCAN_INTRA"
INTRA_MODES = ("seq", "parallel")

# Elements of one (T, B, Dm, N) tile the default chunk size aims for (2 MB in fp32): large enough
# to amortise Python overhead on the vectorised passes, small enough that the few live tiles stay
# in the L2/L3 cache of a small CPU.
_TILE_ELEMENTS = 1 << 19
_MIN_CHUNK, _MAX_CHUNK = 16, 256
_LOG2E = math.log2(math.e)


def default_chunk_size(batch: int, dim: int, d_state: int) -> int:
    """Chunk length used when none is given: a power of two in [16, 256] sized to the tile budget."""
    per_step = max(1, batch * dim * d_state)
    target = max(1, _TILE_ELEMENTS // per_step)
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, 1 << (target.bit_length() - 1))))


def resolve_intra(device: torch.device | str, intra: str | None = None) -> str:
    """Intra-chunk mode for tensors on ``device``: ``seq`` or ``parallel``.

    Args:
        device: where the scan's tensors live.
        intra: ``seq``, ``parallel`` or ``auto``; ``None`` reads ``MEDFUSE_SCAN_INTRA`` (unset: ``auto``).
            ``auto`` is ``parallel`` on CUDA and ``seq`` elsewhere.

    Raises:
        ConfigError: ``MEDFUSE_SCAN_INTRA`` holds an unknown value.
        ValueError: ``intra`` is not a known mode.
    """
    if intra is None:
        want = os.environ.get(INTRA_ENV_VAR, "").strip().lower() or "auto"
        if want not in (*INTRA_MODES, "auto"):
            raise ConfigError(INTRA_ENV_VAR, f"unknown intra-chunk scan mode {want!r}",
                              f"set {INTRA_ENV_VAR} to seq, parallel or auto, or unset it")
    elif intra in (*INTRA_MODES, "auto"):
        want = intra
    else:
        raise ValueError(f"unknown intra-chunk scan mode {intra!r}; expected seq, parallel or auto")
    if want == "auto":
        return "parallel" if torch.device(device).type == "cuda" else "seq"
    return want


def _step_sizes(delta_c: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """delta for one chunk after bias and softplus, (T, B, Dm)."""
    dt = delta_c if delta_bias is None else delta_c + delta_bias
    return F.softplus(dt) if softplus else dt


def _chunk_states(dt: Tensor, x: Tensor, A2: Tensor, Bc: Tensor, h0: Tensor, a: Tensor, hs: Tensor,
                  a_steps: tuple[Tensor, ...], h_steps: tuple[Tensor, ...]) -> None:
    """Fill ``a`` with the decays and ``hs`` with the states of one chunk (in place).

    Args:
        dt: step sizes, (T, B, Dm).
        x: ``dt * u``, (T, B, Dm).
        A2: ``A * log2(e)``, (Dm, N): ``exp2`` is about twice as fast as ``exp`` on CPU.
        Bc: (T, B, N).
        h0: state before the chunk, (B, Dm, N).
        a: output buffer for ``exp(dt * A)``, (T, B, Dm, N).
        hs: output buffer for the states h_t, (T, B, Dm, N).
        a_steps: ``a.unbind(0)`` of the whole tile buffer, made once per call rather than per chunk
            (creating the per-step views costs about as much as the steps themselves).
        h_steps: ``hs.unbind(0)`` likewise.
    """
    T = a.shape[0]
    torch.mul(dt.unsqueeze(-1), A2, out=a)
    torch.exp2(a, out=a)
    torch.mul(x.unsqueeze(-1), Bc.unsqueeze(2), out=hs)  # b_t, overwritten by h_t below
    hs[0].addcmul_(a[0], h0)
    # The sequential part: one fused kernel per step on a contiguous (B, Dm, N) slice.
    for h_prev, h_t, a_t in zip(h_steps[: T - 1], h_steps[1:T], a_steps[1:T], strict=True):
        h_t.addcmul_(a_t, h_prev)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int, keep_states: bool):
    """Forward over all chunks on time-major tensors; returns (out (L, B, Dm), chunk_h0 or None).

    ``chunk_h0`` (n_chunks, B, Dm, N) holds the state entering each chunk, kept for backward.
    """
    with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
        length, batch, dim = u.shape
        n_state = A.shape[1]
        n_chunks = math.ceil(length / chunk)
        tile = min(chunk, length)
        a = u.new_empty(tile, batch, dim, n_state)
        hs = u.new_empty(tile, batch, dim, n_state)
        h = u.new_zeros(batch, dim, n_state)
        out = u.new_empty(length, batch, dim)
        A2 = A * _LOG2E
        chunk_h0 = u.new_empty(n_chunks, batch, dim, n_state) if keep_states else None
        a_steps, h_steps = a.unbind(0), hs.unbind(0)
        for c in range(n_chunks):
            s, e = c * chunk, min(length, (c + 1) * chunk)
            T = e - s
            if chunk_h0 is not None:
                chunk_h0[c] = h
            uc = u[s:e]
            dt = _step_sizes(delta[s:e], delta_bias, softplus)
            _chunk_states(dt, dt * uc, A2, B[s:e], h, a[:T], hs[:T], a_steps, h_steps)
            y = out[s:e]  # written in place: y_t = <h_t, C_t>
            torch.matmul(hs[:T].view(T * batch, dim, n_state), C[s:e].reshape(T * batch, n_state, 1),
                         out=y.view(T * batch, dim, 1))
            if D is not None:
                y.addcmul_(uc, D)
            if z is not None:
                y.mul_(F.silu(z[s:e]))
            h.copy_(hs[T - 1])
        return out, chunk_h0


class _ChunkedScan(torch.autograd.Function):
    """Selective scan with chunk-wise recomputation in backward.

    Works on time-major tensors: u, delta, z (L, B, Dm); B, C (L, B, N); A (Dm, N); D, delta_bias
    (Dm,). All share one float dtype. Returns (L, B, Dm).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int):
        out, chunk_h0 = _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, keep_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_h0)
        ctx.softplus, ctx.chunk = softplus, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, chunk_h0 = ctx.saved_tensors
        softplus, chunk = ctx.softplus, ctx.chunk
        with torch.autocast(u.device.type, enabled=False):
            length, batch, dim = u.shape
            n_state = A.shape[1]
            tile = min(chunk, length)
            a = u.new_empty(tile, batch, dim, n_state)
            hs = u.new_empty(tile, batch, dim, n_state)
            g = u.new_empty(tile, batch, dim, n_state)
            du = u.new_empty(length, batch, dim)
            ddelta = u.new_empty(length, batch, dim)
            dB = u.new_empty(length, batch, n_state)
            dC = u.new_empty(length, batch, n_state)
            dz = u.new_empty(length, batch, dim) if z is not None else None
            dA_acc = u.new_zeros(tile, batch, dim, n_state)  # summed over (t, b) once at the end
            a_steps, h_steps, g_steps = a.unbind(0), hs.unbind(0), g.unbind(0)
            dD = torch.zeros_like(D) if D is not None else None
            dbias = torch.zeros_like(delta_bias) if delta_bias is not None else None
            carry = u.new_zeros(batch, dim, n_state)  # a_{t+1} * g_{t+1} entering the chunk from the right
            A2 = A * _LOG2E
            ones_n = A.new_ones(n_state)
            for c in reversed(range(chunk_h0.shape[0])):
                s, e = c * chunk, min(length, (c + 1) * chunk)
                T = e - s
                a_c, h_c, g_c = a[:T], hs[:T], g[:T]
                uc, dy, Bc, Cc, delta_c = u[s:e], dout[s:e], B[s:e], C[s:e], delta[s:e]
                dt = _step_sizes(delta_c, delta_bias, softplus)
                x = dt * uc
                h0 = chunk_h0[c]
                _chunk_states(dt, x, A2, Bc, h0, a_c, h_c, a_steps, h_steps)
                if z is not None:
                    zc = z[s:e]
                    y = torch.einsum("tbdn,tbn->tbd", h_c, Cc)
                    if D is not None:
                        y.addcmul_(uc, D)
                    sig = torch.sigmoid(zc)
                    dz[s:e] = dy * y * sig * (1 + zc * (1 - sig))
                    dy = dy * (zc * sig)
                if D is not None:
                    dD += (dy * uc).sum((0, 1))
                # Adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}, run backwards in place.
                torch.mul(dy.unsqueeze(-1), Cc.unsqueeze(2), out=g_c)
                g_c[T - 1].add_(carry)
                for g_t, g_next, a_next in zip(g_steps[: T - 1][::-1], g_steps[1:T][::-1], a_steps[1:T][::-1],
                                               strict=True):
                    g_t.addcmul_(a_next, g_next)
                torch.mul(a_c[0], g_c[0], out=carry)
                dC[s:e] = torch.einsum("tbdn,tbd->tbn", h_c, dy)
                dB[s:e] = torch.einsum("tbdn,tbd->tbn", g_c, x)
                dx = torch.einsum("tbdn,tbn->tbd", g_c, Bc)
                # q = dL/d(dt * A) = g_t * a_t * h_{t-1}, built in the decay buffer.
                q = a_c.mul_(g_c)
                q[1:].mul_(h_c[: T - 1])
                q[0].mul_(h0)
                dA_acc[:T].addcmul_(q, dt.unsqueeze(-1))
                ddt = (torch.mul(q, A, out=g_c).view(-1, n_state) @ ones_n).view(T, batch, dim)  # mv: sum over N
                ddt.addcmul_(dx, uc)
                du_c = dx.mul_(dt)
                if D is not None:
                    du_c.addcmul_(dy, D)
                du[s:e] = du_c
                if softplus:
                    pre = delta_c if delta_bias is None else delta_c + delta_bias
                    ddt.mul_(torch.sigmoid(pre))
                if dbias is not None:
                    dbias += ddt.sum((0, 1))
                ddelta[s:e] = ddt
            dA = dA_acc.view(-1, dim * n_state).sum(0).view_as(A)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
    intra: str | None = None,
) -> Tensor:
    """Selective scan, chunked over time, differentiable with O(L * Dm) training memory.

    Same semantics as :func:`medfuse.ssm.scan_ref.selective_scan_ref`.

    Args:
        u: input, (B, Dm, L).
        delta: step sizes before bias/softplus, (B, Dm, L).
        A: (Dm, N), normally negative.
        B: (B, N, L).
        C: (B, N, L).
        D: skip connection, (Dm,).
        z: gate, (B, Dm, L).
        delta_bias: (Dm,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk_size: steps per chunk; default :func:`default_chunk_size` for ``seq`` and
            :func:`~medfuse.ssm.scan_parallel.default_parallel_chunk_size` for ``parallel``.
        intra: scan inside a chunk: ``seq`` (step loop, best on CPU), ``parallel`` (log-depth scan,
            best on GPU) or ``auto``; ``None`` reads ``MEDFUSE_SCAN_INTRA`` (see :func:`resolve_intra`).

    Returns:
        (B, Dm, L) in ``u``'s dtype, computed in fp32 (fp64 for fp64 inputs). The result may be a
        non-contiguous view.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, Dm, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (Dm={dim}, N); got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, n_state, length):
            raise ValueError(f"{name} must be (B, N, L) = {(batch, n_state, length)}; got {tuple(t.shape)}")
    if length == 0:
        return u.new_zeros(u.shape)
    mode = resolve_intra(u.device, intra)
    default = default_parallel_chunk_size if mode == "parallel" else default_chunk_size
    chunk = int(chunk_size) if chunk_size else default(batch, dim, n_state)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")

    # fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (gradcheck).
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(compute)

    def time_major(t: Tensor | None) -> Tensor | None:
        # (B, X, L) -> (L, B, X) view. Per-chunk ops only need the last axis contiguous, which holds
        # when the memory is (B, L, X), as the Mamba blocks pass it (even for slices such as the z
        # half of in_proj's output): no copy. Otherwise one copy here beats strided reads later.
        if t is None:
            return None
        t = t.to(compute).permute(2, 0, 1)
        return t if t.stride(-1) == 1 else t.contiguous()

    args = (time_major(u), time_major(delta), cast(A), time_major(B), time_major(C), cast(D), time_major(z),
            cast(delta_bias), bool(delta_softplus), chunk)
    if mode == "parallel":
        return scan_parallel_time_major(*args).permute(1, 2, 0).to(u.dtype)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        out = _ChunkedScan.apply(*args)  # (L, B, Dm)
    else:  # inference: no autograd Function, no per-chunk states kept
        out = _scan_forward(*args, keep_states=False)[0]
    return out.permute(1, 2, 0).to(u.dtype)
