"""`medfuse predict` for incomplete_seg: a case segmented from whichever modalities it has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfuse.config import Config
from medfuse.data.paths import output_path
from medfuse.engine.outputs import write_rows
from medfuse.engine.predict import PackagedData, Predictor
from medfuse.families.incomplete_seg.data import (
    canonical_to_raw,
    raw_label_values,
    region_labels,
    resolve_predict_inputs,
)
from medfuse.families.incomplete_seg.evaluate import suppress_small_et


class IncompleteSegPredictor(Predictor):
    """``medfuse predict RUN FILES... [--modalities a,b]`` with any non-empty modality subset.

    Inputs are a folder of nnU-Net-style images (``<case>_<XXXX>.<ending>``, several cases, a
    missing channel file = a missing modality), a dataset/manifest, or one case: image files (their
    modalities read from the names or given by ``--modalities``) or one case folder. Writes, on
    each input's own grid (shape and affine), ``<case>.nii.gz`` (raw label values when the regions
    allow it, else canonical labels), ``<case>_regions.nii.gz`` (R probabilities, with
    ``eval.save_probabilities``) and a row of ``predictions.csv``. With
    ``eval.postprocess.min_et_voxels`` a small predicted ET is relabelled first
    (:func:`~medfuse.families.incomplete_seg.evaluate.suppress_small_et`).

    A model package records the regions (``raw_regions``, outer to inner, and their names), which
    the data module otherwise reads from the data set's labels.
    """

    partial_modalities = True  # any subset of the modalities is a valid input (UniMRSeg)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[list[str]] = []  # predictions.csv: case id, modalities given, label file

    def finish(self, out_dir: Path) -> None:
        if self.rows:
            write_rows(output_path(out_dir, "predictions.csv"), ["case_id", "modalities", "prediction"], self.rows)

    postprocess_keys = ("min_et_voxels",)

    @classmethod
    def package_labels(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """The generic record (canonical labels 0..R) plus ``output_labels``: the values the written
        label maps hold (the data set's own, e.g. BraTS 0/1/2/4, when the regions allow it)."""
        out = super().package_labels(dm, cfg)
        if canonical_to_raw(dm.raw_regions) is not None and dm.raw_mask_labels:
            out["output_labels"] = {str(k): int(v) for k, v in dm.raw_mask_labels.items()}
        return out

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        return {"raw_regions": {k: [int(v) for v in vals] for k, vals in dm.raw_regions.items()},
                "region_names": list(dm.region_names)}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        data.raw_regions = {str(k): [int(v) for v in vals] for k, vals in state["raw_regions"].items()}
        data.region_names = [str(n) for n in state["region_names"]]
        return data

    def cases(self, inputs, modalities):
        from medfuse.data.inputs import channel_of, dataset_test_folder, is_image_folder
        from medfuse.data.layouts import Case

        p0 = Path(inputs[0]) if inputs else None
        if len(inputs) == 1 and p0.is_dir() and (dataset_test_folder(p0) or is_image_folder(p0) or
                                                 (p0 / "dataset.json").is_file()):
            return super().cases(inputs, modalities)
        if len(inputs) == 1 and p0.suffix in (".csv", ".json"):
            return super().cases(inputs, modalities)
        if modalities is None and len(inputs) > 1 and all(channel_of(p) is not None for p in inputs):
            return super().cases(inputs, modalities)
        case_id, files = resolve_predict_inputs(list(inputs), modalities, list(self.dm.modalities))
        case_id = self.single_case_id(case_id, next(iter(files.values())))
        cases = [Case(case_id=case_id, patient_id=case_id, images=files)]
        self.check_dims(cases)  # a 2D image for a 3D run (and the reverse), as on the generic paths
        return cases

    def write(self, batch, out, out_dir: Path) -> None:
        from medfuse.data.io import write_nifti
        from medfuse.engine.segmentation_evaluator import case_logits, on_input_grid

        mods = list(self.dm.modalities)
        q_all = suppress_small_et(out["regions"].float().cpu(), self.cfg.eval.postprocess.min_et_voxels,
                                  batch.get("spatial_shape"))  # (B, R, *S)
        for j, case_id in enumerate(batch["case_id"]):
            q, affine = on_input_grid(case_logits(q_all, batch, j), batch, j)  # (R, *S0) on the input grid
            # the family's one rule (as evaluate's files and scores): canonical labels -> data set values
            label = raw_label_values(region_labels(q, dim=0).numpy(), self.dm.raw_regions)
            write_nifti(label[None].astype(np.uint8), output_path(out_dir, f"{case_id}.nii.gz"), affine=affine)
            if self.cfg.eval.save_probabilities:
                write_nifti(q.numpy().astype(np.float32), output_path(out_dir, f"{case_id}_regions.nii.gz"),
                            affine=affine)
            given = "+".join(m for m, p in zip(mods, batch["present"][j].tolist(), strict=True) if p > 0.5)
            self.rows.append([case_id, given, f"{case_id}.nii.gz"])
