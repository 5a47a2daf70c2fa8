"""Medical image readers and the NIfTI writer (DESIGN "Arrays" contract, platform data layer).

Every reader returns a :class:`Volume`: a channel-first array ``(C, D, H, W)`` plus the file's own
RAS+ millimetre affine for the voxel index ``(i, j, k) = (w, h, d)``. ``D`` is the slowest file
axis (the slice axis ``k``), ``H`` is ``j`` and ``W`` is ``i``.

Formats (chosen by suffix; a directory is a DICOM series):

* ``.nii`` / ``.nii.gz`` (nibabel). 4D files ``(X, Y, Z, C)`` such as MSD Task01 give ``C`` channels;
  5D vector files ``(X, Y, Z, 1, C)`` as written by ITK likewise; RGB NIfTI gives 3 channels.
  ``scl_slope`` / ``scl_inter`` are applied by nibabel.
* DICOM folder or ``.dcm`` file (pydicom, :mod:`medfuse.data.dicom`): a file reads its own series,
  a folder must hold one series (or ``data.dicom.series`` names it); geometry is validated from
  ImagePositionPatient/ImageOrientationPatient (gaps, uneven spacing, duplicates, mixed
  orientations, localizers are refused unless ``data.dicom.on_gap: resample``). The array is
  pydicom's ``pixel_array * RescaleSlope + RescaleIntercept``, applied **once** per slice
  (Hounsfield units for CT, ``meta["hu"] = True``); never apply the values kept in
  ``meta["rescale_slope"]`` / ``meta["rescale_intercept"]`` again (the CT-RATE double-rescale
  bug). A DICOM SEG reads as a label map on its referenced series' grid (:mod:`medfuse.data.seg`).
  A file with no suffix that carries the ``DICM`` marker is read as DICOM too.
* ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd`` (SimpleITK). ITK's LPS origin and direction are turned
  into a RAS affine; multi-component pixels and a 4th image axis become channels.
* ``.npz``: the image is key ``"array"``, or the only key besides ``"affine"`` / ``"spacing"``. It is
  stored in medfuse order: ``(H, W)``, ``(D, H, W)`` or ``(C, D, H, W)``. Optional ``"affine"`` is
  a (4, 4) RAS affine for ``(i, j, k) = (w, h, d)``; optional ``"spacing"`` is ``(d, h, w)`` in mm
  (axis-aligned affine). Neither: spacing 1. Loaded with ``allow_pickle=False``.
* ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` (Pillow): a 2D image becomes ``(C, 1, H, W)`` with
  ``C = 1`` (grey, 16-bit, palette indices) or ``C = 3`` (colour; alpha is dropped), spacing 1.
* A folder of 2D slices named by their integer offset from the centre slice (``0.jpeg``,
  ``-1.jpeg``, ``1.jpeg``; PNG/JPG/BMP), as OmniAbnorm-CT stores a centre slice with its context:
  a thin slab ``(C, D, H, W)`` in offset order (:func:`read_slice_folder`); the offsets must be
  evenly spaced, the slice spacing is that step (in slices, ``meta["spacing_unit"] = "pixel"``).
* ``.tif`` / ``.tiff`` (tifffile): a stack ``(D, H, W)`` or ``(D, H, W, C)``; named axes (ImageJ
  hyperstacks, RGB samples) decide where channels are. Spacing comes from the X/YResolution tags
  and ImageJ ``spacing``/``unit`` metadata, converted to mm where the unit is known (else left in
  file units, ``meta["spacing_unit"] = "pixel"``); a missing value is 1. OME-XML sizes are not read.

Dtypes: floating-point images are returned as float32; integer images (label maps, raw CT) keep
their integer dtype; booleans become uint8. ``meta["hu"]`` is True/False for DICOM (from Modality)
and None (unknown) for every other format.

Errors: a missing path, an unreadable or corrupt file and an unsupported suffix raise
:class:`~medfuse.errors.DataError` whose one line names the path. Before any voxel array is
allocated, the size the header declares (shape x voxel type) is checked against the size of the
file (NIfTI, NPZ, NRRD/MHA): a header that claims more voxels than the file can hold, even
compressed, is refused (:func:`check_declared_size`); running out of memory while reading is
reported the same way, naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfuse.errors import DataError

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".nii", ".nii.gz", ".dcm", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
)  # fmt: skip

# ITK/DICOM patient coordinates are LPS; NIfTI and medfuse affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
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


def read_image(path: str | Path, *, channels_last_4d: bool = True) -> Volume:
    """Read an image file or DICOM series folder into a :class:`Volume`.

    Args:
        path: an image file (see the module docstring for suffixes) or a folder of DICOM files.
        channels_last_4d: how to read a 4D array whose axes the file does not name (NIfTI, TIFF
            without axis metadata): True for spatial axes first and channels last (NIfTI
            ``(X, Y, Z, C)`` as in MSD Task01, TIFF ``(D, H, W, C)``); False for channels first
            (NIfTI ``(C, X, Y, Z)``, TIFF ``(C, D, H, W)``), the affine then describing the last three.

    Returns:
        The volume, array (C, D, H, W).

    Raises:
        DataError: the path is missing, unsupported, unreadable or holds an unusable array.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found", f"check the path (relative paths start at {os.getcwd()})")
    if p.is_dir():
        if slice_offsets(p):
            return read_slice_folder(p)
        return _read_dicom(p)
    suffix = image_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(p, channels_last_4d)
    if suffix == ".dcm":
        return _read_dicom(p)
    if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return _read_sitk(p)
    if suffix == ".npz":
        return _read_npz(p)
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        return _read_pillow(p)
    if suffix in (".tif", ".tiff"):
        return _read_tiff(p, channels_last_4d)
    if has_dicom_marker(p):
        return _read_dicom(p)
    raise DataError(
        p,
        f"unsupported image type '{suffix or p.name}'",
        f"use one of {', '.join(SUPPORTED_SUFFIXES)} or a folder of DICOM files",
    )


def write_nifti(volume: Volume | np.ndarray, path: str | Path, affine: np.ndarray | None = None) -> Path:
    """Write a (C, D, H, W) volume as NIfTI-1 in file order (i, j, k[, c]).

    The affine (``affine`` if given, else the volume's, else identity) is stored as both sform and
    qform (code 1, scanner). The sform is exact to float32, the precision of the NIfTI-1 header;
    the qform cannot hold shears, which nibabel strips from it. ``C == 1`` writes a 3D file.
    int64 data that fits is stored as int32 and bool as uint8 for tool compatibility.

    Args:
        volume: a Volume, or an array (C, D, H, W) or (D, H, W).
        path: destination ending in ``.nii`` or ``.nii.gz``; parent folders are created.
        affine: optional (4, 4) RAS affine for (i, j, k) = (w, h, d).

    Returns:
        The written path.
    """
    import nibabel as nib

    out = Path(path)
    if image_suffix(out) not in (".nii", ".nii.gz"):
        raise DataError(out, "write_nifti needs a .nii or .nii.gz path", "change the file name suffix")
    if isinstance(volume, Volume):
        arr, aff = volume.array, volume.affine if affine is None else affine
    else:
        arr, aff = np.asarray(volume), np.eye(4) if affine is None else affine
    aff = np.asarray(aff, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or aff.shape != (4, 4):
        raise ValueError(f"write_nifti needs (C, D, H, W) and a (4, 4) affine, got {arr.shape}, {aff.shape}")
    data = arr.transpose(3, 2, 1, 0)  # (C, D, H, W) -> (i, j, k, c)
    if data.shape[-1] == 1:
        data = data[..., 0]
    data = np.ascontiguousarray(data, dtype=_nifti_dtype(data))
    img = nib.Nifti1Image(data, aff, dtype=data.dtype)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm")
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out


# ----------------------------------------------------------------------------------- slice folders

_SLICE_NAME = re.compile(r"^(-?\d+)\.(?:jpe?g|png|bmp)$", re.IGNORECASE)


def slice_offsets(folder: Path) -> dict[int, Path]:
    """``{offset: file}`` of a folder of 2D slices named by offset; empty unless offset 0 is there."""
    try:
        files = {int(m.group(1)): f for f in folder.iterdir() if f.is_file() and (m := _SLICE_NAME.match(f.name))}
    except OSError:
        return {}
    return dict(sorted(files.items())) if 0 in files else {}


def read_slice_folder(folder: str | Path, offsets: list[int] | None = None) -> Volume:
    """Read a centre slice and its context slices (files named by offset) as a thin slab.

    Args:
        folder: the folder holding ``0.<ext>`` and neighbours such as ``-1.<ext>``, ``1.<ext>``.
        offsets: the offsets to read (default: every offset-named file in the folder).

    Returns:
        A Volume (C, D, H, W) with D in offset order; ``meta["offsets"]`` lists them and
        ``meta["centre"]`` is the index of offset 0.

    Raises:
        DataError: a named offset has no file, slices differ in size or colour, or the offsets are
            not evenly spaced.
    """
    folder = Path(folder)
    found = slice_offsets(folder)
    wanted = sorted(set(offsets or found) | {0})
    missing = [o for o in wanted if o not in found]
    if missing:
        raise DataError(folder, f"has no slice for offset {missing[0]} (files: "
                        f"{', '.join(f.name for f in found.values()) or 'none'})",
                        "restore the slice files, named <offset>.jpeg")
    steps = set(np.diff(wanted).tolist())
    if len(steps) > 1:
        raise DataError(folder, f"slice offsets {wanted} are not evenly spaced", "read evenly spaced context slices")
    planes = [_read_pillow(found[o]) for o in wanted]
    shapes = {v.shape for v in planes}
    if len(shapes) > 1:
        raise DataError(folder, f"slices differ in size or channels {sorted(shapes)}", "give slices of one size")
    arr = np.concatenate([v.array for v in planes], axis=1)  # (C, D, H, W)
    step = float(steps.pop()) if steps else 1.0
    meta = {"format": "slices", "offsets": wanted, "centre": wanted.index(0), "hu": None, "spacing_unit": "pixel"}
    return _finish(arr, np.diag([1.0, 1.0, step, 1.0]), folder, meta)


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


def _nifti_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype == np.bool_:
        return np.dtype(np.uint8)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size == 0 or (data.min() >= info.min and data.max() <= info.max):
            return np.dtype(np.int32)
    if data.dtype == np.float16:
        return np.dtype(np.float32)
    return data.dtype


def has_dicom_marker(path: Path) -> bool:
    """The ``DICM`` marker at byte 128 (DICOM Part 10)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ---------------------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path, channels_last_4d: bool) -> Volume:
    import nibabel as nib

    with _reading(path, "NIfTI"):
        img = nib.load(str(path), mmap=False)
        hdr = img.header
        check_declared_size(path, tuple(int(n) for n in hdr.get_data_shape()), hdr.get_data_dtype(),
                            offset=int(hdr.get_data_offset()),
                            compressed=image_suffix(path) != ".nii", what="NIfTI header")
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        header = img.header
        # nibabel moves scl_slope/scl_inter from the loaded header into the array proxy
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
    if data.dtype.names:  # RGB24 / RGBA32 NIfTI: one structured voxel -> channels last
        data = np.stack([data[name] for name in data.dtype.names], axis=-1)
    if data.ndim == 2:  # (i, j) -> (i, j, 1)
        data = data[..., None]
    if data.ndim == 5 and data.shape[3] == 1:  # ITK vector image (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    if data.ndim == 4 and not channels_last_4d:  # (c, i, j, k) -> (i, j, k, c)
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise DataError(
            path, f"NIfTI with {data.ndim} dimensions {data.shape} is not supported",
            "store one 3D image, or channels on the 4th axis",
        )  # fmt: skip
    meta = {
        "format": "nifti",
        "dtype_on_disk": str(header.get_data_dtype()),
        "rescale_applied": slope != 1.0 or inter != 0.0,
        "hu": None,
    }
    return _finish(data.transpose(3, 2, 1, 0), affine, path, meta)  # (i, j, k, c) -> (C, D, H, W)


# ------------------------------------------------------------------------------ SimpleITK, DICOM


def _sitk_to_volume(image, path: Path, meta: dict) -> Volume:
    """SimpleITK image -> Volume: numpy (k, j, i[, c]) order is already (D, H, W[, C])."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(image)
    arr = np.moveaxis(arr, -1, 0) if ncomp > 1 else arr[None]  # (C, ...spatial reversed)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:  # (C, H, W) -> (C, 1, H, W); a unit k axis along the slice normal
        arr = arr[:, None]
        spacing, origin = np.append(spacing, 1.0), np.append(origin, 0.0)
        direction = np.pad(direction, (0, 1))
        direction[2, 2] = 1.0
    elif dim == 4 and ncomp == 1:  # (1, t, k, j, i): the 4th ITK axis holds channels
        arr = arr[0]
        spacing, origin, direction = spacing[:3], origin[:3], direction[:3, :3]
    elif dim != 3:
        raise DataError(
            path, f"{dim}D image with {ncomp} components per pixel is not supported", "store one 3D image"
        )
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    return _finish(arr, _LPS_TO_RAS @ lps, path, meta)


def _read_sitk(path: Path) -> Volume:
    import SimpleITK as sitk

    fmt = image_suffix(path).lstrip(".").upper()
    with _reading(path, fmt):
        if image_suffix(path) in (".nrrd", ".mha"):  # data in the file itself: check its declared size first
            info = sitk.ImageFileReader()
            info.SetFileName(str(path))
            info.ReadImageInformation()
            n_bytes = sitk.Image([1] * info.GetDimension(), info.GetPixelID(),
                                 info.GetNumberOfComponents()).GetSizeOfPixelComponent()
            shape = (*info.GetSize(), info.GetNumberOfComponents())
            check_declared_size(path, shape, np.dtype(f"u{n_bytes}") if n_bytes in (1, 2, 4, 8) else np.dtype("u1"),
                                compressed=True, what=f"{fmt} header")
        image = sitk.ReadImage(str(path))
    return _sitk_to_volume(image, path, {"format": fmt.lower(), "hu": None})


def _read_dicom(path: Path) -> Volume:
    """DICOM file or folder: :func:`medfuse.data.dicom.read_dicom` (options from ``use_dicom_options``)."""
    from medfuse.data.dicom import read_dicom

    with _reading(path, "DICOM"):
        return read_dicom(path)


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
