"""The :class:`Volume` every image reader returns, and the helpers the readers share.

A :class:`Volume` is a channel-first array ``(C, D, H, W)`` plus the file's own RAS+ millimetre
affine for the voxel index ``(i, j, k) = (w, h, d)`` (DESIGN "Arrays" contract; the formats and
their axis rules are listed in :mod:`medfuse.data.io`). The helpers turn a reader's array into one
(:func:`_finish`: floats become float32, integers keep their dtype, booleans become uint8), turn any
library failure into a one-line :class:`~medfuse.errors.DataError` naming the file (:func:`_reading`),
and refuse a header that declares more voxels than its file can hold before anything is allocated
(:func:`check_declared_size`).

The readers that use them: :mod:`medfuse.data.io` (dispatch, NIfTI, SimpleITK, DICOM),
:mod:`medfuse.data.plain_formats` (NPZ, PNG/JPG/BMP, TIFF) and :mod:`medfuse.data.containers`
(Zarr/N5). Every name here stays importable from :mod:`medfuse.data.io`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfuse.errors import DataError

# Length units found in TIFF/ImageJ metadata, in millimetres.
_UNIT_MM = {
    "mm": 1.0, "millimeter": 1.0, "millimetre": 1.0, "cm": 10.0, "centimeter": 10.0, "m": 1000.0,
    "meter": 1000.0, "inch": 25.4, "in": 25.4, "um": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "\\u00b5m": 1e-3,
    "micron": 1e-3, "microns": 1e-3, "micrometer": 1e-3, "nm": 1e-6, "nanometer": 1e-6,
}  # fmt: skip


@dataclass
class Volume:
    """An image as a channel-first array with the geometry of its file.

    Attributes:
        array: (C, D, H, W) voxels; float32 for float images, an integer dtype for integer images.
        affine: (4, 4) float64 RAS+ mm affine mapping voxel index (i, j, k) = (w, h, d) to world.
        path: the source file or DICOM folder ("" if made in memory).
        meta: format details, e.g. ``{"format": "dicom", "hu": True, "rescale_applied": True}``.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, D, H, W), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be (4, 4), got shape {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (d, h, w) in mm: norms of the affine's k, j and i columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # (i, j, k)
        return (float(norms[2]), float(norms[1]), float(norms[0]))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`, (C, D, H, W)."""
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        """Axis codes of (i, j, k), e.g. ``"RAS"`` or ``"LPS"`` (``?`` for a degenerate axis)."""
        from nibabel.orientations import aff2axcodes

        return "".join(code or "?" for code in aff2axcodes(self.affine))

    def channel(self, c: int) -> Volume:
        """Channel ``c`` as a (1, D, H, W) volume sharing memory with this one."""
        idx = range(self.array.shape[0])[c]  # IndexError for a bad channel, negatives allowed
        return Volume(self.array[idx : idx + 1], self.affine.copy(), self.path, {**self.meta, "channel": idx})

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing=({sp}), "
            f"orientation={self.orientation!r}, path={self.path!r})"
        )


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix of ``path``, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


# --------------------------------------------------------------------------------------- helpers


def _short(exc: BaseException) -> str:
    """First informative line of a library error, short enough for a one-line message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "ERROR" in ln), lines[0] if lines else "")
    line = line.split("ERROR:")[-1].strip() if "ERROR:" in line else line
    text = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Turn any library failure while reading ``path`` into a one-line DataError."""
    try:
        yield
    except (DataError, KeyboardInterrupt):
        raise
    except MemoryError as exc:
        raise DataError(path, f"not enough memory to read this {fmt} file", "check the image size in its header, "
                        "or read it on a machine with more memory") from exc
    except Exception as exc:  # noqa: BLE001 - third-party readers raise anything on bad input
        raise DataError(
            path, f"cannot read {fmt}: {_short(exc)}", f"check that it is a complete, valid {fmt} file"
        ) from exc


# deflate (gzip, zlib, zip) compresses at most about 1032:1
MAX_COMPRESSION_RATIO = 1100


def _nbytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def check_declared_size(path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0,
                        compressed: bool = False, what: str = "header") -> None:
    """Refuse a header whose shape x voxel size cannot fit in the file, before anything is allocated.

    Args:
        path: the image file.
        shape: the shape the header declares (any axis order; channels included).
        dtype: the voxel type on disk.
        offset: bytes before the voxel data (NIfTI ``vox_offset``).
        compressed: the voxels may be compressed: allow up to :data:`MAX_COMPRESSION_RATIO` times the
            file size; otherwise the data must fit exactly after ``offset``.

    Raises:
        DataError: naming the file, the declared shape and both sizes.
    """
    if any(n < 0 for n in shape):
        raise DataError(path, f"{what} declares a negative size {shape}", "re-export the file (its header is corrupt)")
    declared = float(np.prod([float(n) for n in shape])) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    room = size * MAX_COMPRESSION_RATIO if compressed else size - offset
    if declared > room:
        held = f"a file of {_nbytes(size)}" if compressed else f"{_nbytes(max(size - offset, 0))} of voxel data"
        raise DataError(path, f"{what} declares {' x '.join(str(n) for n in shape)} voxels of "
                        f"{np.dtype(dtype)} ({_nbytes(declared)}), more than {held} can hold",
                        "re-export the file (it is truncated or its header is corrupt)")


def _as_output_dtype(arr: np.ndarray, path: Path) -> np.ndarray:
    """Float -> float32; integers kept; bool -> uint8; anything else is refused."""
    kind = arr.dtype.kind
    if kind == "f":
        return arr.astype(np.float32, copy=False)
    if kind in "iu":
        return arr
    if kind == "b":
        return arr.astype(np.uint8)
    raise DataError(path, f"unsupported voxel type {arr.dtype}", "save the image with real-valued voxels")


def _finish(arr: np.ndarray, affine: np.ndarray, path: Path, meta: dict) -> Volume:
    arr = np.ascontiguousarray(_as_output_dtype(np.asarray(arr), path))
    return Volume(arr, np.asarray(affine, dtype=np.float64), str(path), meta)


# ------------------------------------------------------------------------------------ field of view


def voxel_lattice(ijk: tuple[int, ...], per_axis: int = 16) -> np.ndarray:
    """Voxel indices ``(N, 3)`` of an evenly spaced lattice over a grid of shape ``ijk`` = (i, j, k),
    at most ``per_axis`` per axis, the first and last voxels included."""
    axes = [np.unique(np.linspace(0, max(int(n), 1) - 1, min(max(int(n), 1), per_axis)).round()) for n in ijk[:3]]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def inside_fraction(ijk_points: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray,
                    grid_ijk: tuple[int, ...]) -> float:
    """The fraction of points that fall inside another grid's field of view.

    Args:
        ijk_points: (N, 3) voxel indices (i, j, k) of points under ``affine``.
        affine: (4, 4) RAS affine of the points' grid.
        grid_affine: (4, 4) RAS affine of the grid whose field of view is tested.
        grid_ijk: that grid's shape (i, j, k): its field of view is the box of its voxels,
            ``-0.5 .. n - 0.5`` along each axis.

    Returns:
        The fraction in [0, 1] (1.0 for no points); 0.0 when ``grid_affine`` is singular.
    """
    pts = np.asarray(ijk_points, dtype=np.float64).reshape(-1, 3)
    if not len(pts):
        return 1.0
    homog = np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T  # (4, N)
    try:
        to_grid = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    except np.linalg.LinAlgError:
        return 0.0
    idx = (to_grid @ homog)[:3]  # (3, N) in the tested grid's voxel index space
    n = np.asarray([max(int(x), 1) for x in grid_ijk[:3]], dtype=np.float64)[:, None]
    return float(((idx > -0.5 - 1e-6) & (idx < n - 0.5 + 1e-6)).all(0).mean())
