"""MedSAM2 encoder: SAM2 neck semantics and naming, checkpoint round trip, preprocessing, parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfuse.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from medfuse.encoders.medsam2 import FpnNeck, MedSAM2Encoder, intensity_to_uint8, resize_uint8
from medfuse.errors import WeightsError
from medfuse.registry import ENCODERS


@pytest.fixture(scope="module")
def enc() -> MedSAM2Encoder:
    torch.manual_seed(0)
    return MedSAM2Encoder().eval()


@pytest.fixture(scope="module")
def ckpt(enc, tmp_path_factory):
    """A MedSAM2-layout checkpoint of ``enc`` plus non-encoder keys."""
    sd = dict(enc.sam2_state_dict())
    sd["memory_attention.layers.0.linear1.weight"] = torch.randn(4, 4)
    sd["sam_mask_decoder.iou_token.weight"] = torch.randn(1, 4)
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_test.pt"
    torch.save({"model": sd, "epoch": 3}, path)
    return path, sd


@pytest.fixture(scope="module")
def loaded(ckpt) -> MedSAM2Encoder:
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    return MedSAM2Encoder(weights=ckpt[0]).eval()


# ---------------------------------------------------------------------------------------------- neck
def test_neck_parameter_names_match_sam2():
    neck = FpnNeck(d_model=8, backbone_channel_list=[32, 16, 8, 4])
    expected = {f"convs.{i}.conv.{p}" for i in range(4) for p in ("weight", "bias")}
    assert set(neck.state_dict()) == expected
    assert neck.convs[0].conv.in_channels == 32 and neck.convs[3].conv.in_channels == 4


def test_neck_top_down_semantics():
    """convs[0] is the lowest-res lateral; only levels 2 and 3 get top-down features (nearest 2x)."""
    torch.manual_seed(1)
    neck = FpnNeck(d_model=8, backbone_channel_list=[32, 16, 8, 4], top_down_levels=(2, 3))
    xs = [torch.randn(2, c, s, s) for c, s in ((4, 16), (8, 8), (16, 4), (32, 2))]  # high-res first
    out = neck(xs)

    def lateral(i):
        conv = neck.convs[3 - i].conv
        return F.conv2d(xs[i], conv.weight, conv.bias)

    up = torch.repeat_interleave(torch.repeat_interleave(lateral(3), 2, dim=-2), 2, dim=-1)
    torch.testing.assert_close(out[3], lateral(3))
    torch.testing.assert_close(out[2], lateral(2) + up)
    torch.testing.assert_close(out[1], lateral(1))  # not a top-down level: lateral only
    torch.testing.assert_close(out[0], lateral(0))
    partial = neck(xs, min_level=2)
    assert partial[0] is None and partial[1] is None
    torch.testing.assert_close(partial[2], out[2])


# ---------------------------------------------------------------------------------------------- model
def test_registered_shape_and_stride(enc):
    assert ENCODERS.get("medsam2") is MedSAM2Encoder
    assert (enc.out_channels, enc.stride, enc.input_size) == (256, 16, 512)
    with torch.no_grad():
        y = enc(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 256, 4, 6)
    assert not any(k.startswith("trunk.head") for k in enc.state_dict())


def test_full_resolution_vision_features(enc):
    vol = torch.rand(1, 40, 50) * 500
    x = enc.preprocess_volume(vol)
    assert x.shape == (1, 3, 512, 512)
    with torch.no_grad():
        y = enc(x)
    assert y.shape == (1, 256, 32, 32) and torch.isfinite(y).all()


def test_forward_is_last_pyramid_level(enc):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pyr = enc.forward_pyramid(x)
        y = enc(x)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(16, 16), (8, 8), (4, 4)]
    torch.testing.assert_close(pyr[-1], y)


def test_checkpoint_round_trip(enc, ckpt, loaded):
    _, sd = ckpt
    assert any(".mlp.layers.0." in k for k in sd) and not any(".mlp.fc1." in k for k in sd)
    rep = loaded.load_report
    assert rep.ok and rep.loaded == len(enc.state_dict())
    assert sorted(rep.ignored) == ["memory_attention.layers.0.linear1.weight", "sam_mask_decoder.iou_token.weight"]
    assert loaded.weights_id() == enc.weights_id()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))


def test_own_state_dict_loads(loaded, tmp_path):
    from medfuse.encoders.weights import save_safetensors

    before = loaded.weights_id()
    rep = loaded.load_checkpoint(save_safetensors(loaded, tmp_path / "enc.safetensors"))
    assert rep.ok and rep.loaded == len(loaded.state_dict()) and rep.ignored == []
    assert loaded.weights_id() == before


def test_strict_load_reports_missing_trunk_key(loaded, ckpt, tmp_path):
    sd = dict(ckpt[1])
    del sd["image_encoder.trunk.blocks.3.mlp.layers.0.weight"]
    path = tmp_path / "partial.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(WeightsError, match="1 missing"):
        loaded.load_checkpoint(path)
    rep = loaded.load_checkpoint(path, strict=False)  # same weights as the file: nothing changes
    assert rep.missing == ["trunk.blocks.3.mlp.fc1.weight"] and not rep.ok


def test_checkpoint_without_encoder_keys(loaded, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"mask_decoder.w": torch.zeros(2)}}, path)
    with pytest.raises(WeightsError, match="no image-encoder keys"):
        loaded.load_checkpoint(path)


@pytest.mark.parametrize(("name", "content", "match"), [
    ("nope.pt", None, "weights file not found"),
    ("bad.pt", b"not a checkpoint\n", "not a PyTorch weights file"),
    ("empty.pt", b"", "weights file is empty"),
])
def test_missing_or_unreadable_file_says_so(loaded, tmp_path, name, content, match):
    """The file's own problem, not "no image-encoder keys among its 0 keys" (no key was ever read)."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as e:
        loaded.load_checkpoint(path)
    assert "image-encoder keys" not in str(e.value)


def test_trainable_gradients_and_unused_laterals():
    e = MedSAM2Encoder().unfreeze()
    frozen = {n for n, p in e.named_parameters() if not p.requires_grad}
    assert frozen == {f"neck.convs.{i}.conv.{p}" for i in (2, 3) for p in ("weight", "bias")}
    e(torch.randn(1, 3, 32, 32)).square().mean().backward()
    no_grad = [n for n, p in e.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


# ---------------------------------------------------------------------------------------------- preprocessing
def test_mr_uint8_matches_reference_recipe():
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 100.0, size=(4, 20, 24)).astype(np.float32)
    vol[:, :5] = 0
    lo, hi = np.percentile(vol[vol != 0], (0.5, 99.5))
    c = np.clip(vol, lo, hi)
    expected = (c - c.min()) / (c.max() - c.min()) * 255.0
    expected[vol == 0] = 0
    expected = np.uint8(expected)
    got = intensity_to_uint8(torch.from_numpy(vol), "mr", per_volume=True)
    np.testing.assert_array_equal(got.numpy().astype(np.uint8), expected)


@pytest.mark.parametrize(("window", "lo", "hi"), [(None, -160.0, 240.0), ((0.0, 100.0), -50.0, 50.0)])
def test_ct_window(window, lo, hi):
    vol = torch.linspace(-1000, 1000, 2 * 8 * 8).reshape(2, 8, 8)
    u = intensity_to_uint8(vol, "ct", window)
    assert (u[vol <= lo] == 0).all() and (u[vol >= hi] == 255).all()
    mid = (vol > lo) & (vol < hi)
    assert ((u[mid] > 0) & (u[mid] < 255)).any()


def test_per_volume_vs_per_slice(enc):
    vol = torch.rand(3, 16, 16) * 100 + 1
    vol[1] *= 10  # a brighter slice changes the volume statistics, not its own slice statistics
    per_vol = enc.preprocess_volume(vol)
    per_slice = enc.preprocess(vol)
    assert per_vol.shape == per_slice.shape == (3, 3, 512, 512)
    assert not torch.allclose(per_vol[0], per_slice[0])
    torch.testing.assert_close(enc.preprocess_volume(vol[1:2]), enc.preprocess(vol[1:2]))


def test_preprocess_normalisation_and_background(enc):
    vol = torch.zeros(2, 32, 32)
    vol[0, 8:24, 8:24] = torch.rand(16, 16) * 50 + 10
    x = enc.preprocess_volume(vol)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    grey = x * std + mean
    torch.testing.assert_close(grey[:, 0], grey[:, 2])  # 3 identical channels
    torch.testing.assert_close(grey[1], torch.zeros_like(grey[1]), atol=1e-6, rtol=0)  # all-background slice
    levels = grey * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)  # uint8 quantisation kept
    assert grey.max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((37, 53), 64), ((100, 100), 64), ((240, 200), 512)])
def test_resize_matches_pil_bicubic(shape, size):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=shape, dtype=np.uint8)  # noise: worst case for overshoot
    ours = resize_uint8(torch.from_numpy(u8).float()[None], size)[0, 0].numpy()
    pil = np.asarray(image.fromarray(u8).resize((size, size), image.BICUBIC)).astype(np.float32)
    diff = np.abs(ours - pil)
    assert diff.max() <= 1.0 and (diff > 0).mean() < 0.01


# ---------------------------------------------------------------------------------------------- oracle
@pytest.mark.oracles
def test_parity_with_sam2_image_encoder(tmp_path):
    pytest.importorskip("sam2")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"):
        cfg = compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml", overrides=["++model.image_size=512"])
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    ref = instantiate(cfg.model.image_encoder).eval()
    with torch.no_grad():
        for p in ref.parameters():  # move off the init (zeros/ones) so every weight matters
            p.add_(torch.randn_like(p) * 0.02)
    sd = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "sam2_random.pt")
    ours = MedSAM2Encoder(weights=tmp_path / "sam2_random.pt").eval()
    assert set(ours.sam2_state_dict()) == set(sd)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        expected = ref(x)
        pyramid = ours.forward_pyramid(x)
    torch.testing.assert_close(pyramid[-1], expected["vision_features"], atol=1e-4, rtol=0)
    for a, b in zip(pyramid, expected["backbone_fpn"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
