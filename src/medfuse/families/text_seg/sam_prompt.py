"""Promptable image side of text_seg: SAM image encoder + prompt encoder + mask decoder (seed 002).

Talk2MedSAM keeps MedSAM frozen and fuses text into its image embeddings *before* the mask
decoder. This module provides that frozen image side behind one interface:

* :class:`SamPromptDecoder`: Meta's ``segment-anything`` :class:`PromptEncoder` and
  :class:`MaskDecoder` (box prompts -> low-resolution mask logits), with the parameter names of a
  SAM / MedSAM checkpoint (``prompt_encoder.*``, ``mask_decoder.*``), loaded strictly with a report.
* :class:`PromptableSegmenter`: a :class:`~medfuse.encoders.base.SliceEncoder` plus a
  :class:`SamPromptDecoder`: ``embed(image) -> (B, C, h, w)`` and ``decode(embedding, boxes) ->
  (B, 1, 4h, 4w)``.
* :func:`build_image_side`: ``"medsam"`` (timm SAM ViT-B encoder + SAM decoder at 1024², both
  from one local ``medsam_vit_b.pth``) or ``"tiny"`` (:class:`TinySamEncoder`, the tiny CNN +
  residual blocks, and a small SAM decoder of the same classes, for CPU tests and demos).
* :func:`medsam_image`: MedSAM preprocessing of one 2D image (CT window / MR percentiles /
  min-max, uint8, bicubic resize to S, per-image min-max to [0, 1]; REFERENCE.md "MedSAM").
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfuse.encoders.base import SliceEncoder
from medfuse.encoders.medsam2 import EncoderLoadReport, intensity_to_uint8, resize_uint8
from medfuse.encoders.weights import load_weights
from medfuse.errors import ConfigError, WeightsError

__all__ = ["IMAGE_SIDES", "PromptableSegmenter", "SamPromptDecoder", "TinySamEncoder", "build_image_side",
           "medsam_image", "scale_boxes"]

DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
IMAGE_SIDES = ("medsam", "tiny")
INTENSITY_KINDS = ("ct", "mr", "minmax")


class SamPromptDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder for box prompts.

    Args:
        embed_dim: C, width of the image embedding and of every prompt token (256 in SAM).
        image_embedding_size: h = w of the image embedding (64 in SAM at 1024).
        input_image_size: S, side of the encoder input that box coordinates refer to (1024).
        mask_in_chans: hidden channels of the (unused here) mask-prompt encoder.
        depth: two-way transformer depth.
        mlp_dim: two-way transformer MLP width.
        num_heads: two-way transformer heads.
        num_multimask_outputs: extra mask tokens (SAM: 3); the single-mask output is used.
        iou_head_hidden_dim: width of the IoU head.
    """

    def __init__(self, embed_dim: int = 256, image_embedding_size: int = 64, input_image_size: int = 1024,
                 mask_in_chans: int = 16, depth: int = 2, mlp_dim: int = 2048, num_heads: int = 8,
                 num_multimask_outputs: int = 3, iou_head_hidden_dim: int = 256):
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        self.embed_dim, self.input_image_size = int(embed_dim), int(input_image_size)
        self.image_embedding_size = int(image_embedding_size)
        e = self.image_embedding_size
        self.prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(e, e),
                                            input_image_size=(input_image_size, input_image_size),
                                            mask_in_chans=mask_in_chans)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.load_report: EncoderLoadReport | None = None

    def dense_pe(self) -> torch.Tensor:
        """SAM's dense positional encoding of the image embedding grid, (1, C, h, w)."""
        return self.prompt_encoder.get_dense_pe()

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one box-prompted mask per image.

        Args:
            image_embeddings: (B, C, h, w).
            boxes: (B, 4) as (x0, y0, x1, y1) in input-image pixels (0..S).

        Returns:
            ``(logits (B, 1, 4h, 4w), predicted IoU (B, 1))``.
        """
        if boxes.shape[0] != image_embeddings.shape[0]:
            raise ValueError(f"one box per image: {boxes.shape[0]} boxes for {image_embeddings.shape[0]} images")
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.to(image_embeddings.dtype), masks=None)
        return self.predict_masks(image_embeddings, sparse, dense)

    def predict_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's ``MaskDecoder.predict_masks`` for one prompt per image, single-mask output.

        Meta's method repeats every image embedding once per prompt (one image, many prompts), so
        a batch of B images with B boxes would give B² masks; MedSAM patched its copy of the
        package for that. This runs the same submodules with image i paired with prompt i.

        Args:
            image_embeddings: (B, C, h, w).
            sparse: (B, N, C) prompt tokens (N = 2 box corners).
            dense: (B, C, h, w) dense prompt embedding.

        Returns:
            ``(logits (B, 1, 4h, 4w), predicted IoU (B, 1))``.
        """
        md = self.mask_decoder
        b, c, h, w = image_embeddings.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)  # (1 + M, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # (B, 1 + M + N, C)
        src = image_embeddings + dense
        pos = self.dense_pe().expand(b, -1, -1, -1)
        hs, src = md.transformer(src, pos, tokens)  # hs (B, T, C), src (B, h*w, C)
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = md.output_upscaling(src)  # (B, C/8, 4h, 4w)
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1])  # the single-mask token -> (B, C/8)
        masks = torch.einsum("bc,bchw->bhw", hyper, up)[:, None]  # (B, 1, 4h, 4w)
        return masks, md.iou_prediction_head(hs[:, 0])[:, :1]

    def unused_for_boxes(self) -> list[nn.Parameter]:
        """Parameters a box-only single-mask decoder never uses (point and mask prompts, the IoU
        head, the extra mask tokens' hypernetworks); a trainable decoder keeps them frozen."""
        pe, md = self.prompt_encoder, self.mask_decoder
        out = [pe.point_embeddings[0].weight, pe.point_embeddings[1].weight, pe.not_a_point_embed.weight]
        out += list(pe.mask_downscaling.parameters()) + list(md.iou_prediction_head.parameters())
        out += [p for mlp in md.output_hypernetworks_mlps[1:] for p in mlp.parameters()]
        return out

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> EncoderLoadReport:
        """Load ``prompt_encoder.*`` and ``mask_decoder.*`` from a SAM / MedSAM checkpoint.

        Args:
            path: local ``medsam_vit_b.pth`` / ``sam_vit_b_01ec64.pth`` (or this module's state dict).
            strict: fail when a decoder key is missing, unexpected or has another shape.

        Returns:
            The load report; ``image_encoder.*`` keys are listed as ignored.
        """
        ignored: list[str] = []

        def rename(key: str) -> str | None:
            if key.startswith(DECODER_PREFIXES):
                return key
            ignored.append(key)
            return None

        try:
            report = load_weights(self, path, remap=rename, strict=strict)
        except WeightsError:
            if ignored and len(ignored) == _count_keys(path):
                raise WeightsError(path, f"no prompt_encoder.* / mask_decoder.* keys among its {len(ignored)} keys",
                                   "pass a full SAM / MedSAM checkpoint (medsam_vit_b.pth)") from None
            raise
        self.load_report = EncoderLoadReport(**asdict(report), ignored=ignored)
        return self.load_report


def _count_keys(path: str | Path) -> int:
    from medfuse.encoders.weights import load_state_dict_file

    return len(load_state_dict_file(path))


class PromptableSegmenter(nn.Module):
    """An image encoder and a SAM prompt decoder: the promptable image side of text_seg.

    Args:
        encoder: a slice encoder mapping (B, 3, S, S) to (B, C, S / stride, S / stride).
        decoder: a :class:`SamPromptDecoder` with ``embed_dim = C`` and the same S.
        kind: ``"medsam"`` or ``"tiny"`` (for messages and cache keys).
    """

    def __init__(self, encoder: SliceEncoder, decoder: SamPromptDecoder, kind: str):
        super().__init__()
        if encoder.out_channels != decoder.embed_dim:
            raise ValueError(f"encoder width {encoder.out_channels} != decoder width {decoder.embed_dim}")
        self.encoder, self.decoder, self.kind = encoder, decoder, kind
        self.input_size = decoder.input_image_size
        self.embed_dim = decoder.embed_dim
        self.embedding_size = decoder.image_embedding_size
        self.load_report: dict[str, str] | None = None

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the encoder's input (its mean/std; identity for MedSAM)."""
        mean = torch.tensor(self.encoder.mean, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.encoder.std, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (image - mean) / std

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) in [0, 1] -> image embedding (B, C, h, w)."""
        if image.shape[-1] != self.input_size or image.shape[-2] != self.input_size:
            raise ValueError(f"expected {self.input_size}x{self.input_size} images, got {tuple(image.shape[-2:])}")
        return self.encoder(self.normalise(image))

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """embedding (B, C, h, w), boxes (B, 4) in input pixels -> mask logits (B, 1, 4h, 4w)."""
        return self.decoder(embedding, boxes)[0]

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Box-only segmentation: image (B, 3, S, S), boxes (B, 4) -> logits (B, 1, 4h, 4w)."""
        return self.decode(self.embed(image), boxes)


class TinySamEncoder(SliceEncoder):
    """The tiny image encoder of the CPU pair: the ``tiny`` CNN (stride 8) + residual blocks at stride 8.

    The residual blocks widen the receptive field (from 22 to about 22 + 32 * blocks pixels), so a
    token sees a whole lesion and its margin, as a ViT token of SAM sees its neighbourhood.

    Args:
        out_channels: C.
        hidden: widths of the tiny CNN's first two levels.
        blocks: residual 3x3 blocks at stride 8.
        input_size: S.
    """

    name = "tiny_sam"
    stride = 8

    def __init__(self, out_channels: int = 64, hidden: tuple[int, int] = (16, 32), blocks: int = 2,
                 input_size: int | None = 128):
        super().__init__()
        from medfuse.encoders.tiny import TinySliceEncoder
        from medfuse.layers.conv import ResBlock

        self.out_channels, self.input_size = int(out_channels), input_size
        self.stem = TinySliceEncoder(out_channels=out_channels, hidden=hidden, input_size=input_size)
        self.mean, self.std = self.stem.mean, self.stem.std
        self.blocks = nn.Sequential(*(ResBlock(out_channels, out_channels, spatial_dims=2, norm="group", act="gelu")
                                      for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, S, S) -> (N, C, S / 8, S / 8)."""
        return self.blocks(self.stem(x))


def build_image_side(kind: str = "medsam", weights: str | Path | None = None, input_size: int | None = None,
                     embed_dim: int = 64, hidden: tuple[int, int] = (16, 32), decoder_depth: int = 2,
                     decoder_heads: int = 4, strict: bool = True, **encoder_kwargs: Any) -> PromptableSegmenter:
    """Build the promptable image side.

    Args:
        kind: ``"medsam"`` (SAM ViT-B, C = 256, S = 1024 by default) or ``"tiny"``
            (:class:`TinySamEncoder` + a small SAM decoder; S = 128 by default).
        weights: local MedSAM / SAM checkpoint (``medsam`` only); ``None``: random initialisation.
        input_size: S.
        embed_dim: C of the tiny pair.
        hidden: the tiny encoder's first two widths.
        decoder_depth: two-way transformer depth of the tiny decoder.
        decoder_heads: two-way transformer heads of the tiny decoder.
        strict: fail on any missing/unexpected/mismatched checkpoint key.
        **encoder_kwargs: extra encoder arguments (``depth=2`` for a shallow test ViT, ``blocks`` for tiny).
    """
    if kind == "medsam":
        from medfuse.encoders.sam_vitb import MedSAMEncoder

        size = int(input_size or 1024)
        enc = MedSAMEncoder(weights=weights, input_size=size, strict=strict, **encoder_kwargs)
        dec = SamPromptDecoder(embed_dim=256, image_embedding_size=size // 16, input_image_size=size)
        side = PromptableSegmenter(enc, dec, "medsam")
        if weights is not None:
            dec.load_checkpoint(weights, strict=strict)
            side.load_report = {"image_encoder": enc.load_report.summary(), "prompt_decoder": dec.load_report.summary()}
        return side
    if kind == "tiny":
        if weights is not None:
            raise ConfigError("model.params.image_weights", "the tiny image side has no pretrained weights",
                              "drop image_weights or use image_encoder=medsam")
        size = int(input_size or 128)
        if size % 8:
            raise ConfigError("data.params.image_size", f"{size} is not a multiple of 8", "use e.g. 128 or 256")
        enc = TinySamEncoder(out_channels=embed_dim, hidden=hidden, input_size=size, **encoder_kwargs)
        dec = SamPromptDecoder(embed_dim=embed_dim, image_embedding_size=size // enc.stride, input_image_size=size,
                               depth=decoder_depth, mlp_dim=4 * embed_dim, num_heads=decoder_heads,
                               iou_head_hidden_dim=embed_dim)
        return PromptableSegmenter(enc, dec, "tiny")
    raise ConfigError("model.params.image_encoder", f"unknown image side '{kind}'", f"use one of: {', '.join(IMAGE_SIDES)}")


# ----------------------------------------------------------------------------------------------
# MedSAM preprocessing of one 2D image


@torch.no_grad()
def medsam_image(array: np.ndarray | torch.Tensor, size: int, kind: str = "minmax",
                 window: tuple[float, float] | None = None) -> torch.Tensor:
    """MedSAM preprocessing of one 2D image (grey, 2.5D or RGB channels).

    1. Clip: ``ct`` to ``window`` (default 40/400), ``mr`` to the 0.5-99.5 percentiles of the
       nonzero pixels (zeros stay 0), ``minmax`` not at all (ultrasound, X-ray, photographs).
    2. Min-max scale to uint8 grey levels (jointly over the channels).
    3. Bicubic resize to ``size`` x ``size`` with uint8 re-quantisation (as PIL does).
    4. Min-max per image to [0, 1]; one channel is repeated to 3.

    Args:
        array: (H, W) or (C, H, W) raw intensities, C in {1, 3}.
        size: S.
        kind: ``"ct"``, ``"mr"`` or ``"minmax"``.
        window: ``(level, width)`` for ``ct`` (or to force a window on any kind).

    Returns:
        (3, S, S) float32 in [0, 1].
    """
    if kind not in INTENSITY_KINDS:
        raise ConfigError("data.params.intensity", f"unknown intensity kind '{kind}'",
                          f"use one of: {', '.join(INTENSITY_KINDS)}")
    x = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected (H, W) or (C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    if kind == "minmax" and window is None:
        lo, hi = float(x.min()), float(x.max())
        window = ((lo + hi) / 2, max(hi - lo, 1e-6))
    u = intensity_to_uint8(x, "ct" if kind == "ct" else "mr", window, per_volume=True)  # (C, H, W) in 0..255
    v = resize_uint8(u, size)[:, 0]  # (C, S, S)
    lo, hi = v.min(), v.max()
    v = (v - lo) / (hi - lo).clamp(min=1e-8)
    return v.expand(3, -1, -1).contiguous() if v.shape[0] == 1 else v


def scale_boxes(boxes: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Boxes (N, 4) (x0, y0, x1, y1) in an H x W image -> the same boxes in the S x S model input."""
    scale = torch.tensor([size / width, size / height, size / width, size / height], dtype=torch.float32)
    return boxes.float() * scale
