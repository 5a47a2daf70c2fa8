"""Readers of the plain (non-medical) image formats: NPZ, PNG/JPG/BMP (Pillow) and TIFF (tifffile).

:func:`medfuse.data.io.read_image` picks them by suffix; each returns a
:class:`~medfuse.data.volume.Volume` ``(C, D, H, W)``. NPZ stores the image in medfuse order with an
optional ``"affine"`` or ``"spacing"``; a 2D picture becomes ``(C, 1, H, W)``; a TIFF stack
``(D, H, W[, C])`` takes its spacing from the resolution tags and ImageJ metadata. The full rules
for each format are in the :mod:`medfuse.data.io` docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfuse.data.volume import _UNIT_MM, Volume, _finish, _nbytes, _reading, image_suffix
from medfuse.errors import DataError

# ------------------------------------------------------------------------------------------- NPZ


def _npz_check_sizes(path: Path) -> None:
    """Refuse an ``.npy`` member whose header declares more bytes than the archive stores for it."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(fh)  # the header only
            if dtype.hasobject:
                continue  # refused by np.load(allow_pickle=False) below
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > info.file_size:
                raise DataError(path, f"array '{info.filename[:-4]}' declares shape {tuple(shape)} {dtype} "
                                f"({_nbytes(declared)}) but the file stores {_nbytes(info.file_size)} for it",
                                "re-export the file (it is truncated or its header is corrupt)")


def _read_npz(path: Path) -> Volume:
    with _reading(path, "NPZ"):
        _npz_check_sizes(path)
    with _reading(path, "NPZ"), np.load(str(path), allow_pickle=False) as npz:
        keys = list(npz.files)
        data_keys = [k for k in keys if k not in ("affine", "spacing")]
        key = "array" if "array" in keys else (data_keys[0] if len(data_keys) == 1 else None)
        if key is None:
            problem = f"cannot tell which array is the image among keys {data_keys}"
            raise DataError(path, problem, "name the image key 'array'")
        arr = npz[key]
        affine = np.asarray(npz["affine"], dtype=np.float64) if "affine" in keys else None
        spacing = np.asarray(npz["spacing"], dtype=np.float64).ravel() if "spacing" in keys else None
    if arr.ndim not in (2, 3, 4):
        fix = "store (H, W), (D, H, W) or (C, D, H, W)"
        raise DataError(path, f"array '{key}' has shape {arr.shape}", fix)
    arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
    if spacing is not None and (spacing.shape != (3,) or not np.all(spacing > 0)):
        raise DataError(path, f"'spacing' must be 3 positive numbers (d, h, w), got {spacing.tolist()}",
                        "store spacing as [d, h, w] in mm")  # fmt: skip
    if affine is not None and affine.shape != (4, 4):
        raise DataError(path, f"'affine' must be (4, 4), got {affine.shape}", "store a 4x4 RAS affine")
    if affine is None:
        affine = np.diag([*(spacing[::-1] if spacing is not None else (1.0, 1.0, 1.0)), 1.0])
    elif spacing is not None and not np.allclose(np.linalg.norm(affine[:3, :3], axis=0)[::-1], spacing):
        raise DataError(path, "'affine' and 'spacing' disagree", "store only one of them")
    return _finish(arr, affine, path, {"format": "npz", "key": key, "hu": None})


# ---------------------------------------------------------------------------------- PNG/JPG/BMP


def _read_pillow(path: Path) -> Volume:
    from PIL import Image

    meta: dict = {"format": image_suffix(path).lstrip("."), "hu": None}
    with _reading(path, meta["format"].upper()), Image.open(str(path)) as im:
        im.load()
        mode = im.mode
        if mode == "P":  # palette PNGs are usually label maps: keep the indices
            meta["palette"] = True
        elif mode in ("LA", "La"):
            im = im.convert("L")
        elif mode not in ("1", "L", "I", "F") and not mode.startswith("I;16") and mode != "RGB":
            meta["converted_from"] = mode  # RGBA, CMYK, YCbCr, PA, ...: alpha dropped
            im = im.convert("RGB")
        arr = np.array(im)
    arr = np.moveaxis(arr, -1, 0)[:, None] if arr.ndim == 3 else arr[None, None]  # (C, 1, H, W)
    return _finish(arr, np.eye(4), path, meta)


# ------------------------------------------------------------------------------------------ TIFF


def _tiff_spacing(tif) -> tuple[tuple[float, float, float], str]:
    """(x, y, z) voxel size in mm (or in pixels when the unit is unknown) and the unit used."""
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    sizes = []
    for tag in ("XResolution", "YResolution"):
        value = page.tags[tag].value if tag in page.tags else (1, 1)
        num, den = value if isinstance(value, tuple) else (value, 1)
        sizes.append(float(den) / float(num) if num else 1.0)
    sizes.append(float(ij.get("spacing", 1.0)))
    res_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 1
    unit = str(ij.get("unit", "")).strip().lower() or {2: "inch", 3: "cm"}.get(res_unit, "")
    if unit not in _UNIT_MM:
        return (sizes[0], sizes[1], sizes[2]), "pixel"
    scale = _UNIT_MM[unit]
    return (sizes[0] * scale, sizes[1] * scale, sizes[2] * scale), "mm"


def _read_tiff(path: Path, channels_last_4d: bool) -> Volume:
    import tifffile

    with _reading(path, "TIFF"), tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        arr = np.asarray(series.asarray())
        axes = series.axes.upper()
        spacing, unit = _tiff_spacing(tif)
    if len(axes) != arr.ndim:
        axes = "Q" * (arr.ndim - 2) + "YX"
    # Drop unit axes the file names (T, Z, C, ...) but keep unnamed ones, whose order is all we know.
    keep = [n > 1 or a in "QYX" for a, n in zip(axes, arr.shape, strict=True)]
    arr = arr.reshape([n for n, k in zip(arr.shape, keep, strict=True) if k])
    axes = "".join(a for a, k in zip(axes, keep, strict=True) if k)
    chan = [i for i, a in enumerate(axes) if a in "CS"]
    if len(chan) == 1:
        arr = np.moveaxis(arr, chan[0], 0)
    elif arr.ndim == 4 and not chan:  # unnamed 4D: (D, H, W, C) or (C, D, H, W)
        arr = np.moveaxis(arr, -1, 0) if channels_last_4d else arr
    else:
        arr = arr[None]
    if arr.ndim == 3:  # (C, H, W) -> (C, 1, H, W)
        arr = arr[:, None]
    if arr.ndim != 4 or len(chan) > 1:
        raise DataError(
            path, f"TIFF with axes '{series.axes}' and shape {series.shape} is not a 3D stack",
            "save one (D, H, W) or (D, H, W, C) stack per file",
        )  # fmt: skip
    affine = np.diag([*spacing, 1.0])  # i = x (W), j = y (H), k = z (D)
    return _finish(
        arr, affine, path, {"format": "tiff", "axes": series.axes, "spacing_unit": unit, "hu": None}
    )
