"""The SliceEncoder protocol through the tiny CPU encoder: shapes, preprocess, freeze, weights_id."""

from __future__ import annotations

import pytest
import torch

from medfuse.encoders.base import IMAGENET_MEAN, IMAGENET_STD, SliceEncoder, build_encoder
from medfuse.encoders.tiny import TinySliceEncoder
from medfuse.errors import ConfigError
from medfuse.registry import ENCODERS


@pytest.fixture
def enc() -> TinySliceEncoder:
    torch.manual_seed(0)
    return TinySliceEncoder()


def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


@pytest.mark.parametrize(("h", "w"), [(64, 64), (32, 48), (40, 24), (17, 31), (8, 8)])
@pytest.mark.parametrize("out_channels", [16, 32])
def test_output_shape(h, w, out_channels):
    enc = TinySliceEncoder(out_channels=out_channels)
    y = enc(torch.randn(3, 3, h, w))
    assert y.shape == (3, out_channels, h // enc.stride, w // enc.stride)
    assert enc.feature_shape(h, w) == tuple(y.shape[-2:])


def test_registered_and_built_by_name():
    assert "tiny" in ENCODERS.names()
    enc = build_encoder("tiny", out_channels=24)
    assert isinstance(enc, SliceEncoder) and isinstance(enc, TinySliceEncoder)
    assert (enc.name, enc.out_channels, enc.stride, enc.input_size) == ("tiny", 24, 8, None)


def test_build_unknown_encoder_lists_names():
    with pytest.raises(ConfigError, match="tiny"):
        build_encoder("no-such-encoder")


def test_init_is_deterministic_given_seed():
    torch.manual_seed(3)
    a = TinySliceEncoder()
    torch.manual_seed(3)
    b = TinySliceEncoder()
    torch.manual_seed(4)
    c = TinySliceEncoder()
    assert a.weights_id() == b.weights_id() != c.weights_id()


@pytest.mark.parametrize("input_size", [None, 32, 48])
@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_preprocess_shape_and_range(input_size, modality):
    enc = TinySliceEncoder(input_size=input_size)
    ramp = torch.linspace(-1000, 2000, 40).view(1, 1, 40)  # smooth, so resizing keeps its extremes
    raw = ramp * torch.tensor([1.0, 0.5, 2.0, 1.5]).view(4, 1, 1) + torch.zeros(4, 40, 1)
    x = enc.preprocess(raw, modality=modality)
    size = input_size or 40
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
    unit = _denorm(x)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    torch.testing.assert_close(unit[:, 0], unit[:, 2])  # same image in all 3 channels
    assert unit.amax(dim=(1, 2, 3)).min() > 0.99  # each slice spans the full range
    assert unit.amin(dim=(1, 2, 3)).max() < 0.01


def test_preprocess_mr_percentile_clip_keeps_background_zero(enc):
    torch.manual_seed(0)
    raw = torch.zeros(2, 32, 32)
    raw[:, 8:24, 8:24] = torch.rand(2, 16, 16) * 100 + 50
    raw[1, 8:24, 8:24] -= 100  # z-scored-like foreground around 0: background must still map to 0
    raw[0, 10, 10] = 1e6  # outlier is clipped at the 99.5th percentile, not used as the max
    unit = _denorm(enc.preprocess(raw, "mr"))[:, 0]
    assert torch.all(unit[raw == 0].abs() < 1e-5)
    assert torch.all(unit >= -1e-5) and torch.all(unit <= 1 + 1e-5)
    fg = unit[1][raw[1] != 0]
    assert fg.min() < 0.01 and fg.max() > 0.99
    assert (unit[0][raw[0] != 0] > 0.5).float().mean() > 0.3  # not squashed by the outlier


def test_preprocess_ct_window(enc):
    raw = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]]).view(1, 1, 5).expand(1, 4, 5).clone()
    unit = _denorm(enc.preprocess(raw, "ct"))[0, 0, 0]  # default window level 40, width 400
    torch.testing.assert_close(unit, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]), atol=1e-5, rtol=0)
    unit2 = _denorm(enc.preprocess(raw, "ct", window=(0.0, 2000.0)))[0, 0, 0]
    torch.testing.assert_close(unit2, torch.tensor([0.0, 0.42, 0.52, 0.62, 1.0]), atol=1e-5, rtol=0)


def test_preprocess_empty_slice_is_zero(enc):
    unit = _denorm(enc.preprocess(torch.zeros(2, 16, 16), "mr"))
    assert unit.abs().max() < 1e-5


def test_preprocess_rejects_wrong_rank(enc):
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        enc.preprocess(torch.zeros(1, 1, 16, 16))


def test_every_parameter_gets_a_gradient(enc):
    x = enc.preprocess(torch.rand(2, 32, 32) * 100)
    enc(x).square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_freeze_stops_gradients_and_keeps_eval(enc):
    out = enc.freeze()
    assert out is enc and enc.frozen
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    wrapper = torch.nn.Sequential(enc, torch.nn.Conv2d(32, 1, 1))
    wrapper.train()  # a parent's train() must not un-eval the frozen encoder
    assert wrapper.training and not enc.training
    y = wrapper(torch.randn(1, 3, 16, 16))
    y.sum().backward()
    assert all(p.grad is None for p in enc.parameters())
    enc.unfreeze().train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())


def test_weights_id_changes_when_a_weight_changes(enc):
    before = enc.weights_id()
    assert len(before) == 16 and before == enc.weights_id()
    with torch.no_grad():
        next(enc.parameters()).view(-1)[0] += 1e-3
    assert enc.weights_id() != before
