"""Reading the pixels of a text_seg record (seed 002, Talk2MedSAM): one image plane
(:func:`read_plane`: a 2D file, a single DICOM file, or a slice of a NIfTI / DICOM volume, 2.5D
optional), its mask on the image grid (:func:`read_mask`) and MedSAM's tight box of that mask
(:func:`box_from_mask`); whether a file is read as a volume (:func:`is_volume`).

A volume is read once for all its slices in a pass: :data:`VOLUMES` (a :class:`VolumeCache`) keeps
the last few volumes read, keyed by their files' size and mtime. The records and the dataset that
use these live in :mod:`medfuse.families.text_seg.data`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.errors import DataError

__all__ = ["VOLUMES", "VolumeCache", "box_from_mask", "is_volume", "read_mask", "read_plane"]


class VolumeCache:
    """The last few volumes read (least recently used first out), so that the slices of one series
    read it once per pass over records grouped by series (NSCLC: a patient's tumour slices in a row).

    An entry is keyed by the path, the reference grid (a SEG's CT), the size and mtime of every file
    they read (an edited file is read again) and, for DICOM, the ``data.dicom`` options in force
    (:func:`medfuse.data.cache.path_state`, as the disk cache keys them). Memory stays bounded: at
    most ``max_items`` volumes and ``max_bytes`` in all (a volume larger than that is read each
    time, as without the cache). Cached arrays are read-only.

    Args:
        max_items: volumes kept (a CT and its SEG are two).
        max_bytes: total size kept.
    """

    def __init__(self, max_items: int = 4, max_bytes: int = 2 << 30):
        from collections import OrderedDict

        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    @staticmethod
    def key(path: str, reference: str | None) -> str:
        from medfuse.data.cache import path_state
        from medfuse.data.dicom import current_options

        states = [path_state(str(f)) for f in (path, reference) if f is not None]
        options = dataclasses.asdict(current_options()) if any(dicom for _, dicom in states) else None
        return json.dumps([str(path), reference and str(reference), [s for s, _ in states], options],
                          sort_keys=True, default=str)

    def get(self, path: str, reference: str | None, read: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached volume of (``path``, ``reference``), or ``read()`` (kept when it fits)."""
        key = self.key(path, reference)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        arr = read()
        arr.setflags(write=False)
        if self.max_items > 0 and arr.nbytes <= self.max_bytes:
            self._items[key] = arr
            while len(self._items) > self.max_items or sum(a.nbytes for a in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
        return arr

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


VOLUMES = VolumeCache()
"""The process's :class:`VolumeCache` of :func:`_volume` (each DataLoader worker has its own)."""


def _volume(path: str, reference: str | None = None) -> np.ndarray:
    """A volume's (C, D, H, W) voxels, kept in :data:`VOLUMES` for the next records of the same case (a
    CT series is read once for all its slices). A DICOM SEG mask is placed on ``reference``'s grid (the
    case's CT)."""
    from medfuse.data import seg

    return VOLUMES.get(path, reference, lambda: seg.read_label(path, reference).array)


def read_plane(path: str, slice_index: int | None, two_and_half_d: bool, case_id: str,
               reference: str | None = None) -> np.ndarray:
    """One image plane as (C, H, W) float32: C = 1 grey, 3 RGB or 3 consecutive slices (2.5D).

    ``reference``: the case's image, for a DICOM SEG given as ``path`` (its label map on that grid).
    """
    from medfuse.data.io import image_suffix, read_image

    if image_suffix(path) == ".dcm" and reference is None:
        return _read_dicom_file(path)
    arr = _volume(path, reference) if slice_index is not None else read_image(path).array  # (C, D, H, W)
    if arr.shape[1] == 1:
        plane = arr[:, 0]
        return np.repeat(plane, 3, axis=0) if two_and_half_d and plane.shape[0] == 1 else plane.astype(np.float32)
    if slice_index is None:
        raise DataError(path, f"is a volume of {arr.shape[1]} slices", f"add a slice column for case {case_id}")
    if not 0 <= slice_index < arr.shape[1]:
        raise DataError(path, f"slice {slice_index} is outside 0..{arr.shape[1] - 1}", f"fix the slice of {case_id}")
    if two_and_half_d:
        idx = np.clip([slice_index - 1, slice_index, slice_index + 1], 0, arr.shape[1] - 1)
        return arr[0, idx].astype(np.float32)  # (3, H, W)
    return arr[:, slice_index].astype(np.float32)


def is_volume(path: str) -> bool:
    """Whether :func:`read_plane` reads ``path`` as a volume (its slices chosen by a slice column)
    rather than as one 2D image: a folder (a DICOM series) or a file of several slices is a volume,
    one DICOM file is a 2D image. A NIfTI's header is read, not its voxels.

    Raises:
        DataError: the file is missing or unreadable.
    """
    from medfuse.data.inputs import image_shape
    from medfuse.data.io import image_suffix

    if Path(path).is_dir():
        return True
    if image_suffix(path) == ".dcm":
        return False
    return image_shape(path)[1] > 1


def _read_dicom_file(path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)  # HU for CT
    except Exception as e:  # pydicom raises many types on damaged files
        raise DataError(path, f"cannot read the DICOM file ({type(e).__name__})", "check that it is intact") from None
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)[:3]


def read_mask(rec: Any, value: int | None, shape: tuple[int, int]) -> np.ndarray:
    """The target mask of a record (a :class:`~medfuse.families.text_seg.data.Record`: its ``mask``,
    ``slice_index``, ``case_id`` and ``image``) as a bool (H, W) array on the image grid."""
    plane = read_plane(rec.mask, rec.slice_index, False, rec.case_id, reference=rec.image)[0]
    if plane.shape != shape:
        raise DataError(rec.mask, f"mask is {plane.shape[0]}x{plane.shape[1]} but the image is {shape[0]}x{shape[1]}",
                        "give masks on the image grid")
    return plane > 0 if value is None else plane == value


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """MedSAM's tight box of a bool (H, W) mask, (x0, y0, x1, y1) inclusive; ``None`` when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
