"""The ct_encoder family's evaluation and prediction.

:class:`CTEncoderEvaluator` adds, to the retrieval report of the generic
:class:`~medfuse.engine.evaluate.RetrievalEvaluator`, from the same single pass over the split and
the same embeddings:

* zero-shot AUROC per abnormality of ``labels.csv``: ``softmax(scale * [cos(v, "{X} is
  present."), cos(v, "{X} is not present.")])``, and their macro mean;
* region-text alignment accuracy (two-alternative, chance 0.5): each present region with a
  sentence must prefer (local head, cosine) its own sentence over a distractor: the region's most
  common sentence in the split (its "normal" one) when its own differs, else another case's
  sentence for that region; a case's score is the share it gets right;
* region-attention maps (last block, mean over heads) over slices for the first two cases.

:class:`CTEncoderPredictor` is ``medfuse predict`` for the family: embeddings per volume as
``<case_id>.safetensors``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from medfuse.engine.evaluate import RetrievalEvaluator

ATTENTION_CASES = 2
"""Cases of the split's first batch whose region-attention maps the report shows."""


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


class CTEncoderEvaluator(RetrievalEvaluator):
    """Retrieval Recall@k (global head vs impression) plus zero-shot AUROC, region-text alignment
    and region-attention maps (see the module doc), all from one inference pass.

    Report entries besides the retrieval ones: ``metrics["zero_shot/mean_auroc"]``,
    ``metrics["region_text_accuracy"]``, ``per_class`` (zero-shot AUROC and prevalence per
    abnormality) and ``region_attention_maps`` (case, region, png, step).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.texts: list[str] = []
        self.labels: list[list[float]] = []
        self.pairs: list[tuple[int, int, str, torch.Tensor]] = []  # (case index, region id, sentence, region emb)
        self.maps: list[dict[str, Any]] | None = None  # None until the first batch was seen

    def infer(self, batch):
        if self.maps is None:  # the first batch: the same forward pass, also returning the attention
            return self.task.infer_intermediates(batch)
        return self.task.infer(batch)

    def update(self, batch, out):
        super().update(batch, out)
        n_regions = self.task.model.num_regions
        case0 = len(self.texts)
        self.texts += [str(t) for t in batch["text"]]
        self.labels += [list(x or []) for x in batch.get("labels") or [[]] * len(batch["text"])]
        for b, rts in enumerate(batch.get("region_text") or []):
            for r, t in rts:
                if 1 <= int(r) <= n_regions and bool(out["present"][b, int(r) - 1]):
                    self.pairs.append((case0 + b, int(r), str(t), out["region_emb"][b, int(r) - 1].float().cpu()))
        if self.maps is None:
            self.maps = self.attention_maps(batch, out) if "region_attn" in out else []

    def attention_maps(self, batch: dict[str, Any], out: dict[str, Any]) -> list[dict[str, Any]]:
        """PNG overlays of the last block's attention to the region each case's first CoT step names."""
        from medfuse.reports.plots import plot_gate_overlay

        attn = out["region_attn"]  # (B, H, N, R + 1)
        d, h, w = out["grid"]
        pd = self.task.model.vision.patch_embed.patch_size[0]
        shown = []
        for b, cid in enumerate(list(batch["case_id"])[:ATTENTION_CASES]):
            steps = (batch.get("steps") or [[]] * (b + 1))[b]
            rids = next((s[1] for s in steps if s[1]), None)
            r = int(rids[0]) if rids else int(out["mass"][b].argmax()) + 1
            amap = rearrange(attn[b].mean(0)[:, r].float().cpu(), "(d h w) -> d h w", d=d, h=h, w=w)
            image = batch["image"][b, 0].float().cpu().numpy()
            amap = amap.repeat_interleave(pd, 0)[: image.shape[0]].numpy()  # one row per image slice
            zs = np.nonzero((batch["mask"][b, 0].cpu() == r).flatten(1).any(1).numpy())[0]
            z0, z1 = (int(zs.min()), int(zs.max())) if len(zs) else (0, image.shape[0] - 1)
            png = plot_gate_overlay(image[z0: z1 + 1], amap[z0: z1 + 1],
                                    self.run_dir / "plots" / f"region_attention_{cid}.png",
                                    title=f"{cid}: attention to region {r}, slices {z0}-{z1} "
                                          "(last block, mean over heads)")
            shown.append({"case": cid, "region": r, "png": str(png.relative_to(self.run_dir)),
                          "step": steps[0][0] if steps else ""})
        return shown

    def compute(self):
        from medfuse.metrics import bootstrap_ci

        rep = super().compute()
        metrics = rep["metrics"]
        model, n_boot, seed = self.task.model, self.n_boot, self.seed
        img = torch.cat(self.image_emb)  # the retrieval report's image embeddings, (N, E)
        per_class: dict[str, Any] = {}
        names = list(self.dm.abnormalities or [])
        y = np.asarray(self.labels, dtype=np.float64)
        with torch.no_grad():
            if names and y.shape == (len(self.texts), len(names)):
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
                    per_class[a] = {"zero_shot_auroc": bootstrap_ci(_binary_auc, y[ok, k], score[ok, k],
                                                                    n_boot=n_boot, seed=seed, vectorized=True),
                                    "prevalence": float(np.mean(y[ok, k])) if ok.any() else float("nan")}
            align = self.region_alignment()
        if align.size:
            metrics["region_text_accuracy"] = bootstrap_ci(lambda a: a.mean(-1), align, n_boot=n_boot, seed=seed,
                                                           vectorized=True)
        rep["region_attention_maps"] = self.maps or []
        if per_class:
            rep["per_class"] = per_class
        return rep

    def region_alignment(self) -> np.ndarray:
        """Per-case two-alternative region-text accuracy (see the module doc); (cases with a pair,)."""
        pairs = self.pairs
        by_region: dict[int, Counter] = {}
        for _, r, t, _ in pairs:
            by_region.setdefault(r, Counter())[t] += 1
        texts = sorted({t for _, _, t, _ in pairs})
        if not texts:
            return np.zeros(0)
        emb = dict(zip(texts, F.normalize(self.task.model.embed_text(texts).float(), dim=-1).cpu(), strict=True))
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
