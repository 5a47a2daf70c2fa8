"""Data for the ``context_seg`` family: raw + context volumes -> two frozen-feature streams (seed 004).

Seed sections: "Feature Extraction Returns Separate Tensors", "Context Processing Pipeline".

A case is a raw volume (high resolution, small field of view), a context volume (coarser voxels, a
wider field of view, centred on the raw one) and an integer label volume on a *label grid* that may
be the raw grid scaled by a factor. Context is either its own file (``context_mode: paired``) or is
derived from the raw file (``derived``): the raw stream is then the central ``1 / context_fov`` of
the file and the context the whole file block-averaged by ``context_scale``. Files are anything
:func:`medfuse.data.io.read_image` reads (NIfTI, TIFF stacks, ...) or a path into a Zarr/N5
container (``crop.zarr/recon-1/em/s0``; :func:`medfuse.data.containers.read_zarr`, extra
``medfuse[zarr]``). A CellMap dataset (layout ``cellmap``) needs neither a context file nor a label
file: each crop's raw box, the wider context box from a coarser scale level and the label map of
``data.params.classes`` are read as regions of the Zarr volume
(:func:`medfuse.data.containers.read_cellmap_crop`); the context is the same paired stream.

Each stream goes slice by slice through a frozen 2D encoder (``tiny`` on CPU, ``dinov3`` from a
local folder) via :class:`~medfuse.encoders.slicewise.SlicewiseExtractor`, optionally in all three
planes (XY, XZ, YZ; averaged), and is resampled onto the label grid: the raw features over the
whole raw field of view, the context features over the part of the context that the raw field
covers. The two streams stay separate tensors; they are stored per case as float16 safetensors
under ``<cache_dir>/context_seg/``, keyed by the files, the encoder weights and every option, so
features are computed once and training patches are read by slicing the file.

Items carry ``image`` = raw and context features stacked on the channel axis, (C_raw + C_ctx, D, H,
W): one tensor, only so that the engine's batching and MONAI's sliding window crop both streams on
the same grid. The model splits them again before any layer. Training items are patches chosen
by MONAI's positive/negative sampler (``foreground_ratio`` of the centres on labelled voxels);
validation and test items are whole volumes on the label grid (scored there against the label),
with the raw file's own grid (``orig_affine``, ``orig_shape``) onto which the evaluator and the
predictor write the predicted label map.

The feature extraction itself (:class:`~medfuse.families.context_seg.features.FeatureBuilder`,
:func:`~medfuse.families.context_seg.features.resample_to_grid` and the placement of the raw field
of view in the context) is in :mod:`medfuse.families.context_seg.features`; this module holds the
data module, its feature cache, the CellMap case table and the datasets.

Options (``data.params``): :class:`~medfuse.families.context_seg.params.ContextSegDataParams`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfuse.config import validate_params
from medfuse.data.datamodule import CaseDataModule
from medfuse.errors import ConfigError, DataError
from medfuse.families.context_seg.features import FeatureBuilder, _context_placement
from medfuse.families.context_seg.params import ContextSegDataParams, ContextSegParams

__all__ = ["ContextSegDataModule", "build_context_seg_datamodule", "read_volume"]

log = logging.getLogger(__name__)
CACHE_FORMAT = "medfuse-context-seg-v3"  # v2: the raw file's grid (raw_affine, raw_shape); v3: context placed by affines


def _triple(x: float | Sequence[float]) -> np.ndarray:
    return np.asarray([float(x)] * 3 if np.isscalar(x) else [float(v) for v in x], dtype=np.float64)


def read_volume(path: str) -> Any:
    """Read a volume: a path into a ``.zarr``/``.n5`` container, else any :func:`read_image` format."""
    from medfuse.data.containers import read_zarr, split_container_path
    from medfuse.data.io import read_image

    return read_zarr(path) if split_container_path(path) is not None else read_image(path)


def _label_affine(raw_affine: np.ndarray, ratio: np.ndarray, crop_lo: np.ndarray) -> np.ndarray:
    """Affine of the label grid: label voxel centre -> raw voxel index -> world (RAS, (w, h, d) order)."""
    r = np.asarray(ratio, float)[::-1]  # (w, h, d)
    t = np.eye(4)
    t[:3, :3] = np.diag(1.0 / r)
    t[:3, 3] = 0.5 / r - 0.5 + np.asarray(crop_lo, float)[::-1]
    return np.asarray(raw_affine, float) @ t


def _file_state(path: str | None) -> list[Any]:
    if path is None:
        return [None, None, None]
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _label_shape(label: np.ndarray, raw_shape: Sequence[int], scale, where: str) -> np.ndarray:
    """Check that the label grid is the raw grid scaled by one factor (or by ``scale``)."""
    lab, raw = np.asarray(label.shape, float), np.asarray(raw_shape, float)
    if scale is not None:
        want = np.round(raw * _triple(scale))
        if not np.array_equal(want, lab):
            raise DataError(where, f"label grid {tuple(label.shape)} is not raw {tuple(raw_shape)} x label_scale "
                            f"{tuple(_triple(scale))}", "fix data.params.label_scale or the label file")
        return _triple(scale)
    ratio = lab / raw
    if np.ptp(ratio) > 0.02 * ratio.mean():
        raise DataError(where, f"label grid {tuple(label.shape)} is not the raw grid {tuple(raw_shape)} scaled by "
                        "one factor", "set data.params.label_scale=[d, h, w]")
    return ratio


class ContextSegDataModule(CaseDataModule):
    """Case table + splits of :class:`CaseDataModule`, with two-stream feature items (see module doc)."""

    partial_modalities = True  # the low-resolution context may be absent

    def __init__(self, cfg, run_dir: Path | None = None):
        from medfuse.data.datamodule import load_table

        self.params: ContextSegDataParams = validate_params(ContextSegDataParams, cfg.data.params, "data.params")
        table = load_table(cfg)
        self.cellmap = table.layout == "cellmap"
        if self.cellmap:
            table = cellmap_table(table, self.params)
        super().__init__(cfg, run_dir, table)
        p = self.params
        need = [p.raw] + ([p.context] if p.context_mode == "paired" else [])
        missing = [m for m in need if m not in self.modalities] if not self.cellmap else []
        if missing:
            raise ConfigError(f"data.params.{'raw' if missing[0] == p.raw else 'context'}",
                              f"modality '{missing[0]}' is not in the dataset (it has {self.modalities})",
                              "name the raw/context modalities of the case table")
        self.num_classes = cfg.data.num_classes or (len(self.table.mask_labels) if self.table.mask_labels else None)
        if self.num_classes is None:
            raise ConfigError("data.num_classes", "the dataset declares no mask labels",
                              "set data.num_classes or declare mask_labels in dataset.json/dataset.yaml")
        self._builder: FeatureBuilder | None = None
        root = cfg.data.cache_dir or (str(run_dir / "feature_cache") if run_dir is not None else None)
        self.cache_root = Path(root) / "context_seg" if root else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}  # used only without a cache folder
        self.label_scale: np.ndarray | None = None
        self.raw_spacing: np.ndarray | None = None  # the training raw voxel size (d, h, w), for prediction

    @classmethod
    def table_problems(cls, cfg, table) -> list[Any]:
        """What this data module refuses in a case table before reading any voxel, as
        ``data check --config`` problems (:func:`medfuse.data.check_config.check_as_run`): the
        ``data.params`` themselves and, for a CellMap table, ``data.params.classes`` against the
        classes the crops annotate (:func:`cellmap_table`)."""
        from medfuse.data.checks import Problem
        from medfuse.errors import MedfuseError

        try:
            params = validate_params(ContextSegDataParams, cfg.data.params, "data.params")
            if table.layout == "cellmap":
                cellmap_table(table, params, warn=False)
        except MedfuseError as e:
            return [Problem(str(e.where), "config", e.problem, e.fix)]
        return []

    # --------------------------------------------------------------------------------- features
    @property
    def builder(self) -> FeatureBuilder:
        if self._builder is None:
            self._builder = FeatureBuilder(self.params)
            want = validate_params(ContextSegParams, self.cfg.model.params, "model.params").feature_channels
            if want != self._builder.out_channels:
                unset = "" if "feature_channels" in self.cfg.model.params else " (the default)"
                raise ConfigError("model.params.feature_channels",
                                  f"is {want}{unset} but encoder '{self.params.encoder}' gives {self._builder.out_channels}",
                                  f"set model.params.feature_channels={self._builder.out_channels}")
        return self._builder

    def _key(self, case) -> str:
        p = self.params
        desc = {"format": CACHE_FORMAT, "case": case.case_id, "files": [_file_state(v) for v in
                (case.images.get(p.raw), case.images.get(p.context), case.mask)],
                "params": p.model_dump(mode="json", exclude={"patch_size", "foreground_ratio", "samples_per_case",
                                                             "flip", "slice_batch_size"}),
                "weights": self.builder.weights_id}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()

    def case_tensors(self, case) -> dict[str, torch.Tensor] | Path:
        """The case's features (a cache file path, or tensors in memory without a cache folder)."""
        key = self._key(case)
        if self.cache_root is None:
            if key not in self._memory:
                self._memory[key] = self.compute(case)
            return self._memory[key]
        path = self.cache_root / key[:2] / f"{key}.safetensors"
        if not path.is_file():
            from medfuse.encoders.weights import save_safetensors

            save_safetensors(self.compute(case), path, metadata={"case_id": case.case_id, "format": CACHE_FORMAT})
        return path

    def compute(self, case, require_label: bool = True) -> dict[str, torch.Tensor]:
        """Read a case and extract both streams on its label grid (float16) plus the label (uint8).

        Without a label (``require_label=False``, prediction) the grid is the raw grid scaled by
        ``label_scale`` (the option, else the training cases' factor) and ``label`` is all zeros;
        such a case reads its raw (and context) files even when the run was trained on CellMap crops.
        """
        p = self.params
        where = f"case {case.case_id}"
        # A CellMap crop is a case of a CellMap table with its crop folder (the mask). Prediction cases
        # (RAW [CONTEXT] files, no mask) of a CellMap-trained run read their files like any other run.
        crop = case.mask if self.cellmap else None
        if self.cellmap and not crop and require_label:
            raise DataError(where, "has no CellMap crop folder", "give every case a crop<N> folder of groundtruth")
        raw_path = case.images.get("raw" if crop else p.raw)
        if not raw_path:
            raise DataError(where, f"has no '{p.raw}' image", "give every case a raw volume")
        cm = None  # the CellMap crop
        if crop:  # regions of the EM volume only: the crop box and a coarser, wider context box
            from medfuse.data.containers import read_cellmap_crop

            cm = read_cellmap_crop(raw_path, str(crop), p.classes or [], p.raw_resolution, p.label_resolution,
                                   p.context_resolution, p.context_extent)
            raw_vol = cm.raw
        else:
            raw_vol = read_volume(raw_path)
        raw = self._finite(raw_vol.array[0].astype(np.float32), raw_path)
        if not require_label:  # prediction: the raw voxel size must be the training one
            self._check_raw_spacing(raw_vol, str(raw_path))
        if cm is not None or p.context_mode == "paired":
            ctx_path = str(raw_path) if cm is not None else case.images.get(p.context)
            if not ctx_path:
                raise DataError(where, f"has no '{p.context}' image", "give every case a context volume")
            ctx_vol = cm.context if cm is not None else read_volume(ctx_path)
            ctx = self._finite(ctx_vol.array[0].astype(np.float32), ctx_path)
            scale = (np.asarray(ctx_vol.spacing) / np.asarray(raw_vol.spacing) if p.context_scale == "auto"
                     else _triple(p.context_scale))
            fraction, centre = _context_placement(raw_vol, ctx_vol, raw.shape, ctx.shape, scale, ctx_path)
            full_shape = raw.shape
        else:
            full_shape = raw.shape
            crop = [max(1, round(s / p.context_fov)) for s in raw.shape]
            lo = [(s - c) // 2 for s, c in zip(raw.shape, crop, strict=True)]
            ctx = F.interpolate(torch.as_tensor(raw)[None, None], mode="area", scale_factor=tuple(1 / _triple(
                p.context_scale)), recompute_scale_factor=False)[0, 0].numpy()
            fraction, centre = np.asarray(crop) / np.asarray(raw.shape), np.zeros(3)
            raw = raw[lo[0]:lo[0] + crop[0], lo[1]:lo[1] + crop[1], lo[2]:lo[2] + crop[2]]
        if not case.mask:
            if require_label:
                raise DataError(where, "has no label volume", "give every case a mask (integer labels)")
            label = np.zeros([max(1, round(s * f)) for s, f in zip(full_shape, self._predict_scale(), strict=True)],
                             np.uint8)
        else:
            label = cm.label.array[0] if cm is not None else read_volume(case.mask).array[0]
        if label.dtype.kind not in "iu":
            if not np.all(np.mod(label, 1) == 0):
                raise DataError(str(case.mask), "label volume is not integer-valued", "store integer class labels")
            label = label.astype(np.int64)
        crop_lo = np.zeros(3)
        if cm is None and p.context_mode == "derived":  # the label covers the whole file: keep its centre, like the raw
            ratio = _label_shape(label, full_shape, p.label_scale, str(case.mask or where))
            cl = [max(1, round(s * f)) for s, f in zip(label.shape, fraction, strict=True)]
            lo = [(s - c) // 2 for s, c in zip(label.shape, cl, strict=True)]
            label = label[lo[0]:lo[0] + cl[0], lo[1]:lo[1] + cl[1], lo[2]:lo[2] + cl[2]]
            crop_lo = np.asarray(lo) / ratio
        ratio = np.asarray(label.shape) / np.asarray(raw.shape)
        if cm is not None or p.context_mode == "paired":
            ratio = _label_shape(label, raw.shape, p.label_scale, str(case.mask or where))
        if label.min() < 0 or label.max() >= self.num_classes:
            raise DataError(str(case.mask or where), f"label values {int(label.min())}..{int(label.max())} outside 0.."
                            f"{self.num_classes - 1}", "declare every label value (contiguous from 0) in mask_labels")
        out_shape = tuple(label.shape)
        b = self.builder
        return {
            "raw": b.stream(raw, out_shape, (1.0, 1.0, 1.0), p.raw_input_size,
                            p.tri_planar in (True, "raw")).half(),  # (C, D, H, W)
            "context": b.stream(ctx, out_shape, fraction, p.context_input_size,
                                p.tri_planar in (True, "context"), centre=centre).half(),  # (C, D, H, W)
            "intensity": self._preview(raw, out_shape),  # (1, D, H, W), for plots
            "label": torch.as_tensor(label.astype(np.uint8 if self.num_classes <= 255 else np.int32))[None],
            "label_scale": torch.as_tensor(ratio, dtype=torch.float64),  # label voxels per raw voxel (d, h, w)
            "affine": torch.as_tensor(_label_affine(raw_vol.affine, ratio, crop_lo)),
            # the raw input file's own grid (the whole file, before a derived crop): predictions are written there
            "raw_affine": torch.as_tensor(np.asarray(raw_vol.affine, np.float64)),  # (4, 4)
            "raw_shape": torch.as_tensor(full_shape, dtype=torch.long),  # (3,) = (D, H, W)
        }

    def _predict_scale(self) -> np.ndarray:
        if self.params.label_scale is not None:
            return _triple(self.params.label_scale)
        if self.label_scale is None and self.cases.get("train"):
            self.label_scale = _read(self.case_tensors(self.cases["train"][0]), "label_scale").numpy()
        return np.ones(3) if self.label_scale is None else np.asarray(self.label_scale, float)

    def train_raw_spacing(self) -> np.ndarray | None:
        """The raw voxel size (d, h, w) of the training cases (of the first one; a package stores it)."""
        if self.raw_spacing is None and self.cases.get("train"):
            aff = _read(self.case_tensors(self.cases["train"][0]), "raw_affine").numpy()
            self.raw_spacing = np.linalg.norm(aff[:3, :3], axis=0)[::-1].astype(np.float64)
        return None if self.raw_spacing is None else np.asarray(self.raw_spacing, float)

    def _check_raw_spacing(self, raw_vol, path: str) -> None:
        want = self.train_raw_spacing()
        have = np.asarray(raw_vol.spacing, float)
        if want is not None and np.any(np.abs(have / want - 1) > 0.1):
            def fmt(v):
                return tuple(float(f"{x:.4g}") for x in v)

            raise DataError(path, f"has raw voxels of {fmt(have)} (d, h, w), but the run was trained on {fmt(want)}",
                            "give the raw at the training voxel size (for OME-Zarr, the scale level at that size)")

    @staticmethod
    def _finite(arr: np.ndarray, path: str) -> np.ndarray:
        if not np.isfinite(arr).all():
            raise DataError(path, "contains NaN or infinite voxels", "fix or mask them before training")
        return arr

    @staticmethod
    def _preview(raw: np.ndarray, out_shape) -> torch.Tensor:
        lo, hi = np.percentile(raw, [0.5, 99.5])
        x = torch.as_tensor((np.clip(raw, lo, hi) - lo) / max(hi - lo, 1e-6), dtype=torch.float32)
        return F.interpolate(x[None, None], size=tuple(out_shape), mode="trilinear", align_corners=False)[0].half()

    def prepare_split(self, split: str) -> list[tuple[Any, dict[str, torch.Tensor] | Path]]:
        """Compute (or find in the cache) the features of every case of a split, in the main process."""
        cases = self.cases[split]
        if not cases:
            raise DataError(self.cfg.data.root or "data", f"the {split} split is empty",
                            "add cases or change data.split fractions")
        out = [(c, self.case_tensors(c)) for c in cases]
        if self.label_scale is None:
            self.label_scale = _read(out[0][1], "label_scale").numpy().astype(np.float64)
        return out

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = ContextSegDataset(self.prepare_split(split), self.params, train=(split == "train"))
        return self._datasets[split]


def cellmap_table(table, p: ContextSegDataParams, warn: bool = True):
    """A CellMap case table for training: the chosen classes as mask labels; crops that do not annotate
    every chosen class left out (``missing_classes: skip``, with a warning unless ``warn=False``) or
    kept. A class that no crop annotates (e.g. a typo), or a choice that leaves no crop, is refused
    in one line."""
    import dataclasses

    if not p.classes:
        raise ConfigError("data.params.classes", "no classes chosen for the CellMap label map",
                          "set data.params.classes, e.g. [mito, er, nuc] (value k = the k-th class)")
    keep, dropped, seen = [], [], set()
    for c in table.cases:
        have = {n for n in str(c.extra.get("classes") or "").split(";") if n}
        seen |= have
        (keep if p.missing_classes == "background" or set(p.classes) <= have else dropped).append(c)
    unknown = [n for n in p.classes if n not in seen]
    if unknown and table.cases:
        names = sorted(seen)
        raise ConfigError("data.params.classes", f"{unknown} annotated by no crop of {table.root} (the crops annotate "
                          f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''})",
                          "choose classes the crops annotate")
    if not keep:
        raise DataError(table.root, f"no crop annotates all of {p.classes}",
                        "choose classes the crops annotate, or set data.params.missing_classes=background")
    if dropped and warn:  # after the refusal: a refused table prints one line, not a note and then the error
        log.warning("%d CellMap crop(s) do not annotate every class of data.params.classes and are left out "
                    "(e.g. %s); set data.params.missing_classes=background to keep them", len(dropped),
                    dropped[0].case_id)
    labels = {"background": 0, **{name: k for k, name in enumerate(p.classes, start=1)}}
    return dataclasses.replace(table, cases=keep, mask_labels=labels)


def _shape(src: dict[str, torch.Tensor] | Path, key: str) -> tuple[int, ...]:
    if isinstance(src, dict):
        return tuple(src[key].shape)
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        return tuple(f.get_slice(key).get_shape())


def _read(src: dict[str, torch.Tensor] | Path, key: str, box: tuple[slice, ...] | None = None) -> torch.Tensor:
    """One stored tensor, or the ``box`` of it (only those bytes are read from a cache file)."""
    if isinstance(src, dict):
        t = src[key]
        return t[(slice(None), *box)] if box is not None else t
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        return f.get_slice(key)[(slice(None), *box)] if box is not None else f.get_tensor(key)


class ContextSegDataset(Dataset):
    """Items of one split: random patches (train) or whole volumes (val/test).

    Train item: ``image`` (C_raw + C_ctx, *patch) float, ``mask`` (1, *patch) long.
    Val/test item: ``image`` (C_raw + C_ctx, D, H, W) and ``mask`` (1, D, H, W) on the label grid,
    ``intensity`` (1, D, H, W) raw preview, ``affine`` (4, 4) of the label grid, ``orig_affine``
    (4, 4) float64 and ``orig_shape`` (3,) long = (D0, H0, W0) of the raw input file.

    Keys are ``int`` or ``(index, seed)`` as yielded by the engine's seeded sampler; the seed fixes
    the patch and its flips, so a resumed run draws the same patches.
    """

    def __init__(self, cases: list[tuple[Any, dict[str, torch.Tensor] | Path]], params: ContextSegDataParams,
                 train: bool):
        self.cases, self.params, self.train = cases, params, train
        self._indices: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases) * (self.params.samples_per_case if self.train else 1)

    def _fg_bg(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._indices:
            from monai.transforms.utils import map_binary_to_indices

            label = _read(self.cases[i][1], "label")[0].numpy()  # (D, H, W)
            fg, bg = map_binary_to_indices((label > 0)[None])  # expects channel-first (1, D, H, W)
            self._indices[i] = (np.asarray(fg), np.asarray(bg))
        return self._indices[i]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        idx, seed = key if isinstance(key, tuple) else (key, idx_seed(key))
        if not self.train:
            case, src = self.cases[idx]
            raw, ctx = _read(src, "raw"), _read(src, "context")
            return {"case_id": case.case_id, "patient_id": case.patient_id,
                    "image": torch.cat([raw.float(), ctx.float()]),  # (C_raw + C_ctx, D, H, W), split by the model
                    "mask": _read(src, "label").long(), "intensity": _read(src, "intensity").float(),
                    "affine": _read(src, "affine").numpy(),  # (4, 4) label grid: scored there
                    "orig_affine": _read(src, "raw_affine"), "orig_shape": _read(src, "raw_shape")}  # raw file grid
        ci = idx // self.params.samples_per_case
        case, src = self.cases[ci]
        rng = np.random.RandomState(seed % (2**32))
        shape = _shape(src, "label")[1:]
        patch = self.params.patch_size
        fg, bg = self._fg_bg(ci)
        import warnings

        from monai.transforms.utils import generate_pos_neg_label_crop_centers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unable to generate class balanced samples" for empty labels
            center = generate_pos_neg_label_crop_centers(patch, 1, self.params.foreground_ratio, shape, fg, bg,
                                                         rng, allow_smaller=True)[0]
        box = tuple(slice(max(0, int(c) - p // 2), max(0, int(c) - p // 2) + min(p, s))
                    for c, p, s in zip(center, patch, shape, strict=True))
        raw, ctx = _read(src, "raw", box).float(), _read(src, "context", box).float()
        label = _read(src, "label", box).long()
        pad: list[int] = []
        for have, want in zip(reversed(raw.shape[1:]), reversed(patch), strict=True):
            pad += [0, want - have]  # (W, H, D) order for F.pad; only volumes smaller than the patch
        if any(pad):
            raw, ctx, label = F.pad(raw, pad), F.pad(ctx, pad), F.pad(label, pad)
        if self.params.flip:
            dims = [1 + a for a in range(3) if rng.rand() < 0.5]
            if dims:
                raw, ctx, label = raw.flip(dims), ctx.flip(dims), label.flip(dims)
        return {"case_id": case.case_id, "patient_id": case.patient_id,
                "image": torch.cat([raw, ctx]),  # (C_raw + C_ctx, *patch), split by the model
                "mask": label}


def idx_seed(i: int) -> int:
    from medfuse.data.datamodule import derive_seed

    return derive_seed("context_seg", i)


def build_context_seg_datamodule(cfg, run_dir: Path | None = None) -> ContextSegDataModule:
    """The context_seg data module (see :class:`ContextSegDataModule`)."""
    return ContextSegDataModule(cfg, run_dir)
