"""`medfuse predict` for ct_encoder: one embedding file per volume (``<case_id>.safetensors``) and,
for a model with a report generator, one generated report per volume (``<case_id>.txt`` and
``reports.csv``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medfuse.config import Config
from medfuse.data.paths import output_path
from medfuse.engine.evaluate import to_device
from medfuse.engine.outputs import write_rows
from medfuse.engine.predict import PackagedData, Predictor


class CTEncoderPredictor(Predictor):
    """``<out>/<case_id>.safetensors`` per volume, from a ``VOLUME MASK`` pair or one CT-RATE-style folder.

    Each file holds ``global_emb`` (E,), ``region_emb`` (R, E) (both L2-normalised),
    ``region_present`` (R,), ``global_features`` (L * C_f,), ``patch_features`` (N, C_f) and
    ``grid`` (3,) = (d, h, w). HU conversion is the run's (``hu: metadata`` needs a folder).
    With a generator (``model.params.gen_decoder``), ``<case_id>.txt`` holds the generated report
    (greedy or beam search, ``gen_beams``) and ``reports.csv`` lists them all (case_id, report).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[str, str]] = []

    @classmethod
    def package_labels(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """One CT channel; lesion masks are region inputs, not labels (the data module declares no mask values)."""
        return {"modalities": list(dm.modalities), "class_names": None, "mask_labels": None, "mask_values": None}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        """The run's ``data.params`` (HU conversion, file names of a dataset folder), from the config:
        the scratch report tokenizer travels in the weights (``vocab_table``)."""
        from medfuse.families.ct_encoder.data import check_params

        data.params = check_params(cfg)
        return data

    def cases(self, inputs, modalities):
        """:func:`~medfuse.families.ct_encoder.data.predict_cases`, then the 2D/3D check
        (:meth:`Predictor.check_dims`: a single slice given to a run trained on 3D volumes is refused,
        or listed with ``--skip-refused``). OmniAbnorm-CT slabs (slice folders) are not checked."""
        from medfuse.families.ct_encoder.data import predict_cases

        cases = predict_cases(inputs, self.dm.params, self.single_case_id)
        if self.dm.params.source != "omniabnorm":
            self.check_dims(cases)
        return cases

    def batches(self, cases):
        """One volume per batch, through the run's evaluation transforms (with the HU step)."""
        from medfuse.data.datamodule import collate
        from medfuse.families.ct_encoder.transforms import case_item, ct_transforms

        tf = ct_transforms(self.cfg, train=False, regions=self.task.model.num_regions)  # no lesion masks here
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
                       "grid": torch.tensor(out["grid"], dtype=torch.int64)}, str(output_path(out_dir, f"{cid}.safetensors")))
        if self.task.model.generator is not None:
            for cid, text in zip(batch["case_id"], self.task.generate(out), strict=True):
                output_path(out_dir, f"{cid}.txt").write_text(text + "\n", encoding="utf-8")
                self.reports.append((str(cid), text))

    def finish(self, out_dir):
        from medfuse.families.ct_encoder.generation import note_empty_reports

        note_empty_reports([text for _, text in self.reports], str(out_dir))
        if self.reports:  # the rows of other cases an earlier run wrote there are kept
            write_rows(output_path(out_dir, "reports.csv"), ["case_id", "report"], self.reports)

    def infer(self, batch):
        """The vision side only (a volume to predict has no report to embed)."""
        return self.task.encode(batch)
