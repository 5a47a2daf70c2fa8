"""Chunked selective scan with a log-depth parallel scan inside each chunk: the GPU path (seed 000, Bi-Mamba).

Same recurrence as :mod:`.scan_ref` (``h_t = a_t h_{t-1} + b_t`` with ``a_t = exp(delta_t A)`` and
``b_t = delta_t u_t B_t``, ``y_t = <h_t, C_t>``), cut into chunks of T steps like :mod:`.scan_chunked`;
the state h (B, Dm, N) is carried from chunk to chunk. Inside a chunk the sequential loop of T tiny
kernels is replaced by a work-efficient Blelloch scan on the (P, B*Dm*N) tile (P = T rounded up to a
power of two, padded with ``a = b = 0``), written as in-place ``addcmul_`` calls on strided views:

    block products   d_k = prod of a over aligned blocks of 2^k steps      log2(P) - 1 kernels
    up-sweep         x[i] += d_k[block] * x[i - 2^k]                      log2(P) kernels
    down-sweep       x[i] += d_k[block] * x[i - 2^k]  (remaining i)       log2(P) - 1 kernels

so one chunk costs ~3 log2(P) + 10 large kernels instead of T small ones (CUDA is launch-bound
on the sequential form). Only decays a in [0, 1] and their products are multiplied: nothing can
overflow, unlike ``exp(S_t) * cumsum(exp(-S_s) b_s)``, and no (T, T) decay matrix is built.

Backward (custom autograd Function, like :mod:`.scan_chunked`): walk the chunks in reverse, recompute
one chunk's states from the saved chunk-entry state, and run the adjoint as a *reverse* Blelloch scan
over ``p_t = a_t g_t`` (``g_t = dL/dh_t``):

    p_t = a_t p_{t+1} + a_t C_t dy_t        (p_T = p of the next chunk's first step: the carry)
    g_t = C_t dy_t + p_{t+1},   q_t = dL/d(delta_t A) = p_t h_{t-1}

It uses the same decays a_t and hence reuses the block products of the recomputation. Gradients
of u, delta, B, C, D, z, delta_bias and A follow from g, q and h with batched matmuls.

Chunk size rule: the largest power of two T in [16, 4096] with T * B * Dm * N <= 2^24 (a 64 MB fp32
tile; never beyond the next power of two >= L). Backward keeps four such tiles live (decays,
states, adjoint, block products), so the working set is at most ~256 MB whatever L is: e.g. T = 2048
for the Bi-Mamba block of the benchmark (B = 1, Dm = 512, N = 16). Training memory is O(L * Dm)
(inputs and gradients) plus the chunk-entry states (L / T, B, Dm, N) plus that working set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_TILE_ELEMENTS = 1 << 24  # elements of one (T, B, Dm, N) tile: 64 MB in fp32
_MIN_CHUNK, _MAX_CHUNK = 16, 4096
_LOG2E = math.log2(math.e)


def default_parallel_chunk_size(batch: int, dim: int, d_state: int) -> int:
    """Chunk length of the parallel path: a power of two in [16, 4096] sized to a 2^24-element tile."""
    per_step = max(1, batch * dim * d_state)
    target = max(1, _TILE_ELEMENTS // per_step)
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, 1 << (target.bit_length() - 1))))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# One step of a scan: ``dst.addcmul_(dec, src)``, all three views into fixed tiles. The views are made
# once per tile and reused by every chunk: slicing costs as much host time as launching the kernel.
_Op = tuple[Tensor, Tensor, Tensor]


def _block_product_views(a: Tensor, ws: Tensor) -> tuple[list[Tensor], list[_Op]]:
    """Views of the block products of ``a`` (P, M) in ``ws`` and the ops ``out = left * right`` filling them."""
    dec, ops, off, rows = [a], [], 0, a.shape[0] // 2
    while rows >= 2:
        prev = dec[-1].view(rows, 2, -1)
        nxt = ws[off : off + rows]
        ops.append((nxt, prev[:, 0], prev[:, 1]))
        dec.append(nxt)
        off += rows
        rows //= 2
    return dec, ops


def _scan_ops(x: Tensor, dec: list[Tensor], reverse: bool) -> list[_Op]:
    """The up- and down-sweep of a Blelloch scan of ``x`` (P, M) as a list of in-place ops.

    Level k pairs up the steps that start (reverse) or end (forward) 2^k-step blocks: in the
    (P / 2^(k+1), 2, M) view of those steps, column 0 is the earlier block and column 1 the later one.
    """
    rows, m = x.shape
    levels = rows.bit_length() - 1

    def pairs(k: int) -> tuple[Tensor, Tensor]:
        s = 1 << k
        steps = x[::s] if reverse else x[s - 1 :: s]
        return steps.view(rows // (2 * s), 2, m), dec[k].view(rows // (2 * s), 2, m)

    ops = []
    for k in range(levels):  # up-sweep: each 2^(k+1)-step block's scan lands on its last (first) step
        xs, d = pairs(k)
        ops.append((xs[:, 0], d[:, 0], xs[:, 1]) if reverse else (xs[:, 1], d[:, 1], xs[:, 0]))
    for k in range(levels - 2, -1, -1):  # down-sweep: complete the steps the up-sweep left partial
        xs, d = pairs(k)
        ops.append((xs[:-1, 1], d[:-1, 1], xs[1:, 0]) if reverse else (xs[1:, 0], d[1:, 0], xs[:-1, 1]))
    return ops


def _run_products(ops: list[_Op]) -> None:
    for out, left, right in ops:
        torch.mul(left, right, out=out)


def _run_scan(ops: list[_Op]) -> None:
    for dst, dec, src in ops:
        dst.addcmul_(dec, src)


def block_products(a: Tensor, ws: Tensor) -> list[Tensor]:
    """Products of the decays over aligned blocks of 1, 2, 4, ..., P/2 steps.

    Args:
        a: decays, (P, M) with P a power of two.
        ws: scratch, at least (P - 2, M); receives the products of blocks of 2 steps and more.

    Returns:
        ``d`` with ``d[k]`` (P / 2^k, M): ``d[k][m]`` is the product of ``a`` over steps
        ``m 2^k .. (m + 1) 2^k - 1``; ``d[0]`` is ``a`` itself.
    """
    dec, ops = _block_product_views(a, ws)
    _run_products(ops)
    return dec


def scan_forward_(x: Tensor, dec: list[Tensor]) -> None:
    """In-place inclusive scan ``x_t <- a_t x_{t-1} + x_t`` along dim 0 (Blelloch, log-depth).

    Up-sweep ``x[i] += d_k[block] * x[i - 2^k]`` for the ends of 2^(k+1)-step blocks, then the
    down-sweep completes the other steps from the already complete prefix 2^k steps earlier.

    Args:
        x: (P, M), P a power of two; holds b_t on entry and the states on exit.
        dec: :func:`block_products` of the decays a (P, M).
    """
    _run_scan(_scan_ops(x, dec, reverse=False))


def scan_reverse_(x: Tensor, dec: list[Tensor]) -> None:
    """In-place reverse scan ``x_t <- a_t x_{t+1} + x_t`` along dim 0 (mirror of :func:`scan_forward_`)."""
    _run_scan(_scan_ops(x, dec, reverse=True))


class _Tiles:
    """The (P, B, Dm, N) tiles of one run and the scan ops on them, built once per padded chunk length P."""

    def __init__(self, u: Tensor, chunk: int, n_state: int, backward: bool):
        length, batch, dim = u.shape
        rows = _pow2_at_least(min(chunk, length))
        self.a, self.h, self.ws = (u.new_empty(rows, batch, dim, n_state) for _ in range(3))
        self.p = u.new_empty(rows, batch, dim, n_state) if backward else None
        self._plans: dict[int, tuple[list[_Op], list[_Op], list[_Op]]] = {}

    def plan(self, P: int) -> tuple[list[_Op], list[_Op], list[_Op]]:
        """(block-product ops, forward scan ops on ``h``, reverse scan ops on ``p``) for chunks padded to P."""
        if P not in self._plans:
            a, h, ws = (t[:P].view(P, -1) for t in (self.a, self.h, self.ws))
            dec, prods = _block_product_views(a, ws)
            rev = _scan_ops(self.p[:P].view(P, -1), dec, reverse=True) if self.p is not None else []
            self._plans[P] = (prods, _scan_ops(h, dec, reverse=False), rev)
        return self._plans[P]


def _step_sizes(delta_c: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """delta for one chunk after bias and softplus, (T, B, Dm)."""
    dt = delta_c if delta_bias is None else delta_c + delta_bias
    return F.softplus(dt) if softplus else dt


def _chunk_states(dt: Tensor, x: Tensor, A2: Tensor, Bc: Tensor, h0: Tensor, tiles: _Tiles) -> int:
    """Fill ``tiles.a`` with the decays, ``tiles.h`` with the states and ``tiles.ws`` with the block
    products of one chunk; return its padded length P (rows T..P-1 of the tiles are zero padding).

    Args:
        dt: step sizes, (T, B, Dm).
        x: ``dt * u``, (T, B, Dm).
        A2: ``A * log2(e)``, (Dm, N): ``exp2`` is cheaper than ``exp``.
        Bc: (T, B, N).
        h0: state before the chunk, (B, Dm, N).
        tiles: the run's tiles.
    """
    T = dt.shape[0]
    P = _pow2_at_least(T)
    a, hs = tiles.a, tiles.h
    torch.mul(dt.unsqueeze(-1), A2, out=a[:T])
    torch.exp2(a[:T], out=a[:T])
    torch.mul(x.unsqueeze(-1), Bc.unsqueeze(2), out=hs[:T])
    if P > T:
        a[T:P].zero_()
        hs[T:P].zero_()
    hs[0].addcmul_(a[0], h0)
    prods, fwd, _ = tiles.plan(P)
    _run_products(prods)
    _run_scan(fwd)
    return P


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int, keep_states: bool):
    """Forward over all chunks on time-major tensors; returns (out (L, B, Dm), chunk_h0 or None)."""
    with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
        length, batch, dim = u.shape
        n_state = A.shape[1]
        n_chunks = math.ceil(length / chunk)
        tiles = _Tiles(u, chunk, n_state, backward=False)
        hs = tiles.h
        h = u.new_zeros(batch, dim, n_state)
        out = u.new_empty(length, batch, dim)
        A2 = A * _LOG2E
        chunk_h0 = u.new_empty(n_chunks, batch, dim, n_state) if keep_states else None
        for c in range(n_chunks):
            s, e = c * chunk, min(length, (c + 1) * chunk)
            T = e - s
            if chunk_h0 is not None:
                chunk_h0[c] = h
            uc = u[s:e]
            dt = _step_sizes(delta[s:e], delta_bias, softplus)
            _chunk_states(dt, dt * uc, A2, B[s:e], h, tiles)
            y = out[s:e]  # written in place: y_t = <h_t, C_t>
            torch.matmul(hs[:T].view(T * batch, dim, n_state), C[s:e].reshape(T * batch, n_state, 1),
                         out=y.view(T * batch, dim, 1))
            if D is not None:
                y.addcmul_(uc, D)
            if z is not None:
                y.mul_(F.silu(z[s:e]))
            h.copy_(hs[T - 1])
        return out, chunk_h0


class _ParallelChunkedScan(torch.autograd.Function):
    """Selective scan, parallel within chunks, with chunk-wise recomputation in backward.

    Time-major tensors: u, delta, z (L, B, Dm); B, C (L, B, N); A (Dm, N); D, delta_bias (Dm,).
    All share one float dtype. Returns (L, B, Dm).
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
            tiles = _Tiles(u, chunk, n_state, backward=True)
            a, hs, p = tiles.a, tiles.h, tiles.p
            du = u.new_empty(length, batch, dim)
            ddelta = u.new_empty(length, batch, dim)
            dB = u.new_empty(length, batch, n_state)
            dC = u.new_empty(length, batch, n_state)
            dz = u.new_empty(length, batch, dim) if z is not None else None
            dA = torch.zeros_like(A)
            dD = torch.zeros_like(D) if D is not None else None
            dbias = torch.zeros_like(delta_bias) if delta_bias is not None else None
            carry = u.new_zeros(batch, dim, n_state)  # p of the step right after the chunk
            A2 = A * _LOG2E
            ones_n = A.new_ones(n_state)
            for c in reversed(range(chunk_h0.shape[0])):
                s, e = c * chunk, min(length, (c + 1) * chunk)
                T = e - s
                uc, dy, Bc, Cc, delta_c = u[s:e], dout[s:e], B[s:e], C[s:e], delta[s:e]
                dt = _step_sizes(delta_c, delta_bias, softplus)
                x = dt * uc
                h0 = chunk_h0[c]
                P = _chunk_states(dt, x, A2, Bc, h0, tiles)
                if z is not None:
                    zc = z[s:e]
                    y = torch.matmul(hs[:T], Cc.unsqueeze(-1)).squeeze(-1)
                    if D is not None:
                        y.addcmul_(uc, D)
                    sig = torch.sigmoid(zc)
                    dz[s:e] = dy * y * sig * (1 + zc * (1 - sig))
                    dy = dy * (zc * sig)
                if D is not None:
                    dD += (dy * uc).sum((0, 1))
                dC[s:e] = torch.matmul(dy.unsqueeze(-2), hs[:T]).squeeze(-2)
                # Adjoint p_t = a_t (C_t dy_t + p_{t+1}) as a reverse scan with the same block products.
                torch.mul(dy.unsqueeze(-1), Cc.unsqueeze(2), out=p[:T])
                p[T - 1].add_(carry)
                p[:T].mul_(a[:T])
                if P > T:
                    p[T:P].zero_()
                _run_scan(tiles.plan(P)[2])
                # q_t = p_t h_{t-1} into the decay tile (a is not needed any more).
                q = a[:T]
                torch.mul(p[1:T], hs[: T - 1], out=q[1:])
                torch.mul(p[0], h0, out=q[0])
                # g_t = C_t dy_t + p_{t+1} into the state tile (h is not needed any more).
                g = hs[:T]
                torch.mul(dy.unsqueeze(-1), Cc.unsqueeze(2), out=g)
                g[: T - 1].add_(p[1:T])
                g[T - 1].add_(carry)
                carry.copy_(p[0])
                dB[s:e] = torch.matmul(x.unsqueeze(-2), g).squeeze(-2)
                dx = torch.matmul(g, Bc.unsqueeze(-1)).squeeze(-1)
                ddt = (torch.mul(q, A, out=g).view(-1, n_state) @ ones_n).view(T, batch, dim)  # sum over N
                dA += q.mul_(dt.unsqueeze(-1)).view(T * batch, dim * n_state).sum(0).view_as(A)
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
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None


def scan_parallel_time_major(u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int) -> Tensor:
    """Run the parallel-within-chunk scan on time-major compute-dtype tensors; returns (L, B, Dm).

    Called by :func:`medfuse.ssm.scan_chunked.selective_scan_chunked`, which validates, casts and
    transposes; use that function (or :func:`medfuse.ssm.scan.selective_scan`) instead.
    """
    args = (u, delta, A, B, C, D, z, delta_bias, softplus, chunk)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return _ParallelChunkedScan.apply(*args)
    return _scan_forward(*args, keep_states=False)[0]
