"""Family ``context_seg``: a 3D UNet over frozen foundation features with context fusion (seed 004).

Seed sections: "New (Correct) Implementation", "Attention Fusion Mechanism", "Testing & Validation".

Pipeline:

1. :mod:`medfuse.data.context_seg` extracts raw and context features slice by slice with a frozen
   2D encoder (DINOv3 or the tiny CPU encoder), resamples both onto the label grid and keeps them
   as two streams.
2. :class:`~medfuse.layers.context_unet.ContextUNet3D`: the raw stream runs a 1x1 input conv, four
   encoder levels, a bottleneck and a trilinear decoder; the context stream (own 1x1 conv,
   avg-pool and 1x1 projection per level) gates the four encoder skips through
   :class:`~medfuse.layers.fusion.ContextAttentionFusion`, ``raw + raw * att(context)``.
3. Softmax over K classes, trained with MONAI Dice + Focal loss (``train.seg_loss: dice_focal``,
   ``train.class_weights``) on foreground-biased patches, inferred with MONAI's sliding window.
4. Evaluation: per-class precision, recall, F1, IoU and Dice from voxel counts pooled over cases,
   their means over the foreground classes, all with case-bootstrap 95% CIs.

Ablations are the ``fusion`` switch: ``attention`` (the design), ``concat`` (the seed's "old, wrong
way": one 2C-channel input) and ``none`` (raw features only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.errors import ConfigError, DataError
from medfuse.layers.context_unet import FUSIONS, ContextUNet3D
from medfuse.registry import DEMO_ABLATIONS, MODELS

SCORES = ("precision", "recall", "f1", "iou", "dice")


class ContextSegModel(ContextUNet3D):
    """:class:`ContextUNet3D` plus the engine hooks of the family.

    The engine hands a segmentation model one tensor, ``batch["image"]``; for this family it holds
    the raw and the context features stacked on the channel axis (see
    :mod:`medfuse.data.context_seg`), and :meth:`forward` splits them before any layer.
    """

    def split(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_in + C_ctx, D, H, W) -> raw (B, C_in, D, H, W), context (B, C_ctx, D, H, W) (views)."""
        want = self.in_channels + self.context_channels
        if image.shape[1] != want:
            raise ValueError(f"expected {self.in_channels} raw + {self.context_channels} context channels, "
                             f"got {image.shape[1]}")
        return image[:, : self.in_channels], image[:, self.in_channels :]

    def forward(self, raw: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Segment; ``raw`` alone may be the stacked (B, C_in + C_ctx, D, H, W) item -> logits (B, K, D, H, W)."""
        if context is None and raw.shape[1] != self.in_channels:
            raw, context = self.split(raw)
        return super().forward(raw, context)

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_extra(self, task, dm, split: str, run_dir: Path) -> dict[str, Any]:
        """Per-class precision/recall/F1/IoU/Dice with bootstrap CIs; attention maps; overlays."""
        from medfuse.metrics import confusion_stats, segmentation_case_metrics, segmentation_report
        from medfuse.reports.plots import plot_gate_overlay, plot_overlay

        names = _class_names(dm)
        k = len(names)
        counts, per_case, ids = [], [], []
        plots: dict[str, str] = {}
        run_dir = Path(run_dir)
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        n_boot, seed = task.cfg.eval.n_boot, task.cfg.train.seed
        for batch in dm.loader(split):
            image = batch["image"].to(task.device)
            pred = task.infer(image).argmax(1).cpu()  # (B, D, H, W)
            mask = batch["mask"][:, 0].long()
            per_case.append(segmentation_case_metrics(pred, mask, num_classes=k))
            for i, cid in enumerate(batch["case_id"]):
                s = confusion_stats(pred[i], mask[i], k)
                counts.append(np.stack([s["tp"], s["fp"], s["fn"]], axis=-1))  # (K, 3)
                ids.append(cid)
                if len(plots) < 2 * task.cfg.eval.overlays:
                    png = plot_overlay(batch["intensity"][i, 0].numpy(), pred[i].numpy(), mask[i].numpy(),
                                       run_dir / "plots" / f"context_overlay_{cid}.png", title=f"{cid}: raw, pred, truth")
                    plots[f"overlay {cid}"] = str(png.relative_to(run_dir))
                    if self.fusion == "attention":
                        att = self.attention_maps(image[i: i + 1, self.in_channels:])[0][0].mean(0).cpu()
                        png = plot_gate_overlay(batch["intensity"][i, 0].numpy(), att.numpy(),
                                                run_dir / "plots" / f"attention_{cid}.png",
                                                title=f"{cid}: level-1 context attention (channel mean)")
                        plots[f"attention {cid}"] = str(png.relative_to(run_dir))
        c = np.stack(counts)  # (N, K, 3)
        fg = list(range(1, k))
        metrics: dict[str, Any] = {
            "mean_iou": _boot(c, "iou", fg, n_boot, seed), "mean_f1": _boot(c, "f1", fg, n_boot, seed)}
        for j in fg:
            metrics[f"f1[{names[j]}]"] = _boot(c, "f1", [j], n_boot, seed)
        for score in ("precision", "recall", "dice"):
            metrics[f"mean_{score}"] = _boot(c, score, fg, n_boot, seed)
        per_class = {names[j]: {s: _boot(c, s, [j], n_boot, seed) for s in SCORES} for j in fg}
        merged = {key: np.concatenate([m[key] for m in per_case]) for key in per_case[0]}
        case_rep = segmentation_report(merged, names[1:], n_boot=n_boot, seed=seed)
        for name in names[1:]:
            per_class[name]["hd95"] = case_rep["per_class"][name]["hd95"]
        return {
            "metrics": metrics,
            "per_class": per_class,
            "n": len(ids),
            "case_metrics": {m: case_rep[m] for m in ("dice", "iou", "hd95")},
            "context_seg": {"fusion": self.fusion, "scores": "voxel counts pooled over cases; mean over "
                            "foreground classes; case-bootstrap 95% CI", "plots": plots},
        }

    # ------------------------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_inputs(self, task, cfg, dm, inputs: list[str], out: Path, modalities: list[str] | None) -> Path:
        """``medfuse predict RUN RAW [CONTEXT]``: label map on the training label grid, as NIfTI."""
        from medfuse.data.io import write_nifti
        from medfuse.data.layouts import Case

        p = dm.params
        want = 1 if p.context_mode == "derived" else 2
        if len(inputs) != want:
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for context_mode '{p.context_mode}'",
                            "give RAW" + (" CONTEXT" if want == 2 else "") + " (one case)")
        for path in inputs:
            if not Path(path).exists():
                raise DataError(path, "file not found", "check the path")
        images = {p.raw: inputs[0]} | ({p.context: inputs[1]} if want == 2 else {})
        name = Path(inputs[0]).name.split(".")[0]
        feats = dm.compute(Case(case_id=name, patient_id=name, images=images), require_label=False)
        image = torch.cat([feats["raw"].float(), feats["context"].float()])[None].to(task.device)
        pred = task.infer(image).argmax(1)[0].cpu().numpy().astype(np.uint8)  # (D, H, W)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_nifti(pred[None], out / f"{name}_pred.nii.gz", affine=feats["affine"].numpy())
        return out


def _class_names(dm) -> list[str]:
    labels = dm.table.mask_labels
    if labels:
        return [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    return [str(i) for i in range(dm.num_classes)]


def _scores(counts: np.ndarray, score: str, classes: list[int]) -> np.ndarray:
    """counts (..., n, K, 3) -> ``score`` averaged over ``classes`` (NaN-skipping) after pooling cases: (...,)."""
    tot = counts.sum(axis=-3).astype(np.float64)  # (..., K, 3)
    tp, fp, fn = tot[..., 0], tot[..., 1], tot[..., 2]
    num, den = {"precision": (tp, tp + fp), "recall": (tp, tp + fn), "iou": (tp, tp + fp + fn),
                "f1": (2 * tp, 2 * tp + fp + fn), "dice": (2 * tp, 2 * tp + fp + fn)}[score]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)[..., classes]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples are skipped by bootstrap_ci
            return np.nanmean(val, axis=-1)


def _boot(counts: np.ndarray, score: str, classes: list[int], n_boot: int, seed: int) -> dict[str, Any]:
    from medfuse.metrics import bootstrap_ci

    return bootstrap_ci(lambda c: _scores(c, score, classes), counts, n_boot=n_boot, seed=seed, vectorized=True)


@MODELS.register("context_seg", help="3D UNet on frozen 2D features; context gates the skips (attention|concat|none)")
def context_seg(num_classes: int, feature_channels: int, context_channels: int | None = None, base: int = 32,
                levels: int = 4, fusion: str = "attention", reduction: int = 4, norm: str = "batch",
                up_mode: str = "trilinear", dropout: float = 0.0) -> ContextSegModel:
    """The context_seg model (see :class:`ContextSegModel` and :class:`ContextUNet3D` for the arguments).

    ``feature_channels`` is the raw features' C (the encoder's ``out_channels``: tiny 32 by default,
    DINOv3 ViT-S 384, ViT-L 1024); ``context_channels`` defaults to it.
    """
    if fusion not in FUSIONS:
        raise ConfigError("model.params.fusion", f"unknown fusion '{fusion}'", f"use one of: {', '.join(FUSIONS)}")
    if norm not in ("batch", "instance", "group"):
        raise ConfigError("model.params.norm", f"unknown norm '{norm}'", "use batch, instance or group")
    if up_mode not in ("trilinear", "transpose"):
        raise ConfigError("model.params.up_mode", f"unknown up_mode '{up_mode}'", "use trilinear or transpose")
    if num_classes is None or int(num_classes) < 2:
        raise ConfigError("data.num_classes", f"context_seg needs >= 2 classes, got {num_classes}",
                          "declare mask_labels (background first) or set data.num_classes")
    return ContextSegModel(int(feature_channels), int(num_classes), context_channels, base, levels, fusion,
                           reduction, norm, up_mode, dropout)


DEMO_ABLATIONS["context_seg"] = [
    ("attention fusion", []),
    ("concat (seed's old way)", ["model.params.fusion=concat"]),
    ("none (raw only)", ["model.params.fusion=none"]),
]
