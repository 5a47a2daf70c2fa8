"""Family ``ct_encoder``: a 3D CT encoder with slice- and region-aware attention, aligned to
chain-of-thought reports (seed 001, "3D CT-Specialized Vision Encoder").

Pipeline (seed sections in brackets):

1. :class:`~medfuse.layers.patch_embed.PatchEmbed3d`: Conv3d patches (4, 16, 16) + learned or
   sin-cos 3D positions, interpolated to other sizes [1. 3D Patch Embedding].
2. :class:`~medfuse.layers.region_attention.AnatomicalStructureEncoder`: region mask -> voxel
   fractions per patch (B, N, R + 1) and region embeddings [2. Anatomical Structure Encoder].
3. ``depth`` blocks: LN -> slice-aware self-attention -> add -> LN -> region-aware
   cross-attention -> add -> LN -> FFN -> add (pre-norm; the seed's diagram is post-norm "Add &
   Norm") [3, 4, 5].
4. Multi-scale aggregation: LayerNorm'd outputs of ``fpn_levels`` blocks, pooled to 1, 1/2,
   1/4 of the patch grid, through MONAI's ``FeaturePyramidNetwork``; global features = mean of
   every level, region features = fraction-weighted means of the finest level per region
   [Component 4].
5. Global / local (region) / step projection heads into a shared space; the text side is a
   frozen encoder from :mod:`medfuse.text` (MiniLM offline by default, ``hf:<folder>`` for
   CXR-BERT or PubMedBERT) whose pooled embeddings are cached per unique string, then a trainable
   projection [Component 5].
6. Loss: symmetric InfoNCE with a learnable clamped temperature at three levels: global <->
   impression, region <-> the report's sentences about that region, step <-> chain-of-thought
   steps pooled over each step's ``mask_region``; optional auxiliary region segmentation of the
   patches [Training Strategy].

Ablations are config switches: ``region_attention: false`` (region-blind), ``weighting: log |
multiply | none``, ``slice_bias: false``. This module holds the network only: the loss is
:class:`~medfuse.families.ct_encoder.task.CTEncoderTask`'s, the evaluation (zero-shot AUROC,
region-text alignment and region-attention maps next to retrieval, from one pass over the split)
is :class:`~medfuse.families.ct_encoder.evaluate.CTEncoderEvaluator`, and ``medfuse predict``'s
embeddings per volume are :class:`~medfuse.families.ct_encoder.evaluate.CTEncoderPredictor`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfuse.errors import ConfigError
from medfuse.layers.patch_embed import PatchEmbed3d
from medfuse.layers.region_attention import WEIGHTINGS, AnatomicalStructureEncoder, CTBlock, region_pool
from medfuse.layers.slice_attention import IMPLS
from medfuse.losses import InfoNCE

PRESETS = {
    "tiny": {"dim": 64, "depth": 3, "num_heads": 4},
    "small": {"dim": 384, "depth": 6, "num_heads": 6},
    "base": {"dim": 768, "depth": 12, "num_heads": 12},
}


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _mlp(i: int, o: int) -> nn.Module:
    """Projection head (M, i) -> (M, o). BatchNorm centres the features across the batch: volumes
    (and report sentences) share most of their content, and without it the contrastive loss sits at
    chance for epochs while the heads find the small differences (SimCLR's projector does the same)."""
    return nn.Sequential(nn.Linear(i, o), _BatchNorm(o), nn.GELU(), nn.Linear(o, o))


def _project(head: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Apply ``head`` to the rows of x (..., C) where ``valid`` (...) is True; zeros elsewhere."""
    out = x.new_zeros(*x.shape[:-1], head[-1].out_features)
    if bool(valid.any()):
        out[valid] = head(x[valid]).to(out.dtype)
    return out


class CTVisionEncoder(nn.Module):
    """The vision side (seed ``ThreeDVisionEncoder``) up to the pooled features.

    Args:
        in_channels: CT channels (1).
        num_regions: R regions in the mask (values 1..R).
        dim, depth, num_heads: transformer width, blocks, heads.
        patch_size, img_size, pos_embed: see :class:`~medfuse.layers.patch_embed.PatchEmbed3d`.
        slice_bias: slice-distance bias in self-attention.
        region_attention: region-aware cross-attention in every block.
        weighting: ``log`` | ``multiply`` | ``none`` (region attention).
        attn_impl: slice-attention implementation (``auto`` picks per device).
        fpn_levels: number of blocks tapped for the FPN (1/1, 1/2, 1/4 ... of the patch grid).
        fpn_dim: FPN width (default ``dim``).
        mask_hidden: channels of the anatomical mask CNN.
        mask_sub: cells per patch (along D, H, W) at which the mask CNN runs.
        drop: dropout in attention projections and FFN.
        grad_checkpoint: recompute blocks in the backward pass (saves memory at base size).
    """

    def __init__(self, in_channels: int = 1, num_regions: int = 20, dim: int = 64, depth: int = 3,
                 num_heads: int = 4, patch_size=(4, 16, 16), img_size=(64, 512, 512), pos_embed: str = "learned",
                 slice_bias: bool = True, region_attention: bool = True, weighting: str = "log",
                 attn_impl: str = "auto", fpn_levels: int = 3, fpn_dim: int | None = None, mask_hidden: int = 32,
                 mask_sub=(1, 4, 4), drop: float = 0.0, grad_checkpoint: bool = False):
        super().__init__()
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

        self.patch_embed = PatchEmbed3d(in_channels, dim, patch_size, img_size, pos_embed)
        self.anatomy = AnatomicalStructureEncoder(num_regions, dim, self.patch_embed.patch_size, sub=mask_sub,
                                                  hidden=mask_hidden, embed=region_attention)
        self.blocks = nn.ModuleList([CTBlock(dim, num_heads, region_attention=region_attention, weighting=weighting,
                                             slice_bias=slice_bias, impl=attn_impl, drop=drop) for _ in range(depth)])
        n = max(1, min(fpn_levels, depth))
        self.taps = sorted({max(1, round(depth * (i + 1) / n)) for i in range(n)})  # 1-based block indices
        self.tap_norms = nn.ModuleList([nn.LayerNorm(dim) for _ in self.taps])
        self.fpn_dim = fpn_dim or dim
        self.fpn = FeaturePyramidNetwork(3, [dim] * len(self.taps), self.fpn_dim)
        self.num_regions = num_regions
        self.grad_checkpoint = grad_checkpoint

    @property
    def global_dim(self) -> int:
        return self.fpn_dim * len(self.taps)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Encode a CT volume with its region mask.

        Args:
            image: (B, 1, D, H, W) windowed CT.
            mask: (B, 1, D, H, W) integer region IDs 0..R on the same grid.

        Returns:
            ``global`` (B, fpn_levels * C_f) mean of every FPN level, ``patch`` (B, N, C_f) finest
            FPN level, ``region`` (B, R, C_f) and ``mass`` (B, R) fraction-weighted region pools,
            ``ctx`` the :class:`~medfuse.layers.region_attention.RegionContext`, ``grid`` (d, h, w).
        """
        return self.forward_intermediates(image, mask, attention=False)[0]

    def forward_intermediates(self, image: torch.Tensor, mask: torch.Tensor,
                              attention: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """:meth:`forward` plus what evaluation shows, from the same single pass.

        Args:
            image: (B, 1, D, H, W) windowed CT.
            mask: (B, 1, D, H, W) integer region IDs 0..R.
            attention: return the last block's region attention (False: exactly :meth:`forward`).

        Returns:
            The :meth:`forward` outputs and intermediates: ``region_attn`` (B, H, N, R + 1), the
            last block's region-aware attention weights (detached; column 0 is the background),
            present when ``attention`` is set and the blocks have region attention. The last block
            then runs with ``return_attn=True`` and is never checkpointed.
        """
        x, coords, grid = self.patch_embed(image)  # (B, N, C), (N, 3)
        ctx = self.anatomy(mask)
        if ctx.grid != grid:
            raise ValueError(f"mask grid {ctx.grid} differs from the image's patch grid {grid}")
        z = coords[:, 0]
        taps, inter = [], {}
        for i, blk in enumerate(self.blocks, start=1):
            if attention and i == len(self.blocks) and blk.region is not None and ctx.embeds is not None:
                x, inter["region_attn"] = blk(x, z, ctx.embeds, ctx.fractions, return_attn=True)
            elif self.grad_checkpoint and self.training:
                x = checkpoint(blk, x, z, ctx.embeds, ctx.fractions, use_reentrant=False)
            else:
                x = blk(x, z, ctx.embeds, ctx.fractions)
            if i in self.taps:
                taps.append(x)
        feats = OrderedDict()
        for lvl, (t, norm) in enumerate(zip(taps, self.tap_norms, strict=True)):
            m = rearrange(norm(t), "b (d h w) c -> b c d h w", d=grid[0], h=grid[1], w=grid[2])
            if lvl:
                m = F.adaptive_avg_pool3d(m, [max(1, s // 2 ** lvl) for s in grid])  # coarser level
            feats[f"l{lvl}"] = m
        levels = list(self.fpn(feats).values())  # finest first, each (B, C_f, d_i, h_i, w_i)
        patch = rearrange(levels[0], "b c d h w -> b (d h w) c")  # (B, N, C_f)
        glob = torch.cat([lv.mean(dim=(2, 3, 4)) for lv in levels], dim=-1)  # (B, L * C_f)
        region, mass = region_pool(patch, ctx.fractions[..., 1:])  # (B, R, C_f), (B, R)
        out = {"global": glob, "patch": patch, "region": region, "mass": mass, "ctx": ctx, "grid": grid}
        return out, inter


# Frozen text encoders are shared between model instances (a process loads MiniLM once).
_TEXT_ENCODERS: dict[tuple[str, int], nn.Module] = {}


def _frozen_text_encoder(spec: str, max_length: int) -> nn.Module:
    key = (spec, max_length)
    if key not in _TEXT_ENCODERS:
        from medfuse.text import build_text_encoder

        _TEXT_ENCODERS[key] = build_text_encoder(spec, max_length=max_length, trainable=False).eval()
    return _TEXT_ENCODERS[key]


class CTEncoderModel(nn.Module):
    """The ct_encoder family network: vision encoder, projection heads, text side, temperatures.

    The three-level loss that uses them is
    :meth:`~medfuse.families.ct_encoder.task.CTEncoderTask.compute_loss`.

    Args (besides those of :class:`CTVisionEncoder`):
        preset: ``tiny`` (64/3/4, CPU) | ``small`` (384/6/6) | ``base`` (768/12/12, the seed's);
            ``dim``/``depth``/``num_heads`` override single values.
        embed_dim: width E of the shared space.
        text_encoder: ``minilm`` or ``hf:<local folder>``; its width is read from the model.
        text_pool: ``mean`` (masked mean, sentence-transformers) or ``cls`` (CXR-BERT style).
        text_trainable: fine-tune the text encoder (then nothing is cached).
        text_max_length: tokens per text.
        init_temp: initial temperature of every level (clamped to [0.01, 1]).
        aux_seg: add the auxiliary region-segmentation head on patch features.
        gen_*: the report generator (:class:`~medfuse.families.ct_encoder.generation.ReportGenerator`;
            ``gen_decoder`` none | scratch | hf:<folder>), built only when a decoder is named.
    """

    def __init__(self, in_channels: int = 1, num_regions: int = 20, preset: str = "tiny", dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, patch_size=(4, 16, 16),
                 img_size=(64, 512, 512), pos_embed: str = "learned", slice_bias: bool = True,
                 region_attention: bool = True, weighting: str = "log", attn_impl: str = "auto", fpn_levels: int = 3,
                 fpn_dim: int | None = None, mask_hidden: int = 32, mask_sub=(1, 4, 4), drop: float = 0.0,
                 grad_checkpoint: bool = False, embed_dim: int = 256, text_encoder: str = "minilm", text_pool: str = "mean",
                 text_trainable: bool = False, text_max_length: int = 128, init_temp: float = 0.07,
                 aux_seg: bool = False, gen_decoder: str = "none", gen_queries: int = 16, gen_width: int = 128,
                 gen_depth: int = 2, gen_heads: int = 4, gen_dropout: float = 0.1, gen_vocab_size: int = 1024,
                 gen_max_length: int = 160, gen_lm_trainable: bool = True):
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError("model.params.preset", f"unknown preset '{preset}'", f"use one of: {', '.join(PRESETS)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError("model.params.weighting", f"unknown weighting '{weighting}'",
                              f"use one of: {', '.join(WEIGHTINGS)}")
        if attn_impl not in IMPLS:
            raise ConfigError("model.params.attn_impl", f"unknown attn_impl '{attn_impl}'", f"use one of: {IMPLS}")
        if text_pool not in ("mean", "cls"):
            raise ConfigError("model.params.text_pool", f"unknown text_pool '{text_pool}'", "use mean or cls")
        if in_channels != 1:
            raise ConfigError("data.modalities", f"ct_encoder takes one CT channel, got {in_channels}",
                              "set data.modalities=[ct]")
        size = {**PRESETS[preset], **{k: v for k, v in (("dim", dim), ("depth", depth), ("num_heads", num_heads))
                                      if v is not None}}
        self.vision = CTVisionEncoder(in_channels, num_regions, size["dim"], size["depth"], size["num_heads"],
                                      patch_size, img_size, pos_embed, slice_bias, region_attention, weighting,
                                      attn_impl, fpn_levels, fpn_dim, mask_hidden, mask_sub, drop, grad_checkpoint)
        cf = self.vision.fpn_dim
        self.global_proj = _mlp(self.vision.global_dim, embed_dim)
        self.local_proj = _mlp(cf, embed_dim)
        self.step_proj = _mlp(cf, embed_dim)
        self.seg_head = nn.Linear(cf, num_regions + 1) if aux_seg else None
        self.temps = nn.ModuleDict({k: InfoNCE(init_temp) for k in ("global", "region", "step")})
        self.text_spec, self.text_pool, self.text_max_length = text_encoder, text_pool, text_max_length
        if text_trainable:
            from medfuse.text import build_text_encoder

            self.text_encoder = build_text_encoder(text_encoder, max_length=text_max_length, trainable=True)
            text_dim = self.text_encoder.dim
        else:
            self.text_encoder = None
            text_dim = _frozen_text_encoder(text_encoder, text_max_length).dim
        self.text_proj = _mlp(text_dim, embed_dim)
        self.num_regions = num_regions
        self._text_cache: dict[str, torch.Tensor] = {}
        # Built last (and only when asked for), so that every module above draws the same initial
        # weights from the global generator as a model without a generator.
        self.generator = None
        if gen_decoder != "none":
            from medfuse.families.ct_encoder.generation import ReportGenerator

            self.generator = ReportGenerator(cf, gen_decoder, gen_queries, gen_width, gen_depth, gen_heads, gen_dropout,
                                             gen_vocab_size, gen_max_length, gen_lm_trainable)

    # --- text ------------------------------------------------------------------------------------
    def _encode_raw(self, encoder: nn.Module, texts: list[str]) -> torch.Tensor:
        out = encoder(texts)
        return out.pooled if self.text_pool == "mean" else out.tokens[:, 0]

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """T strings -> (T, C_text) encoder features (frozen ones cached per unique string)."""
        device = self.text_proj[0].weight.device
        if self.text_encoder is not None:
            return self._encode_raw(self.text_encoder, texts).float()
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            enc = _frozen_text_encoder(self.text_spec, self.text_max_length)
            enc.to(device)
            with torch.no_grad():
                for i in range(0, len(missing), 64):
                    feats = self._encode_raw(enc, missing[i: i + 64]).float().cpu()
                    self._text_cache.update(zip(missing[i: i + 64], feats, strict=True))
        return torch.stack([self._text_cache[t] for t in texts]).to(device)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """T strings -> (T, E) projected text embeddings (not normalised)."""
        return self.text_proj(self.text_features(texts))

    # --- vision ----------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Encode volumes into the shared space.

        Args:
            image: (B, 1, D, H, W) windowed CT.
            mask: (B, 1, D, H, W) region IDs 0..R.

        Returns:
            The :class:`CTVisionEncoder` outputs plus ``image_emb`` (B, E) (global head) and
            ``region_emb`` (B, R, E) (local head), ``present`` (B, R) bool.
        """
        return self.forward_intermediates(image, mask, attention=False)[0]

    def forward_intermediates(self, image: torch.Tensor, mask: torch.Tensor,
                              attention: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """:meth:`forward` and the intermediates of :meth:`CTVisionEncoder.forward_intermediates`
        (``region_attn`` (B, H, N, R + 1), the last block's region attention), from one pass."""
        v, inter = self.vision.forward_intermediates(image, mask, attention)
        v["image_emb"] = self.global_proj(v["global"])
        v["present"] = v["ctx"].present
        v["region_emb"] = _project(self.local_proj, v["region"], v["present"])
        return v, inter

    # --- text-to-patch attention -----------------------------------------------------------------
    def step_patch_attention(self, patch: torch.Tensor, step_emb: torch.Tensor) -> torch.Tensor:
        """Each CoT step's attention over its volume's patches (seed "CoT-Anchored Learning").

        The patches go through the step head (with the BatchNorm's running statistics, so that
        training with the anchor loss does not change the statistics the step level sees) into the
        shared space; a step attends to the patches by ``softmax(scale_step * cos(patch, step))``.

        Args:
            patch: (M, N, C_f) patch features of the volume each step belongs to.
            step_emb: (M, E) projected step-text embeddings (:meth:`embed_text`).

        Returns:
            (M, N) attention weights; each row sums to 1.
        """
        p = F.normalize(_head_running_stats(self.step_proj, patch), dim=-1)  # (M, N, E)
        t = F.normalize(step_emb, dim=-1)  # (M, E)
        return (self.temps["step"].scale * torch.einsum("mne,me->mn", p, t)).softmax(-1)


def _head_running_stats(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` on (..., C) with every BatchNorm normalising by its running statistics (no update)."""
    for layer in head:
        if isinstance(layer, nn.BatchNorm1d):
            shape = x.shape
            x = F.batch_norm(x.reshape(-1, shape[-1]), layer.running_mean, layer.running_var, layer.weight, layer.bias,
                             False, 0.0, layer.eps).reshape(shape)
        else:
            x = layer(x)
    return x
