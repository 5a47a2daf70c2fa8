"""``medfuse predict RUN RAW [CONTEXT]`` for the context_seg family: one case per call, written on the
raw input's own grid."""

from __future__ import annotations

import json
import re
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

_SCALE_LEVEL = re.compile(r"s?\d+")  # OME-Zarr / CellMap scale levels: s0, s1, ... or 0, 1, ...
_CROP = re.compile(r"crop\d+", re.IGNORECASE)  # CellMap crop folders: crop123


def default_case_id(raw: str | Path) -> str:
    """The case id ``medfuse predict`` gives a raw input when ``--case-id`` does not name it.

    A file (NIfTI, TIFF, ...) is named as by every family (:func:`~medfuse.data.inputs.case_id_of`:
    the file name without its ending and an nnU-Net ``_XXXX`` suffix). An array inside a Zarr/N5
    container is named after the data, not the array: a scale level is the same name in every
    data set (``s1``). So the id is the container's name without ``.zarr``/``.n5``, then

    * under a CellMap crop folder (``crop<N>``): ``<container>_crop<N>``, as ``medfuse evaluate``
      names a crop (``jrc_hela-2.zarr/.../crop155/s0`` -> ``jrc_hela-2_crop155``);
    * otherwise the group path without a last scale level (``s<N>`` or ``<N>``), ``/`` -> ``_``:
      ``jrc_hela-2.zarr/recon-1/em/fibsem-uint8/s1`` -> ``jrc_hela-2_recon-1_em_fibsem-uint8``,
      ``sample.zarr/0`` -> ``sample``.

    The caller checks the id (:func:`~medfuse.data.paths.check_case_id`).
    """
    from medfuse.data.containers import CONTAINER_SUFFIXES, split_container_path
    from medfuse.data.inputs import case_id_of

    split = split_container_path(raw)
    if split is None:
        return case_id_of(raw)
    root, inner = split
    stem = next((root.name[: -len(s)] for s in CONTAINER_SUFFIXES if root.name.lower().endswith(s)), root.name)
    parts = [part for part in inner.split("/") if part]
    crop = next((part for part in reversed(parts) if _CROP.fullmatch(part)), None)
    if crop is not None:
        return f"{stem}_{crop}"
    if parts and _SCALE_LEVEL.fullmatch(parts[-1]):
        parts = parts[:-1]
    return "_".join([stem, *parts])


OUTPUT_GRID = ("`<case_id>.nii.gz` (NIfTI-1) on RAW's grid: RAW's shape, voxel size and origin; the affine and the "
               "header unit are mm (an OME-Zarr/N5 raw's nm scale and translation times 1e-6); NIfTI axes (i, j, k) "
               "= the raw's (W, H, D), so a Zarr (z, y, x) array or a TIFF stack (page, row, column) comes back "
               "transposed to (x, y, z): `nib.load(f).get_fdata()[x, y, z]` labels raw voxel `[z, y, x]`")


def model_card_lines(p: ContextSegDataParams, raw_spacing: Any, label_scale: Any, cellmap: bool) -> dict[str, str]:
    """The model card's ``inputs``, ``preprocessing`` and ``outputs`` lines of a context_seg package
    (the package's ``labels.json`` ``card``, read by the engine's ``model_card``).

    Args:
        p: the run's ``data.params``.
        raw_spacing: the training raw voxel size (d, h, w) in mm, or None when unknown.
        label_scale: label voxels per raw voxel (d, h, w) of the training cases.
        cellmap: the run was trained on a CellMap layout (crops of OME-Zarr volumes).
    """
    from medfuse.families.context_seg.units import format_lengths

    size = "at any voxel size" if raw_spacing is None else \
        f"at the training raw voxel size {format_lengths(raw_spacing)} (d, h, w) within 10%"
    raw = (f"RAW, a 3D volume {size} (NIfTI, NRRD, DICOM series, TIFF stack, or an array of an OME-Zarr/N5 "
           "container such as `<ds>.zarr/recon-1/em/fibsem-uint8/s0`)")
    if p.context_mode == "derived":
        inputs = (f"RAW only (`medfuse predict model.zip RAW`): {raw}; the context is made from it (the whole file "
                  f"block-averaged by {p.context_scale}, the raw stream its central 1/{p.context_fov:g})")
    else:
        if cellmap:
            r = p.context_resolution
            res = "raw voxel size" if r is None else \
                (f"{r:g} nm" if np.isscalar(r) else "(" + ", ".join(f"{v:g}" for v in r) + ") nm")
            ctx = f"trained on boxes {p.context_extent:g}x the crop's per axis at {res}"
            if p.context_resolution is None:
                ctx += f" x {p.context_extent:g}"
        elif p.context_scale == "auto":
            ctx = "voxel ratio to RAW read from the two files' spacings"
        else:
            ctx = f"voxels {p.context_scale} times RAW's"
        inputs = (f"RAW CONTEXT (`medfuse predict model.zip RAW CONTEXT`): {raw}; CONTEXT, the same place at "
                  f"coarser voxels ({ctx}) whose field of view contains RAW's, placed by the two files' affines")
    sizes = {"raw": p.raw_input_size, "context": p.context_input_size}
    resize = ", ".join(f"{k} {v}x{v}" if v else f"{k} at the encoder's own input size" for k, v in sizes.items())
    planes = {True: "XY, XZ and YZ passes averaged for both streams", False: "axial (XY) slices only",
              "raw": "XY, XZ and YZ passes averaged for the raw stream", "context":
              "XY, XZ and YZ passes averaged for the context stream"}[p.tri_planar]
    intensity = "per-slice percentiles" if p.intensity == "mr" else f"CT window {p.window}"
    scale = ", ".join(f"{float(v):g}" for v in label_scale)
    prep = (f"its own (not the generic orientation/spacing/intensity chain): each stream slice by slice through the "
            f"frozen encoder `{p.encoder}` ({json.dumps(p.encoder_params)}), slices resized to {resize}, intensity "
            f"`{p.intensity}` ({intensity}), {planes}; both feature streams resampled (trilinear) onto the label grid "
            f"= RAW's grid scaled by ({scale}) (d, h, w)")
    return {"inputs": inputs, "preprocessing": prep, "outputs": OUTPUT_GRID}


def _train_raw_spacing(dm: Any) -> Any:
    """The training raw voxel size (d, h, w) in mm of a run's data module, or None (a stand-in data
    module has no ``train_raw_spacing``)."""
    train_spacing = getattr(dm, "train_raw_spacing", None)
    return train_spacing() if train_spacing is not None else None


class ContextSegPredictor(SegmentationPredictor):
    """RAW (and CONTEXT in ``context_mode: paired``) -> ``<case_id>.nii.gz`` with exactly the raw
    file's shape and affine (in mm, NIfTI axes (x, y, z): :data:`OUTPUT_GRID`); the case id is
    ``--case-id`` or :func:`default_case_id` of RAW.

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
    def package_labels(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        """The generic labels plus ``card``: the model card's inputs, preprocessing and outputs lines
        for this family (:func:`model_card_lines`); the generic chain of the card is not used here."""
        spacing = _train_raw_spacing(dm)
        params = validate_params(ContextSegDataParams, cfg.data.params, "data.params")
        cellmap = bool(getattr(dm, "cellmap", False))  # trained on CellMap crops (a stand-in: no)
        return {**super().package_labels(dm, cfg), "card": model_card_lines(params, spacing, dm._predict_scale(), cellmap)}

    @classmethod
    def package_state(cls, dm: Any, cfg: Config) -> dict[str, Any]:
        spacing = _train_raw_spacing(dm)
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
        from medfuse.data.containers import split_container_path

        name = self.single_case_id(default_case_id(inputs[0]), inputs[0])
        case = Case(case_id=name, patient_id=name, images=images)

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
