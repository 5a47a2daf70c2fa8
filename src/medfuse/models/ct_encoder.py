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
multiply | none``, ``slice_bias: false``. Evaluation adds zero-shot AUROC, region-text alignment
and region-attention maps to the retrieval report (:func:`evaluate_ct_encoder`), and
``medfuse predict`` writes embeddings per volume
(:func:`medfuse.data.ct_encoder.export_embeddings`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfuse.errors import ConfigError, DataError
from medfuse.layers.patch_embed import PatchEmbed3d
from medfuse.layers.region_attention import WEIGHTINGS, AnatomicalStructureEncoder, CTBlock, region_pool
from medfuse.layers.slice_attention import IMPLS
from medfuse.losses import InfoNCE
from medfuse.registry import DEMO_ABLATIONS, MODELS

PRESETS = {
    "tiny": {"dim": 64, "depth": 3, "num_heads": 4},
    "small": {"dim": 384, "depth": 6, "num_heads": 6},
    "base": {"dim": 768, "depth": 12, "num_heads": 12},
}
LEVELS = ("global", "region", "step", "seg")
DEFAULT_LOSS_WEIGHTS = {"global": 1.0, "region": 1.0, "step": 1.0, "seg": 0.0}


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
        x, coords, grid = self.patch_embed(image)  # (B, N, C), (N, 3)
        ctx = self.anatomy(mask)
        if ctx.grid != grid:
            raise ValueError(f"mask grid {ctx.grid} differs from the image's patch grid {grid}")
        z = coords[:, 0]
        taps = []
        for i, blk in enumerate(self.blocks, start=1):
            if self.grad_checkpoint and self.training:
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
        return {"global": glob, "patch": patch, "region": region, "mass": mass, "ctx": ctx, "grid": grid}


# Frozen text encoders are shared between model instances (a process loads MiniLM once).
_TEXT_ENCODERS: dict[tuple[str, int], nn.Module] = {}


def _frozen_text_encoder(spec: str, max_length: int) -> nn.Module:
    key = (spec, max_length)
    if key not in _TEXT_ENCODERS:
        from medfuse.text import build_text_encoder

        _TEXT_ENCODERS[key] = build_text_encoder(spec, max_length=max_length, trainable=False).eval()
    return _TEXT_ENCODERS[key]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, texts: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where identical strings are all positives of each other.

    Args:
        img: (M, E) visual embeddings.
        txt: (M, E) text embeddings; row i describes row i of ``img``.
        texts: the M strings (equal strings, e.g. "Heart: normal size.", are not negatives).
        scale: 1 / temperature.

    Returns:
        Scalar: mean of the image->text and text->image soft cross-entropies.
    """
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tid = torch.tensor([ids[t] for t in texts], device=img.device)
    pos = (tid[:, None] == tid[None, :]).to(img.dtype)  # (M, M), symmetric
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


@MODELS.register("ct_encoder", help="3D CT ViT with slice-aware + region-aware attention, 3-level CoT alignment")
class CTEncoderModel(nn.Module):
    """The ct_encoder family model: vision encoder + text side + three-level contrastive loss.

    Args (besides those of :class:`CTVisionEncoder`):
        preset: ``tiny`` (64/3/4, CPU) | ``small`` (384/6/6) | ``base`` (768/12/12, the seed's);
            ``dim``/``depth``/``num_heads`` override single values.
        embed_dim: width E of the shared space.
        text_encoder: ``minilm`` or ``hf:<local folder>``; its width is read from the model.
        text_pool: ``mean`` (masked mean, sentence-transformers) or ``cls`` (CXR-BERT style).
        text_trainable: fine-tune the text encoder (then nothing is cached).
        text_max_length: tokens per text.
        init_temp: initial temperature of every level (clamped to [0.01, 1]).
        loss_weights: ``{global, region, step, seg}``; a stage's ``losses`` overrides them.
        aux_seg: add the auxiliary region-segmentation head on patch features.
    """

    def __init__(self, in_channels: int = 1, num_regions: int = 20, preset: str = "tiny", dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, patch_size=(4, 16, 16),
                 img_size=(64, 512, 512), pos_embed: str = "learned", slice_bias: bool = True,
                 region_attention: bool = True, weighting: str = "log", attn_impl: str = "auto", fpn_levels: int = 3,
                 fpn_dim: int | None = None, mask_hidden: int = 32, mask_sub=(1, 4, 4), drop: float = 0.0,
                 grad_checkpoint: bool = False, embed_dim: int = 256, text_encoder: str = "minilm", text_pool: str = "mean",
                 text_trainable: bool = False, text_max_length: int = 128, init_temp: float = 0.07,
                 loss_weights: dict[str, float] | None = None, aux_seg: bool = False):
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
        unknown = sorted(set(loss_weights or {}) - set(LEVELS))
        if unknown:
            raise ConfigError(f"model.params.loss_weights.{unknown[0]}", "unknown loss",
                              f"use some of: {', '.join(LEVELS)}")
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
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        self.num_regions = num_regions
        self._text_cache: dict[str, torch.Tensor] = {}

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
        v = self.vision(image, mask)
        v["image_emb"] = self.global_proj(v["global"])
        v["present"] = v["ctx"].present
        v["region_emb"] = _project(self.local_proj, v["region"], v["present"])
        return v

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch.get("mask") is None:
            raise DataError(batch.get("case_id", ["?"])[0], "has no region mask",
                            "ct_encoder needs a region mask per volume (data.params.masks)")
        out = self(batch["image"], batch["mask"])
        out["text_emb"] = self.embed_text([str(t) for t in batch["text"]])
        return out

    # --- loss ------------------------------------------------------------------------------------
    def _weights(self, stage: Any) -> dict[str, float]:
        w = dict(self.loss_weights)
        if stage is not None and getattr(stage, "losses", None):
            unknown = sorted(set(stage.losses) - set(LEVELS))
            if unknown:
                raise ConfigError(f"train.stages.{stage.name}.losses.{unknown[0]}", "unknown loss",
                                  f"use some of: {', '.join(LEVELS)}")
            w.update(stage.losses)
        return w

    def region_pairs(self, batch: dict[str, Any], out: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """(M, E) region embeddings of present regions that have a sentence, and the M sentences."""
        idx, texts = [], []
        present = out["present"]
        for b, pairs in enumerate(batch.get("region_text") or []):
            for rid, text in pairs:
                if 1 <= int(rid) <= self.num_regions and bool(present[b, int(rid) - 1]):
                    idx.append((b, int(rid) - 1))
                    texts.append(str(text))
        if not idx:
            return out["region_emb"].new_zeros(0, out["region_emb"].shape[-1]), []
        bi, ri = torch.tensor(idx, device=present.device).unbind(1)
        return out["region_emb"][bi, ri], texts

    def step_pairs(self, batch: dict[str, Any], out: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """(M, E) step embeddings and the M step texts.

        A step's visual feature is the mass-weighted mean of the region features of its
        ``mask_region`` (a union of regions); a step with no (present) region uses the global mean.
        """
        feats, texts = [], []
        region, mass = out["region"], out["mass"]  # (B, R, C_f), (B, R)
        for b, steps in enumerate(batch.get("steps") or []):
            for text, rids in steps:
                r = [int(i) - 1 for i in rids if 1 <= int(i) <= self.num_regions]
                w = mass[b, r] if r else mass.new_zeros(0)
                if r and float(w.sum()) > 0:
                    feats.append((w[:, None] * region[b, r]).sum(0) / w.sum())
                else:
                    feats.append(out["patch"][b].mean(0))
                texts.append(str(text))
        if not feats:
            return region.new_zeros(0, self.step_proj[-1].out_features), []
        return self.step_proj(torch.stack(feats)), texts

    def loss(self, batch: dict[str, Any], out: dict[str, Any], stage: Any = None) -> dict[str, torch.Tensor]:
        w = self._weights(stage)
        texts = [str(t) for t in batch["text"]]
        losses = {"global": contrastive_loss(out["image_emb"], out["text_emb"], texts, self.temps["global"].scale)}
        for level, pairs in (("region", self.region_pairs), ("step", self.step_pairs)):
            if w.get(level, 0.0) > 0:
                img, txt = pairs(batch, out)
                if len(txt) > 1:
                    losses[level] = contrastive_loss(img, self.embed_text(txt), txt, self.temps[level].scale)
        if self.seg_head is not None and w.get("seg", 0.0) > 0:
            logp = self.seg_head(out["patch"]).log_softmax(-1)  # (B, N, R + 1)
            losses["seg"] = -(out["ctx"].fractions * logp).sum(-1).mean()
        total = sum(w.get(k, 0.0) * v for k, v in losses.items())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}

    # --- evaluation hooks ------------------------------------------------------------------------
    def evaluate_extra(self, task, dm, split: str, run_dir: Path) -> dict[str, Any]:
        """Retrieval R@1/5/10/50, zero-shot AUROC, region-text alignment, region-attention maps."""
        return evaluate_ct_encoder(self, dm, split, Path(run_dir), task.cfg)

    def predict_inputs(self, task, cfg, dm, inputs: list[str], out: Path, modalities=None) -> Path:
        """Embeddings per volume as ``<case_id>.safetensors`` (``medfuse predict RUN VOLUME MASK | FOLDER``)."""
        from medfuse.data.ct_encoder import export_embeddings

        return export_embeddings(self, cfg, dm, list(inputs), Path(out))


# ---------------------------------------------------------------------------------- evaluation


def _binary_auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC along the last axis (Mann-Whitney U, mid-ranks); NaN without both classes. (..., n) -> (...)."""
    from scipy.stats import rankdata

    pos = y > 0.5
    n_pos = pos.sum(-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    u = np.where(pos, rankdata(s, axis=-1), 0.0).sum(-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _macro_auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Mean AUROC over classes with both labels; y, s (..., n, K) -> (...)."""
    auc = _binary_auc(np.moveaxis(y, -1, -2), np.moveaxis(s, -1, -2))  # (..., K)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(auc, axis=-1)


@torch.no_grad()
def evaluate_ct_encoder(model: CTEncoderModel, dm, split: str, run_dir: Path, cfg) -> dict[str, Any]:
    """The family's evaluation on ``split`` (the task's retrieval metrics plus the extras).

    * retrieval Recall@1/5/10/50 image->text and text->image (global head vs impression);
    * zero-shot AUROC per abnormality of ``labels.csv``: ``softmax(scale * [cos(v, "{X} is
      present."), cos(v, "{X} is not present.")])``, and their macro mean;
    * region-text alignment accuracy (two-alternative, chance 0.5): each present region with a
      sentence must prefer (local head, cosine) its own sentence over a distractor: the region's
      most common sentence in the split (its "normal" one) when its own differs, else another
      case's sentence for that region; a case's score is the share it gets right;
    * region-attention maps (last block, mean over heads) over slices for two cases.
    """
    from medfuse.metrics import bootstrap_ci, retrieval_report

    model.eval()
    device = next(model.parameters()).device
    n_boot, seed = cfg.eval.n_boot, cfg.train.seed
    region_attn = model.vision.blocks[-1].region
    imgs, texts, labels, pairs, shown = [], [], [], [], []
    for bi, batch in enumerate(dm.loader(split)):
        if region_attn is not None:
            region_attn.record = bi == 0
        out = model(batch["image"].to(device), batch["mask"].to(device))
        imgs.append(F.normalize(out["image_emb"].float(), dim=-1).cpu())
        case0 = len(texts)
        texts += [str(t) for t in batch["text"]]
        labels += [list(x or []) for x in batch.get("labels") or [[]] * len(batch["text"])]
        for b, rts in enumerate(batch.get("region_text") or []):
            for r, t in rts:
                if 1 <= int(r) <= model.num_regions and bool(out["present"][b, int(r) - 1]):
                    pairs.append((case0 + b, int(r), str(t), out["region_emb"][b, int(r) - 1].float().cpu()))
        if region_attn is not None and region_attn.last_attn is not None:
            shown = _attention_maps(model, batch, out, region_attn.last_attn, run_dir)
            region_attn.record, region_attn.last_attn = False, None
    img = torch.cat(imgs)
    txt = F.normalize(model.embed_text(texts).float(), dim=-1).cpu()
    metrics: dict[str, Any] = retrieval_report((img @ txt.t()).numpy(), n_boot=n_boot, seed=seed)
    metrics.pop("n", None)
    per_class: dict[str, Any] = {}
    names = list(getattr(dm, "abnormalities", []) or [])
    y = np.asarray(labels, dtype=np.float64)
    if names and y.shape == (len(texts), len(names)):
        scale = float(model.temps["global"].scale)
        pos = F.normalize(model.embed_text([f"{a} is present." for a in names]).float(), dim=-1).cpu()
        neg = F.normalize(model.embed_text([f"{a} is not present." for a in names]).float(), dim=-1).cpu()
        score = torch.sigmoid(scale * (img @ pos.t() - img @ neg.t())).numpy()  # 2-way softmax, (N, K)
        known = np.isfinite(y).all(1)
        if known.sum() > 1:
            metrics["zero_shot/mean_auroc"] = bootstrap_ci(_macro_auc, y[known], score[known], n_boot=n_boot,
                                                           seed=seed, vectorized=True)
        for k, a in enumerate(names):
            ok = np.isfinite(y[:, k])
            per_class[a] = {"zero_shot_auroc": bootstrap_ci(_binary_auc, y[ok, k], score[ok, k], n_boot=n_boot,
                                                            seed=seed, vectorized=True),
                            "prevalence": float(np.mean(y[ok, k])) if ok.any() else float("nan")}
    align = _region_alignment(model, pairs, len(texts))
    if align.size:
        metrics["region_text_accuracy"] = bootstrap_ci(lambda a: a.mean(-1), align, n_boot=n_boot, seed=seed,
                                                       vectorized=True)
    rep: dict[str, Any] = {"metrics": metrics, "region_attention_maps": shown}
    if per_class:
        rep["per_class"] = per_class
    return rep


def _region_alignment(model: CTEncoderModel, pairs: list, n_cases: int) -> np.ndarray:
    """Per-case two-alternative region-text accuracy (see :func:`evaluate_ct_encoder`); (cases with a pair,)."""
    from collections import Counter

    by_region: dict[int, Counter] = {}
    for _, r, t, _ in pairs:
        by_region.setdefault(r, Counter())[t] += 1
    texts = sorted({t for _, _, t, _ in pairs})
    if not texts:
        return np.zeros(0)
    emb = dict(zip(texts, F.normalize(model.embed_text(texts).float(), dim=-1).cpu(), strict=True))
    right: dict[int, list[float]] = {}
    for i, (case, r, t, v) in enumerate(pairs):
        normal = by_region[r].most_common(1)[0][0]
        others = sorted(x for x in by_region[r] if x != normal)
        distractor = normal if t != normal else (others[i % len(others)] if others else None)
        if distractor is None:
            continue
        v = F.normalize(v, dim=-1)
        right.setdefault(case, []).append(float(v @ emb[t] > v @ emb[distractor]))
    return np.asarray([np.mean(v) for _, v in sorted(right.items())])


def _attention_maps(model: CTEncoderModel, batch: dict[str, Any], out: dict[str, Any], attn: torch.Tensor,
                    run_dir: Path) -> list[dict[str, Any]]:
    """PNG overlays of the last block's attention to the region each case's first CoT step names."""
    from medfuse.reports.plots import plot_gate_overlay

    d, h, w = out["grid"]
    pd = model.vision.patch_embed.patch_size[0]
    shown = []
    for b, cid in enumerate(list(batch["case_id"])[:2]):
        steps = (batch.get("steps") or [[]] * (b + 1))[b]
        rids = next((s[1] for s in steps if s[1]), None)
        r = int(rids[0]) if rids else int(out["mass"][b].argmax()) + 1
        amap = rearrange(attn[b].mean(0)[:, r].float().cpu(), "(d h w) -> d h w", d=d, h=h, w=w)
        image = batch["image"][b, 0].float().numpy()
        amap = amap.repeat_interleave(pd, 0)[: image.shape[0]].numpy()  # one row per image slice
        zs = np.nonzero((batch["mask"][b, 0] == r).flatten(1).any(1).numpy())[0]
        z0, z1 = (int(zs.min()), int(zs.max())) if len(zs) else (0, image.shape[0] - 1)
        png = plot_gate_overlay(image[z0: z1 + 1], amap[z0: z1 + 1], run_dir / "plots" / f"region_attention_{cid}.png",
                                title=f"{cid}: attention to region {r}, slices {z0}-{z1} (last block, mean over heads)")
        shown.append({"case": cid, "region": r, "png": str(png.relative_to(run_dir)),
                      "step": steps[0][0] if steps else ""})
    return shown


ct_encoder = CTEncoderModel  # the registered factory: ``model.params`` are the constructor's arguments

DEMO_ABLATIONS["ct_encoder"] = [
    ("full: slice + region attention (log)", []),
    ("region attention off", ["model.params.region_attention=false"]),
    ("region attention, seed 'multiply'", ["model.params.weighting=multiply"]),
]
