"""SAM prompt decoder, the promptable image side, MedSAM checkpoint compatibility and preprocessing."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from medfuse.errors import ConfigError, WeightsError
from medfuse.families.text_seg.sam_prompt import (
    SamPromptDecoder,
    TinySamEncoder,
    build_image_side,
    medsam_image,
    scale_boxes,
)


def _sam(depth: int, size: int, global_attn: list[int]):
    """A SAM ViT-B built by Meta's segment-anything (random weights), shallow for fast tests."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=768, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn, window_size=14,
                                      out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
    ).eval()


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """SAM zero-inits some tensors (rel-pos tables): fill everything so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _meta_masks(sam, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's pipeline, one image at a time (its decoder pairs one image with many prompts)."""
    emb = sam.image_encoder(image)
    masks = []
    for i in range(image.shape[0]):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i: i + 1], masks=None)
        m, _ = sam.mask_decoder(image_embeddings=emb[i: i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        masks.append(m)
    return emb, torch.cat(masks)


def _compare_checkpoint(tmp_path, sam, size: int, **encoder_kwargs) -> None:
    ckpt = tmp_path / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), ckpt)  # MedSAM's checkpoint layout: a plain SAM state dict
    side = build_image_side("medsam", weights=ckpt, input_size=size, **encoder_kwargs).eval()
    assert side.load_report is not None and "missing" not in side.load_report["image_encoder"]
    assert side.decoder.load_report.ok and len(side.decoder.load_report.ignored) == len(
        [k for k in sam.state_dict() if k.startswith("image_encoder.")])
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, size, size, generator=g)
    boxes = torch.tensor([[10.0, 20.0, size * 0.6, size * 0.7], [size * 0.3, 5.0, size - 3.0, size * 0.5]])
    with torch.no_grad():
        ref_emb, ref_masks = _meta_masks(sam, image, boxes)
        emb = side.embed(image)
        masks = side.decode(emb, boxes)
    assert emb.shape == (2, 256, size // 16, size // 16)
    assert torch.allclose(emb, ref_emb, atol=1e-4), (emb - ref_emb).abs().max()
    assert masks.shape == ref_masks.shape == (2, 1, size // 4, size // 4)
    assert torch.allclose(masks, ref_masks, atol=1e-4 * max(1.0, float(ref_masks.abs().max()))), \
        (masks - ref_masks).abs().max()


def test_medsam_checkpoint_loads_and_matches_segment_anything(tmp_path):
    torch.manual_seed(0)
    sam = _sam(depth=2, size=256, global_attn=[1])
    _randomise(sam)
    _compare_checkpoint(tmp_path, sam, 256, depth=2, global_attn_indexes=[1])


@pytest.mark.slow
def test_full_vit_b_checkpoint_matches_segment_anything(tmp_path):
    """The acceptance parity: ``sam_model_registry["vit_b"]`` with random weights at 1024² (minutes on CPU)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    _compare_checkpoint(tmp_path, sam, 1024)


@pytest.mark.parametrize("dim,size,depth,heads", [(64, 64, 2, 4), (32, 128, 1, 2)])
def test_batched_decoder_matches_meta_per_image_outputs_and_gradients(dim, size, depth, heads):
    """One prompt per image in a batch == Meta's MaskDecoder called image by image."""
    torch.manual_seed(0)
    dec = SamPromptDecoder(embed_dim=dim, image_embedding_size=size // 8, input_image_size=size, depth=depth,
                           mlp_dim=2 * dim, num_heads=heads, iou_head_hidden_dim=dim)
    emb = torch.randn(3, dim, size // 8, size // 8, requires_grad=True)
    boxes = torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]]) * size / 64
    masks, iou = dec(emb, boxes)
    ref_masks, ref_iou = [], []
    emb_ref = emb.detach().clone().requires_grad_(True)
    for i in range(3):
        sparse, dense = dec.prompt_encoder(points=None, boxes=boxes[i: i + 1], masks=None)
        m, q = dec.mask_decoder(image_embeddings=emb_ref[i: i + 1], image_pe=dec.dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        ref_masks.append(m)
        ref_iou.append(q)
    ref_masks, ref_iou = torch.cat(ref_masks), torch.cat(ref_iou)
    assert masks.shape == (3, 1, size // 2, size // 2)
    assert torch.allclose(masks, ref_masks, atol=1e-5) and torch.allclose(iou, ref_iou, atol=1e-5)
    w = torch.randn_like(masks)
    (masks * w).sum().backward()
    (ref_masks * w).sum().backward()
    assert torch.allclose(emb.grad, emb_ref.grad, atol=1e-5)


def test_decoder_needs_one_box_per_image():
    dec = SamPromptDecoder(embed_dim=32, image_embedding_size=8, input_image_size=64, depth=1, mlp_dim=64,
                           num_heads=2, iou_head_hidden_dim=32)
    with pytest.raises(ValueError, match="one box per image"):
        dec(torch.randn(2, 32, 8, 8), torch.zeros(3, 4))


def test_checkpoint_without_decoder_keys_is_refused(tmp_path):
    dec = SamPromptDecoder(embed_dim=32, image_embedding_size=8, input_image_size=64, depth=1, mlp_dim=64,
                           num_heads=2, iou_head_hidden_dim=32)
    only_encoder = tmp_path / "enc.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(2)}, only_encoder)
    with pytest.raises(WeightsError, match="no prompt_encoder"):
        dec.load_checkpoint(only_encoder)
    partial_sd = tmp_path / "partial.pth"
    sd = dec.state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    torch.save(sd, partial_sd)
    with pytest.raises(WeightsError, match="missing"):
        dec.load_checkpoint(partial_sd)
    report = dec.load_checkpoint(partial_sd, strict=False)
    assert report.missing == ["mask_decoder.iou_token.weight"]


def test_tiny_image_side_shapes_and_unused_parameters():
    side = build_image_side("tiny", input_size=64, embed_dim=32)
    assert isinstance(side.encoder, TinySamEncoder)
    x = torch.rand(2, 3, 64, 64)
    emb = side.embed(x)
    assert emb.shape == (2, 32, 8, 8)
    out = side(x, torch.tensor([[4.0, 4.0, 40.0, 40.0], [0.0, 0.0, 63.0, 63.0]]))
    assert out.shape == (2, 1, 32, 32)
    out.sum().backward()
    unused = {id(p) for p in side.decoder.unused_for_boxes()}
    for name, p in side.named_parameters():
        if id(p) in unused:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    with pytest.raises(ValueError, match="64x64"):
        side.embed(torch.rand(1, 3, 32, 32))


def test_build_image_side_errors():
    with pytest.raises(ConfigError, match="unknown image side"):
        build_image_side("vit_h")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_image_side("tiny", weights="x.pth")
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_image_side("tiny", input_size=100)


def test_medsam_preprocessing_ct_window_mr_percentiles_and_rgb():
    size = 32
    ct = np.full((40, 50), -1000.0, dtype=np.float32)
    ct[10:30, 10:40] = 40.0
    ct[15:20, 15:20] = 3000.0  # bone: above the 40/400 window, clipped
    out = medsam_image(ct, size, "ct")
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # soft tissue (40 HU) sits at the window centre: about half way after clipping -160..240
    assert 0.45 < float(out[0, 13, 16]) < 0.6
    mr = np.zeros((40, 40), dtype=np.float32)
    mr[5:35, 5:35] = np.random.default_rng(0).uniform(100, 200, (30, 30))
    mr[20, 20] = 1e6  # an outlier above the 99.5th percentile does not squash the rest
    out = medsam_image(mr, size, "mr")
    assert float(out[0, 0, 0]) == 0.0  # background stays 0
    assert float(out[0, 8:24, 8:24].std()) > 0.1
    rgb = np.stack([np.full((20, 20), v, np.float32) for v in (0.0, 100.0, 200.0)])
    out = medsam_image(rgb, size)
    assert torch.allclose(out[:, 5, 5], torch.tensor([0.0, 0.5, 1.0]), atol=0.01)
    with pytest.raises(ConfigError, match="intensity"):
        medsam_image(ct, size, "pet")


def test_scale_boxes_to_model_input():
    boxes = scale_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), height=200, width=100, size=1024)
    assert torch.allclose(boxes, torch.tensor([[102.4, 102.4, 307.2, 204.8]]))


def test_medsam_image_side_names_a_missing_or_unreadable_weights_file(tmp_path):
    """model.params.image_weights that is missing or not a checkpoint: the file's own problem, not
    "no image-encoder keys among its 0 keys" (the audit's message)."""
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint\n")
    small = {"input_size": 64, "depth": 2, "global_attn_indexes": (1,)}
    for path, match in ((tmp_path / "nope.pth", "weights file not found"), (bad, "not a PyTorch weights file")):
        with pytest.raises(WeightsError, match=match) as e:
            build_image_side("medsam", weights=path, **small)
        assert "image-encoder keys" not in str(e.value)
