"""Anatomical encoder and region-aware attention: assignment from the mask, log vs multiply weighting."""

from __future__ import annotations

import pytest
import torch

from medfuse.layers.region_attention import (
    AnatomicalStructureEncoder,
    RegionAwareAttention,
    region_fractions,
    region_pool,
)


def _mask(b=2, shape=(8, 16, 16), r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, r + 1, (b, 1, *shape), generator=g)
    m[:, :, :4, :8, :8] = 0  # one fully uncovered patch at (4, 8, 8) patches
    return m


def test_fractions_count_voxels_per_cell():
    m = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    m[0, 0, :2] = 1  # half the cell in region 1
    m[0, 0, 2:, :, :1] = 2  # a 2x4x1 slab in region 2
    f = region_fractions(m, num_regions=2, cell=(4, 4, 4))
    assert f.shape == (1, 3, 1, 1, 1)
    torch.testing.assert_close(f.flatten(), torch.tensor([24 / 64, 32 / 64, 8 / 64]))
    with pytest.raises(ValueError):
        region_fractions(m + 5, num_regions=2, cell=(4, 4, 4))


def test_fractions_pad_partial_patches_as_background():
    m = torch.ones(1, 1, 3, 5, 5, dtype=torch.long)
    f = region_fractions(m, num_regions=1, cell=(2, 4, 4))
    assert f.shape == (1, 2, 2, 2, 2)
    torch.testing.assert_close(f[0, 1, 0, 0, 0], torch.tensor(1.0))
    torch.testing.assert_close(f[0, 1, 1, 1, 1], torch.tensor(1 / 32))  # 1 of 32 voxels is inside
    torch.testing.assert_close(f.sum(1), torch.ones(1, 2, 2, 2))


def test_assignment_rows_sum_to_one_over_covered_voxels():
    enc = AnatomicalStructureEncoder(4, 16, patch_size=(4, 8, 8))
    mask = _mask()
    ctx = enc(mask)
    assert ctx.fractions.shape == (2, 2 * 2 * 2, 5) and ctx.assignment.shape == (2, 8, 4) and ctx.grid == (2, 2, 2)
    torch.testing.assert_close(ctx.fractions.sum(-1), torch.ones(2, 8))
    covered = ctx.coverage > 0
    assert (~covered).any() and covered.any()
    torch.testing.assert_close(ctx.assignment.sum(-1)[covered], torch.ones(int(covered.sum())))
    assert float(ctx.assignment[~covered].abs().sum()) == 0.0
    # assignment = share of the patch's *covered* voxels: check one patch by counting
    patch = mask[0, 0, 4:8, 8:16, 0:8]
    counts = torch.stack([(patch == r).sum() for r in range(1, 5)]).float()
    n = (1 * 2 + 1) * 2 + 0  # patch (z=1, y=1, x=0) in slice-major order
    torch.testing.assert_close(ctx.assignment[0, n], counts / counts.sum())
    assert ctx.embeds.shape == (2, 5, 16)
    assert ctx.present.shape == (2, 4) and bool(ctx.present.all())


def test_region_embeddings_depend_on_the_mask_shape():
    torch.manual_seed(0)
    enc = AnatomicalStructureEncoder(2, 8, patch_size=(2, 4, 4), sub=(1, 2, 2))
    a = torch.zeros(1, 1, 4, 8, 8, dtype=torch.long)
    a[..., :4, :4] = 1
    b = torch.zeros_like(a)
    b[..., :2, :8] = 1  # same voxel count, other shape
    ea, eb = enc(a).embeds, enc(b).embeds
    assert not torch.allclose(ea[:, 1], eb[:, 1])
    torch.testing.assert_close(ea[:, 2], enc.table.weight[2][None])  # absent region: table entry only


def test_region_pool_is_a_weighted_mean():
    feats = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    w = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    pooled, mass = region_pool(feats, w)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))
    torch.testing.assert_close(mass, torch.tensor([[2.0, 0.0]]))


def test_log_weighting_suppresses_non_overlapping_regions_multiply_does_not():
    torch.manual_seed(0)
    log_attn = RegionAwareAttention(8, num_heads=1, weighting="log")
    mul_attn = RegionAwareAttention(8, num_heads=1, weighting="multiply")
    # a patch entirely inside region 0 of 3; all logits negative (as when q and k disagree)
    logits = torch.tensor([-2.0, -1.0, -3.0]).view(1, 1, 1, 3)
    fractions = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3)
    w_log = log_attn.weights(logits, fractions)[0, 0, 0]
    w_mul = mul_attn.weights(logits, fractions)[0, 0, 0]
    assert float(w_log[0]) > 0.999 and float(w_log[1:].max()) < 1e-3
    # the seed's literal form: logit * 0 = 0 > -2, so the regions the patch does not touch win
    assert float(w_mul[1:].sum()) > 0.8 and float(w_mul[0]) < 0.2
    # partial overlap: log weighting is the softmax re-weighted by the overlap
    fractions = torch.tensor([0.25, 0.75, 0.0]).view(1, 1, 3)
    w = log_attn.weights(logits, fractions)[0, 0, 0]
    ref = torch.softmax(logits.flatten(), 0) * torch.tensor([0.25 + 1e-4, 0.75 + 1e-4, 1e-4])
    torch.testing.assert_close(w, ref / ref.sum())


@pytest.mark.parametrize("weighting", ["log", "multiply", "none"])
def test_region_attention_forward_backward_and_returned_weights(weighting):
    torch.manual_seed(0)
    attn = RegionAwareAttention(16, num_heads=4, weighting=weighting)
    x = torch.randn(2, 10, 16, requires_grad=True)
    regions = torch.randn(2, 5, 16, requires_grad=True)
    fractions = torch.softmax(torch.randn(2, 10, 5) * 3, -1)
    y = attn(x, regions, fractions)
    y2, weights = attn(x, regions, fractions, return_attn=True)
    torch.testing.assert_close(y2, y)
    assert y.shape == (2, 10, 16) and weights.shape == (2, 4, 10, 5) and not weights.requires_grad
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
    y.square().sum().backward()
    assert float(x.grad.abs().sum()) > 0 and float(regions.grad.abs().sum()) > 0
    if weighting == "none":  # the assignment is ignored
        torch.testing.assert_close(attn(x, regions, torch.rand(2, 10, 5)), y)
    else:
        assert not torch.allclose(attn(x, regions, torch.rand(2, 10, 5)), y)
