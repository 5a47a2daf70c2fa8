"""3D positional encodings: slice-major order, uniqueness, learned-table interpolation."""

from __future__ import annotations

import pytest
import torch

from medfuse.layers.pos_embed import (
    LearnedPosEmbed3d,
    PosEmbed3d,
    sincos_3d,
    sincos_from_coords,
    token_coords,
)


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 2, 4), (5, 1, 3)])
def test_token_coords_are_slice_major(grid):
    D, H, W = grid
    coords = token_coords(D, H, W)
    assert coords.shape == (D * H * W, 3) and coords.dtype == torch.int64
    # flat index of (z, y, x) in a (D, H, W) array reshaped to L: z outermost
    flat = (coords[:, 0] * H + coords[:, 1]) * W + coords[:, 2]
    assert torch.equal(flat, torch.arange(D * H * W))
    volume_z = torch.arange(D)[:, None, None].expand(D, H, W).reshape(-1)
    assert torch.equal(coords[:, 0], volume_z)


@pytest.mark.parametrize(("grid", "dim"), [((4, 3, 5), 24), ((6, 6, 6), 48), ((3, 4, 4), 32), ((2, 2, 2), 6)])
def test_sincos_tokens_are_unique(grid, dim):
    pe = sincos_3d(grid, dim)
    L = grid[0] * grid[1] * grid[2]
    assert pe.shape == (L, dim)
    dist = (pe[:, None] - pe[None, :]).norm(dim=-1) + torch.eye(L) * 1e3
    assert dist.min() > 1e-3


def test_sincos_channel_blocks_follow_token_coords():
    grid, dim = (3, 4, 5), 36
    pe, coords = sincos_3d(grid, dim), token_coords(*grid)
    per_axis = dim // 3
    for axis in range(3):
        block = pe[:, axis * per_axis:(axis + 1) * per_axis]
        same = coords[:, axis][:, None] == coords[:, axis][None, :]
        equal_rows = (block[:, None] - block[None, :]).abs().amax(dim=-1) < 1e-6
        assert torch.equal(equal_rows, same), f"axis {axis} block does not depend only on that coordinate"


def test_sincos_matches_reshaped_volume_layout():
    grid, dim = (3, 2, 4), 12
    pe = sincos_3d(grid, dim)
    vol = pe.reshape(*grid, dim)  # (D, h, w, C) view of the slice-major rows
    z, y, x = 2, 1, 3
    expected = sincos_from_coords(torch.tensor([[z, y, x]]), dim)[0]
    torch.testing.assert_close(vol[z, y, x], expected)


@pytest.mark.parametrize("dim", [7, 16, 20])
def test_sincos_pads_dims_not_divisible_by_six(dim):
    pe = sincos_3d((2, 3, 3), dim)
    assert pe.shape == (18, dim)
    used = 6 * (dim // 6)
    assert torch.all(pe[:, used:] == 0) and pe[:, :used].abs().sum() > 0


def test_sincos_rejects_tiny_dim():
    with pytest.raises(ValueError, match="dim >= 6"):
        sincos_3d((2, 2, 2), 4)


def test_learned_identity_at_own_grid():
    torch.manual_seed(0)
    table = LearnedPosEmbed3d((3, 4, 5), 8)
    expected = table.pos_embed[0].permute(1, 2, 3, 0).reshape(-1, 8)  # (D, h, w, C) -> (L, C)
    torch.testing.assert_close(table(), expected)
    torch.testing.assert_close(table((3, 4, 5)), expected)


def test_learned_trilinear_same_size_is_identity():
    torch.manual_seed(0)
    table = LearnedPosEmbed3d((3, 4, 5), 8)
    resized = torch.nn.functional.interpolate(table.pos_embed, size=(3, 4, 5), mode="trilinear", align_corners=False)
    torch.testing.assert_close(resized, table.pos_embed)


@pytest.mark.parametrize("new_grid", [(6, 8, 10), (2, 2, 3), (1, 4, 5), (5, 3, 7)])
def test_learned_interpolation_shapes_and_convexity(new_grid):
    torch.manual_seed(0)
    table = LearnedPosEmbed3d((3, 4, 5), 8)
    out = table(new_grid)
    L = new_grid[0] * new_grid[1] * new_grid[2]
    assert out.shape == (L, 8)
    src = table.pos_embed[0].reshape(8, -1)  # (C, L0)
    lo, hi = src.min(dim=1).values, src.max(dim=1).values
    assert torch.all(out >= lo - 1e-6) and torch.all(out <= hi + 1e-6)  # trilinear = convex combination
    out.sum().backward()
    assert table.pos_embed.grad is not None and table.pos_embed.grad.abs().sum() > 0


def test_learned_interpolation_keeps_slice_major_order():
    table = LearnedPosEmbed3d((2, 2, 2), 3)
    with torch.no_grad():  # channel a holds coordinate a (a linear ramp along that axis)
        ramp = token_coords(2, 2, 2).T.reshape(3, 2, 2, 2).float()
        table.pos_embed.copy_(ramp[None])
    out = table((4, 4, 4))
    order = out.reshape(4, 4, 4, 3)
    assert torch.all(order[1:, :, :, 0] >= order[:-1, :, :, 0])  # z grows along the slice axis
    assert torch.all(order[:, 1:, :, 1] >= order[:, :-1, :, 1])
    assert torch.all(order[:, :, 1:, 2] >= order[:, :, :-1, 2])
    assert torch.allclose(order[:, :, :, 0].std(dim=(1, 2)), torch.zeros(4))  # z channel constant per slice


@pytest.mark.parametrize("kind", ["sincos", "learned"])
def test_pos_embed_module_adds_encoding(kind):
    torch.manual_seed(0)
    grid = (2, 3, 3)
    mod = PosEmbed3d(12, kind=kind, grid=grid)
    x = torch.randn(2, 18, 12)
    y = mod(x, grid)
    assert y.shape == x.shape
    torch.testing.assert_close(y - x, mod.encoding(grid).expand_as(x))
    assert (y - x).abs().sum() > 0
    y2 = mod(torch.randn(1, 4 * 3 * 3, 12), (4, 3, 3))  # another grid
    assert y2.shape == (1, 36, 12)


@pytest.mark.parametrize(("kwargs", "match"), [({"kind": "rope"}, "kind"), ({"kind": "learned"}, "grid")])
def test_pos_embed_module_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PosEmbed3d(12, **kwargs)


def test_pos_embed_module_rejects_wrong_length():
    with pytest.raises(ValueError, match="expected tokens"):
        PosEmbed3d(12)(torch.randn(1, 10, 12), (2, 3, 3))
