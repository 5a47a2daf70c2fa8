"""`medfuse predict` for text_seg: PNG masks and ``predictions.csv`` from a manifest CSV of images, boxes and texts.

Each mask is ``<case_id>.png`` (0/255) at the image's original size, the name and pixels that
``medfuse evaluate`` writes under ``predictions/<split>/`` for the same case, box and text. An
output file that would replace one of the inputs (an image, a mask, the manifest) is refused
before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.config import Config, validate_params
from medfuse.data.paths import output_path
from medfuse.engine.evaluate import to_device
from medfuse.engine.outputs import write_rows
from medfuse.engine.predict import PackagedData, Predictor
from medfuse.errors import DataError
from medfuse.families.text_seg.evaluate import mask_file
from medfuse.families.text_seg.params import TextSegDataParams


class TextSegPredictor(Predictor):
    """``medfuse predict RUN inputs.csv``: boxes and text from a manifest CSV -> ``<case_id>.png`` (0/255)
    at each image's original size, and ``predictions.csv`` (case, text, box, area, mean probability).
    A pixel is foreground where its logit is positive, as in ``evaluate``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[list[Any]] = []
        self.out_dir: Path | None = None

    def run(self, inputs: list[str], out_dir: Path, modalities: list[str] | None = None,
            progress: bool = False, case_id: str | None = None, skip_refused: bool = False) -> Path:
        self.out_dir = Path(out_dir)  # for the check that no output replaces an input (cases())
        return super().run(inputs, out_dir, modalities, progress, case_id, skip_refused=skip_refused)

    def check_outputs(self, records: list[Any], manifest: str, out_dir: Path) -> None:
        """Refuse a run whose outputs would replace an input file (the manifest's image sits in the
        output folder under the name of a prediction, or the manifest is ``predictions.csv`` there)."""
        inputs = {Path(manifest).resolve(): "the manifest"}
        for r in records:
            inputs.setdefault(Path(r.image).resolve(), f"the image of case {r.case_id}")
            if r.mask:
                inputs.setdefault(Path(r.mask).resolve(), f"the mask of case {r.case_id}")
        outputs = [mask_file(r.case_id) for r in records] + ["predictions.csv"]
        for name in outputs:
            path = output_path(out_dir, name)
            what = inputs.get(path.resolve())
            if what is not None:
                raise DataError(path, f"is {what}; the prediction '{name}' would replace it",
                                "write the predictions to another folder (--out)")

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """The image column the run was trained on (``data.params.modality`` or the manifest's first)
        and whether its images were slices of 3D volumes (:meth:`TextSegDataModule.trained_on_volumes`;
        None from any other data module: the package's reference shape decides)."""
        from medfuse.families.text_seg.data import TextSegDataModule

        volumes = dm.trained_on_volumes() if isinstance(dm, TextSegDataModule) else None
        return {"modality": str(dm.modality), "volumes": volumes}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        data.modality = str(state["modality"])
        data.params = validate_params(TextSegDataParams, cfg.data.params, "data.params")
        volumes = state.get("volumes")
        if volumes is None and data.reference_shape is not None:  # a package written before "volumes"
            volumes = data.reference_shape[1] > 1
        data.volumes = volumes
        return data

    def trained_on_volumes(self) -> bool | None:
        """Whether the run (or package) was trained on slices of 3D volumes; None: not known."""
        if isinstance(self.dm, PackagedData):
            return self.dm.volumes
        return self.dm.trained_on_volumes()

    def check_rows(self, table: Any, records: list[Any]) -> None:
        """Refuse, before any pixel is read, what the run cannot predict, in the manifest's row order.

        A manifest without a column that the run's text needs is refused as a whole. A row is
        refused (:meth:`refuse`) when its text lacks a value (naming the manifest and the row's
        line), or when its image is not of the kind the run was trained on (:meth:`kind_problem`).
        """
        from medfuse.families.text_seg.prompts import (
            case_fields,
            missing_text_field,
            row_where,
            template_fields,
        )

        template = self.dm.params.text_template
        what = f"the run's text template '{template}'" if template is not None else "the run (it has no text template)"
        columns = {k for c in table.cases for k in case_fields(c)}
        absent = [f for f in (template_fields(template) if template is not None else ["text"]) if f not in columns]
        if absent:
            raise DataError(table.source or table.root, f"has no {absent[0]} column, which {what} needs",
                            f"add a {absent[0]} column with each row's value")
        volumes, kinds = self.trained_on_volumes(), {}
        for i, r in enumerate(records):
            missing = missing_text_field(r.fields, template)
            if missing is not None:
                self.refuse(r, DataError(row_where(table, i), f"case {r.case_id} has no value for '{missing}', "
                                         f"which {what} needs", f"fill its {missing} cell, or leave the row out"))
            elif volumes is not None and (bad := self.kind_problem(r, volumes, kinds)) is not None:
                self.refuse(r, bad)

    def kind_problem(self, record: Any, volumes: bool, kinds: dict[str, Any]) -> DataError | None:
        """Why a record's image is not of the kind the run was trained on, or None: a 2D image (PNG,
        JPG, one DICOM file) for a run trained on slices of 3D volumes (NSCLC's CT series: HU, 2.5D
        neighbours), whose preprocessing would misread it, or a slice of a volume for a run trained
        on 2D images (BUS-BRA's PNGs); also an image that cannot be read.

        Args:
            record: the record.
            volumes: the run was trained on slices of volumes (:meth:`trained_on_volumes`).
            kinds: image path -> its kind (or its read error), filled here: each image is looked at once.
        """
        from medfuse.families.text_seg.pixels import is_volume

        r, p = record, self.dm.params
        if r.image not in kinds:
            try:
                kinds[r.image] = is_volume(r.image)
            except DataError as e:
                kinds[r.image] = e
        kind = kinds[r.image]
        if isinstance(kind, DataError):
            return kind
        if kind == volumes:
            return None
        if volumes:
            how = ", 2.5D: 3 neighbouring slices" if p.two_and_half_d else ""
            return DataError(r.image, f"case {r.case_id} is a 2D image, but this run was trained on slices of 3D "
                             f"{self.dm.modality} volumes (read with data.params.intensity={p.intensity}{how})",
                             "give the case's volume (a DICOM series folder or a NIfTI) and a slice column")
        return DataError(r.image, f"case {r.case_id} is a volume of slices, but this run was trained on 2D images",
                         "give 2D images like the training ones (PNG, JPG or one DICOM file)")

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
        records = records_from_cases(table.cases, self.dm.modality, need_mask=False)
        self.check_rows(table, records)
        if self.out_dir is not None:
            self.check_outputs(records, inputs[0], self.out_dir)
        return records

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
            logit = F.interpolate(logits[i: i + 1].float(), size=(h, w), mode="bilinear",
                                  align_corners=False)[0, 0].cpu()
            pred, prob = (logit > 0).numpy(), torch.sigmoid(logit).numpy()  # logit > 0 as evaluate
            Image.fromarray(pred.astype(np.uint8) * 255).save(output_path(out_dir, mask_file(cid)))
            box = batch["box"][i].cpu().numpy() * np.array([w, h, w, h]) / self.dm.params.image_size
            self.rows.append([cid, batch["text"][i], " ".join(f"{v:.1f}" for v in box), int(pred.sum()),
                              f"{float(prob[pred].mean()) if pred.any() else 0.0:.4f}"])

    def case_inputs(self, case: Any) -> tuple[str, dict[str, str]]:
        """(case id, {modality: image}) of a record, for the output folder's ``inputs.csv``."""
        return case.case_id, {self.dm.modality: case.image}

    def finish(self, out_dir):
        write_rows(output_path(out_dir, "predictions.csv"), ["case_id", "text", "box", "area_px", "mean_prob"],
                   self.rows)
