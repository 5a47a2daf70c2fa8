"""MemoryBlock: shapes, factorized attention against an explicit loop, mode choice, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfuse.layers.memory import MemoryBlock
from medfuse.layers.pos_embed import PosEmbed3d

C, HEADS = 16, 4


def _block(mode: str, **kw) -> MemoryBlock:
    torch.manual_seed(0)
    return MemoryBlock(C, num_heads=HEADS, num_prototypes=5, mlp_ratio=2.0, mode=mode, **kw).double().eval()


def _tokens(b: int, grid: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid[0] * grid[1] * grid[2], C, generator=g, dtype=torch.float64)


def _assert_all_grads(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert all(p.grad.abs().sum() > 0 for p in module.parameters())


def _loop_reference(blk: MemoryBlock, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Factorized MemoryBlock written with explicit Python loops over slices and positions."""
    D, h, w = grid
    vol = x.reshape(x.shape[0], D, h, w, C).clone()  # slice-major tokens as a volume
    for z in range(D):  # within-slice attention, one slice at a time
        s = vol[:, z].reshape(x.shape[0], h * w, C)
        vol[:, z] = (s + blk.attn(blk.norm_attn(s))).reshape(x.shape[0], h, w, C)
    out = vol.clone()
    for yy in range(h):  # across-slice attention, one (y, x) position at a time
        for xx in range(w):
            s = vol[:, :, yy, xx]  # (B, D, C)
            out[:, :, yy, xx] = s + blk.attn_depth(blk.norm_depth(s))
    t = out.reshape(x.shape[0], D * h * w, C)
    protos = blk.prototypes.expand(x.shape[0], -1, -1)
    t = t + blk.mem_attn(blk.norm_mem(t), protos)
    return t + blk.ffn(blk.norm_ffn(t))


@pytest.mark.parametrize("mode", ["full", "factorized", "auto"])
@pytest.mark.parametrize("grid", [(1, 2, 2), (3, 2, 4), (4, 1, 1)])
def test_shapes(mode, grid):
    blk = _block(mode)
    x = _tokens(2, grid)
    y = blk(x, grid)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("grid", [(3, 2, 2), (2, 3, 1), (4, 2, 3)])
def test_factorized_equals_explicit_loop(grid):
    blk = _block("factorized")
    x = _tokens(2, grid)
    torch.testing.assert_close(blk(x, grid), _loop_reference(blk, x, grid))


def test_factorized_differs_from_full():
    grid = (3, 2, 2)
    fac = _block("factorized")
    full = _block("full")
    full.load_state_dict(fac.state_dict(), strict=False)  # full's weights are a subset
    x = _tokens(1, grid)
    assert not torch.allclose(fac(x, grid), full(x, grid))


@pytest.mark.parametrize(("grid", "expected"), [((2, 2, 2), "full"), ((2, 3, 2), "full"), ((3, 3, 2), "factorized")])
def test_auto_picks_mode_by_threshold(grid, expected):
    auto = _block("auto", full_max_tokens=12)
    L = grid[0] * grid[1] * grid[2]
    assert auto.resolve_mode(L) == expected
    same = _block(expected)
    same.load_state_dict(auto.state_dict(), strict=expected == "factorized")
    x = _tokens(2, grid)
    torch.testing.assert_close(auto(x, grid), same(x, grid))


def test_full_mode_is_permutation_equivariant_over_all_tokens():
    grid = (3, 2, 2)
    blk = _block("full")
    x = _tokens(2, grid)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(blk(x[:, perm], grid), blk(x, grid)[:, perm])


def test_factorized_is_equivariant_to_slice_order_but_not_to_any_token_order():
    grid = (4, 2, 2)
    blk = _block("factorized")
    x = _tokens(2, grid)
    y = blk(x, grid)
    slice_perm = torch.tensor([2, 0, 3, 1])
    token_perm = torch.arange(x.shape[1]).reshape(4, 4)[slice_perm].reshape(-1)  # whole slices move
    torch.testing.assert_close(blk(x[:, token_perm], grid), y[:, token_perm])
    mixed = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(5))  # slices scrambled
    assert not torch.allclose(blk(x[:, mixed], grid), y[:, mixed])


@pytest.mark.parametrize("mode", ["full", "factorized"])
def test_slice_order_matters_only_through_position(mode):
    grid = (4, 2, 2)
    blk = _block(mode)
    pe = PosEmbed3d(C).double()
    x = _tokens(1, grid)
    token_perm = torch.arange(x.shape[1]).reshape(4, 4)[torch.tensor([3, 1, 0, 2])].reshape(-1)
    y = blk(pe(x, grid), grid)
    y_perm = blk(pe(x[:, token_perm], grid), grid)
    assert not torch.allclose(y_perm, y[:, token_perm], atol=1e-4)


def test_prototypes_change_the_output():
    grid = (2, 2, 2)
    blk = _block("full")
    x = _tokens(1, grid)
    y = blk(x, grid)
    with torch.no_grad():
        blk.prototypes.add_(torch.randn_like(blk.prototypes))
    assert not torch.allclose(blk(x, grid), y)


@pytest.mark.parametrize(("mode", "grid"), [("full", (2, 2, 3)), ("factorized", (3, 2, 2)), ("auto", (3, 3, 3))])
def test_every_parameter_gets_a_gradient(mode, grid):
    torch.manual_seed(0)
    blk = MemoryBlock(C, num_heads=HEADS, num_prototypes=5, mode=mode, full_max_tokens=20, drop=0.1).train()
    x = torch.randn(2, grid[0] * grid[1] * grid[2], C)
    blk(x, grid).square().mean().backward()
    _assert_all_grads(blk)
    assert blk.prototypes.grad.abs().sum() > 0


def test_full_mode_has_no_unused_across_slice_weights():
    names = {n for n, _ in _block("full").named_parameters()}
    assert not any(n.startswith(("attn_depth", "norm_depth")) for n in names)
    assert {n for n, _ in _block("auto").named_parameters()} > names


@pytest.mark.parametrize(("kwargs", "match"), [({"mode": "linear"}, "mode"), ({"num_prototypes": 0}, "num_prototypes")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBlock(C, num_heads=HEADS, **kwargs)


def test_wrong_grid_is_rejected():
    with pytest.raises(ValueError, match="expected tokens"):
        _block("full")(_tokens(1, (2, 2, 2)), (2, 2, 3))
