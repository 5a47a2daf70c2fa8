"""``medfuse predict``: a trained run on new files.

A :class:`Predictor` turns the command's inputs into cases, runs the task's inference on them and
writes one output per case. A family with its own inputs (text and boxes, any subset of
modalities, volume + region mask) subclasses a generic predictor and names it in its
:class:`~medfuse.registry.ModelEntry`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.config import Config
from medfuse.engine.build import family_of
from medfuse.engine.evaluate import load_trained, to_device
from medfuse.engine.tasks import BaseTask
from medfuse.errors import DataError


class Predictor:
    """Inputs -> cases -> batches -> files.

    Args:
        task: the trained task in eval mode.
        dm: the run's data module (modalities, class names).
        cfg: the run's resolved config.
    """

    def __init__(self, task: BaseTask, dm: Any, cfg: Config):
        self.task, self.dm, self.cfg = task, dm, cfg

    def cases(self, inputs: list[str], modalities: list[str] | None) -> list[Any]:
        """One image per modality (in the run's order or the ``modalities`` given), or one
        manifest/dataset path whose cases are all predicted."""
        from medfuse.data.layouts import Case, load_cases

        mods = self.dm.modalities
        if len(inputs) == 1 and (Path(inputs[0]).is_dir() or Path(inputs[0]).suffix in (".csv", ".json")):
            return load_cases(inputs[0], modalities=mods).cases
        given = modalities or mods[: len(inputs)]
        if len(given) != len(inputs):
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for modalities {given}",
                            f"give one file per modality in the order {mods} or name them with --modalities")
        unknown = [m for m in given if m not in mods]
        if unknown:
            raise DataError(unknown[0], "not a modality of this run", f"use some of: {', '.join(mods)}")
        for p in inputs:
            if not Path(p).exists():
                raise DataError(p, "file not found", "check the path")
        name = Path(inputs[0]).name.split(".")[0]
        return [Case(case_id=name, patient_id=name, images=dict(zip(given, inputs, strict=True)))]

    def batches(self, cases: list[Any]):
        """Cases -> transformed, collated batches on the task's device."""
        from medfuse.data.datamodule import collate
        from medfuse.data.transforms import build_transforms, case_to_item

        mods = self.dm.modalities
        tf = build_transforms(self.cfg.data.transforms, mods, train=False, has_mask=False)
        items = [tf(case_to_item(c, mods)) for c in cases]
        bs = max(1, self.cfg.data.eval_batch_size or self.cfg.data.batch_size)
        for i in range(0, len(items), bs):
            yield to_device(collate(items[i: i + bs]), self.task.device)

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One forward pass over a batch (default: the task's inference path)."""
        return self.task.infer(batch)

    def write(self, batch: dict[str, Any], out: dict[str, Any], out_dir: Path) -> None:
        """Write one batch's predictions."""
        raise NotImplementedError

    def finish(self, out_dir: Path) -> None:
        """Called once after the last batch (e.g. to write a table)."""

    def run(self, inputs: list[str], out_dir: Path, modalities: list[str] | None = None) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for batch in self.batches(self.cases(list(inputs), modalities)):
                self.write(batch, self.infer(batch), out_dir)
        self.finish(out_dir)
        return out_dir


class ClassificationPredictor(Predictor):
    """``predictions.csv``: case id, predicted class, one probability column per class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[str, np.ndarray]] = []

    def write(self, batch, out, out_dir):
        probs = out["logits"].float().softmax(-1).cpu().numpy()  # (B, K)
        self.rows += list(zip(batch["case_id"], probs, strict=True))

    def finish(self, out_dir):
        if not self.rows:
            return
        names = self.dm.table.class_names or [str(i) for i in range(len(self.rows[0][1]))]
        with (out_dir / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "pred", *[f"p_{n}" for n in names]])
            for cid, p in self.rows:
                w.writerow([cid, names[int(p.argmax())], *[f"{v:.5f}" for v in p]])


class SegmentationPredictor(Predictor):
    """One label map per case, ``<case_id>_pred.nii.gz`` (processed grid's affine)."""

    def write(self, batch, out, out_dir):
        from medfuse.data.io import write_nifti

        pred = out["logits"].argmax(1).cpu().numpy().astype(np.uint8)  # (B, D, H, W)
        for j, cid in enumerate(batch["case_id"]):
            write_nifti(pred[j][None], out_dir / f"{cid}_pred.nii.gz", affine=np.asarray(batch["affine"][j].cpu()))


class EmbeddingPredictor(Predictor):
    """``embeddings.npz``: case ids and L2-normalised image embeddings (E per case)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: list[str] = []
        self.emb: list[np.ndarray] = []

    def write(self, batch, out, out_dir):
        self.ids += list(batch["case_id"])
        self.emb.append(torch.nn.functional.normalize(out["image_emb"].float(), dim=-1).cpu().numpy())

    def finish(self, out_dir):
        if self.emb:
            np.savez(out_dir / "embeddings.npz", case_id=np.asarray(self.ids), image_emb=np.concatenate(self.emb))


def predict(run_dir: str | Path, inputs: list[str], out: str | Path,
            modalities: list[str] | None = None) -> Path:
    """Run a trained model on new files with its family's predictor; return the output folder.

    Args:
        run_dir: a trained run.
        inputs: what the family's predictor takes (generic: one image per modality, or one
            manifest/dataset path).
        out: output folder.
        modalities: which modalities ``inputs`` are, when not all of them.
    """
    cfg, dm, task = load_trained(run_dir)
    _, entry = family_of(cfg)
    predictor: Predictor = entry.predictor(task, dm, cfg)
    return predictor.run(list(inputs), Path(out), modalities)
