"""The staging family's task: case-level classification that refuses a case missing a modality."""

from __future__ import annotations

from typing import Any

import torch

from medfuse.engine.tasks import Batch, ClassificationTask
from medfuse.errors import DataError


class StagingTask(ClassificationTask):
    """Cross-entropy on (B, K) logits from (B, 2, D, H, W) T2W + DWI volumes."""

    def check_present(self, batch: Batch) -> None:
        present = batch.get("present")
        if present is None:
            return
        branches = self.model.branches
        missing = (torch.as_tensor(present)[:, branches] < 0.5).nonzero()
        if len(missing):
            i, j = missing[0].tolist()
            raise DataError(batch["case_id"][i], f"modality '{self.model.modalities[branches[j]]}' is missing",
                            "staging needs both T2W and DWI for every case")

    def forward_batch(self, batch: Batch) -> dict[str, Any]:
        self.check_present(batch)
        return {"logits": self.model(batch["image"])}

    def infer_intermediates(self, batch: Batch) -> dict[str, Any]:
        """Logits (B, K) and, with BGAMF, ``gate`` (B, D, h, w), from one forward pass."""
        self.check_present(batch)
        logits, inter = self.model.forward_intermediates(batch["image"])
        return {"logits": logits, **inter}
