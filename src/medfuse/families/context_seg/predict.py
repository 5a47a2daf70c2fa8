"""``medfuse predict RUN RAW [CONTEXT]`` for the context_seg family: one case per call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfuse.engine.evaluate import to_device
from medfuse.engine.predict import SegmentationPredictor
from medfuse.errors import DataError


class ContextSegPredictor(SegmentationPredictor):
    """RAW (and CONTEXT in ``context_mode: paired``) -> ``<case_id>.nii.gz`` on the training label grid.

    The inputs go through the run's data pipeline (frozen encoder, resampling onto the label grid,
    the training cases' ``label_scale``); the label map is written with the label grid's affine.
    """

    def cases(self, inputs: list[str], modalities: list[str] | None) -> list[Any]:
        from medfuse.data.layouts import Case

        p = self.dm.params
        want = 1 if p.context_mode == "derived" else 2
        if len(inputs) != want:
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for context_mode '{p.context_mode}'",
                            "give RAW" + (" CONTEXT" if want == 2 else "") + " (one case)")
        for path in inputs:
            if not Path(path).exists():
                raise DataError(path, "file not found", "check the path")
        images = {p.raw: inputs[0]} | ({p.context: inputs[1]} if want == 2 else {})
        from medfuse.data.inputs import case_id_of
        from medfuse.data.paths import check_case_id

        name = check_case_id(case_id_of(inputs[0]), inputs[0])  # nnU-Net naming: no _XXXX, no ending
        return [Case(case_id=name, patient_id=name, images=images)]

    def batches(self, cases: list[Any]):
        """One case per batch: its two feature streams stacked, as the data module's items."""
        for case in cases:
            feats = self.dm.compute(case, require_label=False)
            image = torch.cat([feats["raw"].float(), feats["context"].float()])[None]  # (1, C_raw + C_ctx, D, H, W)
            yield to_device({"image": image, "affine": feats["affine"][None], "case_id": [case.case_id]},
                            self.task.device)
