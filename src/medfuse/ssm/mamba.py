"""The Mamba block (selective state-space model), the building block of seed 000's Bi-Mamba.

Standard Mamba (Gu & Dao, 2023): ``in_proj`` -> (x, z); depthwise causal conv1d on x; SiLU;
``x_proj`` -> (dt, B, C); ``dt_proj``; selective scan with ``A = -exp(A_log)`` and skip ``D``;
gate with ``silu(z)``; ``out_proj``. Parameter names and shapes match state-spaces/mamba
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) so its state
dicts load directly. The scan goes through :func:`medfuse.ssm.scan.selective_scan`, so the block
runs on CPU (chunked scan) and on GPU (Triton kernels, or mamba-ssm's when installed).

Activations stay in (B, L, C) memory order throughout: the scan receives transposed views and
its chunked path reads them time-major without copies (for batch 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfuse.ssm.scan import selective_scan


def _conv_pre(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv as K shifted multiply-adds: x (B, L, C), w (K, C) -> new (B, L, C)."""
    k, length = w.shape[0], x.shape[1]
    y = x * w[k - 1]
    for j in range(1, min(k, length)):  # tap k-1-j reads j steps back; the first j outputs have none
        y[:, j:].addcmul_(x[:, : length - j], w[k - 1 - j])
    return y if bias is None else y.add_(bias)


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal 1D convolution in (B, L, C) layout (differentiable by autograd).

    Computed as ``K`` shifted multiply-adds over the sequence: on CPU this is faster than
    ``F.conv1d(groups=C)`` (whose depthwise backward is slow) and needs no layout transposes.

    Args:
        x: (B, L, C).
        weight: ``nn.Conv1d`` depthwise weight, (C, 1, K).
        bias: (C,) or None.

    Returns:
        (B, L, C); output t sees inputs t-K+1 .. t only.
    """
    return _conv_pre(x, weight[:, 0, :].t().to(x.dtype), None if bias is None else bias.to(x.dtype))


class _CausalConvSiLU(torch.autograd.Function):
    """``silu(causal_depthwise_conv(x))`` that keeps only ``x`` for backward and recomputes the rest.

    ``x`` is normally a view of ``in_proj``'s output, so training stores no extra (B, L, C) tensor
    for the conv, and backward makes a handful of passes instead of autograd's slice/pad chain.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        w = weight[:, 0, :].t().to(x.dtype)  # (K, C)
        pre = _conv_pre(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight, bias)
        return F.silu(pre, inplace=True)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        k, length = weight.shape[-1], x.shape[1]
        w = weight[:, 0, :].t().to(x.dtype)
        pre = _conv_pre(x, w, None if bias is None else bias.to(x.dtype))
        sig = torch.sigmoid(pre)
        # silu'(p) = s * (1 + p * (1 - s)), built in place in ``pre``.
        dpre = pre.addcmul_(pre, sig, value=-1).add_(1).mul_(sig).mul_(grad)
        del sig
        dx = dpre * w[k - 1]
        for j in range(1, min(k, length)):
            dx[:, : length - j].addcmul_(dpre[:, j:], w[k - 1 - j])
        buf = torch.empty_like(dpre)
        dw = torch.zeros_like(w)  # (K, C); taps reaching before the start (j >= L) stay 0
        for j in range(min(k, length)):
            torch.mul(dpre[:, j:], x[:, : length - j], out=buf[:, j:])
            dw[k - 1 - j] = buf[:, j:].sum((0, 1))
        dbias = None if bias is None else dpre.sum((0, 1)).to(bias.dtype)
        return dx, dw.t().unsqueeze(1).to(weight.dtype), dbias


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``silu(causal_depthwise_conv(x))``, (B, L, C) -> (B, L, C); recomputed in backward.

    Only ``x`` (usually a view of ``in_proj``'s output) is kept for backward, not the
    pre-activation: one (B, L, C) tensor less per branch in training.
    """
    return _CausalConvSiLU.apply(x, weight, bias)


class Mamba(nn.Module):
    """Uni-directional Mamba block.

    Args:
        d_model: channels C of the input and output.
        d_state: state size N per channel.
        d_conv: kernel size of the causal depthwise conv.
        expand: inner width ``E = expand * d_model``.
        dt_rank: rank of the dt projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        dt_init_floor: lower clamp of the initial step size.
        bias: bias in ``in_proj`` and ``out_proj``.
        conv_bias: bias in the conv.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
    ):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._make_branch(conv_bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _make_branch(self, conv_bias: bool) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        """Create one scan branch's modules and parameters with Mamba's initialisation."""
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        conv1d = nn.Conv1d(e, e, self.d_conv, groups=e, padding=self.d_conv - 1, bias=conv_bias)
        x_proj = nn.Linear(e, r + 2 * n, bias=False)
        dt_proj = nn.Linear(r, e, bias=True)
        nn.init.uniform_(dt_proj.weight, -(r**-0.5), r**-0.5)
        dt_min, dt_max, floor = self._dt_init
        # dt ~ log-uniform in [dt_min, dt_max]; the bias is its inverse softplus so that
        # softplus(bias) == dt at initialisation.
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel.
        a_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        d_skip = nn.Parameter(torch.ones(e))
        a_log._no_weight_decay = True  # type: ignore[attr-defined]
        d_skip._no_weight_decay = True  # type: ignore[attr-defined]
        return conv1d, x_proj, dt_proj, a_log, d_skip

    def _scan_branch(
        self, x: Tensor, z: Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, a_log: Tensor,
        d_skip: Tensor,
    ) -> Tensor:
        """Conv, SiLU, input-dependent (dt, B, C), selective scan and gate for one direction.

        Args:
            x: scan input after ``in_proj``, (B, L, E).
            z: gate after ``in_proj``, (B, L, E).

        Returns:
            (B, L, E), before ``out_proj``.
        """
        x = conv_silu(x, conv1d.weight, conv1d.bias)  # (B, L, E)
        x_dbl = x_proj(x)  # (B, L, R + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight)  # (B, L, E); the bias enters the scan as delta_bias
        y = selective_scan(
            x.transpose(1, 2), dt.transpose(1, 2), -torch.exp(a_log.float()),
            b.transpose(1, 2), c.transpose(1, 2), d_skip.float(), z.transpose(1, 2),
            delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )  # (B, E, L)
        return y.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Mix the sequence causally.

        Args:
            x: (B, L, C) with C = ``d_model``; any L >= 1.

        Returns:
            (B, L, C); output t depends on inputs 0..t only.
        """
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        y = self._scan_branch(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        return self.out_proj(y)
