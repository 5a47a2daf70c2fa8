"""Triton kernels of the selective scan (forward and backward) and their ``@triton.jit`` helpers.

The host side (launch shape, launch, autograd Function, :func:`selective_scan_triton`) and the
description of the kernel layout and of the backward's algebra are in :mod:`.scan_triton`; this
module holds only the device code, imported from there:

- ``_affine_combine``: the ``tl.associative_scan`` combine of the affine maps ``x -> a x + b``.
- ``_softplus``: torch's softplus (threshold 20) in a form the interpreter also runs.
- ``_last_column``: ``x[:, :, CHUNK - 1]`` of a (BLOCK_D, BLOCK_N, CHUNK) tile (the carried state).
- ``_fwd_kernel``: out (B, Dm, L) and, when ``SAVE_STATES``, the state entering every chunk into
  hs (B, n_chunks, Dm, N) fp32 contiguous.
- ``_bwd_kernel``: the chunks in reverse; du, ddelta, dz (B, Dm, L); dB, dC fp32 (B, N, L)
  contiguous, zeroed, atomically added; dA (B, Dm, N), dD and dbias (B, Dm): fp32 per-batch
  partials, summed over the batch on the host.

Inputs of both kernels: u, delta, z (B, Dm, L) and B, C (B, N, L), any strides (passed per tensor);
A (Dm, N); D and delta_bias (Dm,). Grid of both: (B, cdiv(Dm, BLOCK_D)); one program owns one batch
element and ``BLOCK_D`` channels (all N states of them, padded to ``BLOCK_N``).

Triton is imported unguarded, as in :mod:`.scan_triton`: without it this module raises ImportError,
which :func:`medfuse.ssm.scan._load_triton` catches. ``@triton.jit`` picks the interpreter at
decoration time, so ``TRITON_INTERPRET=1`` must be set before this module is first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1 (earlier steps) with x -> a2 x + b2 (the next step)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) with a log1p that the interpreter also runs."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    # log1p(e) = log(w) * e / (w - 1) is exact to rounding (Goldberg); w == 1 means log1p(e) = e.
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _last_column(x, offs_t, CHUNK: tl.constexpr):
    """x[:, :, CHUNK - 1] of a (BD, BN, CHUNK) tile."""
    return tl.sum(tl.where(offs_t[None, None, :] == CHUNK - 1, x, 0.0), axis=2)


@triton.jit
def _tile(ptr, rows, t, mask, s_r, s_l):
    """A (rows, T) tile of a (..., L) tensor as fp32, 0 where ``mask`` is off."""
    return tl.load(ptr + rows[:, None] * s_r + t[None, :] * s_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta_tile(delta_ptr, offs_d, t, mask, s_dt_d, s_dt_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(pre, dt) of a (BD, T) tile of delta: delta (+ bias) before and after the softplus, fp32."""
    pre = _tile(delta_ptr, offs_d, t, mask, s_dt_d, s_dt_l)
    if HAS_BIAS:
        pre += bias[:, None]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return pre, dt


@triton.jit
def _lanes(DIM, NSTATE, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """This program's batch index (int64), its channel, state and in-chunk step offsets, and the
    channel, state and (channel, state) masks."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < NSTATE
    return pid_b, offs_d, offs_n, tl.arange(0, CHUNK), mask_d, mask_n, mask_d[:, None] & mask_n[None, :]


@triton.jit
def _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, s_A_d, s_A_n,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BD, BN), D and delta_bias (BD,) of this program's channels as fp32 (zeros when absent).
    Padded channels/states read A = 0: their decay is 1."""
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, Dv, bias


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, hs_ptr,
    L, DIM, NSTATE,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Forward: out (B, Dm, L) and, when SAVE_STATES, the state entering every chunk into hs
    (B, n_chunks, Dm, N) fp32 contiguous. Grid: (B, cdiv(Dm, BLOCK_D))."""
    pid_b, offs_d, offs_n, offs_t, mask_d, mask_n, mask_dn = _lanes(DIM, NSTATE, BLOCK_D, BLOCK_N, CHUNK)
    u_ptr += pid_b * s_u_b
    delta_ptr += pid_b * s_dt_b
    B_ptr += pid_b * s_B_b
    C_ptr += pid_b * s_C_b
    z_ptr += pid_b * s_z_b
    out_ptr += pid_b * s_o_b
    n_chunks = tl.cdiv(L, CHUNK)
    hs_ptr += pid_b * n_chunks * DIM * NSTATE
    hs_offs = offs_d[:, None] * NSTATE + offs_n[None, :]
    # Padded channels/states read A = 0, B = C = 0: their decay is 1 and their state stays 0.
    A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, s_A_d, s_A_n,
                                  HAS_D, HAS_BIAS, BLOCK_D)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        start = c * CHUNK
        if SAVE_STATES:
            tl.store(hs_ptr + c * DIM * NSTATE + hs_offs, h, mask=mask_dn)
        if SEQ:
            for t in range(start, start + CHUNK):
                # Steps past L (last chunk) read nothing and write nothing.
                mask_dt = mask_d & (t < L)
                u_t = tl.load(u_ptr + offs_d * s_u_d + t * s_u_l, mask=mask_dt, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + offs_d * s_dt_d + t * s_dt_l, mask=mask_dt, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt += bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                dt = tl.where(mask_dt, dt, 0.0)
                b_t = tl.load(B_ptr + offs_n * s_B_n + t * s_B_l, mask=mask_n & (t < L), other=0.0).to(tl.float32)
                c_t = tl.load(C_ptr + offs_n * s_C_n + t * s_C_l, mask=mask_n & (t < L), other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u_t)[:, None] * b_t[None, :]
                y = tl.sum(h * c_t[None, :], axis=1)
                if HAS_D:
                    y += u_t * Dv
                if HAS_Z:
                    z_t = tl.load(z_ptr + offs_d * s_z_d + t * s_z_l, mask=mask_dt, other=0.0).to(tl.float32)
                    y *= z_t * tl.sigmoid(z_t)
                tl.store(out_ptr + offs_d * s_o_d + t * s_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_dt)
        else:
            t = start + offs_t
            mask_t = t < L
            m2 = mask_d[:, None] & mask_t[None, :]
            mnt = mask_n[:, None] & mask_t[None, :]
            u = _tile(u_ptr, offs_d, t, m2, s_u_d, s_u_l)
            _, dt = _delta_tile(delta_ptr, offs_d, t, m2, s_dt_d, s_dt_l, bias, HAS_BIAS, SOFTPLUS)
            dt = tl.where(m2, dt, 0.0)  # padded steps: decay 1, input 0, so the last column is the carry
            Bt = _tile(B_ptr, offs_n, t, mnt, s_B_n, s_B_l)
            Ct = _tile(C_ptr, offs_n, t, mnt, s_C_n, s_C_l)
            a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BD, BN, T)
            b = (dt * u)[:, None, :] * Bt[None, :, :]
            a_run, h_loc = tl.associative_scan((a, b), 2, _affine_combine)
            hh = h_loc + a_run * h[:, :, None]
            y = tl.sum(hh * Ct[None, :, :], axis=1)  # (BD, T)
            if HAS_D:
                y += u * Dv[:, None]
            if HAS_Z:
                z = _tile(z_ptr, offs_d, t, m2, s_z_d, s_z_l)
                y *= z * tl.sigmoid(z)
            tl.store(out_ptr + offs_d[:, None] * s_o_d + t[None, :] * s_o_l, y.to(out_ptr.dtype.element_ty), mask=m2)
            h = _last_column(hh, offs_t, CHUNK)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, hs_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, DIM, NSTATE,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_do_b, s_do_d, s_do_l,
    s_du_b, s_du_d, s_du_l,
    s_ddt_b, s_ddt_d, s_ddt_l,
    s_dz_b, s_dz_d, s_dz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Backward over the chunks in reverse. dB, dC: fp32 (B, N, L) contiguous, zeroed, atomically
    added; dA (B, Dm, N), dD and dbias (B, Dm): fp32 per-batch partials. Grid: (B, cdiv(Dm, BLOCK_D))."""
    pid_b, offs_d, offs_n, offs_t, mask_d, mask_n, mask_dn = _lanes(DIM, NSTATE, BLOCK_D, BLOCK_N, CHUNK)
    u_ptr += pid_b * s_u_b
    delta_ptr += pid_b * s_dt_b
    B_ptr += pid_b * s_B_b
    C_ptr += pid_b * s_C_b
    z_ptr += pid_b * s_z_b
    dout_ptr += pid_b * s_do_b
    du_ptr += pid_b * s_du_b
    ddelta_ptr += pid_b * s_ddt_b
    dz_ptr += pid_b * s_dz_b
    dB_ptr += pid_b * NSTATE * L
    dC_ptr += pid_b * NSTATE * L
    n_chunks = tl.cdiv(L, CHUNK)
    hs_ptr += pid_b * n_chunks * DIM * NSTATE
    hs_offs = offs_d[:, None] * NSTATE + offs_n[None, :]
    A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_dn, s_A_d, s_A_n,
                                  HAS_D, HAS_BIAS, BLOCK_D)
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # a g of the step after this chunk
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        mnt = mask_n[:, None] & mask_t[None, :]
        # Recompute the chunk's states from its entry state.
        h0 = tl.load(hs_ptr + c * DIM * NSTATE + hs_offs, mask=mask_dn, other=0.0)
        u = _tile(u_ptr, offs_d, t, m2, s_u_d, s_u_l)
        pre, dt = _delta_tile(delta_ptr, offs_d, t, m2, s_dt_d, s_dt_l, bias, HAS_BIAS, SOFTPLUS)
        dt = tl.where(m2, dt, 0.0)
        Bt = _tile(B_ptr, offs_n, t, mnt, s_B_n, s_B_l)
        Ct = _tile(C_ptr, offs_n, t, mnt, s_C_n, s_C_l)
        x = dt * u  # (BD, T)
        a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BD, BN, T)
        b = x[:, None, :] * Bt[None, :, :]
        a_run, h_loc = tl.associative_scan((a, b), 2, _affine_combine)
        hh = h_loc + a_run * h0[:, :, None]
        dy = _tile(dout_ptr, offs_d, t, m2, s_do_d, s_do_l)
        if HAS_Z:
            z = _tile(z_ptr, offs_d, t, m2, s_z_d, s_z_l)
            y = tl.sum(hh * Ct[None, :, :], axis=1)
            if HAS_D:
                y += u * Dv[:, None]
            sig = tl.sigmoid(z)
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + offs_d[:, None] * s_dz_d + t[None, :] * s_dz_l, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * z * sig
        # Decay of the next step inside the chunk; 0 past the chunk's end (the carry enters there instead).
        t1 = t + 1
        m_next = mask_d[:, None] & ((offs_t + 1 < CHUNK) & (t1 < L))[None, :]
        _, dt1 = _delta_tile(delta_ptr, offs_d, t1, m_next, s_dt_d, s_dt_l, bias, HAS_BIAS, SOFTPLUS)
        a_next = tl.where(m_next[:, None, :], tl.exp(dt1[:, None, :] * A[:, :, None]), 0.0)
        src = dy[:, None, :] * Ct[None, :, :]
        src += tl.where(offs_t[None, None, :] == CHUNK - 1, carry[:, :, None], 0.0)
        _, g = tl.associative_scan((a_next, src), 2, _affine_combine, reverse=True)  # dL/dh_t
        carry = tl.sum(tl.where(offs_t[None, None, :] == 0, a * g, 0.0), axis=2)
        q = g * (hh - b)  # g_t a_t h_{t-1}
        dA_acc += tl.sum(q * dt[:, None, :], axis=2)
        dx = tl.sum(g * Bt[None, :, :], axis=1)  # (BD, T)
        ddt = tl.sum(q * A[:, :, None], axis=1) + dx * u
        du = dx * dt
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(pre)
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs_d[:, None] * s_du_d + t[None, :] * s_du_l, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + offs_d[:, None] * s_ddt_d + t[None, :] * s_ddt_l, ddt.to(ddelta_ptr.dtype.element_ty),
                 mask=m2)
        dBc = tl.sum(g * x[:, None, :], axis=0)  # (BN, T)
        dCc = tl.sum(hh * dy[:, None, :], axis=0)
        nt_offs = offs_n[:, None] * L + t[None, :]
        tl.atomic_add(dB_ptr + nt_offs, dBc, mask=mnt)
        tl.atomic_add(dC_ptr + nt_offs, dCc, mask=mnt)
    tl.store(dA_ptr + pid_b * DIM * NSTATE + hs_offs, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DIM + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DIM + offs_d, dbias_acc, mask=mask_d)
