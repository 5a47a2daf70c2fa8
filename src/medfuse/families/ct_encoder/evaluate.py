"""The ct_encoder family's evaluation (every item of seed 001's "Evaluation Metrics").

:class:`CTEncoderEvaluator` runs the encoder once over the evaluated split (and once over the
training split, with the evaluation transforms, for the two things that need training data: the
linear probe and the nearest-neighbour baseline) and reports, from those passes:

* retrieval Recall@k both ways (global head vs impression), ``k`` in ``model.params.retrieval_ks``
  (default 1, 5, 10, 50, 100; cut-offs at or above the split size are left out, with a note: every
  query's rank is below the split size, so such an R@k is 1.0 for any model); pairs with identical
  texts (reconstructions of one scan share their report) count as matches of each other;
* volume-to-volume retrieval (``volume_to_volume/R@k``): a volume's positives are the other
  patients' volumes of the split with the same set of findings (identical ``labels.csv`` rows),
  ranked by cosine of the global embeddings; the patient's own other volumes are left out of the
  gallery, and volumes without a positive are left out;
* zero-shot AUROC per abnormality of ``labels.csv``: ``softmax(scale * [cos(v, "{X} is
  present."), cos(v, "{X} is not present.")])``, and their macro mean;
* lesion classification by a linear probe (``probe/mean_accuracy``, ``probe/mean_auroc``):
  scikit-learn logistic regression per abnormality on the standardised frozen global features of
  the training split, scored on the evaluated split (accuracy at 0.5);
* region-text alignment accuracy (two-alternative, chance 0.5): each present region with a
  sentence must prefer (local head, cosine) its own sentence over a distractor: the region's most
  common sentence in the split (its "normal" one) when its own differs, else another case's
  sentence for that region; a case's score is the share it gets right;
* step-patch attention correlation (``step_patch_corr``): Pearson correlation, over a volume's
  patches, between a CoT step's text-to-patch attention
  (:meth:`~medfuse.families.ct_encoder.model.CTEncoderModel.step_patch_attention`) and the voxel
  fraction of each patch inside the region the step names; mean per case;
* lesion localization (``localization_iou``, ``localization_pointing``): for a step that names a
  lesion of the lesion masks, the patches with attention >= half the step's maximum against the
  patches the lesion occupies (IoU on the patch grid), and whether the most attended patch holds
  lesion (pointing game); mean per case;
* report generation (``generation/bleu1..4``, ``rouge_l``, ``rouge1``, ``meteor``,
  ``ce_precision``, ``ce_recall``, ``ce_f1``, ``ce_f1_micro``; see
  :mod:`medfuse.metrics.generation`) of the model's generator against
  :func:`~medfuse.families.ct_encoder.generation.target_text`, and the same for a
  nearest-neighbour baseline (``nn_copy/...``) that copies the training report of the closest
  training volume by global embedding. Clinical efficacy compares the findings the labeler
  (``data.params.labeler``) reads from a generated report with the dataset's labels (the labeler
  on the reference report where ``labels.csv`` has none); the generated and copied reports are
  written to ``predictions/<split>_reports.csv``;
* region-attention maps (last block, mean over heads) over slices for the first two cases.

Every metric carries n and a 95% bootstrap CI over cases; when a patient has several of the
metric's cases (CT-RATE: several scans, or reconstructions, of one patient) the bootstrap resamples
patients and takes all their cases (``n`` = patients, ``n_items`` = cases), the per-case values
being computed as before (a retrieval rank against the whole gallery).
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


def localization_scores(attn: torch.Tensor, occupied: torch.Tensor) -> tuple[float, float]:
    """IoU on the patch grid between the patches with attention >= half the maximum and the
    patches a lesion occupies, and the pointing-game hit (the most attended patch holds lesion).

    Args:
        attn: (N,) a step's attention over the patches; occupied: (N,) bool.
    """
    pred = attn >= 0.5 * attn.max()
    union = float((pred | occupied).sum())
    return (float((pred & occupied).sum()) / union if union else float("nan")), float(occupied[int(attn.argmax())])


def _same_findings(y: np.ndarray, patients: list[str] | None = None) -> np.ndarray:
    """(N, N) bool: volumes i != j with the same finding set, of other patients when ``patients``
    (N,) is given; y: (N, K) 0/1 findings."""
    yy = np.asarray(y) > 0.5
    same = (yy[:, None, :] == yy[None, :, :]).all(-1)
    np.fill_diagonal(same, False)
    if patients is not None:
        same &= ~_same_patient(patients)
    return same


def _same_patient(patients: list[str]) -> np.ndarray:
    """(N, N) bool: i and j belong to one patient (i == j included)."""
    arr = np.asarray([str(p) for p in patients], dtype=object)
    return arr[:, None] == arr[None, :]


def volume_to_volume_queries(y: np.ndarray, patients: list[str] | None = None) -> np.ndarray:
    """(N,) bool: the volumes with a positive (another patient's volume with the same finding set),
    the queries of :func:`volume_to_volume_ranks` (in the same order); y: (N, K) 0/1 findings."""
    return _same_findings(y, patients).any(1)


def volume_to_volume_ranks(img: torch.Tensor, y: np.ndarray, patients: list[str] | None = None) -> np.ndarray:
    """0-based rank of the best volume of another patient with the same finding set, per volume that has one.

    A patient's other volumes (another reconstruction or scan: near copies) are left out of its
    gallery; they would be trivial positives or push a true one down.

    Args:
        img: (N, E) L2-normalised global embeddings; y: (N, K) 0/1 findings; patients: (N,) the
            patient of each volume (None: every volume is its own patient).

    Returns:
        (Q,) ranks over the other patients' volumes, for the Q volumes with a positive
        (:func:`volume_to_volume_queries`).
    """
    from medfuse.metrics import retrieval_ranks

    sim = (img @ img.t()).numpy().astype(np.float64)
    np.fill_diagonal(sim, -np.inf)  # never retrieve the query itself
    if patients is not None:
        sim[_same_patient(patients)] = -np.inf  # nor the patient's other volumes
    same = _same_findings(y, patients)
    q = same.any(1)
    return retrieval_ranks(sim[q], same[q]) if q.any() else np.zeros(0, dtype=np.int64)


def _per_case(rows: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean value per case of (case index, value) rows, NaNs dropped: (case indices (M,), means (M,))."""
    per: dict[int, list[float]] = {}
    for c, v in rows:
        if np.isfinite(v):
            per.setdefault(c, []).append(float(v))
    cases = sorted(per)
    return np.asarray(cases, dtype=np.int64), np.asarray([np.mean(per[c]) for c in cases])


class CTEncoderEvaluator(RetrievalEvaluator):
    """Every metric of the module doc from one inference pass over the split (plus one over the
    training split for the linear probe and the nearest-neighbour baseline).

    Report entries besides the retrieval ones: the ``metrics`` named in the module doc,
    ``per_class`` (zero-shot and probe AUROC, probe accuracy, prevalence and CE scores per
    abnormality), ``region_attention_maps`` (case, region, png, step), ``generated_examples`` and
    ``notes``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels: list[list[float]] = []
        self.pairs: list[tuple[int, int, str, torch.Tensor]] = []  # (case index, region id, sentence, region emb)
        self.maps: list[dict[str, Any]] | None = None  # None until the first batch was seen
        self.refs: list[str] = []  # the generator's targets
        self.hyps: list[str] = []  # generated reports
        self.global_feats: list[torch.Tensor] = []  # (B, L * C_f) frozen global features
        self.corr: list[tuple[int, float]] = []  # (case index, step-patch correlation)
        self.loc: list[tuple[int, float, float]] = []  # (case index, IoU, pointing hit)
        self.train: dict[str, Any] = {}  # the training split's pass
        self.notes: list[str] = []
        self.examples: list[dict[str, str]] = []

    def run(self):
        """Infer the split once (every metric reads that pass), then the training split once."""
        with torch.no_grad():
            for batch in self.batches():
                self.update(batch, self.infer(batch))
            if self.split != "train":
                self.train_pass()
            return self.compute()

    def train_pass(self) -> None:
        """Global features, embeddings, labels and targets of the training split (evaluation transforms)."""
        loader = self.dm.eval_loader("train") if hasattr(self.dm, "eval_loader") else self.dm.loader("train")
        feats, emb, labels, refs = [], [], [], []
        for batch in self.batches(loader):
            out = self.task.encode(batch)
            feats.append(out["global"].float().cpu())
            emb.append(F.normalize(out["image_emb"].float(), dim=-1).cpu())
            labels += [list(x or []) for x in batch.get("labels") or [[]] * len(batch["text"])]
            refs += self.task.gen_targets(batch)
        if feats:
            self.train = {"global": torch.cat(feats).numpy(), "emb": torch.cat(emb), "labels": labels, "refs": refs}

    def infer(self, batch):
        if self.maps is None:  # the first batch: the same forward pass, also returning the attention
            return self.task.infer_intermediates(batch)
        return self.task.infer(batch)

    def update(self, batch, out):
        case0 = len(self.case_ids)
        super().update(batch, out)  # embeddings, case ids and texts
        n_regions = self.task.model.num_regions
        self.labels += [list(x or []) for x in batch.get("labels") or [[]] * len(batch["text"])]
        for b, rts in enumerate(batch.get("region_text") or []):
            for r, t in rts:
                if 1 <= int(r) <= n_regions and bool(out["present"][b, int(r) - 1]):
                    self.pairs.append((case0 + b, int(r), str(t), out["region_emb"][b, int(r) - 1].float().cpu()))
        if self.maps is None:
            self.maps = self.attention_maps(batch, out) if "region_attn" in out else []
        self.refs += self.task.gen_targets(batch)
        self.global_feats.append(out["global"].float().cpu())
        if self.task.model.generator is not None:
            self.hyps += self.task.generate(out)
        self.step_metrics(batch, out, case0)

    def step_metrics(self, batch, out, case0: int) -> None:
        """Step-patch correlation and lesion localization of one batch (see the module doc)."""
        sa = self.task.step_attention(batch, out)
        if not len(sa["case"]):
            return
        attn, inside = sa["attn"].float().cpu(), sa["inside"].float().cpu()
        lesion_map = batch.get("lesion")
        grid = tuple(out["grid"])
        for m in range(len(sa["case"])):
            b = int(sa["case"][m])
            a = attn[m]
            if bool(sa["has_region"][m]) and float(inside[m].std()) > 0 and float(a.std()) > 0:
                self.corr.append((case0 + b, float(np.corrcoef(a.numpy(), inside[m].numpy())[0, 1])))
            k = int(sa["lesion"][m])
            if k and lesion_map is not None:
                hit = (lesion_map[b, 0] == k).float()[None, None]
                if float(hit.sum()) == 0:
                    continue
                occ = F.adaptive_avg_pool3d(hit, grid).flatten().cpu() > 0  # (N,) patches holding lesion
                self.loc.append((case0 + b, *localization_scores(a, occ)))

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
                                    self.out_path("plots", f"region_attention_{cid}.png"),
                                    title=f"{cid}: attention to region {r}, slices {z0}-{z1} "
                                          "(last block, mean over heads)")
            shown.append({"case": cid, "region": r, "png": str(png.relative_to(self.run_dir)),
                          "step": steps[0][0] if steps else ""})
        return shown

    def groups(self, cases: np.ndarray | None = None) -> list[str] | None:
        """The patient of each of ``cases`` (indices or a bool mask over the split's N cases; None:
        all) when a patient has several of them, else None: the bootstrap groups of a metric over
        those cases (:meth:`~medfuse.engine.evaluate.Evaluator.patient_groups`)."""
        ids = np.asarray(self.case_ids, dtype=object)
        return self.patient_groups(ids if cases is None else ids[cases])

    def compute(self):
        from medfuse.metrics import bootstrap_ci, retrieval_report
        from medfuse.metrics.retrieval import trivial_ks, trivial_ks_note

        sim = self.similarity()
        groups = self.groups()
        ks = tuple(self.task.params.retrieval_ks)
        metrics = retrieval_report(sim, ks=ks, n_boot=self.n_boot, seed=self.seed,
                                   groups=groups, positives=self.positives())
        left, n = trivial_ks(ks, sim.shape[1]), sim.shape[1]
        if left:
            self.notes.append(trivial_ks_note(left, n))
        rep: dict[str, Any] = {"n": metrics.pop("n"), "metrics": metrics}
        if "n_patients" in metrics:
            rep["n_patients"] = metrics.pop("n_patients")
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
                                                                   seed=seed, vectorized=True, groups=self.groups(known))
                for k, a in enumerate(names):
                    ok = np.isfinite(y[:, k])
                    per_class[a] = {"zero_shot_auroc": bootstrap_ci(_binary_auc, y[ok, k], score[ok, k],
                                                                    n_boot=n_boot, seed=seed, vectorized=True,
                                                                    groups=self.groups(ok)),
                                    "prevalence": float(np.mean(y[ok, k])) if ok.any() else float("nan")}
            align_cases, align = self.region_alignment()
        if align.size:
            metrics["region_text_accuracy"] = bootstrap_ci(lambda a: a.mean(-1), align, n_boot=n_boot, seed=seed,
                                                           vectorized=True, groups=self.groups(align_cases))
        metrics.update(self.volume_to_volume(img, y))
        metrics.update(self.linear_probe(y, per_class))
        for key, rows in (("step_patch_corr", [(c, v) for c, v in self.corr]),
                          ("localization_iou", [(c, v) for c, v, _ in self.loc]),
                          ("localization_pointing", [(c, v) for c, _, v in self.loc])):
            cases, per_case = _per_case(rows)
            if per_case.size:
                metrics[key] = bootstrap_ci(lambda a: a.mean(-1), per_case, n_boot=n_boot, seed=seed, vectorized=True,
                                            groups=self.groups(cases))
        self.generation(metrics, per_class, y, names)
        rep["region_attention_maps"] = self.maps or []
        if self.examples:
            rep["generated_examples"] = self.examples
        if per_class:
            rep["per_class"] = per_class
        if self.notes:
            rep["notes"] = self.notes
        return rep

    # --- volume-to-volume retrieval ------------------------------------------------------------------
    def volume_to_volume(self, img: torch.Tensor, y: np.ndarray) -> dict[str, Any]:
        """Recall@k of volume -> other volumes with the same finding set (see the module doc)."""
        from medfuse.metrics import bootstrap_ci

        if y.ndim != 2 or y.shape[0] != img.shape[0] or not y.shape[1]:
            return {}
        known = np.isfinite(y).all(1)
        idx = np.nonzero(known)[0]
        if len(idx) < 3:
            return {}
        patients = self.patients_of([self.case_ids[i] for i in idx])
        ranks = volume_to_volume_ranks(img[idx], y[idx], patients)  # each against the other patients' volumes
        if len(ranks) < 2:
            return {}
        groups = self.groups(idx[volume_to_volume_queries(y[idx], patients)])  # the queries' patients
        out = {}
        for k in self.task.params.retrieval_ks:
            if k < len(idx):
                out[f"volume_to_volume/R@{k}"] = bootstrap_ci(lambda r, k=k: (r < k).mean(-1), ranks,
                                                              n_boot=self.n_boot, seed=self.seed, vectorized=True,
                                                              groups=groups)
        return out

    # --- linear probe ----------------------------------------------------------------------------------
    def linear_probe(self, y: np.ndarray, per_class: dict[str, Any]) -> dict[str, Any]:
        """Logistic regression per abnormality on frozen global features, train split -> this split."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from medfuse.metrics import bootstrap_ci

        names = list(self.dm.abnormalities or [])
        tr = self.train
        if not names or not tr or y.shape != (len(self.texts), len(names)):
            return {}
        ytr = np.asarray(tr["labels"], dtype=np.float64)
        if ytr.shape != (len(tr["global"]), len(names)):
            return {}
        scaler = StandardScaler().fit(tr["global"])
        xtr, xte = scaler.transform(tr["global"]), scaler.transform(torch.cat(self.global_feats).numpy())
        prob = np.full(y.shape, np.nan)
        for k in range(len(names)):
            ok = np.isfinite(ytr[:, k])
            if len(np.unique(ytr[ok, k])) < 2:
                continue
            clf = LogisticRegression(max_iter=2000).fit(xtr[ok], ytr[ok, k] > 0.5)
            prob[:, k] = clf.predict_proba(xte)[:, 1]
        cols = np.isfinite(prob).all(0)
        rows = np.isfinite(y[:, cols]).all(1)
        if not cols.any() or rows.sum() < 2:
            return {}
        yc, pc = y[rows][:, cols], prob[rows][:, cols]
        n_boot, seed, groups = self.n_boot, self.seed, self.groups(rows)
        out = {"probe/mean_accuracy": bootstrap_ci(lambda a, b: ((b > 0.5) == (a > 0.5)).mean((-1, -2)), yc, pc,
                                                   n_boot=n_boot, seed=seed, vectorized=True, groups=groups),
               "probe/mean_auroc": bootstrap_ci(_macro_auc, yc, pc, n_boot=n_boot, seed=seed, vectorized=True,
                                                groups=groups)}
        for j, k in enumerate(np.nonzero(cols)[0]):
            entry = per_class.setdefault(names[k], {})
            entry["probe_auroc"] = bootstrap_ci(_binary_auc, yc[:, j], pc[:, j], n_boot=n_boot, seed=seed,
                                                vectorized=True, groups=groups)
            entry["probe_accuracy"] = float(((pc[:, j] > 0.5) == (yc[:, j] > 0.5)).mean())
        return out

    # --- report generation -----------------------------------------------------------------------------
    def generation(self, metrics: dict[str, Any], per_class: dict[str, Any], y: np.ndarray, names: list[str]) -> None:
        """Generation metrics of the model (``generation/``) and of the nearest-neighbour copy (``nn_copy/``)."""
        from medfuse.families.ct_encoder.generation import note_empty_reports
        from medfuse.families.ct_encoder.labeler import build_labeler
        from medfuse.metrics.generation import generation_report

        systems: dict[str, list[str]] = {}
        if self.hyps:
            systems["generation"] = self.hyps
            note = note_empty_reports(self.hyps, f"{self.split} split")
            if note:
                self.notes.append(note)
        tr = self.train
        if tr and tr.get("refs"):
            img = torch.cat(self.image_emb)
            nearest = (img @ tr["emb"].t()).argmax(1).tolist()
            systems["nn_copy"] = [tr["refs"][j] for j in nearest]
        if not systems:
            return
        true, kept, labeler, cols = None, [], None, None
        if names and y.shape == (len(self.refs), len(names)):
            labeler = build_labeler(self.dm.params.labeler, getattr(self.dm.table, "root", None))
            from_refs = np.asarray(labeler(self.refs, names), dtype=np.float64)
            true = np.where(np.isfinite(y), y, from_refs)
            cols = np.isfinite(from_refs).all(0) & np.isfinite(true).all(0)
            if cols.any():
                kept = [n for n, c in zip(names, cols, strict=True) if c]
                true = true[:, cols]
                left = [n for n, c in zip(names, cols, strict=True) if not c]
                if left:
                    self.notes.append(f"clinical efficacy leaves out {', '.join(left)} (no labeler rule)")
            else:
                true = None
        keep_nn = {"bleu1", "bleu4", "rouge_l", "meteor", "ce_f1"}
        for system, hyps in systems.items():
            pred = None if true is None else np.asarray(labeler(hyps, names), dtype=np.float64)[:, cols]
            g = generation_report(hyps, self.refs, pred, true, kept or None, n_boot=self.n_boot, seed=self.seed,
                                  prefix=f"{system}/", groups=self.groups())
            for key, v in g["metrics"].items():
                if system == "generation" or key.split("/", 1)[1] in keep_nn:
                    metrics[key] = v
            for name, scores in g["per_class"].items():
                entry = per_class.setdefault(name, {})
                entry.update({f"{system}_{k}": v for k, v in scores.items() if k != "support"})
                entry["ce_support"] = scores["support"]
        self.write_reports(systems)

    def write_reports(self, systems: dict[str, list[str]]) -> None:
        import csv

        out = self.run_dir / "predictions"
        out.mkdir(exist_ok=True)
        with (out / f"{self.split}_reports.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "reference", *systems])
            for i, cid in enumerate(self.case_ids):
                w.writerow([cid, self.refs[i], *[systems[s][i] for s in systems]])
        self.examples = [{"case": self.case_ids[i], "reference": self.refs[i], **{s: systems[s][i] for s in systems}}
                         for i in range(min(3, len(self.case_ids)))]

    def region_alignment(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-case two-alternative region-text accuracy (see the module doc): (case indices (M,),
        accuracies (M,)) for the M cases with a scored pair."""
        pairs = self.pairs
        by_region: dict[int, Counter] = {}
        for _, r, t, _ in pairs:
            by_region.setdefault(r, Counter())[t] += 1
        texts = sorted({t for _, _, t, _ in pairs})
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
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
        cases = sorted(right)
        return np.asarray(cases, dtype=np.int64), np.asarray([np.mean(right[c]) for c in cases])
