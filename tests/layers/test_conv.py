"""Shapes and gradients of the conv blocks in medfuse.layers.conv, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfuse.layers.conv import ConvNormAct, DownBlock, ResBlock, UpBlock, make_norm

DIMS = [2, 3]


def _x(dims: int, b: int = 2, c: int = 4, s: int = 8) -> torch.Tensor:
    return torch.randn(b, c, *([s] * dims))


def _assert_all_grads(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "size", "expected"),
    [(3, 1, 1, 8, 8), (3, 2, 1, 8, 4), (3, 2, 1, 7, 4), (4, 2, 1, 7, 3), (1, 1, 1, 5, 5), (3, 1, 2, 6, 6)],
)
def test_conv_norm_act_shapes(dims, kernel, stride, dilation, size, expected):
    block = ConvNormAct(4, 6, kernel_size=kernel, stride=stride, dilation=dilation, spatial_dims=dims)
    y = block(_x(dims, s=size))
    assert y.shape == (2, 6, *([expected] * dims))


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize(
    ("norm", "norm_cls"),
    [
        ("instance", (nn.InstanceNorm2d, nn.InstanceNorm3d)),
        ("batch", (nn.BatchNorm2d, nn.BatchNorm3d)),
        ("group", (nn.GroupNorm, nn.GroupNorm)),
        (None, (nn.Identity, nn.Identity)),
    ],
)
@pytest.mark.parametrize("act", ["relu", "gelu", "leakyrelu", None])
def test_conv_norm_act_variants_get_gradients(dims, norm, norm_cls, act):
    block = ConvNormAct(4, 6, spatial_dims=dims, norm=norm, act=act)
    assert isinstance(block.norm, norm_cls[dims - 2])
    assert (block.conv.bias is None) == (norm is not None)  # bias only when no norm follows
    block(_x(dims)).square().mean().backward()
    _assert_all_grads(block)


@pytest.mark.parametrize(("channels", "groups", "expected"), [(32, 8, 8), (12, 8, 6), (7, 8, 7), (3, 8, 3)])
def test_group_norm_uses_a_divisor_of_channels(channels, groups, expected):
    norm = make_norm("group", channels, 2, groups)
    assert norm.num_groups == expected


@pytest.mark.parametrize(
    ("bad", "kwargs"),
    [("spatial_dims", {"spatial_dims": 1}), ("norm", {"norm": "layer"}), ("act", {"act": "tanh"})],
)
def test_conv_norm_act_rejects_bad_options(bad, kwargs):
    with pytest.raises(ValueError, match=bad.split("_")[0]):
        ConvNormAct(2, 2, **kwargs)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize(
    ("cin", "cout", "stride", "projection"),
    [(6, 6, 1, False), (4, 6, 1, True), (6, 6, 2, True), (4, 8, 2, True)],
)
def test_resblock_shortcut_and_shape(dims, cin, cout, stride, projection):
    block = ResBlock(cin, cout, stride=stride, spatial_dims=dims)
    assert isinstance(block.shortcut, ConvNormAct) == projection
    assert isinstance(block.shortcut, nn.Identity) == (not projection)
    y = block(_x(dims, c=cin, s=8))
    assert y.shape == (2, cout, *([8 // stride] * dims))
    y.square().mean().backward()
    _assert_all_grads(block)


@pytest.mark.parametrize("dims", DIMS)
def test_resblock_identity_shortcut_adds_input(dims):
    block = ResBlock(4, 4, spatial_dims=dims, act=None).eval()
    for p in block.conv2.parameters():  # zero second conv -> residual branch is 0, out == x
        nn.init.zeros_(p)
    x = _x(dims)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("mode", ["strided", "maxpool", "avgpool"])
@pytest.mark.parametrize("residual", [False, True])
def test_down_block(dims, mode, residual):
    block = DownBlock(4, 8, spatial_dims=dims, mode=mode, residual=residual, num_convs=2)
    y = block(_x(dims, s=8))
    assert y.shape == (2, 8, *([4] * dims))
    y.square().mean().backward()
    _assert_all_grads(block)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("mode", ["transpose", "trilinear", "nearest"])
def test_up_block_concatenates_skip(dims, mode):
    block = UpBlock(8, 4, 6, spatial_dims=dims, mode=mode)
    assert block.conv1.conv.in_channels == (6 if mode == "transpose" else 8) + 4
    x, skip = _x(dims, c=8, s=4), _x(dims, c=4, s=8)
    y = block(x, skip)
    assert y.shape == (2, 6, *([8] * dims))
    y.square().mean().backward()
    _assert_all_grads(block)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("skip_size", [7, 9])
def test_up_block_matches_odd_skip_size(dims, skip_size):
    block = UpBlock(8, 4, 6, spatial_dims=dims, mode="transpose")
    y = block(_x(dims, c=8, s=4), _x(dims, c=4, s=skip_size))
    assert y.shape == (2, 6, *([skip_size] * dims))


@pytest.mark.parametrize("dims", DIMS)
def test_up_block_without_skip(dims):
    block = UpBlock(8, 0, 6, spatial_dims=dims, mode="trilinear")
    assert block(_x(dims, c=8, s=4)).shape == (2, 6, *([8] * dims))
    with pytest.raises(ValueError, match="skip"):
        block(_x(dims, c=8, s=4), _x(dims, c=4, s=8))


def test_down_then_up_restores_shape_2d_unet_level():
    down, up = DownBlock(3, 8, spatial_dims=2), UpBlock(8, 3, 4, spatial_dims=2)
    x = torch.randn(1, 3, 10, 12)
    y = up(down(x), x)
    assert y.shape == (1, 4, 10, 12)
