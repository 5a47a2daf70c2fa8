"""3D positional encodings for slice-major token sequences (DESIGN "layers/pos_embed.py").

DESIGN's token contract: a volume of D slices, each an h x w feature map, becomes (B, L, C) with
L = D * h * w in slice-major order (z outermost, then y, then x), and every sequence model gets a
3D position (z, y, x) per token. This module provides those positions (:func:`token_coords`), a
fixed sin-cos encoding of them (:func:`sincos_3d`, :func:`sincos_from_coords`), a learned table
that interpolates to new grids (:class:`LearnedPosEmbed3d`) and a module adding either one to a
token sequence (:class:`PosEmbed3d`).

This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["LearnedPosEmbed3d", "PosEmbed3d", "sincos_3d", "sincos_from_coords", "token_coords"]

Grid = Sequence[int]


def _grid3(grid: Grid) -> tuple[int, int, int]:
    g = tuple(int(s) for s in grid)
    if len(g) != 3 or min(g) < 1:
        raise ValueError(f"grid must be three positive sizes (D, h, w), got {tuple(grid)}")
    return g  # type: ignore[return-value]


def token_coords(D: int, H: int, W: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer (z, y, x) of every token, in slice-major order.

    Args:
        D: number of slices.
        H: feature-map height h.
        W: feature-map width w.
        device: where to build the tensor.

    Returns:
        (L, 3) int64 with L = D * H * W; row ``(z * H + y) * W + x`` is ``(z, y, x)``.
    """
    D, H, W = _grid3((D, H, W))
    axes = [torch.arange(n, device=device) for n in (D, H, W)]
    zyx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3)
    return zyx.reshape(-1, 3)  # (L, 3), z outermost


def sincos_from_coords(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos encoding of arbitrary (possibly fractional) 3D coordinates.

    The channels are split evenly across z, y and x; each axis gets ``dim // 6`` frequencies
    ``temperature ** (-i / (dim // 6))`` and contributes their sines then cosines. When ``dim`` is
    not divisible by 6 the last ``dim % 6`` channels are zero.

    Args:
        coords: (L, 3) positions (z, y, x), in voxel units or any physical unit.
        dim: output width C (at least 6).
        temperature: the longest wavelength's scale.

    Returns:
        (L, dim) float32 (float64 if ``coords`` is float64).
    """
    if dim < 6:
        raise ValueError(f"sin-cos 3D encoding needs dim >= 6, got {dim}")
    if coords.ndim != 2 or coords.shape[-1] != 3:
        raise ValueError(f"coords must be (L, 3), got {tuple(coords.shape)}")
    dtype = coords.dtype if coords.dtype == torch.float64 else torch.float32
    n_freq = dim // 6
    omega = torch.arange(n_freq, dtype=dtype, device=coords.device) / n_freq
    omega = temperature ** (-omega)  # (F,)
    angles = coords.to(dtype)[:, :, None] * omega  # (L, 3, F)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, 3, 2F): per axis sin then cos
    emb = rearrange(emb, "l a f -> l (a f)")  # (L, 6F): z block, y block, x block
    return F.pad(emb, (0, dim - emb.shape[-1]))


def sincos_3d(grid: Grid, dim: int, temperature: float = 10000.0,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 3D sin-cos table for a (D, h, w) token grid, in slice-major order.

    Args:
        grid: (D, h, w).
        dim: output width C (at least 6; zero-padded when not divisible by 6).
        temperature: the longest wavelength's scale.
        device: where to build the table.

    Returns:
        (D * h * w, dim) float32; row i encodes ``token_coords(*grid)[i]``.
    """
    return sincos_from_coords(token_coords(*_grid3(grid), device=device), dim, temperature)


class LearnedPosEmbed3d(nn.Module):
    """A learned (D, h, w, dim) position table, trilinearly resized to other grids.

    Args:
        grid: the table's own grid (D, h, w); inputs of that size use it unchanged.
        dim: embedding width C.
        init_std: std of the truncated-normal initialisation.
    """

    def __init__(self, grid: Grid, dim: int, init_std: float = 0.02):
        super().__init__()
        self.grid = _grid3(grid)
        self.dim = dim
        self.pos_embed = nn.Parameter(torch.empty(1, dim, *self.grid))  # (1, C, D, h, w)
        nn.init.trunc_normal_(self.pos_embed, std=init_std, a=-2 * init_std, b=2 * init_std)

    def forward(self, grid_new: Grid | None = None) -> torch.Tensor:
        """The table at ``grid_new`` (default: the table's own grid).

        Args:
            grid_new: target grid (D', h', w').

        Returns:
            (D' * h' * w', dim) in slice-major order.
        """
        target = self.grid if grid_new is None else _grid3(grid_new)
        pe = self.pos_embed
        if target != self.grid:
            pe = F.interpolate(pe, size=target, mode="trilinear", align_corners=False)
        return rearrange(pe, "1 c d h w -> (d h w) c")


class PosEmbed3d(nn.Module):
    """Add a 3D positional encoding to a slice-major token sequence.

    Args:
        dim: token width C.
        kind: ``"sincos"`` (fixed) or ``"learned"`` (:class:`LearnedPosEmbed3d`).
        grid: the learned table's grid (D, h, w); required for ``"learned"``.
        temperature: sin-cos scale (``"sincos"`` only).
    """

    def __init__(self, dim: int, kind: str = "sincos", grid: Grid | None = None, temperature: float = 10000.0):
        super().__init__()
        if kind not in ("sincos", "learned"):
            raise ValueError(f"kind must be 'sincos' or 'learned', got {kind!r}")
        if kind == "learned" and grid is None:
            raise ValueError("kind='learned' needs the table's grid (D, h, w)")
        self.dim = dim
        self.kind = kind
        self.temperature = temperature
        self.table = LearnedPosEmbed3d(grid, dim) if kind == "learned" else None
        if kind == "sincos" and dim < 6:
            raise ValueError(f"sin-cos 3D encoding needs dim >= 6, got {dim}")

    def encoding(self, grid: Grid, device: torch.device | str | None = None) -> torch.Tensor:
        """The (D * h * w, dim) encoding for ``grid`` (float32 for sin-cos)."""
        if self.table is not None:
            return self.table(grid)
        return sincos_3d(grid, self.dim, self.temperature, device=device)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Return ``x + pe``.

        Args:
            x: tokens, (B, L, C) with L = D * h * w in slice-major order.
            grid: (D, h, w).

        Returns:
            (B, L, C).
        """
        D, h, w = _grid3(grid)
        if x.shape[1] != D * h * w or x.shape[2] != self.dim:
            raise ValueError(f"expected tokens (B, {D * h * w}, {self.dim}) for grid {(D, h, w)}, "
                             f"got {tuple(x.shape)}")
        return x + self.encoding((D, h, w), device=x.device).to(x.dtype)
