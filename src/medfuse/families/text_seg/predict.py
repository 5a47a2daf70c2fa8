"""`medfuse predict` for text_seg: PNG masks and ``predictions.csv`` from a manifest CSV of images, boxes and texts."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.config import Config, validate_params
from medfuse.data.paths import output_path
from medfuse.engine.evaluate import to_device
from medfuse.engine.predict import PackagedData, Predictor
from medfuse.errors import DataError
from medfuse.families.text_seg.params import TextSegDataParams


class TextSegPredictor(Predictor):
    """``medfuse predict RUN inputs.csv``: boxes and text from a manifest CSV -> ``<case>_mask.png`` at
    each image's original size, and ``predictions.csv`` (case, text, box, area, mean probability)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[list[Any]] = []

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """The image column the run was trained on (``data.params.modality`` or the manifest's first)."""
        return {"modality": str(dm.modality)}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        data.modality = str(state["modality"])
        data.params = validate_params(TextSegDataParams, cfg.data.params, "data.params")
        return data

    def cases(self, inputs: list[str], modalities: list[str] | None) -> list[Any]:
        """One manifest CSV -> the records to predict (no masks needed)."""
        from medfuse.data.checks import validate_table
        from medfuse.data.layouts import load_cases
        from medfuse.families.text_seg.data import records_from_cases

        if len(inputs) != 1 or Path(inputs[0]).suffix.lower() not in (".csv", ".json"):
            raise DataError(" ".join(inputs), "text_seg predicts from one manifest CSV",
                            "give a CSV with case_id, image_<modality>, box and the text (or template) columns")
        table = validate_table(load_cases(inputs[0]))
        if not table.cases:
            raise DataError(inputs[0], "lists no case", "add one row per image to predict")
        if self.dm.modality not in table.modalities:
            raise DataError(inputs[0], f"has no image_{self.dm.modality} column (the run was trained on "
                            f"'{self.dm.modality}'; the manifest has {table.modalities})",
                            f"name the image column image_{self.dm.modality}")
        return records_from_cases(table.cases, self.dm.modality, need_mask=False)

    def batches(self, cases: list[Any]):
        """Records -> batches of the run's preprocessing, boxes from the CSV, on the task's device."""
        from torch.utils.data import DataLoader

        from medfuse.data.datamodule import collate
        from medfuse.families.text_seg.data import TextSegDataset

        params = self.dm.params.model_copy(update={"box_source": "csv", "cache_in_memory": False})
        ds = TextSegDataset(cases, params, need_mask=False)
        bs = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
        for batch in DataLoader(ds, batch_size=bs, collate_fn=collate):
            yield to_device(batch, self.task.device)

    def write(self, batch, out, out_dir):
        from PIL import Image

        logits = out["mask_logits"]
        for i, cid in enumerate(batch["case_id"]):
            h, w = (int(v) for v in batch["orig_size"][i])
            prob = torch.sigmoid(F.interpolate(logits[i: i + 1].float(), size=(h, w), mode="bilinear",
                                               align_corners=False))[0, 0].cpu().numpy()
            pred = prob > 0.5
            Image.fromarray(pred.astype(np.uint8) * 255).save(output_path(out_dir, f"{cid}_mask.png"))
            box = batch["box"][i].cpu().numpy() * np.array([w, h, w, h]) / self.dm.params.image_size
            self.rows.append([cid, batch["text"][i], " ".join(f"{v:.1f}" for v in box), int(pred.sum()),
                              f"{float(prob[pred].mean()) if pred.any() else 0.0:.4f}"])

    def finish(self, out_dir):
        with (out_dir / "predictions.csv").open("w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["case_id", "text", "box", "area_px", "mean_prob"])
            wr.writerows(self.rows)
