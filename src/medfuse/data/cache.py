"""Datasets over case items (:func:`~medfuse.data.transforms.case_to_item`): plain, or with the
deterministic part of the transform chain cached on disk (:func:`build_dataset`).

The disk cache is a MONAI ``PersistentDataset`` made safe for several processes and for loading:
entries are written atomically by one process, keyed by the item and the size and modification time
of every file it names (an edited image invalidates its entry; a DICOM item also keys on its
series' files and the ``data.dicom`` options), and loaded with
``torch.load(weights_only=True)`` (MetaTensor geometry is stored as plain tensors and rebuilt), so
no cache file ever runs code.

Both datasets carry the ``data.dicom`` options they read with and set them around every item (key
and read alike), so a DataLoader worker reads as the main process does whether it was forked or
spawned (a spawned worker starts a fresh interpreter, without the main process's options).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor, PersistentDataset
from monai.utils import convert_to_tensor

from medfuse.data.dicom import DicomOptions, as_dicom_options, current_options, use_dicom_options
from medfuse.data.dicom_headers import looks_like_dicom
from medfuse.data.io import SUPPORTED_SUFFIXES, image_suffix
from medfuse.data.transforms import raise_user_error
from medfuse.fileio import atomic_open, claim

__all__ = ["CachedDataset", "CaseDataset", "build_dataset", "file_state_hash", "path_state"]

# Key under which CachedDataset keeps MetaTensor geometry while the item sits in the disk cache.
_META_KEY = "_medfuse_meta"


# Suffixes read by other readers: such a file is never a DICOM series (its header is not opened).
_NOT_DICOM = frozenset(SUPPORTED_SUFFIXES) - {".dcm"}


def _files_state(folder: Path, files: list[Path]) -> list[list[Any]]:
    return [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def path_state(path: str) -> tuple[list[Any], bool]:
    """([path, size, mtime_ns], reads DICOM) of a file; a folder (DICOM series) lists every file
    inside it, and so does a DICOM file's own folder (one file of a series is read with its series)."""
    p = Path(path)
    try:
        if p.is_dir():
            return [path, _files_state(p, sorted(f for f in p.rglob("*") if f.is_file()))], True
        st = os.stat(p)
        if image_suffix(p) not in _NOT_DICOM and looks_like_dicom(p):  # no marker read for NIfTI & co
            return [path, st.st_size, st.st_mtime_ns,
                    _files_state(p.parent, sorted(f for f in p.parent.iterdir() if f.is_file()))], True
        return [path, st.st_size, st.st_mtime_ns], False
    except OSError:
        return [path, None, None], False  # the load will raise a DataError naming the file


def file_state_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of an item: the item itself plus size and mtime of every file it references.

    Editing or replacing a file changes its size or modification time and hence the key, so the
    stale cache entry is simply not used again. An item that reads DICOM (a series folder, a file of
    a series, a SEG) also keys on the files beside it and on the ``data.dicom`` options in force
    (``on_gap``, ``series``, ...), which change what is read.
    """
    paths = [p for p in item.get("image", []) if p] + ([item["mask"]] if item.get("mask") else [])
    states = [path_state(str(p)) for p in paths]
    payload: dict[str, Any] = {"item": item, "files": [state for state, _ in states]}
    if any(dicom for _, dicom in states):
        payload["dicom"] = asdict(current_options())
    dump = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(dump).hexdigest().encode()


class _UserErrors:
    """Dataset mixin: each item is keyed and read with :attr:`dicom_options` (None: the options in
    force in the reading process), and a MedfuseError from the transform is raised as itself, not in
    a RuntimeError."""

    dicom_options: DicomOptions | None = None

    def _transform(self, index: int) -> Any:
        opts = self.dicom_options
        with nullcontext() if opts is None else use_dicom_options(opts):
            try:
                return super()._transform(index)  # type: ignore[misc]
            except RuntimeError as exc:
                raise_user_error(exc)
                raise


class CaseDataset(_UserErrors, Dataset):
    """``monai.data.Dataset`` that raises a MedfuseError from its transform unwrapped."""


class CachedDataset(_UserErrors, PersistentDataset):
    """``PersistentDataset`` whose cache files load with ``torch.load(weights_only=True)``.

    MetaTensors are stored as plain tensors plus their affine and file name and are rebuilt on
    load, because MONAI's MetaTensor metadata (enums, transform traces) is not loadable with
    ``weights_only=True``, and an unpickling load must never run code from a file. A MedfuseError
    from the transform is raised unwrapped, as in :class:`CaseDataset`.
    """

    def _pre_transform(self, item_transformed: Any) -> Any:
        return _strip_meta(super()._pre_transform(item_transformed))

    def _cachecheck(self, item_transformed: Any) -> Any:
        """MONAI's cache lookup (same file names), but rank-safe: an entry is written atomically in
        the cache folder itself (MONAI writes it under the system temp folder and moves it, a copy
        that a reader can catch half-written when the folders are on different file systems) by
        one process (:func:`medfuse.fileio.claim`); an unreadable entry is recomputed."""
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        key = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
        hashfile = Path(self.cache_dir) / f"{key}.pt"
        cached = _read_cached(hashfile)
        if cached is not None:
            return cached
        with claim(hashfile) as mine:
            if not mine:
                cached = _read_cached(hashfile)
                if cached is not None:
                    return cached
            item = self._pre_transform(deepcopy(item_transformed))  # keep the hashed item as it is
            with atomic_open(hashfile, "wb") as f:
                torch.save(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), f)
        return item

    def _post_transform(self, item_transformed: Any) -> Any:
        out = super()._post_transform(_restore_meta(item_transformed))
        if isinstance(out, dict) and isinstance(out.get("affine"), torch.Tensor):
            out["affine"] = out["affine"].numpy().astype(np.float64)  # the cache turned numpy into tensors
        return out


def _read_cached(path: Path) -> Any:
    """A cache entry loaded with ``weights_only=True``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        warnings.warn(f"transform cache entry {path} unreadable ({type(e).__name__}); recomputing it", stacklevel=2)
        return None


def _strip_meta(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    out, meta = dict(item), {}
    for key, value in item.items():
        if isinstance(value, MetaTensor):
            name = str(value.meta.get("filename_or_obj", ""))
            meta[key] = {"affine": value.affine.clone(), "filename_or_obj": name}
            out[key] = value.as_tensor().clone()
    if meta:
        out[_META_KEY] = meta
    return out


def _restore_meta(item: Any) -> Any:
    if not isinstance(item, dict) or _META_KEY not in item:
        return item
    out = dict(item)
    for key, m in out.pop(_META_KEY).items():
        out[key] = MetaTensor(out[key], affine=m["affine"], meta={"filename_or_obj": m["filename_or_obj"]})
    return out


def build_dataset(items: list[dict[str, Any]], transform: Any, cache_dir: str | Path | None = None,
                  dicom: DicomOptions | Mapping[str, Any] | Any | None = None) -> torch.utils.data.Dataset:
    """A dataset over ``items``, optionally caching the deterministic transforms on disk.

    Args:
        items: plain items from :func:`case_to_item`.
        transform: the chain from :func:`build_transforms`.
        cache_dir: None for a :class:`CaseDataset` (a ``monai.data.Dataset``); else a :class:`CachedDataset`
            (PersistentDataset) there. Its key is :func:`file_state_hash` of the item (so an edited
            image or mask invalidates its entry) plus the chain's ``fingerprint`` (so a changed
            transforms config, or a train vs eval chain, never reuses another's entries).
        dicom: the ``data.dicom`` options (a :class:`~medfuse.data.dicom.DicomOptions`, a dict or
            the config section) every item is keyed and read with, in whichever process reads it;
            None: those in force now (:func:`~medfuse.data.dicom.current_options`). They travel
            with the dataset into DataLoader workers, spawned ones included.

    Returns:
        The dataset; ``ds[i]`` is the transformed item.
    """
    opts = current_options() if dicom is None else as_dicom_options(dicom)
    if cache_dir is None:
        ds: Any = CaseDataset(data=items, transform=transform)
        ds.dicom_options = opts
        return ds
    ds = CachedDataset(data=items, transform=transform, cache_dir=Path(cache_dir), hash_func=file_state_hash)
    ds.dicom_options = opts
    fingerprint = getattr(transform, "fingerprint", None) or type(transform).__name__
    digest = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:16].encode()
    ds.set_transform_hash(lambda _transforms: b"-" + digest)
    return ds
