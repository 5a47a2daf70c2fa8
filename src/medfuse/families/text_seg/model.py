"""Family ``text_seg``: text-guided box-prompted segmentation on a frozen MedSAM (seed 002, Talk2MedSAM).

Pipeline (seed sections in brackets):

1. The image side (:mod:`medfuse.families.text_seg.sam_prompt`): MedSAM's SAM ViT-B encoder gives the
   image embedding (B, 256, 64, 64) of a 1024² image; its prompt encoder and mask decoder turn a
   box into mask logits. Frozen by default, loaded from a local ``medsam_vit_b.pth``; embeddings
   of a frozen encoder may be cached on disk (``embedding_cache``). A tiny CNN + small SAM
   decoder pair stands in on CPU.
2. The text side (:mod:`medfuse.text`): a frozen text encoder (MiniLM offline, or ``hf:<folder>``
   for PubMedBERT & co.); its pooled output is cached per unique string, so training never reruns
   it on a prompt it has seen. Its width is read from the encoder.
3. The adapter [Hierarchical Fusion Block]: text is fused into the image embedding *before* the
   mask decoder, by :class:`~medfuse.families.text_seg.fusion.HierarchicalTextFusion` (level 1:
   1 token, 4 heads, gate 0.5; level 2: 2 tokens, 8 heads, gate 0.8; effective gates, see there)
   or the single-level :class:`~medfuse.families.text_seg.fusion.GatedTextFusion` baseline;
   ``fusion: none`` feeds a learned constant instead of the text (the box-only control with the
   same network); ``fusion: bypass`` has no adapter at all (with a frozen MedSAM: MedSAM as it is,
   the seed's zero-training baseline).
4. The loss [Training Objective] lives in :mod:`medfuse.families.text_seg.task`: Dice + BCE on
   the mask logits + 2 x InfoNCE between the image embedding pooled under the target mask
   (pre-fusion, :meth:`TextSegModel.contrastive_embeddings`) and the coarse text token, with a
   learnable temperature (:attr:`TextSegModel.contrastive`) clamped to [min, max].

The default configuration (MedSAM image side, MiniLM) has about 500K trainable parameters (the
adapter and the contrastive head); the count is printed when the model is built and reported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from medfuse.errors import ConfigError
from medfuse.families.text_seg.fusion import BypassFusion, GatedTextFusion, HierarchicalTextFusion, TextFusion

FUSIONS = ("hierarchical", "gated", "none", "bypass")
_TEXT_ENCODERS: dict[str, Any] = {}


def shared_text_encoder(spec: str):
    """One frozen text encoder per spec and process, with its per-string cache of pooled outputs."""
    if spec not in _TEXT_ENCODERS:
        from medfuse.text import build_text_encoder

        enc = build_text_encoder(spec)
        enc.pooled_cache = {}  # str -> (Ct,) float32 CPU tensor
        _TEXT_ENCODERS[spec] = enc
    return _TEXT_ENCODERS[spec]


class TextSegModel(nn.Module):
    """Text-guided MedSAM: frozen image side + text fusion adapter + SAM mask decoder.

    Args:
        image_encoder: ``"medsam"`` (SAM ViT-B + SAM decoder) or ``"tiny"`` (CPU pair).
        image_weights: local ``medsam_vit_b.pth`` for ``medsam`` (``None``: random weights).
        image_size: S, must equal ``data.params.image_size`` (default 1024 / 128).
        freeze_image_side: keep the image encoder, prompt encoder and mask decoder frozen.
        tiny_dim: C of the tiny pair.
        tiny_hidden: first two widths of the tiny encoder.
        text_encoder: ``"minilm"`` or ``"hf:<local folder>"``.
        fusion: ``hierarchical`` | ``gated`` | ``none`` | ``bypass`` (no adapter: the contrastive
            head is built, frozen, so that its weights match the other variants').
        token_dim: width of the hierarchical text tokens (and of the contrastive space).
        coarse_heads, fine_heads: heads of levels 1 and 2.
        coarse_gate, fine_gate: effective gates of levels 1 and 2 at initialisation.
        gated_init: image share of the gated baseline at initialisation.
        init_temperature, min_temperature, max_temperature: the contrastive temperature.
        contrastive_pool: ``mask`` (pool the image embedding under the target) or ``global``.
        embedding_cache: folder of the disk cache of frozen image embeddings (``None``: off).
        box_margin: with ``restrict_to_box`` (evaluate, predict), mask cells outside the box prompt
            grown by ``box_margin`` x its width / height on each side are background
            (:func:`restrict_to_box`); ``None``: the output is not restricted.
    """

    def __init__(self, image_encoder: str = "medsam", image_weights: str | None = None, image_size: int | None = None,
                 freeze_image_side: bool = True, tiny_dim: int = 64, tiny_hidden: tuple[int, int] = (16, 32),
                 text_encoder: str = "minilm", fusion: str = "hierarchical", token_dim: int = 96,
                 coarse_heads: int = 4, fine_heads: int = 8, coarse_gate: float = 0.5, fine_gate: float = 0.8,
                 gated_init: float = 0.8, init_temperature: float = 0.07, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, contrastive_pool: str = "mask", embedding_cache: str | None = None,
                 box_margin: float | None = 0.1):
        super().__init__()
        from medfuse.families.text_seg.sam_prompt import build_image_side
        from medfuse.losses import InfoNCE

        if fusion not in FUSIONS:
            raise ConfigError("model.params.fusion", f"unknown fusion '{fusion}'", f"use one of: {', '.join(FUSIONS)}")
        if contrastive_pool not in ("mask", "global"):
            raise ConfigError("model.params.contrastive_pool", f"unknown pooling '{contrastive_pool}'", "use mask or global")
        self.image_side = build_image_side(image_encoder, weights=image_weights, input_size=image_size,
                                           embed_dim=tiny_dim, hidden=tuple(tiny_hidden))
        self.frozen_image_side = bool(freeze_image_side)
        self._state_excludes_image_side = self.frozen_image_side and image_weights is not None
        if self.frozen_image_side:
            self.image_side.requires_grad_(False)
            self.image_side.encoder.freeze()
        else:
            for p in self.image_side.decoder.unused_for_boxes():
                p.requires_grad_(False)
        self.text_spec = text_encoder
        text_dim = int(shared_text_encoder(text_encoder).dim)
        dim = self.image_side.embed_dim
        self.fusion_kind = fusion
        self.fusion: TextFusion
        if fusion == "gated":
            self.fusion = GatedTextFusion(dim, text_dim, init_gate=gated_init)
        elif fusion == "bypass":
            self.fusion = BypassFusion(token_dim)
        else:
            self.fusion = HierarchicalTextFusion(dim, text_dim, token_dim, coarse_heads=coarse_heads,
                                                 coarse_gate=coarse_gate, fine_heads=fine_heads, fine_gate=fine_gate,
                                                 text_mode="null" if fusion == "none" else "text")
        self.image_proj = nn.Linear(dim, self.fusion.embed_dim)
        self.contrastive = InfoNCE(init_temperature, min_temperature, max_temperature)
        if fusion == "bypass":  # no adapter: nothing on the text side trains
            self.image_proj.requires_grad_(False)
            self.contrastive.requires_grad_(False)
        self.contrastive_pool = contrastive_pool
        self.box_margin = box_margin
        self.extractor = None
        if embedding_cache is not None:
            if not self.frozen_image_side:
                raise ConfigError("model.params.embedding_cache", "only embeddings of a frozen encoder can be cached",
                                  "set freeze_image_side=true or drop embedding_cache")
            from medfuse.encoders.slicewise import SlicewiseExtractor

            # not a registered submodule: the encoder would appear twice in the state dict
            object.__setattr__(self, "extractor", SlicewiseExtractor(
                self.image_side.encoder, slice_batch_size=4, cache_dir=embedding_cache, preprocess=False))
        self._register_state_dict_hook(_drop_image_side)
        self.register_load_state_dict_post_hook(_allow_missing_image_side)
        counts = self.parameter_counts()
        print(f"text_seg ({image_encoder}, fusion={fusion}): {counts['trainable']:,} trainable parameters "
              f"(adapter {counts['adapter']:,}); {counts['frozen']:,} frozen")

    # ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TextSegModel:
        super().train(mode)
        if self.frozen_image_side:
            self.image_side.eval()
        return self

    def parameter_counts(self) -> dict[str, int]:
        """Trainable / frozen parameters, and the adapter's share (fusion + contrastive head)."""
        params = list(self.parameters())
        adapter = [*self.fusion.parameters(), *self.image_proj.parameters(), *self.contrastive.parameters()]
        return {"trainable": sum(p.numel() for p in params if p.requires_grad),
                "frozen": sum(p.numel() for p in params if not p.requires_grad),
                "adapter": sum(p.numel() for p in adapter if p.requires_grad)}

    def level_gates(self) -> list[float] | None:
        """Effective gates (coarse, fine) of the hierarchical fusion; None for the gated baseline."""
        return self.fusion.gates if isinstance(self.fusion, HierarchicalTextFusion) else None

    @property
    def temperature(self) -> float:
        """The current (clamped) contrastive temperature."""
        return float(1.0 / self.contrastive.scale.detach())

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """B strings -> pooled text features (B, Ct), from the per-string cache (computed once)."""
        enc = shared_text_encoder(self.text_spec)
        cache = enc.pooled_cache
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(new), 64):
            with torch.no_grad():
                pooled = enc(new[i: i + 64]).pooled.float().cpu()
            cache.update(zip(new[i: i + 64], pooled, strict=True))
        return torch.stack([cache[t] for t in texts])

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) in [0, 1] -> image embedding (B, C, h, w), cached on disk when enabled."""
        side = self.image_side
        if image.shape[-1] != side.input_size:
            raise ConfigError("model.params.image_size", f"the model expects {side.input_size}px images, the data "
                              f"give {image.shape[-1]}px", "set data.params.image_size and model.params.image_size alike")
        if self.extractor is not None:
            x = side.normalise(image)
            return torch.stack([self.extractor.extract_cached(x[i][:, None])[0] for i in range(x.shape[0])])
        if self.frozen_image_side:
            with torch.no_grad():
                return side.embed(image)
        return side.embed(image)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, texts: list[str],
                out_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Segment the box's target that the text names.

        Args:
            image: (B, 3, S, S) in [0, 1].
            boxes: (B, 4) (x0, y0, x1, y1) in input pixels.
            texts: B prompts.
            out_size: (m, m) of the returned logits (default: the decoder's 4h x 4w).

        Returns:
            ``mask_logits`` (B, 1, m, m), ``embedding`` (B, C, h, w) before fusion and ``text`` (B, Ct).
        """
        return self.forward_intermediates(image, boxes, texts, out_size)[0]

    def forward_intermediates(self, image: torch.Tensor, boxes: torch.Tensor, texts: list[str],
                              out_size: tuple[int, int] | None = None, restrict: bool = False,
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward pass that also returns what evaluation shows.

        Args: as :meth:`forward`, and ``restrict``: logits outside the box prompt (grown by
            ``box_margin``) are background (:func:`restrict_to_box`; evaluation and prediction).

        Returns:
            :meth:`forward`'s dict and the intermediates: ``gate`` (B,), the gated baseline's image
            share averaged over positions and channels (only with ``fusion: gated``).
        """
        emb = self.embed(image)  # (B, C, h, w)
        h = emb.shape[-2]
        if self.fusion_kind == "bypass":  # the text is never read: no text-encoder call
            text = emb.new_zeros(emb.shape[0], int(shared_text_encoder(self.text_spec).dim))  # (B, Ct)
        else:
            text = self.text_features(list(texts)).to(emb.device, emb.dtype)  # (B, Ct)
        pos = rearrange(self.image_side.decoder.dense_pe(), "1 c h w -> 1 (h w) c")
        fused, inter = self.fusion.forward_intermediates(rearrange(emb, "b c h w -> b (h w) c"), text, pos)  # (B, L, C)
        low = self.image_side.decode(rearrange(fused, "b (h w) c -> b c h w", h=h), boxes)  # (B, 1, 4h, 4w)
        if restrict and self.box_margin is not None:
            low = restrict_to_box(low, boxes, self.image_side.input_size, self.box_margin)
        if out_size is not None and tuple(low.shape[-2:]) != tuple(out_size):
            low = F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)
        extra = {"gate": inter["gate"].float().mean(dim=(1, 2))} if "gate" in inter else {}
        return {"mask_logits": low, "embedding": emb, "text": text}, extra

    def contrastive_embeddings(self, embedding: torch.Tensor, text: torch.Tensor,
                               weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sides of the InfoNCE term.

        Args:
            embedding: (B, C, h, w) image embedding before fusion.
            text: (B, Ct) pooled text.
            weights: (B, 1, m, m) pooling weights (the target mask), or None for the global mean.

        Returns:
            image_emb (B, E) and text_emb (B, E), E = ``fusion.embed_dim`` (not normalised).
        """
        return self.image_proj(_pool(embedding, weights)), self.fusion.text_embedding(text)


BACKGROUND_LOGIT = -1e4
"""The logit of a mask cell outside the box prompt (:func:`restrict_to_box`): finite, so that resizing
the logits to an image's own size stays a plain interpolation."""


def restrict_to_box(logits: torch.Tensor, boxes: torch.Tensor, size: int, margin: float) -> torch.Tensor:
    """Mask logits outside the box prompt set to background.

    MedSAM's box says where the target is (seed 002: the text picks the target *inside* the box), so
    a prediction outside it contradicts the prompt. A cell is kept when its centre lies within the
    box grown on each side by ``margin`` x the box's width (height), the largest outward move of the
    training box jitter (``data.params.box_jitter``), plus one cell.

    Args:
        logits: (B, 1, m, n) mask logits over the S x S model input.
        boxes: (B, 4) (x0, y0, x1, y1) in input pixels.
        size: S.
        margin: growth as a fraction of the box's width / height.

    Returns:
        (B, 1, m, n) logits, :data:`BACKGROUND_LOGIT` outside the grown box.
    """
    m, n = logits.shape[-2:]
    b = boxes.to(logits.device, torch.float32)
    x0, y0, x1, y1 = b.unbind(-1)  # (B,) each
    cy, cx = size / m, size / n  # cell sizes in input pixels
    ys = (torch.arange(m, device=logits.device, dtype=torch.float32) + 0.5) * cy - 0.5  # (m,) cell centres
    xs = (torch.arange(n, device=logits.device, dtype=torch.float32) + 0.5) * cx - 0.5  # (n,)
    gy, gx = margin * (y1 - y0) + cy, margin * (x1 - x0) + cx  # (B,)
    in_y = (ys[None] >= (y0 - gy)[:, None]) & (ys[None] <= (y1 + gy)[:, None])  # (B, m)
    in_x = (xs[None] >= (x0 - gx)[:, None]) & (xs[None] <= (x1 + gx)[:, None])  # (B, n)
    inside = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, m, n)
    return torch.where(inside, logits, logits.new_full((), BACKGROUND_LOGIT))


def _pool(emb: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """emb (B, C, h, w), weights (B, 1, m, m) or None -> weighted mean (B, C); empty weights -> global mean."""
    if weights is None:
        return emb.mean(dim=(2, 3))
    w = F.interpolate(weights.to(emb.dtype), size=emb.shape[-2:], mode="area")  # (B, 1, h, w)
    total = w.sum(dim=(2, 3))  # (B, 1)
    pooled = (emb * w).sum(dim=(2, 3)) / total.clamp_min(1e-6)
    return torch.where(total > 1e-6, pooled, emb.mean(dim=(2, 3)))


def _drop_image_side(module: TextSegModel, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Checkpoints of a frozen MedSAM image side leave out its 94M weights (they reload from the
    local ``image_weights`` file when the model is built)."""
    if module._state_excludes_image_side:
        for key in [k for k in state_dict if k.startswith(prefix + "image_side.")]:
            del state_dict[key]


def _allow_missing_image_side(module: TextSegModel, incompatible) -> None:
    if module._state_excludes_image_side:
        keep = [k for k in incompatible.missing_keys if ".image_side." not in f".{k}"]
        incompatible.missing_keys[:] = keep
