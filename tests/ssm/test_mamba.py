"""Mamba and BiMamba blocks: shapes, gradients, causality, live backward branch, dispatch parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfuse.ssm import BiMamba, Mamba, causal_depthwise_conv
from medfuse.ssm.mamba import conv_silu

D_MODEL = 16


def build(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "mamba":
        return Mamba(D_MODEL, d_state=4, **kw)
    return BiMamba(D_MODEL, d_state=4, bidirectional=(kind == "bi"), **kw)


def tokens(batch: int, length: int, seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, D_MODEL, generator=g).requires_grad_(requires_grad)


@pytest.mark.parametrize("kind", ["mamba", "bi", "uni"])
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 5), (2, 37)])
def test_shapes(kind, batch, length):
    y = build(kind)(tokens(batch, length))
    assert y.shape == (batch, length, D_MODEL)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["mamba", "bi", "uni"])
def test_every_parameter_gets_a_gradient(kind):
    model = build(kind)
    model(tokens(2, 23)).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if kind == "bi":
        assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight", "A_b_log", "D_b"} <= dict(
            model.named_parameters()).keys()


def test_backward_branch_changes_the_output_on_cpu():
    model = build("bi")
    x = tokens(1, 12)
    before = model(x)
    with torch.no_grad():
        model.A_b_log.add_(0.5)
        model.D_b.add_(1.0)
    after = model(x)
    assert not torch.allclose(before, after, atol=1e-6)
    with torch.no_grad():  # the forward-branch output alone is unaffected by the backward params
        model.bidirectional = False
        uni_before = model(x)
        model.A_b_log.sub_(0.5)
        uni_after = model(x)
    torch.testing.assert_close(uni_before, uni_after)


@pytest.mark.parametrize("kind", ["mamba", "uni", "bi"])
def test_causality(kind):
    """Uni-directional blocks are causal; the bi block sees the whole sequence from position 0."""
    model = build(kind)
    length, t = 10, 4
    x = tokens(1, length, requires_grad=True)
    y = model(x)
    (grad,) = torch.autograd.grad(y[0, t].sum(), x)
    future = grad[0, t + 1:].abs().sum()
    past = grad[0, : t + 1].abs().sum()
    assert past > 0
    if kind == "bi":
        assert future > 0
        (grad0,) = torch.autograd.grad(model(x)[0, 0].sum(), x)
        assert grad0[0, -1].abs().sum() > 0  # position 0 depends on the last token
    else:
        assert future == 0


@pytest.mark.parametrize("kind", ["mamba", "bi"])
def test_ref_and_chunked_paths_agree(monkeypatch, kind):
    model = build(kind)
    x = tokens(2, 45)
    results = {}
    for path in ("ref", "chunked"):
        monkeypatch.setenv("MEDFUSE_SCAN", path)
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.pow(2).sum().backward()
        results[path] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()})
    (y_r, gx_r, gp_r), (y_c, gx_c, gp_c) = results["ref"], results["chunked"]
    torch.testing.assert_close(y_c, y_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_r, rtol=1e-4, atol=1e-5)
    for name in gp_r:
        scale = float(gp_r[name].abs().max())
        torch.testing.assert_close(gp_c[name], gp_r[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("kind", ["mamba", "bi"])
def test_bf16_autocast(kind):
    model = build(kind)
    x = tokens(2, 20, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    with torch.no_grad():
        y32 = model(x)
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max()
    y.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_initialisation_follows_mamba():
    model = Mamba(32, d_state=8, dt_min=0.002, dt_max=0.05)
    assert model.dt_rank == math.ceil(32 / 16) and model.d_inner == 64
    torch.testing.assert_close(-torch.exp(model.A_log), -torch.arange(1, 9.0).repeat(64, 1))
    dt = F.softplus(model.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert torch.equal(model.D.detach(), torch.ones(64))


def test_state_dict_names_match_mamba_ssm_and_vim():
    keys = set(build("bi").state_dict())
    uni = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
           "A_log", "D", "out_proj.weight"}
    assert set(build("mamba").state_dict()) == uni == set(build("uni").state_dict())
    assert keys == uni | {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                          "dt_proj_b.bias", "A_b_log", "D_b"}


def test_uni_bimamba_equals_mamba():
    mamba, uni = build("mamba"), build("uni", seed=5)
    uni.load_state_dict(mamba.state_dict())
    x = tokens(2, 9)
    torch.testing.assert_close(uni(x), mamba(x))


def test_causal_depthwise_conv_matches_conv1d():
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 11, 6)
    expected = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, conv.weight, conv.bias), expected)


@pytest.mark.parametrize("length", [1, 3, 4, 9])
def test_fused_conv_silu_gradcheck(length):
    """The fused conv + SiLU Function (manual backward) against finite differences, incl. L < kernel."""
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv_silu, (x, w, b))
    torch.testing.assert_close(conv_silu(x, w, b), F.silu(causal_depthwise_conv(x, w, b)))
