"""Tests of the baseline 3D CNN classifier (medfuse.families.baseline.model)."""

from __future__ import annotations

import pytest
import torch

from medfuse.config import validate_params
from medfuse.families.baseline import CNN3dParams, build_cnn3d
from medfuse.families.baseline.model import BaselineCNN
from medfuse.registry import FAMILIES


def baseline_cnn3d(in_channels, num_classes, **kw):
    return build_cnn3d(validate_params(CNN3dParams, {"in_channels": in_channels, "num_classes": num_classes, **kw},
                                       "model.params"))


def test_registered():
    fam, entry = FAMILIES.find_model("baseline_cnn3d")
    assert fam.name == "baseline" and entry.build is build_cnn3d and entry.task.kind == "classification"


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize(("batch", "in_channels", "num_classes"), [(1, 1, 2), (2, 2, 4), (3, 3, 5)])
def test_output_shape(batch, in_channels, num_classes, pool):
    model = baseline_cnn3d(in_channels, num_classes, widths=(8, 16, 16), pool=pool).eval()
    logits = model(torch.randn(batch, in_channels, 6, 32, 32))
    assert logits.shape == (batch, num_classes)
    assert torch.isfinite(logits).all()


def test_spatial_dims_2():
    model = baseline_cnn3d(2, 3, widths=(8, 16), spatial_dims=2).eval()
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 3)


def test_anisotropic_downsampling_keeps_depth_early():
    model = BaselineCNN(1, 2, widths=(4, 8, 8, 8))
    x = torch.randn(1, 1, 8, 32, 32)
    h1 = model.stages[0](model.stem(x))
    assert h1.shape[2:] == (8, 8, 8)  # in-plane /4, depth kept
    assert model.stages(model.stem(x)).shape[2:] == (2, 2, 2)


@pytest.mark.parametrize("shape", [(2, 3, 6, 32, 32), (2, 2, 32, 32)])
def test_wrong_input_shape_raises(shape):
    model = baseline_cnn3d(2, 4, widths=(8, 16))
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(*shape))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = baseline_cnn3d(2, 4, widths=(8, 16, 16), norm="batch")
    logits = model(torch.randn(3, 2, 6, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def _separable_set(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright cube in the k-th in-plane quadrant of channel k % 2, on noise."""
    y = torch.arange(n) % 4
    x = 0.5 * torch.randn(n, 2, 4, 16, 16, generator=generator)
    for i, k in enumerate(y.tolist()):
        r, c = 8 * (k // 2), 8 * (k % 2)
        x[i, k % 2, 1:3, r + 2 : r + 6, c + 2 : c + 6] += 2.0
    return x, y


def test_learns_a_separable_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _separable_set(64, g)
    x_test, y_test = _separable_set(32, g)
    model = baseline_cnn3d(2, 4, widths=(8, 16), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(x_train), y_train).item()
    model.train()
    for step in range(40):
        idx = torch.arange(16) + 16 * (step % 4)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = torch.nn.functional.cross_entropy(model(x_train), y_train).item()
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert last < 0.5 * first
    assert acc >= 0.75  # chance is 0.25
