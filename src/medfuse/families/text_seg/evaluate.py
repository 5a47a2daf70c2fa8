"""The text_seg family's evaluation and prediction.

:class:`TextSegEvaluator` scores each image at its original resolution (Dice / IoU / HD95 in
pixels, with bootstrap CIs) in one pass over the split, and writes the predicted masks, a per-case
table and an overlay figure. :meth:`TextSegEvaluator.counterfactual` reruns the split with wrong
text (a different input, so a pass of its own per condition) and reports the paired Dice drop
against the base pass, which the evaluator keeps. :class:`TextSegPredictor` reads boxes and text
from a manifest CSV and writes PNG masks and ``predictions.csv``.

Counterfactual text (:func:`counterfactual_texts`): ``FIELD=ACTION[,FIELD=ACTION...]`` changes one
or several template fields at once (the seed's "both wrong"), or ``text`` the whole text. ACTION is
``shuffle`` (each record takes another record's value: a random cyclic permutation of the records,
so with few distinct values some keep their own), ``wrong`` (a random cyclic permutation of the
field's distinct values, a derangement: every record's value changes) or a literal value. What
changed is counted per field.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.data.paths import output_path
from medfuse.engine.evaluate import Evaluator, to_device
from medfuse.errors import ConfigError
from medfuse.families.text_seg.params import COUNTERFACTUAL_MODES, parse_counterfactual_spec

METRICS = ("dice", "iou", "hd95")


def mask_file(case_id: str) -> str:
    """The file name of a case's predicted mask, ``<case_id>.png`` (0/255 on the image's own grid), for
    ``evaluate`` (``predictions/<split>/``) and ``medfuse predict`` (``--out``) alike."""
    return f"{case_id}.png"


@dataclass
class Counterfactual:
    """Wrong text for a split's records.

    Attributes:
        spec: the ``FIELD=ACTION[,...]`` it was made from.
        texts: case_id -> counterfactual text.
        fields_changed: field -> number of records whose value of that field changed.
        texts_changed: number of records whose rendered text changed.
        n: number of records.
    """

    spec: str
    texts: dict[str, str]
    fields_changed: dict[str, int]
    texts_changed: int
    n: int


def parse_counterfactual(spec: str) -> list[tuple[str, str]]:
    """The ``--counterfactual`` parser: ``"FIELD=ACTION[,FIELD=ACTION...]"`` -> ``[(field, action)]``.

    Raises:
        ConfigError: one line naming ``--counterfactual`` (malformed, a field twice, ``text`` mixed
            with fields).
    """
    try:
        return parse_counterfactual_spec(spec)
    except ValueError as e:
        raise ConfigError("--counterfactual", str(e), "e.g. margin=shuffle, or birads=wrong,margin=wrong") from None


def _cycle(n: int, rng: np.random.Generator) -> list[int]:
    """Sattolo's algorithm: a uniformly random n-cycle, so ``perm[i] != i`` for n > 1."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _new_values(values: list[str], action: str, rng: np.random.Generator, field: str) -> list[str]:
    if action == "shuffle":
        perm = _cycle(len(values), rng)
        return [values[j] for j in perm]
    if action == "wrong":
        distinct = sorted(set(values))
        if len(distinct) < 2:
            raise ConfigError("--counterfactual", f"'{field}=wrong' is impossible: all {len(values)} records have "
                              f"the value '{distinct[0] if distinct else ''}'", f"use {field}=VALUE instead")
        perm = _cycle(len(distinct), rng)
        swap = {v: distinct[perm[i]] for i, v in enumerate(distinct)}
        return [swap[v] for v in values]
    return [action] * len(values)


def counterfactual_texts(records: list[Any], template: str | None, spec: str, seed: int = 0) -> Counterfactual:
    """Wrong text for every record (see the module docstring for ``spec``).

    The k-th field of ``spec`` draws from ``numpy.random.default_rng(seed)`` for k = 0 and
    ``default_rng([seed, k])`` after, so a one-field ``shuffle`` gives the same texts as before
    several fields were possible.

    Args:
        records: the split's :class:`~medfuse.families.text_seg.data.Record` list.
        template: ``data.params.text_template`` (None: free text, only ``text=...`` applies).
        spec: ``FIELD=shuffle|wrong|VALUE[,FIELD=...]``.
        seed: random seed.

    Raises:
        ConfigError: a malformed spec, a field the run does not have, or ``wrong`` on a field with
            a single value.
    """
    from medfuse.families.text_seg.prompts import render_text, template_fields

    pairs = parse_counterfactual(spec)
    allowed = ["text", *(template_fields(template) if template else [])]
    for name, _ in pairs:
        if name not in allowed:
            raise ConfigError("--counterfactual", f"'{name}' is not a text field of this run",
                              f"use one of: {', '.join(allowed)} (actions: {', '.join(COUNTERFACTUAL_MODES)} or a value)")
    true = [render_text(r, template) for r in records]
    changed: dict[str, int] = {}
    if pairs[0][0] == "text":
        new = _new_values(true, pairs[0][1], np.random.default_rng(seed), "text")
        changed["text"] = sum(a != b for a, b in zip(true, new, strict=True))
        texts = {r.case_id: t for r, t in zip(records, new, strict=True)}
    else:
        fields = [dict(r.fields) for r in records]
        for k, (name, action) in enumerate(pairs):
            rng = np.random.default_rng(seed if k == 0 else [seed, k])
            old = [f.get(name, "") for f in fields]
            new = _new_values(old, action, rng, name)
            changed[name] = sum(a != b for a, b in zip(old, new, strict=True))
            for f, v in zip(fields, new, strict=True):
                f[name] = v
        texts = {r.case_id: render_text(r, template, f) for r, f in zip(records, fields, strict=True)}
    n_text = sum(texts[r.case_id] != t for r, t in zip(records, true, strict=True))
    return Counterfactual(spec, texts, changed, n_text, len(records))


@dataclass
class SplitScores:
    """Per-case results of one pass over a split, in loader order.

    Attributes:
        case_id, text: per case.
        pred: case_id -> bool (H, W) prediction at the original size.
        box: case_id -> (x0, y0, x1, y1) box in original pixels.
        scores: ``dice``/``iou``/``hd95`` -> per-case values (HD95 in pixels, NaN when undefined).
        gate: per-case mean image share of the gated baseline (empty for other fusions).
    """

    case_id: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    pred: dict[str, np.ndarray] = field(default_factory=dict)
    box: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRICS})
    gate: list[float] = field(default_factory=list)

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.scores[key], dtype=np.float64)

    def add(self, batch: dict[str, Any], out: dict[str, Any], dm: Any, split: str) -> None:
        """Score one batch's ``mask_logits`` against the masks read at each image's original size."""
        from medfuse.families.text_seg.pixels import read_mask
        from medfuse.metrics import segmentation_case_metrics

        recs = dm.record_index(split)
        logits = out["mask_logits"]
        for i, cid in enumerate(batch["case_id"]):
            h, w = (int(v) for v in batch["orig_size"][i])
            pred = F.interpolate(logits[i: i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0
            gt = torch.from_numpy(read_mask(recs[cid], dm.params.mask_value, (h, w)))
            m = segmentation_case_metrics(pred[None].long().cpu(), gt[None].long(), num_classes=2)
            for key in METRICS:
                self.scores[key].append(float(m[key][0, 0]))
            self.case_id.append(cid)
            self.text.append(batch["text"][i])
            self.pred[cid] = pred.cpu().numpy()
            self.box[cid] = batch["box"][i].cpu().numpy() * np.array([w, h, w, h]) / dm.params.image_size
        if "gate" in out:
            self.gate += [float(g) for g in out["gate"].float().cpu()]


class TextSegEvaluator(Evaluator):
    """Dice / IoU / HD95 at the original resolution with CIs, predictions, overlays, parameter counts.

    The base pass's per-case results stay on the evaluator (:attr:`base`, :attr:`base_metrics`), so
    that :meth:`counterfactual` pairs every wrong-text pass with it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base = SplitScores()
        self.base_metrics: dict[str, Any] | None = None

    def update(self, batch, out):
        self.base.add(batch, out, self.dm, self.split)

    def compute(self):
        from PIL import Image

        from medfuse.metrics import segmentation_report

        res = self.base
        rep = segmentation_report({k: res.array(k)[:, None] for k in METRICS}, ["target"], self.n_boot, self.seed,
                                  groups=self.patients(res))
        metrics = {k: rep[k] for k in METRICS}
        self.base_metrics = metrics
        out_dir = self.run_dir / "predictions" / self.split
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "per_case.csv").open("w", newline="", encoding="utf-8") as f:
            wr = csv.writer(f)
            wr.writerow(["case_id", "text", "dice", "iou", "hd95_px"])
            for j, cid in enumerate(res.case_id):
                Image.fromarray(res.pred[cid].astype(np.uint8) * 255).save(output_path(out_dir, mask_file(cid)))
                wr.writerow([cid, res.text[j], *(f"{res.scores[k][j]:.4f}" for k in METRICS)])
        overlay = plot_overlays(self.dm, self.split, res, self.run_dir / "plots" / "text_seg_overlays.png")
        self.plots["text seg overlays"] = overlay
        model = self.task.model
        counts = model.parameter_counts()
        p = self.dm.params
        entry: dict[str, Any] = {
            "n": len(res.case_id), "metrics": metrics, "parameters": counts, "gates": model.level_gates(),
            "temperature": model.temperature, "overlays": str(overlay.relative_to(self.run_dir)),
            "notes": [f"trainable parameters: {counts['trainable']:,} (adapter {counts['adapter']:,}); "
                      f"frozen {counts['frozen']:,}",
                      "2D segmentation from a box and a text prompt; Dice / IoU / HD95 (pixels) at each image's "
                      f"original resolution; prompts: box from {p.box_source}, text from "
                      f"{'the template ' + repr(p.text_template) if p.text_template else 'CSV'}"]}
        if res.gate:
            entry["mean_image_gate"] = float(np.mean(res.gate))
        spec = p.test_counterfactual if self.split == "test" else None
        if spec:  # the whole split was evaluated with wrong text (the demo's rows): say what changed
            cf = self.counterfactual_of(spec, res)
            entry["test_counterfactual"] = {"spec": spec, "texts_changed": cf.texts_changed,
                                            "fields_changed": cf.fields_changed, "n": cf.n}
            entry["notes"].append(f"test text replaced by '{spec}': {cf.texts_changed}/{cf.n} texts changed ("
                                  + ", ".join(f"{k} {v}" for k, v in cf.fields_changed.items()) + ")")
        return entry

    def patients(self, res: SplitScores) -> list[str] | None:
        """The patient of each scored case when a patient has several (NSCLC slices, BUS-BRA images):
        the bootstrap then resamples patients, since one patient's cases are not independent (None:
        one case per patient)."""
        from medfuse.metrics import repeated_groups

        recs = self.dm.record_index(self.split)
        return repeated_groups(recs[c].patient_id or c for c in res.case_id)

    def counterfactual_of(self, spec: str, seen: SplitScores) -> Counterfactual:
        """The wrong texts of ``spec`` for the split (the data module's seed), with counts, checked
        against the texts the pass ``seen`` was given."""
        from medfuse.data.datamodule import derive_seed

        seed = derive_seed(self.cfg.train.seed, "counterfactual", spec)
        recs = list(self.dm.record_index(self.split).values())
        cf = counterfactual_texts(recs, self.dm.params.text_template, spec, seed)
        if [cf.texts[c] for c in seen.case_id] != seen.text:  # the counts must describe what was evaluated
            raise RuntimeError(f"the data module's texts for '{spec}' differ from counterfactual_texts()")
        return cf

    def counterfactual(self, specs: list[str]) -> dict[str, Any]:
        """Rerun the split with wrong text (``FIELD=shuffle|wrong|VALUE[,...]``); report the Dice drop and what
        changed (texts, and records per field) per condition."""
        from rich.console import Console
        from rich.table import Table

        from medfuse.metrics import mean_ci
        from medfuse.reports import format_ci

        if self.base_metrics is None:
            raise RuntimeError("run() must come before counterfactual()")  # the engine's order
        base = self.base
        d0, metrics = base.array("dice"), dict(self.base_metrics)
        table = Table("text", "Dice", "drop", "relative drop", "texts changed", "fields changed",
                      title=f"counterfactual text on the {self.split} split (95% bootstrap CI)")
        table.add_row("correct", format_ci(metrics["dice"]), "-", "-", "-", "-")
        out: dict[str, Any] = {"correct": metrics["dice"]}
        for spec in specs:
            res = self.wrong_text_pass(spec)
            if res.case_id != base.case_id:
                raise RuntimeError("counterfactual loader changed the case order")  # pragma: no cover
            d1 = res.array("dice")
            changed = sum(a != b for a, b in zip(base.text, res.text, strict=True))
            fields = self.counterfactual_of(spec, res).fields_changed
            groups = self.patients(base)
            cf = mean_ci(d1, groups, n_boot=self.n_boot, seed=self.seed)
            drop = mean_ci(d0 - d1, groups, n_boot=self.n_boot, seed=self.seed)
            rel = 100.0 * drop["value"] / max(float(d0.mean()), 1e-8)
            out[spec] = {"dice": cf, "dice_drop": drop, "relative_drop_percent": rel, "texts_changed": changed,
                         "fields_changed": fields, "n": len(d1)}
            metrics[f"dice ({spec})"] = cf
            metrics[f"dice drop ({spec})"] = drop
            table.add_row(spec, format_ci(cf), format_ci(drop), f"{rel:.1f}%", f"{changed}/{len(d1)}",
                          ", ".join(f"{k} {v}" for k, v in fields.items()))
        Console(width=120).print(table)
        return {"metrics": metrics, "counterfactual": out}

    @torch.no_grad()
    def wrong_text_pass(self, spec: str) -> SplitScores:
        """One pass over the split with the counterfactual text ``spec`` (same images and boxes)."""
        res = SplitScores()
        for batch in self.dm.loader(self.split, spec):
            batch = to_device(batch, self.device)
            res.add(batch, self.infer(batch), self.dm, self.split)
        return res


def plot_overlays(dm: Any, split: str, res: SplitScores, png: Path, n: int = 6) -> Path:
    """Image, box (yellow), reference (green) and prediction (red) contours of a few cases, with their text."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfuse.families.text_seg.pixels import read_mask, read_plane

    recs = dm.record_index(split)
    ids = res.case_id[:n]
    fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 4.2), squeeze=False)
    for ax, cid in zip(axes[0], ids, strict=True):
        rec = recs[cid]
        img = read_plane(rec.image, rec.slice_index, False, cid)
        img = img.mean(0) if img.shape[0] > 1 else img[0]
        gt = read_mask(rec, dm.params.mask_value, img.shape)
        ax.imshow(img, cmap="gray")
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
        if res.pred[cid].any():
            ax.contour(res.pred[cid], levels=[0.5], colors="red", linewidths=1)
        x0, y0, x1, y1 = res.box[cid]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", linewidth=1))
        j = res.case_id.index(cid)
        ax.set_title("\n".join(textwrap.wrap(res.text[j], 28)) + f"\nDice {res.scores['dice'][j]:.2f}", fontsize=7)
        ax.axis("off")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
