"""Family ``text_seg``: text-guided box-prompted segmentation on a frozen MedSAM (seed 002, Talk2MedSAM).

Pipeline (seed sections in brackets):

1. The image side (:mod:`medfuse.encoders.sam_prompt`): MedSAM's SAM ViT-B encoder gives the
   image embedding (B, 256, 64, 64) of a 1024² image; its prompt encoder and mask decoder turn a
   box into mask logits. Frozen by default, loaded from a local ``medsam_vit_b.pth``; embeddings
   of a frozen encoder may be cached on disk (``embedding_cache``). A tiny CNN + small SAM
   decoder pair stands in on CPU.
2. The text side (:mod:`medfuse.text`): a frozen text encoder (MiniLM offline, or ``hf:<folder>``
   for PubMedBERT & co.); its pooled output is cached per unique string, so training never reruns
   it on a prompt it has seen. Its width is read from the encoder.
3. The adapter [Hierarchical Fusion Block]: text is fused into the image embedding *before* the
   mask decoder, by :class:`~medfuse.layers.fusion.HierarchicalTextFusion` (level 1: 1 token,
   4 heads, gate 0.5; level 2: 2 tokens, 8 heads, gate 0.8; effective gates, see there) or the
   single-level :class:`~medfuse.layers.fusion.GatedTextFusion` baseline; ``fusion: none`` feeds
   a learned constant instead of the text (the box-only control with the same network).
4. The loss [Training Objective]: Dice + BCE + 2 x InfoNCE between the image embedding pooled
   under the target mask (pre-fusion) and the coarse text token, with a learnable temperature
   clamped to [min, max]. Texts that are equal are positives of each other.

The default configuration (MedSAM image side, MiniLM) has about 500K trainable parameters (the
adapter and the contrastive head); the count is printed when the model is built and reported.

The platform's segmentation task runs 3D volumes through ``model(image)``; this family needs text
and boxes, so it runs under ``task: contrastive`` (whose steps go through ``forward_batch`` and
``loss``), returns ``logits`` (B, 2, m, m) that a 2D segmentation task could also score, and
replaces the evaluation metrics with Dice / IoU / HD95 at the original image resolution in
:meth:`TextSegModel.evaluate_extra`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from medfuse.errors import ConfigError, DataError
from medfuse.layers.fusion import GatedTextFusion, HierarchicalTextFusion
from medfuse.registry import DEMO_ABLATIONS, MODELS

FUSIONS = ("hierarchical", "gated", "none")
_TEXT_ENCODERS: dict[str, Any] = {}


def shared_text_encoder(spec: str):
    """One frozen text encoder per spec and process, with its per-string cache of pooled outputs."""
    if spec not in _TEXT_ENCODERS:
        from medfuse.text import build_text_encoder

        enc = build_text_encoder(spec)
        enc.pooled_cache = {}  # str -> (Ct,) float32 CPU tensor
        _TEXT_ENCODERS[spec] = enc
    return _TEXT_ENCODERS[spec]


def multi_positive_info_nce(a: torch.Tensor, b: torch.Tensor, groups: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where rows with the same group (equal text) are all positives.

    Args:
        a: (B, E) image embeddings; b: (B, E) text embeddings (both normalised here).
        groups: B keys; equal keys are positives of each other.
        scale: 1 / temperature.

    Returns:
        Scalar loss (soft-target cross-entropy both ways).
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = scale * a @ b.t()  # (B, B)
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    g = torch.tensor([ids[k] for k in groups], device=a.device)
    same = (g[:, None] == g[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


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
        fusion: ``hierarchical`` | ``gated`` | ``none``.
        token_dim: width of the hierarchical text tokens (and of the contrastive space).
        coarse_heads, fine_heads: heads of levels 1 and 2.
        coarse_gate, fine_gate: effective gates of levels 1 and 2 at initialisation.
        gated_init: image share of the gated baseline at initialisation.
        dice_weight, bce_weight, contrastive_weight: loss weights (a stage's ``losses`` overrides).
        init_temperature, min_temperature, max_temperature: the contrastive temperature.
        contrastive_pool: ``mask`` (pool the image embedding under the target) or ``global``.
        embedding_cache: folder of the disk cache of frozen image embeddings (``None``: off).
    """

    def __init__(self, image_encoder: str = "medsam", image_weights: str | None = None, image_size: int | None = None,
                 freeze_image_side: bool = True, tiny_dim: int = 64, tiny_hidden: tuple[int, int] = (16, 32),
                 text_encoder: str = "minilm", fusion: str = "hierarchical", token_dim: int = 96,
                 coarse_heads: int = 4, fine_heads: int = 8, coarse_gate: float = 0.5, fine_gate: float = 0.8,
                 gated_init: float = 0.8, dice_weight: float = 1.0, bce_weight: float = 1.0,
                 contrastive_weight: float = 2.0, init_temperature: float = 0.07, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, contrastive_pool: str = "mask", embedding_cache: str | None = None):
        super().__init__()
        from medfuse.encoders.sam_prompt import build_image_side
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
        if fusion == "gated":
            self.fusion: nn.Module = GatedTextFusion(dim, text_dim, init_gate=gated_init)
        else:
            self.fusion = HierarchicalTextFusion(dim, text_dim, token_dim, coarse_heads=coarse_heads,
                                                 coarse_gate=coarse_gate, fine_heads=fine_heads, fine_gate=fine_gate,
                                                 text_mode="null" if fusion == "none" else "text")
        self.image_proj = nn.Linear(dim, self.fusion.embed_dim)
        self.contrastive = InfoNCE(init_temperature, min_temperature, max_temperature)
        self.weights = {"dice": dice_weight, "bce": bce_weight, "contrastive": contrastive_weight}
        self.contrastive_pool = contrastive_pool
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
        self._eval_cache: dict[str, Any] = {}
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
        emb = self.embed(image)  # (B, C, h, w)
        h = emb.shape[-2]
        text = self.text_features(list(texts)).to(emb.device, emb.dtype)  # (B, Ct)
        pos = rearrange(self.image_side.decoder.dense_pe(), "1 c h w -> 1 (h w) c")
        fused = self.fusion(rearrange(emb, "b c h w -> b (h w) c"), text, pos)  # (B, L, C)
        low = self.image_side.decode(rearrange(fused, "b (h w) c -> b c h w", h=h), boxes)  # (B, 1, 4h, 4w)
        if out_size is not None and tuple(low.shape[-2:]) != tuple(out_size):
            low = F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)
        return {"mask_logits": low, "embedding": emb, "text": text}

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The task hook: batch with image (B, 3, S, S), box (B, 4), text, optional mask (B, 1, m, m)."""
        mask = batch.get("mask")
        out = self(batch["image"], batch["box"], batch["text"], tuple(mask.shape[-2:]) if mask is not None else None)
        logits = out["mask_logits"]
        weights = mask if (mask is not None and self.contrastive_pool == "mask") else None
        if weights is None and self.contrastive_pool == "mask":
            weights = torch.sigmoid(logits).detach()
        pooled = _pool(out["embedding"], weights)  # (B, C)
        return {"mask_logits": logits, "logits": torch.cat([torch.zeros_like(logits), logits], dim=1),
                "image_emb": self.image_proj(pooled), "text_emb": self.fusion.text_embedding(out["text"])}

    def loss(self, batch: dict[str, Any], out: dict[str, torch.Tensor], stage_cfg=None) -> dict[str, torch.Tensor]:
        """Dice + BCE + w * InfoNCE. In eval mode ``loss`` is Dice + BCE only (the selection criterion)."""
        from monai.losses import DiceLoss

        w = {**self.weights, **(stage_cfg.losses if stage_cfg is not None and stage_cfg.losses else {})}
        target = batch["mask"].to(out["mask_logits"].dtype)
        logits = out["mask_logits"].float()
        dice = DiceLoss(sigmoid=True)(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        con = multi_positive_info_nce(out["image_emb"], out["text_emb"], list(batch["text"]), self.contrastive.scale)
        seg = w["dice"] * dice + w["bce"] * bce
        total = seg + w["contrastive"] * con if self.training else seg
        return {"loss": total, "dice_loss": dice.detach(), "bce": bce.detach(), "contrastive": con.detach(),
                "temperature": (1.0 / self.contrastive.scale).detach()}

    # ------------------------------------------------------------------------------------------
    # evaluation hooks (engine/evaluate.py)

    def evaluate_extra(self, task, dm, split: str, run_dir: Path) -> dict[str, Any]:
        """Dice / IoU / HD95 at the original resolution with CIs, predictions, overlays, parameter counts."""
        return _evaluate_split(self, dm, split, Path(run_dir), task.cfg.eval.n_boot, task.cfg.train.seed)

    def evaluate_counterfactual(self, task, dm, split: str, run_dir: Path, specs: list[str],
                                n_boot: int) -> dict[str, Any]:
        """Rerun ``split`` with wrong text (``FIELD=shuffle|VALUE``); report the Dice drop per condition."""
        return _counterfactual(self, dm, split, specs, n_boot, task.cfg.train.seed)

    def predict_inputs(self, task, cfg, dm, inputs: list[str], out: Path, modalities: list[str] | None) -> Path:
        """``medfuse predict RUN inputs.csv``: boxes and text from the CSV -> PNG masks + predictions.csv."""
        return _predict_csv(self, dm, inputs, Path(out))


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


@MODELS.register("text_seg", help="Talk2MedSAM: text fused into frozen MedSAM embeddings (hierarchical / gated)")
def text_seg(image_encoder: str = "medsam", image_weights: str | None = None, image_size: int | None = None,
             freeze_image_side: bool = True, tiny_dim: int = 64, tiny_hidden: tuple[int, int] = (16, 32),
             text_encoder: str = "minilm", fusion: str = "hierarchical", token_dim: int = 96, coarse_heads: int = 4,
             fine_heads: int = 8, coarse_gate: float = 0.5, fine_gate: float = 0.8, gated_init: float = 0.8,
             dice_weight: float = 1.0, bce_weight: float = 1.0, contrastive_weight: float = 2.0,
             init_temperature: float = 0.07, min_temperature: float = 0.01, max_temperature: float = 1.0,
             contrastive_pool: str = "mask", embedding_cache: str | None = None) -> TextSegModel:
    """The text_seg family's model (see :class:`TextSegModel`)."""
    return TextSegModel(image_encoder, image_weights, image_size, freeze_image_side, tiny_dim, tiny_hidden,
                        text_encoder, fusion, token_dim, coarse_heads, fine_heads, coarse_gate, fine_gate, gated_init,
                        dice_weight, bce_weight, contrastive_weight, init_temperature, min_temperature,
                        max_temperature, contrastive_pool, embedding_cache)


DEMO_ABLATIONS["text_seg"] = [
    ("hierarchical fusion", []),
    ("single-level gated fusion", ["model.params.fusion=gated"]),
    ("no text (box only)", ["model.params.fusion=none"]),
    ("hierarchical, shuffled test text", ["data.params.test_counterfactual=text=shuffle"]),
]


# ----------------------------------------------------------------------------------------------
# evaluation at the original resolution, counterfactual text, prediction from a CSV


@torch.no_grad()
def _run_split(model: TextSegModel, dm, split: str, counterfactual: str | None = None) -> dict[str, Any]:
    """Per-case Dice / IoU / HD95 (pixels) at each image's original size, plus texts and predictions."""
    from medfuse.data.text_seg import read_mask
    from medfuse.metrics import segmentation_case_metrics

    device = next(model.parameters()).device
    recs = {r.case_id: r for r in dm.records[split]}
    res: dict[str, Any] = {"case_id": [], "text": [], "pred": {}, "box": {}, "dice": [], "iou": [], "hd95": []}
    for batch in dm.loader(split, counterfactual):
        logits = model(batch["image"].to(device), batch["box"].to(device), batch["text"])["mask_logits"]
        for i, cid in enumerate(batch["case_id"]):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred = F.interpolate(logits[i: i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0
            gt = torch.from_numpy(read_mask(recs[cid], dm.params["mask_value"], (h, w)))
            m = segmentation_case_metrics(pred[None].long().cpu(), gt[None].long(), num_classes=2)
            for key in ("dice", "iou", "hd95"):
                res[key].append(float(m[key][0, 0]))
            res["case_id"].append(cid)
            res["text"].append(batch["text"][i])
            res["pred"][cid] = pred.cpu().numpy()
            res["box"][cid] = batch["box"][i].numpy() * np.array([w, h, w, h]) / dm.params["image_size"]
    for key in ("dice", "iou", "hd95"):
        res[key] = np.asarray(res[key], dtype=np.float64)
    return res


def _evaluate_split(model: TextSegModel, dm, split: str, run_dir: Path, n_boot: int, seed: int) -> dict[str, Any]:
    import csv

    from PIL import Image

    from medfuse.metrics import segmentation_report

    res = _run_split(model, dm, split)
    rep = segmentation_report({k: res[k][:, None] for k in ("dice", "iou", "hd95")}, ["target"], n_boot, seed)
    metrics = {k: rep[k] for k in ("dice", "iou", "hd95")}
    model._eval_cache[split] = {"res": res, "metrics": metrics}
    out_dir = run_dir / "predictions" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_case.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", "text", "dice", "iou", "hd95_px"])
        for j, cid in enumerate(res["case_id"]):
            Image.fromarray(res["pred"][cid].astype(np.uint8) * 255).save(out_dir / f"{cid}.png")
            wr.writerow([cid, res["text"][j], *(f"{res[k][j]:.4f}" for k in ("dice", "iou", "hd95"))])
    overlay = _plot_overlays(model, dm, split, res, run_dir / "plots" / "text_seg_overlays.png")
    counts = model.parameter_counts()
    gates = model.fusion.gates if hasattr(model.fusion, "gates") else None
    return {"task": "segmentation (2D, box + text prompt)", "n": len(res["case_id"]), "metrics": metrics,
            "parameters": counts, "gates": gates, "temperature": float(1.0 / model.contrastive.scale.detach()),
            "overlays": str(overlay.relative_to(run_dir)),
            "notes": [f"trainable parameters: {counts['trainable']:,} (adapter {counts['adapter']:,}); "
                      f"frozen {counts['frozen']:,}",
                      "Dice / IoU / HD95 (pixels) at each image's original resolution; prompts: "
                      f"box from {dm.params['box_source']}, text from "
                      f"{'the template ' + repr(dm.params['text_template']) if dm.params['text_template'] else 'CSV'}"]}


def _counterfactual(model: TextSegModel, dm, split: str, specs: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from medfuse.metrics import bootstrap_ci
    from medfuse.reports import format_ci

    if split not in model._eval_cache:
        raise RuntimeError("evaluate_extra must run before evaluate_counterfactual")  # the engine's order
    base = model._eval_cache[split]
    d0, metrics = base["res"]["dice"], dict(base["metrics"])
    table = Table("text", "Dice", "drop", "relative drop", "texts changed",
                  title=f"counterfactual text on the {split} split (95% bootstrap CI)")
    table.add_row("correct", format_ci(metrics["dice"]), "-", "-", "-")
    out: dict[str, Any] = {"correct": metrics["dice"]}
    for spec in specs:
        res = _run_split(model, dm, split, spec)
        if res["case_id"] != base["res"]["case_id"]:
            raise RuntimeError("counterfactual loader changed the case order")  # pragma: no cover
        d1 = res["dice"]
        changed = sum(a != b for a, b in zip(base["res"]["text"], res["text"], strict=True))
        mean = lambda x: x.mean(-1)  # noqa: E731 - vectorised bootstrap statistic
        cf = bootstrap_ci(mean, d1, n_boot=n_boot, seed=seed, vectorized=True)
        drop = bootstrap_ci(mean, d0 - d1, n_boot=n_boot, seed=seed, vectorized=True)
        rel = 100.0 * drop["value"] / max(float(d0.mean()), 1e-8)
        out[spec] = {"dice": cf, "dice_drop": drop, "relative_drop_percent": rel, "texts_changed": changed,
                     "n": len(d1)}
        metrics[f"dice ({spec})"] = cf
        metrics[f"dice drop ({spec})"] = drop
        table.add_row(spec, format_ci(cf), format_ci(drop), f"{rel:.1f}%", f"{changed}/{len(d1)}")
    Console(width=120).print(table)
    return {"metrics": metrics, "counterfactual": out}


def _plot_overlays(model: TextSegModel, dm, split: str, res: dict[str, Any], png: Path, n: int = 6) -> Path:
    """Image, box (yellow), reference (green) and prediction (red) contours of a few cases, with their text."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfuse.data.text_seg import read_mask, read_plane

    recs = {r.case_id: r for r in dm.records[split]}
    ids = res["case_id"][:n]
    fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 4.2), squeeze=False)
    for ax, cid in zip(axes[0], ids, strict=True):
        rec = recs[cid]
        img = read_plane(rec.image, rec.slice_index, False, cid)
        img = img.mean(0) if img.shape[0] > 1 else img[0]
        gt = read_mask(rec, dm.params["mask_value"], img.shape)
        ax.imshow(img, cmap="gray")
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
        if res["pred"][cid].any():
            ax.contour(res["pred"][cid], levels=[0.5], colors="red", linewidths=1)
        x0, y0, x1, y1 = res["box"][cid]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", linewidth=1))
        j = res["case_id"].index(cid)
        ax.set_title("\n".join(textwrap.wrap(res["text"][j], 28)) + f"\nDice {res['dice'][j]:.2f}", fontsize=7)
        ax.axis("off")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


@torch.no_grad()
def _predict_csv(model: TextSegModel, dm, inputs: list[str], out: Path) -> Path:
    import csv

    from PIL import Image
    from torch.utils.data import DataLoader

    from medfuse.data.layouts import load_cases
    from medfuse.data.text_seg import TextSegDataset, records_from_cases
    from medfuse.engine.data import collate

    if len(inputs) != 1 or Path(inputs[0]).suffix.lower() not in (".csv", ".json"):
        raise DataError(" ".join(inputs), "text_seg predicts from one manifest CSV",
                        "give a CSV with case_id, image_<modality>, box and the text (or template) columns")
    table = load_cases(inputs[0])
    mod = dm.modality if dm.modality in table.modalities else table.modalities[0]
    recs = records_from_cases(table.cases, mod, need_mask=False)
    ds = TextSegDataset(recs, {**dm.params, "box_source": "csv", "cache_in_memory": False}, need_mask=False)
    device = next(model.parameters()).device
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in DataLoader(ds, batch_size=dm.cfg.data.eval_batch_size or dm.cfg.data.batch_size, collate_fn=collate):
        logits = model(batch["image"].to(device), batch["box"].to(device), batch["text"])["mask_logits"]
        for i, cid in enumerate(batch["case_id"]):
            h, w = (int(v) for v in batch["orig_size"][i])
            prob = torch.sigmoid(F.interpolate(logits[i: i + 1].float(), size=(h, w), mode="bilinear",
                                               align_corners=False))[0, 0].cpu().numpy()
            pred = prob > 0.5
            Image.fromarray(pred.astype(np.uint8) * 255).save(out / f"{cid}_mask.png")
            box = batch["box"][i].numpy() * np.array([w, h, w, h]) / dm.params["image_size"]
            rows.append([cid, batch["text"][i], " ".join(f"{v:.1f}" for v in box), int(pred.sum()),
                         f"{float(prob[pred].mean()) if pred.any() else 0.0:.4f}"])
    with (out / "predictions.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", "text", "box", "area_px", "mean_prob"])
        wr.writerows(rows)
    return out
