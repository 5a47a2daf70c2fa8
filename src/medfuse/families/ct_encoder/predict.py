"""`medfuse predict` for ct_encoder: one embedding file per volume (``<case_id>.safetensors``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from medfuse.engine.evaluate import to_device
from medfuse.engine.predict import Predictor


class CTEncoderPredictor(Predictor):
    """``<out>/<case_id>.safetensors`` per volume, from a ``VOLUME MASK`` pair or one CT-RATE-style folder.

    Each file holds ``global_emb`` (E,), ``region_emb`` (R, E) (both L2-normalised),
    ``region_present`` (R,), ``global_features`` (L * C_f,), ``patch_features`` (N, C_f) and
    ``grid`` (3,) = (d, h, w). HU conversion is the run's (``hu: metadata`` needs a folder).
    """

    def cases(self, inputs, modalities):
        from medfuse.families.ct_encoder.data import predict_cases

        return predict_cases(inputs, self.dm.params)

    def batches(self, cases):
        """One volume per batch, through the run's evaluation transforms (with the HU step)."""
        from medfuse.data.datamodule import collate
        from medfuse.families.ct_encoder.data import case_item, ct_transforms

        tf = ct_transforms(self.cfg, train=False)
        for c in cases:
            yield to_device(collate([tf(case_item(c))]), self.task.device)

    def write(self, batch, out, out_dir):
        from safetensors.torch import save_file

        for b, cid in enumerate(batch["case_id"]):
            save_file({"global_emb": F.normalize(out["image_emb"][b].float(), dim=-1).cpu().contiguous(),
                       "region_emb": F.normalize(out["region_emb"][b].float(), dim=-1).cpu().contiguous(),
                       "region_present": out["present"][b].to(torch.uint8).cpu().contiguous(),
                       "global_features": out["global"][b].float().cpu().contiguous(),
                       "patch_features": out["patch"][b].float().cpu().contiguous(),
                       "grid": torch.tensor(out["grid"], dtype=torch.int64)}, str(out_dir / f"{cid}.safetensors"))

    def run(self, inputs: list[str], out_dir: Path, modalities: list[str] | None = None) -> Path:
        # The base loop calls task.infer (vision + text); a prediction has no report, so only the
        # vision side runs (the engine's Predictor has no per-family inference hook yet).
        cases = self.cases(list(inputs), modalities)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for batch in self.batches(cases):
                self.write(batch, self.task.encode(batch), out_dir)
        self.finish(out_dir)
        return out_dir
