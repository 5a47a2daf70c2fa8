"""`medfuse predict` for incomplete_seg: a case segmented from whichever modalities it has."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfuse.data.paths import output_path
from medfuse.engine.predict import Predictor
from medfuse.families.incomplete_seg.data import (
    canonical_to_raw,
    resolve_predict_inputs,
)


class IncompleteSegPredictor(Predictor):
    """``medfuse predict RUN FILES... [--modalities a,b]`` with any non-empty modality subset.

    Inputs are image files (their modalities read from the names or given by ``--modalities``) or
    one case folder. Writes ``<case>_pred.nii.gz`` (raw label values when the regions allow it,
    else canonical labels), ``<case>_regions.nii.gz`` (R probabilities) and a row of
    ``predictions.csv``.
    """

    def cases(self, inputs, modalities):
        from medfuse.data.layouts import Case
        from medfuse.data.paths import check_case_id

        case_id, files = resolve_predict_inputs(list(inputs), modalities, list(self.dm.modalities))
        check_case_id(case_id, next(iter(files.values())))
        return [Case(case_id=case_id, patient_id=case_id, images=files)]

    def write(self, batch, out, out_dir: Path) -> None:
        from medfuse.data.io import write_nifti

        mods = list(self.dm.modalities)
        raw = canonical_to_raw(self.dm.raw_regions)
        q = out["regions"].float().cpu()  # (B, R, *S)
        csv_path = out_dir / "predictions.csv"
        if not csv_path.exists():
            csv_path.write_text("case_id,modalities,prediction\n")
        for j, case_id in enumerate(batch["case_id"]):
            label = (q[j] > 0.5).sum(0).numpy()  # canonical labels (nested regions)
            if raw is not None:
                label = np.vectorize(raw.get)(label)
            affine = np.asarray(batch["affine"][j].cpu())
            write_nifti(label[None].astype(np.uint8), output_path(out_dir, f"{case_id}_pred.nii.gz"), affine=affine)
            write_nifti(q[j].numpy().astype(np.float32), output_path(out_dir, f"{case_id}_regions.nii.gz"),
                        affine=affine)
            given = "+".join(m for m, p in zip(mods, batch["present"][j].tolist(), strict=True) if p > 0.5)
            with csv_path.open("a") as f:
                f.write(f"{case_id},{given},{case_id}_pred.nii.gz\n")
