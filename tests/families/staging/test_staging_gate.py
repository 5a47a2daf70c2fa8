"""Staging's gate: the sum and gate-only ablations, the gate temperature, the gate's spread and its map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.config import validate_params
from medfuse.errors import ConfigError
from medfuse.families.staging import FAMILY
from medfuse.families.staging.bgamf import BGAMF, TemperedGatedFusion
from medfuse.families.staging.evaluate import gate_statistics
from medfuse.families.staging.params import StagingParams, build_staging
from medfuse.layers.fusion import GatedFusion

SMALL = dict(dim=16, num_heads=2, num_prototypes=4, d_state=4, token_pool=4, memory_mode="full",
             encoder_params={"out_channels": 8, "hidden": (4, 8)})


def staging(**kw):
    return build_staging(validate_params(StagingParams, {"modalities": ["t2w", "dwi"], **SMALL, **kw}, "model.params"))


def _x(b=2, d=3, hw=32):
    return torch.rand(b, 2, d, hw, hw, generator=torch.Generator().manual_seed(0))


def test_demo_ablation_has_sum_and_gate_only_rows():
    rows = dict(FAMILY.demo_ablations)
    sums = [o for n, o in rows.items() if n.startswith("sum")]
    gates = [o for n, o in rows.items() if n.startswith("gate only")]
    assert sums == [("model.params.fusion=sum",)]
    assert gates == [("model.params.bgamf_align=false", "model.params.bgamf_mamba=false")]


def test_sum_is_the_gated_blend_with_the_gate_at_one_half():
    """``sum`` and a gate-only BGAMF whose gate is exactly 0.5 give the same logits from the same weights."""
    torch.manual_seed(0)
    gate_only = staging(fusion="bgamf", bgamf_align=False, bgamf_mamba=False).eval()
    with torch.no_grad():
        gate_only.bgamf.fuse.gate.weight.zero_()
        gate_only.bgamf.fuse.gate.bias.zero_()  # sigmoid(0) = 0.5 everywhere
    summed = staging(fusion="sum").eval()
    missing = summed.load_state_dict(gate_only.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("bgamf.") for k in missing.unexpected_keys)
    x = _x()
    torch.testing.assert_close(summed(x), gate_only(x))


def test_gate_only_bgamf_is_the_gate_alone():
    torch.manual_seed(0)
    m = BGAMF(16, num_heads=2, d_state=4, align=False, branch_mamba=False)
    assert [n for n, _ in m.named_children()] == ["fuse"]
    a, b = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    f, g = m(a, b, (3, 2, 2))
    torch.testing.assert_close(f, g * a + (1 - g) * b)


def test_gate_temperature_one_is_the_seed_gate_and_below_one_sharpens_it():
    torch.manual_seed(0)
    assert type(BGAMF(16, num_heads=2, d_state=4).fuse) is GatedFusion  # default: unchanged module and weights
    plain = GatedFusion(8)
    hot = TemperedGatedFusion(8, temperature=0.1)
    hot.load_state_dict(plain.state_dict())  # same parameter names
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        g1, g01 = plain(a, b)[1], hot(a, b)[1]
    logit = torch.logit(g1)
    torch.testing.assert_close(g01, torch.sigmoid(logit / 0.1), rtol=1e-4, atol=1e-5)
    assert float((g01 - 0.5).abs().mean()) > float((g1 - 0.5).abs().mean())
    with pytest.raises(ValueError, match="temperature"):
        TemperedGatedFusion(8, temperature=0.0)


def test_gate_temperature_param_is_validated_and_reaches_the_gate():
    m = staging(bgamf_gate_temperature=0.25)
    assert isinstance(m.bgamf.fuse, TemperedGatedFusion) and m.bgamf.fuse.temperature == 0.25
    with pytest.raises(ConfigError, match="model.params.bgamf_gate_temperature"):
        staging(bgamf_gate_temperature=0)


def test_forward_intermediates_gives_the_gate_and_its_spread_over_channels():
    torch.manual_seed(0)
    m = staging().eval()
    _, inter = m.forward_intermediates(_x())
    assert inter["gate"].shape == inter["gate_channel_sd"].shape == (2, 3, 4, 4)
    assert float(inter["gate_channel_sd"].min()) >= 0 and float(inter["gate_channel_sd"].max()) > 0


def test_gate_statistics_spread_and_modality_regions():
    a = np.array([[0.2, 0.4], [0.6, 0.8]])  # one case: mean 0.5
    b = np.full((2, 2), 0.7)  # a constant case
    s = gate_statistics([a, b], [np.zeros((2, 2)), np.ones((2, 2))])
    allg = np.concatenate([a.ravel(), b.ravel()])
    assert s["mean"] == pytest.approx(allg.mean()) and s["sd_tokens"] == pytest.approx(allg.std())
    assert s["sd_within_case"] == pytest.approx((a.std() + 0.0) / 2)
    assert s["sd_between_cases"] == pytest.approx(np.std([0.5, 0.7]))
    assert (s["min"], s["max"], s["n_cases"], s["n_tokens"]) == (0.2, 0.8, 2, 8)
    assert s["t2w_favoured"] == {"fraction": 6 / 8, "mean_gate": pytest.approx((0.6 + 0.8 + 4 * 0.7) / 6)}
    assert s["dwi_favoured"] == {"fraction": 2 / 8, "mean_gate": pytest.approx(0.3)}
    assert s["mean_channel_sd"] == pytest.approx(0.5)
    flat = gate_statistics([np.full((3, 2, 2), 0.49)])
    assert flat["sd_tokens"] == pytest.approx(0.0) and flat["t2w_favoured"] == {"fraction": 0.0, "mean_gate": None}
    assert "mean_channel_sd" not in flat
    with pytest.raises(ValueError):
        gate_statistics([])


def test_gate_map_is_diverging_around_the_case_mean(tmp_path):
    """Centred at the mean, a gate that varies by +-0.01 around 0.49 spans the whole colour scale."""
    from medfuse.reports.plots import plot_gate_overlay

    gate = 0.49 + 0.01 * np.linspace(-1, 1, 4 * 4 * 4).reshape(4, 4, 4)
    image = np.zeros((4, 32, 32))
    fixed = plot_gate_overlay(image, gate, tmp_path / "fixed.png")
    centred = plot_gate_overlay(image, gate, tmp_path / "centred.png", center=float(gate.mean()))
    assert fixed.is_file() and centred.is_file()

    def colour_spread(png):
        from PIL import Image

        rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        rgb = rgb[:, : rgb.shape[1] * 3 // 5]  # the slices, not the colour bar on the right
        return float((rgb[..., 0] - rgb[..., 2]).std())  # coolwarm: red minus blue

    assert colour_spread(centred) > 2 * colour_spread(fixed)
