"""The first step of every transform chain: :class:`LoadCased` reads a case's files onto one grid.

Each modality file is read with :func:`medfuse.data.io.read_image`; a modality on another grid is
resampled onto the first present one where its header places it over that one, a mask likewise
(nearest); the per-file rules of ``medfuse data check`` (:mod:`medfuse.data.rules`) run on every
case read and the first problem is raised as a one-line DataError. The rest of the chain is in
:mod:`medfuse.data.transforms`, which re-exports :class:`LoadCased`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor

from medfuse.data.io import read_image
from medfuse.data.labels import values_to_classes
from medfuse.data.rules import (
    CHANNEL_FIX,
    dims_problem,
    mask_outside_problem,
    mask_value_problem,
    nonfinite_problem,
    overlap_problem,
)
from medfuse.errors import DataError, MedfuseError

# Two affines closer than this (mm, per entry) describe the same grid: NIfTI stores them as float32.
_AFFINE_ATOL = 1e-4



def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` as (C, i, j, k) plus its affine; every failure is a DataError naming the file."""
    try:
        vol = read_image(path)
    except (MedfuseError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure must name the file
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {exc})", "check the file") from exc
    return vol.array.transpose(0, 3, 2, 1), vol.affine  # (C, D, H, W) -> (C, i, j, k)


def _cdhw(x: Any) -> tuple[int, ...]:
    """(C, i, j, k) shape -> (C, D, H, W)."""
    return (int(x.shape[0]), *(int(n) for n in reversed(x.shape[1:])))


def raise_first(problems: list[Any]) -> None:
    """Raise the first problem found (``None`` entries are skipped) as a one-line DataError."""
    from medfuse.data.checks import raise_first as _raise

    _raise([p for p in problems if p is not None])


def _geom(x: MetaTensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine (4, 4), shape (i, j, k)) of a (C, i, j, k) MetaTensor."""
    return x.affine.detach().cpu().numpy().astype(np.float64), tuple(int(n) for n in x.shape[1:])


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return a.shape[1:] == b.shape[1:] and np.allclose(
        a.affine.numpy(), b.affine.numpy(), atol=_AFFINE_ATOL, rtol=0.0
    )


class LoadCased(mt.MapTransform):
    """Read a case's modality files and stack them into one image on one voxel grid.

    ``item["image"]`` (a path or ``None`` per modality) becomes a float32 :class:`MetaTensor`
    ``(M, i, j, k)`` (MONAI's file-index order, ``(M, W, H, D)``) whose affine is that of the first
    present modality. A modality whose grid (shape or affine) differs from that one is resampled
    onto it with MONAI ``ResampleToMatch`` (trilinear, zeros outside its field of view). A missing
    modality (``None``) becomes zeros and ``item["present"]`` is a float tensor ``(M,)`` of 1/0.
    ``item["mask"]`` (a path) becomes an integer ``(1, i, j, k)`` MetaTensor on the same grid
    (nearest-neighbour when resampled). ``item["resampled"]`` (a str) says which modalities were
    resampled onto which ("" when none was).

    The per-file rules of ``medfuse data check`` run here, on every case read (one code path,
    :mod:`medfuse.data.checks`): ``nonfinite``, ``dims`` (a single-slice image or mask next to 3D
    volumes) and ``label`` (mask values outside ``mask_values``, or not whole numbers); the reader
    itself refuses a header that declares more voxels than its file holds.

    Args:
        modalities: modality names in channel order (for messages and a length check).
        load_mask: read ``item["mask"]``; when False the key is dropped.
        keys: the image key.
        mask_key: the mask key.
        mask_values: the label values a mask may hold (None: any whole number).
        mask_classes: the file value of each class index (:func:`label_class_values`); a mask's
            values become their class indices (None: the values are the class indices).

    Raises:
        DataError: a file is missing or unreadable, a multi-channel file lacks a valid channel
            index, voxels are NaN/inf, a mask holds undeclared or non-integer values, a 2D file
            sits among 3D ones, or the case has no modality.
    """

    def __init__(self, modalities: Sequence[str], load_mask: bool = True, keys: str = "image",
                 mask_key: str = "mask", mask_values: Sequence[int] | None = None,
                 mask_classes: Sequence[int] | None = None) -> None:
        super().__init__(keys)
        self.modalities = list(modalities)
        self.load_mask = load_mask
        self.mask_key = mask_key
        self.mask_values = None if mask_values is None else [int(v) for v in mask_values]
        self.mask_classes = None if mask_classes is None else [int(v) for v in mask_classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get("case_id", "?")
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # a 4D file shared by modalities is read once
        for key in self.key_iterator(d):
            paths = list(d[key])
            if len(paths) != len(self.modalities):
                raise ValueError(f"case {case}: {len(paths)} image paths for modalities {self.modalities}")
            chans = list(d.pop("channel_index", None) or [None] * len(paths))
            loaded = [None if p is None else self._channel(str(p), c, m, cache, str(case))
                      for p, c, m in zip(paths, chans, self.modalities, strict=True)]
            ref = next((x for x in loaded if x is not None), None)
            if ref is None:
                raise DataError(f"case {case}", "has none of the modalities " + ", ".join(self.modalities),
                                "give at least one image per case")
            ref_m = self.modalities[loaded.index(ref)]
            for x, p, m in zip(loaded, paths, self.modalities, strict=True):
                if x is not None:
                    raise_first([dims_problem(f"image '{ref_m}'", _cdhw(ref), f"image '{m}'", _cdhw(x),
                                              str(p), str(case))])
                    if not _same_grid(x, ref):
                        raise_first([overlap_problem(f"image '{ref_m}'", _geom(ref), f"image '{m}'", _geom(x),
                                                     str(p), str(case))])
            resample = mt.ResampleToMatch(mode="bilinear", padding_mode="zeros")
            chans_out = [torch.zeros_like(ref.as_tensor()) if x is None
                         else x.as_tensor() if _same_grid(x, ref)
                         else resample(x, img_dst=ref).as_tensor().float()
                         for x in loaded]
            d[key] = MetaTensor(torch.cat(chans_out), affine=ref.affine.clone(),
                                meta={"filename_or_obj": ref.meta["filename_or_obj"]})  # (M, i, j, k)
            d["present"] = torch.tensor([0.0 if x is None else 1.0 for x in loaded])
            moved = [m for x, m in zip(loaded, self.modalities, strict=True) if x is not None and not _same_grid(x, ref)]
            # said once per case by predict (engine.predict.Predictor.note_resampled)
            d["resampled"] = (f"image(s) {', '.join(repr(m) for m in moved)} resampled (trilinear) onto the "
                              f"grid of image '{ref_m}'") if moved else ""
            # the input's own grid, for writing predictions back onto it (engine.inference.to_input_grid)
            d["orig_affine"] = ref.affine.detach().cpu().to(torch.float64).clone()  # (4, 4)
            d["orig_shape"] = torch.tensor(_cdhw(ref)[1:], dtype=torch.long)  # (3,) = (D, H, W)
            if self.load_mask and d.get(self.mask_key) is not None:
                d[self.mask_key] = self._mask(str(d[self.mask_key]), ref, cache, str(case))
            else:
                d.pop(self.mask_key, None)
        return d

    def _channel(self, path: str, chan: int | None, modality: str,
                 cache: dict[str, tuple[np.ndarray, np.ndarray]], case: str = "?") -> MetaTensor:
        """One modality as float32 (1, i, j, k)."""
        if path not in cache:
            cache[path] = _read(path)
        arr, affine = cache[path]
        n = arr.shape[0]
        if chan is None and n != 1:
            raise DataError(path, f"has {n} channels but no channel index is given for modality '{modality}'",
                            CHANNEL_FIX.format(m=modality, last=n - 1))
        c = 0 if chan is None else chan
        if not -n <= c < n:
            raise DataError(path, f"has {n} channels; channel {c} of modality '{modality}' is out of range",
                            f"use a channel index in 0..{n - 1}")
        c %= n
        x = np.asarray(arr[c : c + 1], dtype=np.float32)
        if not np.isfinite(x).all():
            raise_first([nonfinite_problem(x, path, f"image '{modality}'", case)])
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(x)), affine=torch.as_tensor(affine),
                          meta={"filename_or_obj": path})

    def _mask(self, path: str, ref: MetaTensor, cache: dict[str, tuple[np.ndarray, np.ndarray]],
              case: str = "?") -> MetaTensor:
        """The label map as int32 (1, i, j, k) on ``ref``'s grid (class indices with ``mask_classes``)."""
        arr, affine = cache[path] if path in cache else _read(path)
        if arr.shape[0] != 1:
            raise DataError(path, f"a mask must have one channel, this one has {arr.shape[0]}",
                            "store the label map as a single 3D image")
        raise_first([dims_problem("image", _cdhw(ref), "mask", _cdhw(arr), path, case)])
        if arr.dtype.kind == "f":
            raise_first([nonfinite_problem(arr, path, "mask", case)])
        values, counts = np.unique(arr, return_counts=True)
        raise_first([mask_value_problem(values, counts, self.mask_values, path, case)])
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise DataError(path, "mask values do not fit in int32", "store small integer class labels")
        if self.mask_classes is not None:  # declared values (e.g. 0/255) -> class indices 0..K-1
            arr = values_to_classes(arr, self.mask_classes, path)
        mask = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int32)),
                          affine=torch.as_tensor(affine), meta={"filename_or_obj": path})
        if _same_grid(mask, ref):
            return mask
        raise_first([mask_outside_problem("its image", _geom(ref), arr[0], np.asarray(affine, np.float64), path, case)])
        out = mt.ResampleToMatch(mode="nearest", padding_mode="zeros")(mask.float(), img_dst=ref)
        return MetaTensor(out.as_tensor().round().to(torch.int32), affine=ref.affine.clone(),
                          meta={"filename_or_obj": path})
