"""UniMRSeg losses: NT-Xent against a per-row reference (outputs and gradients) and the stage-1
L1 + 3D SSIM reconstruction loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfuse.losses.ntxent import multilevel_nt_xent, nt_xent
from medfuse.losses.reconstruction import ReconstructionLoss


def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. 1 written out row by row."""
    z = torch.cat([z1, z2])
    n = z.shape[0]
    b = n // 2
    losses = []
    for i in range(n):
        j = (i + b) % n
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / t for k in range(n)]
        denom = sum(torch.exp(sims[k]) for k in range(n) if k != i)
        losses.append(-torch.log(torch.exp(sims[j]) / denom))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("b, t", [(2, 0.5), (5, 0.1), (3, 1.0)])
def test_nt_xent_matches_reference_outputs_and_gradients(b, t):
    torch.manual_seed(b)
    z1 = torch.randn(b, 7, requires_grad=True)
    z2 = torch.randn(b, 7, requires_grad=True)
    out, ref = nt_xent(z1, z2, t), _nt_xent_reference(z1, z2, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g_out = torch.autograd.grad(out, [z1, z2])
    g_ref = torch.autograd.grad(ref, [z1, z2])
    for a, r in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_nt_xent_rewards_aligned_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn_like(z))
    shuffled = nt_xent(z, z[torch.randperm(8)] + 0.01 * torch.randn_like(z))
    chance = math.log(2 * 8 - 1)
    assert aligned < 0.7 * chance < shuffled


def test_multilevel_pools_and_averages():
    torch.manual_seed(0)
    f1 = [torch.randn(3, 4, 2, 2, 2), torch.randn(3, 6, 1, 1, 1)]
    f2 = [torch.randn(3, 4, 2, 2, 2), torch.randn(3, 6, 1, 1, 1)]
    expected = (nt_xent(f1[0].mean((2, 3, 4)), f2[0].mean((2, 3, 4)), 0.5)
                + nt_xent(f1[1].flatten(1), f2[1].flatten(1), 0.5)) / 2
    torch.testing.assert_close(multilevel_nt_xent(f1, f2, 0.5), expected)
    with pytest.raises(ValueError):
        multilevel_nt_xent(f1, f2[:1])


def test_reconstruction_loss_zero_for_perfect_and_ignores_absent_channels():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 12, 12, 12)
    loss = ReconstructionLoss(win_size=7)
    perfect = loss(target.clone(), target)
    assert float(perfect["loss"]) < 1e-4 and float(perfect["ssim"]) > 0.999
    pred = target.clone()
    pred[1, 2] = torch.rand(12, 12, 12)  # garbage where the modality is absent
    present = torch.ones(2, 3)
    present[1, 2] = 0
    assert float(loss(pred, target, present)["loss"]) < 1e-4
    assert float(loss(pred, target)["loss"]) > 0.05


def test_reconstruction_loss_is_l1_plus_monai_ssim_and_has_gradients():
    from monai.losses import SSIMLoss

    torch.manual_seed(0)
    target = torch.rand(1, 2, 10, 10, 10)
    pred = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
    out = ReconstructionLoss(win_size=5, l1_weight=1.0, ssim_weight=1.0)(pred, target)
    ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=5)(pred.reshape(2, 1, 10, 10, 10),
                                                                 target.reshape(2, 1, 10, 10, 10))
    torch.testing.assert_close(out["loss"], F.l1_loss(pred, target) + ssim)
    out["loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    # a window larger than the volume shrinks to fit
    assert torch.isfinite(ReconstructionLoss(win_size=11)(pred.detach()[..., :6, :6, :6], target[..., :6, :6, :6])["loss"])
