"""ASPP block: shapes in 2D and 3D, the image-pooling branch, gradients, argument checks."""

from __future__ import annotations

import pytest
import torch

from medfuse.layers.aspp import ASPP


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("image_pool", [True, False])
def test_shapes_and_every_parameter_gets_a_gradient(dims, image_pool):
    torch.manual_seed(0)
    block = ASPP(6, 5, dilations=(1, 2, 3), spatial_dims=dims, image_pool=image_pool)
    x = torch.randn(2, 6, *([7] * dims), requires_grad=True)
    y = block(x)
    assert y.shape == (2, 5, *([7] * dims))
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert len(block.branches) == 3 and (block.pool is not None) == image_pool


def test_peer_dilations_work_on_a_small_bottleneck():
    block = ASPP(4, 4, dilations=(1, 6, 12, 18))
    assert block(torch.randn(1, 4, 3, 4, 4)).shape == (1, 4, 3, 4, 4)
    assert [b.conv.dilation[0] for b in block.branches] == [1, 6, 12, 18]
    assert block.branches[0].conv.kernel_size == (1, 1, 1) and block.branches[1].conv.kernel_size == (3, 3, 3)


def test_image_pool_branch_is_global():
    torch.manual_seed(0)
    block = ASPP(3, 4, dilations=(1,), image_pool=True).eval()
    x = torch.randn(1, 3, 6, 6, 6)
    # The pooling branch sees only the mean: moving mass between voxels without changing the mean
    # changes the 1x1 branch but leaves the pooled feature identical.
    pooled = block.pool(x.mean(dim=(2, 3, 4), keepdim=True))
    y = x.clone()
    y[:, :, 0, 0, 0] += 1.0
    y[:, :, 1, 1, 1] -= 1.0
    torch.testing.assert_close(block.pool(y.mean(dim=(2, 3, 4), keepdim=True)), pooled)
    assert not torch.allclose(block(x), block(y))


def test_bad_dilations_are_refused():
    with pytest.raises(ValueError, match="dilations"):
        ASPP(4, 4, dilations=(1, 0))
    with pytest.raises(ValueError, match="dilations"):
        ASPP(4, 4, dilations=())
