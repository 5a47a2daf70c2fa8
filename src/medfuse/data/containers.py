"""Zarr (v2/v3, OME-Zarr multiscales) and N5 containers: EM volumes (CellMap, OpenOrganelle).

Kept out of :func:`medfuse.data.io.read_image`'s suffix dispatch: a Zarr/N5 "file" is a path
*inside* a container folder, and the reader needs the optional ``zarr`` package (extra
``medfuse[zarr]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfuse.data.io import _UNIT_MM, Volume, _finish, _reading
from medfuse.errors import DataError

CONTAINER_SUFFIXES: tuple[str, ...] = (".zarr", ".n5")


def split_container_path(path: str | Path) -> tuple[Path, str] | None:
    """``/d/crop.zarr/recon-1/em/s0`` -> ``(Path('/d/crop.zarr'), 'recon-1/em/s0')``.

    Returns:
        The container folder and the array/group path inside it ("" for the root), or None when no
        path component ends in ``.zarr`` or ``.n5``.
    """
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.lower().endswith(CONTAINER_SUFFIXES):
            return Path(*parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def _zarr_spacing_n5(attrs: dict) -> tuple[list[float] | None, str]:
    """N5 (x, y, z) voxel size from ``pixelResolution`` or ``resolution`` (+ ``units``), reversed to (z, y, x)."""
    res = attrs.get("pixelResolution")
    if isinstance(res, dict) and "dimensions" in res:
        return [float(v) for v in res["dimensions"]][::-1], str(res.get("unit", ""))
    if isinstance(attrs.get("resolution"), list):
        units = attrs.get("units")
        unit = str(units[0]) if isinstance(units, list) and units else ""
        return [float(v) for v in attrs["resolution"]][::-1], unit
    return None, ""


def _ome_dataset(group, level: int | str) -> tuple[str, list[float] | None, str]:
    """(array path, spacing in array order, unit) of one scale level of an OME-Zarr multiscales group."""
    ms = group.attrs.get("multiscales")
    if not isinstance(ms, list) or not ms:
        raise ValueError("a group without OME-NGFF 'multiscales' metadata; name the array inside it")
    first = ms[0]
    datasets = first.get("datasets", [])
    if isinstance(level, str):
        found = [d for d in datasets if d.get("path") == level]
        if not found:
            raise ValueError(f"no scale level '{level}' (have {[d.get('path') for d in datasets]})")
        ds = found[0]
    else:
        ds = datasets[level]
    scale = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
    axes = first.get("axes", [])
    units = [a.get("unit", "") for a in axes if isinstance(a, dict)]
    unit = next((u for u in units[-3:] if u), "")
    return str(ds["path"]), scale, unit


def read_zarr(path: str | Path, *, level: int | str = 0) -> Volume:
    """Read one array of a Zarr (v2/v3, including OME-Zarr multiscales) or N5 container.

    ``path`` runs through the container into the array, e.g. ``crop.zarr/recon-1/em/fibsem-uint8/s0``
    or ``jrc_hela.n5/em/fibsem-uint8/s1``. A path naming an OME-Zarr multiscales *group* reads scale
    ``level`` (index or dataset path). Arrays are read in their stored (C-order) axis order, which
    for OME-Zarr and for N5 through zarr's N5 store is (z, y, x), i.e. (D, H, W); 4D arrays are
    (C, D, H, W) and 5D (T=1, C, D, H, W). Voxel sizes come from OME ``coordinateTransformations`` or
    N5 ``pixelResolution``/``resolution`` and are converted to mm where the unit is known (nm for
    EM); otherwise they stay in file units (``meta["spacing_unit"] = "pixel"``).

    Raises:
        DataError: the container or array is missing or unreadable, zarr is not installed (with the
            install hint), or the array is not 3D-5D.
    """
    p = Path(path)
    split = split_container_path(p)
    if split is None:
        raise DataError(p, "is not inside a .zarr or .n5 container", "give container.zarr/path/to/array")
    root, inner = split
    if not root.exists():
        raise DataError(root, "file not found", f"check the path (relative paths start at {os.getcwd()})")
    import warnings

    try:
        import zarr
    except ImportError:
        raise DataError(p, "reading Zarr/N5 needs the optional 'zarr' package",
                        "pip install 'medfuse[zarr]'  (N5 needs zarr 2: pip install 'zarr>=2.16,<3')") from None
    n5 = root.suffix.lower() == ".n5"
    fmt = "N5" if n5 else "Zarr"
    major = int(str(zarr.__version__).split(".")[0])
    if n5 and major >= 3:
        raise DataError(p, f"zarr {zarr.__version__} cannot read N5 (zarr 3 dropped N5 support)",
                        "pip install 'zarr>=2.16,<3', or convert the container to Zarr")
    scale, unit = None, ""
    with _reading(p, fmt):
        with warnings.catch_warnings():  # zarr 2 marks N5FSStore deprecated (it is gone in zarr 3)
            warnings.simplefilter("ignore", FutureWarning)
            top = zarr.open(zarr.N5FSStore(str(root)) if n5 else str(root), mode="r")
        node = top[inner] if inner else top
        if not hasattr(node, "shape"):  # a group: OME-Zarr multiscales
            sub, scale, unit = _ome_dataset(node, level)
            node = node[sub]
        elif not n5 and inner:  # an array inside a multiscales group: the group holds its scale
            parent, _, name = inner.rpartition("/")
            group = top[parent] if parent else top
            if isinstance(group.attrs.get("multiscales"), list):
                try:
                    _, scale, unit = _ome_dataset(group, name)
                except ValueError:
                    scale, unit = None, ""
        attrs = dict(node.attrs)
        arr = np.asarray(node[...])
    if scale is None and n5:
        scale, unit = _zarr_spacing_n5(attrs)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise DataError(p, f"{fmt} array of shape {arr.shape} is not a 3D volume",
                        "point at a (z, y, x) or (c, z, y, x) array")
    spacing = [1.0, 1.0, 1.0] if scale is None else list(scale[-3:])
    key = unit.strip().lower()
    mm = _UNIT_MM.get(key)
    if mm is not None:
        spacing = [s * mm for s in spacing]
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # i = x (W), j = y (H), k = z (D)
    meta = {"format": fmt.lower(), "container": str(root), "array": inner, "hu": None,
            "spacing_unit": "mm" if mm is not None else "pixel"}
    return _finish(arr, affine, p, meta)
