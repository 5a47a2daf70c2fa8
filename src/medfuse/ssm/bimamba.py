"""Bidirectional Mamba ("Vim v2" style), the "Bidirectional Mamba Modeling" step of seed 000.

The forward and the backward scan share ``in_proj`` and ``out_proj``; the backward scan has its own
conv1d, x_proj, dt_proj, A and D and runs on the flipped sequence:

    x, z  = in_proj(u)
    y_f   = branch_f(x, z)
    y_b   = flip(branch_b(flip(x), flip(z)))
    out   = out_proj(y_f + y_b)

Parameter names follow Vim (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``).
Both branches go through :func:`medfuse.ssm.scan.selective_scan`, whatever the path (ref, chunked
or cuda): the Vim and SegMamba forks run the backward branch only in their CUDA kernel and
silently drop it on CPU; here the two branches are plain PyTorch code around the same scan.
"""

from __future__ import annotations

from torch import Tensor

from medfuse.ssm.mamba import Mamba


class BiMamba(Mamba):
    """Bidirectional Mamba block; with ``bidirectional=False`` it is exactly :class:`Mamba`.

    Args:
        d_model: channels C of the input and output.
        d_state: state size N per channel.
        d_conv: kernel size of the causal depthwise conv of each direction.
        expand: inner width ``E = expand * d_model``.
        dt_rank: rank of the dt projections; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        dt_init_floor: lower clamp of the initial step size.
        bias: bias in ``in_proj`` and ``out_proj``.
        conv_bias: bias in the convs.
        bidirectional: add the backward scan (the ``mamba: uni`` ablation sets False).
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
        bidirectional: bool = True,
    ):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, bias, conv_bias)
        self.bidirectional = bool(bidirectional)
        if self.bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._make_branch(conv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """Mix the sequence in both directions.

        Args:
            x: (B, L, C) with C = ``d_model``; any L >= 1.

        Returns:
            (B, L, C). With ``bidirectional=True`` every output position depends on every input
            position; otherwise the block is causal.
        """
        xz = self.in_proj(x)  # (B, L, 2E)
        x_in, z = xz.chunk(2, dim=-1)
        y = self._scan_branch(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            xz_b = xz.flip(1)  # the backward scan reads the sequence reversed
            del xz, x_in, z  # in inference the forward half is freed before the backward scan runs
            x_b, z_b = xz_b.chunk(2, dim=-1)
            y_b = self._scan_branch(x_b, z_b, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
            y = y + y_b.flip(1)  # (B, L, E), back in forward order
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, bidirectional={self.bidirectional}"
