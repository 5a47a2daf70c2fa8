"""Inputs of ``medfuse predict``: folders of nnU-Net-style images, single files, manifests.

nnU-Net v2 names an input image ``<case>_<XXXX>.<ending>`` with a 4-digit channel index; the case
id is the file name without the channel suffix and the ending, and predictions are written as
``<case>.<ending>``. :func:`case_id_of` strips both; :func:`image_cases` groups a list of files
(or a plain ``imagesTs`` folder) into cases, channel ``i`` being the run's ``i``-th modality.
:func:`image_shape` reads an input's (C, D, H, W) from its header where it can (the 2D/3D check).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.errors import DataError

ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npz", ".dcm")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")


def strip_ending(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000`` (the known image endings, case-insensitive)."""
    low = name.lower()
    for e in ENDINGS:
        if low.endswith(e):
            return name[: -len(e)]
    return name.split(".")[0]


def case_id_of(path: str | Path) -> str:
    """nnU-Net case id of an image file: the name without the ending and a ``_XXXX`` channel suffix."""
    stem = strip_ending(Path(path).name)
    m = _CHANNEL.match(stem)
    return m.group("case") if m else stem


def channel_of(path: str | Path) -> int | None:
    """The 4-digit channel index of an nnU-Net-style file name, or None."""
    m = _CHANNEL.match(strip_ending(Path(path).name))
    return int(m.group("chan")) if m else None


def is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ENDINGS) and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (sorted)."""
    return sorted(p for p in folder.iterdir() if is_image(p))


def is_image_folder(folder: Path) -> bool:
    """A plain folder of nnU-Net-style images (``<case>_<XXXX>.<ending>``), e.g. ``imagesTs``."""
    files = image_files(folder) if folder.is_dir() else []
    return bool(files) and all(channel_of(p) is not None for p in files)


def image_cases(files: list[Path], modalities: list[str]) -> list[Any]:
    """Group nnU-Net-style files into cases; channel ``i`` is ``modalities[i]``.

    Raises:
        DataError: a channel index beyond the run's modalities, a file without a channel suffix, or
            a case lacking every modality.
    """
    from medfuse.data.layouts import Case
    from medfuse.data.paths import check_case_id

    by_case: dict[str, dict[str, str]] = {}
    for p in files:
        chan = channel_of(p)
        if chan is None:
            raise DataError(p, "is not named <case>_<XXXX>.<ending> (nnU-Net channel suffix)",
                            "rename it, e.g. case001_0000.nii.gz for the first modality")
        if chan >= len(modalities):
            raise DataError(p, f"channel {chan:04d} but the run has {len(modalities)} modalities ({', '.join(modalities)})",
                            f"use channels 0000..{len(modalities) - 1:04d} in the order {modalities}")
        cid = check_case_id(case_id_of(p), str(p))
        by_case.setdefault(cid, {})[modalities[chan]] = str(p)
    return [Case(case_id=cid, patient_id=cid, images=imgs) for cid, imgs in sorted(by_case.items())]


def is_dicom_series(folder: Path) -> bool:
    """A folder that holds DICOM files itself (a series, read as one image), not a dataset: no
    ``dataset.json`` or manifest in it, and one of its first files is DICOM."""
    from medfuse.data.dicom_headers import looks_like_dicom

    if not folder.is_dir() or (folder / "dataset.json").exists() or any(folder.glob("*.csv")):
        return False
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))[:8]
    return any(looks_like_dicom(p) for p in files)


def dataset_test_folder(folder: Path) -> Path | None:
    """``imagesTs`` of an nnU-Net/MSD dataset folder (``dataset.json`` + ``imagesTs``), else None."""
    ts = folder / "imagesTs"
    if (folder / "dataset.json").is_file() and ts.is_dir() and image_files(ts):
        return ts
    return None


def image_shape(path: str | Path) -> tuple[int, ...]:
    """(C, D, H, W) of an image: from the header for NIfTI and for a path into a Zarr/N5 container
    (no voxels read), else by reading it."""
    from medfuse.data.containers import split_container_path
    from medfuse.data.io import image_suffix, read_image

    if split_container_path(path) is not None:
        return container_shape(path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
        except Exception:  # noqa: BLE001 - read_image reports it with the file's name
            return read_image(path).shape
        i, j, k = (*shape[:3], 1, 1, 1)[:3]
        c = int(np.prod(shape[3:])) if len(shape) > 3 else 1
        return (c, k, j, i)
    return read_image(path).shape


def container_shape(path: str | Path) -> tuple[int, ...]:
    """(C, D, H, W) of a Zarr/N5 array, or of the first scale level of an OME-Zarr multiscales group
    (e.g. CellMap's ``<ds>.zarr/recon-1/em/fibsem-uint8``), from the metadata only: the array that
    :func:`medfuse.data.containers.read_zarr` would read, without reading it (EM volumes can be terabytes).

    Raises:
        DataError: the container or node is unreadable (see :func:`~medfuse.data.containers.open_node`),
            a group names no scale level, or the array is not 3D-5D.
    """
    from medfuse.data.containers import is_array, open_node

    node = open_node(path)
    if not is_array(node):
        ms = node.attrs.get("multiscales")
        try:
            node = node[str(ms[0]["datasets"][0]["path"])]
        except Exception:  # noqa: BLE001 - no/odd multiscales metadata or a missing level: one line below
            raise DataError(path, "is a Zarr/N5 group without a readable OME-NGFF multiscales level",
                            "point at an array inside it (e.g. .../s0)") from None
    shape = tuple(int(n) for n in node.shape)
    if len(shape) == 5 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise DataError(path, f"array of shape {shape} is not a 3D volume", "point at a (z, y, x) or (c, z, y, x) array")
    return shape
