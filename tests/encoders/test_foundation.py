"""MedSAM (SAM ViT-B) and DINOv3 slice encoders: checkpoint layouts, shapes, preprocessing."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from medfuse.encoders.base import IMAGENET_MEAN, build_encoder
from medfuse.encoders.dinov3 import DINOV3_STATS, DINOv3Encoder
from medfuse.encoders.sam_vitb import MedSAMEncoder
from medfuse.errors import ConfigError, WeightsError
from medfuse.registry import ENCODERS

# A 2-block SAM ViT-B at 256 px (block 1 global, block 0 windowed) keeps the CPU cost low.
SMALL = {"input_size": 256, "depth": 2, "global_attn_indexes": (1,)}


# ---------------------------------------------------------------------------------------------- MedSAM
@pytest.fixture(scope="module")
def medsam() -> MedSAMEncoder:
    torch.manual_seed(0)
    return MedSAMEncoder(**SMALL).eval()


@pytest.fixture(scope="module")
def medsam_ckpt(medsam, tmp_path_factory):
    sd = dict(medsam.sam_state_dict())
    sd["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 256)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(sd, path)  # MedSAM's layout: a plain state dict
    return path


def test_medsam_registered_and_shape(medsam):
    assert ENCODERS.get("medsam") is MedSAMEncoder
    assert (medsam.out_channels, medsam.stride, medsam.input_size) == (256, 16, 256)
    with torch.no_grad():
        y = medsam(torch.rand(1, 3, 256, 256))
    assert y.shape == (1, 256, 16, 16)


def test_medsam_checkpoint_round_trip(medsam, medsam_ckpt):
    keys = set(medsam.sam_state_dict())
    assert "image_encoder.blocks.0.mlp.lin1.weight" in keys and "image_encoder.neck.0.weight" in keys
    torch.manual_seed(1)
    fresh = MedSAMEncoder(weights=medsam_ckpt, **SMALL).eval()
    rep = fresh.load_report
    assert rep.ok and rep.loaded == len(medsam.state_dict()) and len(rep.ignored) == 2
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), medsam(x))


def test_medsam_checkpoint_at_other_size_fails(medsam_ckpt):
    with pytest.raises(WeightsError, match="shape"):
        MedSAMEncoder(weights=medsam_ckpt, input_size=128, depth=2, global_attn_indexes=(1,))



@pytest.mark.parametrize(("name", "content", "match"), [
    ("nope.pth", None, "weights file not found"),
    ("bad.pth", b"not a checkpoint\n", "not a PyTorch weights file"),
    ("wrong.pth", "wrong-keys", "no image-encoder keys"),
])
def test_medsam_weights_file_problem_is_named(tmp_path, name, content, match):
    """A missing or non-checkpoint file is reported as such; only a readable checkpoint without
    image_encoder.* keys gets the wrong-keys message."""
    path = tmp_path / name
    if content == "wrong-keys":
        torch.save({"mask_decoder.iou_token.weight": torch.zeros(1, 256)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as e:
        MedSAMEncoder(weights=path, **SMALL)
    assert str(path) in str(e.value) and "among its 0 keys" not in str(e.value)


@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_medsam_preprocess(medsam, modality):
    vol = torch.randn(3, 40, 30) * 300
    x = medsam.preprocess_volume(vol, modality)
    assert x.shape == (3, 3, 256, 256)
    torch.testing.assert_close(x[:, 0], x[:, 2])
    flat = x.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(3))  # per image min-max, no mean/std
    torch.testing.assert_close(flat.amax(1), torch.ones(3))
    assert medsam.preprocess(vol, modality).shape == x.shape


@pytest.mark.oracles
def test_medsam_parity_with_segment_anything(tmp_path):
    sam = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    ref = sam.ImageEncoderViT(
        img_size=256, depth=2, embed_dim=768, num_heads=12, mlp_ratio=4, out_chans=256, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
        global_attn_indexes=(1,),
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # rel-pos tables init to zero
    torch.save({f"image_encoder.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "sam.pth")
    ours = MedSAMEncoder(weights=tmp_path / "sam.pth", **SMALL).eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- DINOv3
@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_register_tokens=4, image_size=64, patch_size=16,
    )
    torch.manual_seed(0)
    model = DINOv3ViTModel(cfg).eval()
    path = tmp_path_factory.mktemp("dinov3")
    model.save_pretrained(path)
    return path, model


def test_dinov3_drops_cls_and_registers(dino_dir):
    path, raw = dino_dir
    enc = build_encoder("dinov3", weights=path).eval()
    assert isinstance(enc, DINOv3Encoder)
    assert (enc.out_channels, enc.stride, enc.num_register_tokens) == (64, 16, 4)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        y = enc(x)
        tokens = raw(pixel_values=x).last_hidden_state  # (2, 1 + 4 + 4*3, 64)
    assert y.shape == (2, 64, 4, 3) and tokens.shape[1] == 1 + 4 + 12
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), tokens[:, 5:])  # row-major patches
    assert not torch.allclose(y[:, :, 0, 0], tokens[:, 0])  # CLS is not the first patch


@pytest.mark.parametrize(
    ("folder_stats", "stats", "expected_mean"),
    [
        (None, "imagenet", IMAGENET_MEAN),
        (None, "sat493m", DINOV3_STATS["sat493m"][0]),
        ((0.1, 0.2, 0.3), "sat493m", (0.1, 0.2, 0.3)),  # the folder's config wins over the argument
    ],
)
def test_dinov3_normalisation_stats(dino_dir, tmp_path, folder_stats, stats, expected_mean):
    import shutil

    path = tmp_path / "dino"
    shutil.copytree(dino_dir[0], path)
    if folder_stats is not None:
        cfg = {"image_mean": list(folder_stats), "image_std": [0.5, 0.5, 0.5]}
        (path / "preprocessor_config.json").write_text(json.dumps(cfg))
    enc = DINOv3Encoder(path, stats=stats, input_size=32)
    assert enc.mean == pytest.approx(expected_mean)
    x = enc.preprocess(torch.zeros(1, 20, 20))  # all background -> (0 - mean) / std
    torch.testing.assert_close(x[0, :, 0, 0], -torch.tensor(enc.mean) / torch.tensor(enc.std))
    assert x.shape == (1, 3, 32, 32)


def test_dinov3_trainable_gradients(dino_dir):
    enc = DINOv3Encoder(dino_dir[0]).unfreeze()
    enc(torch.randn(2, 3, 32, 32)).square().mean().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not enc.model.embeddings.mask_token.requires_grad


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda p: None, ConfigError, "no built-in weights"),
        (lambda p: p / "missing", WeightsError, "no config.json"),
    ],
)
def test_dinov3_bad_folder(tmp_path, make, err, match):
    with pytest.raises(err, match=match):
        DINOv3Encoder(make(tmp_path))


def test_dinov3_partial_weights_fail(dino_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "dino"
    shutil.copytree(dino_dir[0], path)
    sd = load_file(path / "model.safetensors")
    del sd["embeddings.patch_embeddings.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="patch_embeddings"):
        DINOv3Encoder(path)
