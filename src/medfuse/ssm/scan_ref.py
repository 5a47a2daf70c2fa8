"""Sequential reference selective scan (the spec every fast path is tested against).

Seed 000 ("Bidirectional Mamba Modeling") needs the Mamba selective scan. This module states what
the scan computes, one time step at a time, in fp32 (fp64 for fp64 inputs):

    delta_t = softplus(delta_t + delta_bias)            (each step optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        h: (B, Dm, N)
    y_t     = <h_t, C_t> + D * u_t
    out_t   = y_t * silu(z_t)                          (when z is given)

Shapes follow state-spaces/mamba's ``selective_scan_ref``. It is slow (a Python loop over L) and
is meant for tests and for debugging other paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Run the selective scan with a plain loop over time.

    Args:
        u: input, (B, Dm, L).
        delta: step sizes before bias/softplus, (B, Dm, L).
        A: state matrix (diagonal per channel), (Dm, N). Negative for a decaying state.
        B: input matrix per step, (B, N, L).
        C: output matrix per step, (B, N, L).
        D: skip connection, (Dm,).
        z: gate, (B, Dm, L); the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta``, (Dm,).
        delta_softplus: apply softplus to ``delta`` (after the bias).

    Returns:
        (B, Dm, L) in ``u``'s dtype, accumulated in fp32 (fp64 for fp64 inputs, so that the
        reference can serve as a high-precision oracle). Differentiable by autograd.
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32  # fp64 in, fp64 oracle
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])  # (B, Dm, N)
    ys = []
    for t in range(length):
        d_t = delta[:, :, t, None]  # (B, Dm, 1)
        h = torch.exp(d_t * A) * h + (d_t * u[:, :, t, None]) * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, Dm)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)  # (B, Dm, L)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
