"""``medfuse predict RUN RAW [CONTEXT]`` for the context_seg family: one case per call, written on the
raw input's own grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from medfuse.config import Config, validate_params
from medfuse.engine.evaluate import to_device
from medfuse.engine.predict import PackagedData
from medfuse.engine.predictors import SegmentationPredictor
from medfuse.errors import DataError, WeightsError
from medfuse.families.context_seg.data import ContextSegDataModule
from medfuse.families.context_seg.params import ContextSegDataParams


class ContextSegPredictor(SegmentationPredictor):
    """RAW (and CONTEXT in ``context_mode: paired``) -> ``<case_id>.nii.gz`` with exactly the raw
    file's shape and affine.

    The inputs go through the run's data pipeline (frozen encoder, resampling onto the label grid:
    the raw grid scaled by the training cases' ``label_scale``, and in ``context_mode: derived``
    only the centre of the file). The network's logits on that grid are moved back onto the raw
    file's grid by the generic writer that ``evaluate`` also uses (an exact index mapping when the
    label grid is the raw grid, MONAI ``ResampleToMatch`` otherwise; voxels outside the label grid,
    e.g. around a derived crop, get zero logits: background in the label map, uniform
    probabilities) and the label map is their argmax. With ``eval.save_probabilities`` also
    ``<case_id>_probs.nii.gz`` (K channels, same grid).

    A model package records the class count, the training ``label_scale``, the training raw voxel
    size (a raw input whose voxels differ by more than 10% is refused, as from the run directory)
    and the frozen encoder's weights id (a package whose encoder builds other weights on this
    machine is refused). A 2D NIfTI/TIFF raw is refused (:meth:`check_dims`; Zarr by its reader).
    """

    partial_modalities = True  # its cases check RAW [CONTEXT] themselves (derived context needs none)

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        train_spacing = getattr(dm, "train_raw_spacing", None)  # a stand-in data module may not have it
        spacing = train_spacing() if train_spacing is not None else None
        return {"num_classes": int(dm.num_classes),
                "label_scale": [float(v) for v in dm._predict_scale()],  # the training cases' factor
                "raw_spacing": None if spacing is None else [float(v) for v in spacing],  # training raw voxels
                "encoder_weights_id": str(dm.builder.weights_id)}

    @classmethod
    def package_data(cls, data: PackagedData, cfg: Config, state: dict[str, Any]) -> Any:
        return PackagedContextData(data, cfg, state)

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
        case = Case(case_id=name, patient_id=name, images=images)
        from medfuse.data.containers import split_container_path

        files = {m: f for m, f in images.items() if split_container_path(f) is None}  # Zarr: read_zarr checks dims
        if files:
            self.check_dims([Case(case_id=name, patient_id=name, images=files)])
            if self.refused and self.refused[-1][0].case_id == name:
                return []
        return [case]

    def reference_shape(self) -> tuple[int, ...] | None:
        if isinstance(self.dm, PackagedContextData):
            return self.dm.reference_shape
        return super().reference_shape()

    def batches(self, cases: list[Any]):
        """One case per batch: its two feature streams stacked, as the data module's items, plus
        the raw file's grid (``orig_affine`` (1, 4, 4), ``orig_shape`` (1, 3) = (D, H, W)); the
        generic :meth:`SegmentationPredictor.write` moves the logits there, as ``evaluate`` does."""
        for case in cases:
            feats = self.dm.compute(case, require_label=False)
            image = torch.cat([feats["raw"].float(), feats["context"].float()])[None]  # (1, C_raw + C_ctx, D, H, W)
            yield to_device({"image": image, "affine": feats["affine"][None], "case_id": [case.case_id],
                             "orig_affine": feats["raw_affine"][None], "orig_shape": feats["raw_shape"][None]},
                            self.task.device)


class PackagedContextData(ContextSegDataModule):
    """The feature side of a context_seg data module, rebuilt from a model package: :meth:`compute`
    on new cases with the run's ``data.params`` and training ``label_scale``; no case table, no
    feature cache. The frozen encoder is built as in training (``data.params.encoder``,
    ``encoder_params``, ``encoder_seed``) and must give the weights the run used.

    It sets the attributes :meth:`ContextSegDataModule.compute` reads instead of reading a case
    table (``tests/families/context_seg/test_context_seg_predict.py`` runs a package end to end, so
    a new attribute of the data module shows up there)."""

    def __init__(self, data: PackagedData, cfg: Config, state: dict[str, Any]):
        L.LightningDataModule.__init__(self)  # no case table: the package holds what compute() needs
        self.cfg, self.run_dir = cfg, None
        self.params = validate_params(ContextSegDataParams, cfg.data.params, "data.params")
        self.modalities, self.mask_values, self.table = data.modalities, data.mask_values, data.table
        self.cases: dict[str, list[Any]] = {}
        self.cellmap = False  # no CellMap table: predict reads RAW [CONTEXT] files (as a CellMap run directory does)
        self.num_classes = int(state["num_classes"])
        self.label_scale = np.asarray(state["label_scale"], dtype=np.float64)
        spacing = state.get("raw_spacing")  # None: a package from before it was recorded (no check)
        self.raw_spacing = None if spacing is None else np.asarray(spacing, dtype=np.float64)
        self.reference_shape = data.reference_shape
        self.weights_id = state.get("encoder_weights_id")
        self._builder = None
        self.cache_root = None
        self._memory = {}
        self._datasets = {}

    @property
    def builder(self):
        b = super().builder
        if self.weights_id is not None and b.weights_id != self.weights_id:
            raise WeightsError(f"data.params.encoder ({self.params.encoder})",
                               f"builds weights {b.weights_id} here, but the package was trained on features of "
                               f"{self.weights_id}", "give the same encoder weights (encoder_params) as in training")
        return b
