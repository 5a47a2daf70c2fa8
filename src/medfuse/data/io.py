"""Medical image readers and the NIfTI writer (DESIGN "Arrays" contract, platform data layer).

Every reader returns a :class:`Volume`: a channel-first array ``(C, D, H, W)`` plus the file's own
RAS+ millimetre affine for the voxel index ``(i, j, k) = (w, h, d)``. ``D`` is the slowest file
axis (the slice axis ``k``), ``H`` is ``j`` and ``W`` is ``i``.

Formats (chosen by suffix; a directory is a DICOM series):

* ``.nii`` / ``.nii.gz`` (nibabel). 4D files ``(X, Y, Z, C)`` such as MSD Task01 give ``C`` channels;
  5D vector files ``(X, Y, Z, 1, C)`` as written by ITK likewise; RGB NIfTI gives 3 channels.
  ``scl_slope`` / ``scl_inter`` are applied by nibabel. The affine is the sform (the qform where
  only it is set); a header with neither (both codes 0), or whose qform and sform place the grid
  more than half a voxel apart, is refused: readers disagree on such files.
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
compressed, is refused (:func:`~medfuse.data.volume.check_declared_size`); running out of memory while
reading is reported the same way, naming the file.

Where the code lives: this module holds :func:`read_image` (the dispatch), :func:`write_nifti`, the
slice folders and the NIfTI, SimpleITK and DICOM entry readers; the NPZ, PNG/JPG/BMP and TIFF
readers are in :mod:`medfuse.data.plain_formats`; :class:`Volume` and the helpers every reader
shares are in :mod:`medfuse.data.volume` (all still importable from here).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from medfuse.data.dicom_headers import has_dicom_marker
from medfuse.data.plain_formats import (  # noqa: F401 - the names that moved to plain_formats.py stay importable here
    _npz_check_sizes,
    _read_npz,
    _read_pillow,
    _read_tiff,
    _tiff_spacing,
)
from medfuse.data.volume import (  # noqa: F401 - the names that moved to volume.py stay importable here
    _UNIT_MM,
    MAX_COMPRESSION_RATIO,
    Volume,
    _as_output_dtype,
    _finish,
    _nbytes,
    _reading,
    _short,
    check_declared_size,
    image_suffix,
)
from medfuse.errors import DataError

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".nii", ".nii.gz", ".dcm", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
)  # fmt: skip

# ITK/DICOM patient coordinates are LPS; NIfTI and medfuse affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        raise DataError(p, "file not found", "check the path" + ("" if p.is_absolute() else
                                                                 f" (relative paths start at {os.getcwd()})"))
    if p.is_dir():
        if slice_offsets(p):
            return read_slice_folder(p)
        if any(part.lower().endswith((".zarr", ".n5")) for part in p.parts):
            raise DataError(p, "is a Zarr/N5 group or array, not an image file or a DICOM folder",
                            "use it where Zarr/N5 paths are read (context_seg raw/context volumes, the CellMap "
                            "layout), or convert it to NIfTI")
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
    the qform cannot hold shears, so an affine with one is written as the sform alone (qform code
    0) rather than as a qform that disagrees with it. ``C == 1`` writes a 3D file.
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
    apart, voxel = _grid_apart(img.get_qform(), img.get_sform(), data.shape)
    if apart > 1e-3 * voxel:  # a shear the qform cannot hold: a qform without it would disagree
        img.set_qform(None, code=0)
    img.header.set_xyzt_units("mm")
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out


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


# ---------------------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path, channels_last_4d: bool) -> Volume:
    import nibabel as nib

    with _reading(path, "NIfTI"):
        img = nib.load(str(path), mmap=False)
        hdr = img.header
        check_declared_size(path, tuple(int(n) for n in hdr.get_data_shape()), hdr.get_data_dtype(),
                            offset=int(hdr.get_data_offset()),
                            compressed=image_suffix(path) != ".nii", what="NIfTI header")
        affine_source = _nifti_geometry(path, hdr)
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
        "affine_source": affine_source,
    }
    return _finish(data.transpose(3, 2, 1, 0), affine, path, meta)  # (i, j, k, c) -> (C, D, H, W)


def _grid_apart(q: np.ndarray, s: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """How far apart two (4, 4) affines place the grid: the largest distance in mm between a corner
    voxel of ``shape`` (i, j, k, ...) under ``q`` and under ``s``, and the smallest voxel size of ``s``."""
    n = [max(int(x), 1) for x in (tuple(shape) + (1, 1, 1))[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0] - 1) for j in (0, n[1] - 1)
                        for k in (0, n[2] - 1)]).T  # (4, 8) voxel indices of the grid corners
    apart = float(np.linalg.norm((q @ corners - s @ corners)[:3], axis=0).max())
    return apart, float(np.linalg.norm(s[:3, :3], axis=0).min())


def _nifti_geometry(path: Path, hdr) -> str:
    """Which header field gives the voxel-to-world affine: ``"sform"`` or ``"qform"``.

    Readers disagree where the header is ambiguous (nibabel prefers the sform, ITK may take the
    qform; with both codes 0 nibabel falls back to an ANALYZE-style affine with x flipped, ITK to
    an identity direction at the origin), so such a file is refused instead of read one way:

    * ``qform_code`` and ``sform_code`` both 0: the header gives no orientation or origin;
    * both set, and some corner voxel of the grid lands more than half the smallest voxel size
      apart under the two affines.

    Raises:
        DataError: naming the file, the codes or the distance, and how to repair the header.
    """
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode == 0 and scode == 0:
        raise DataError(path, "header gives no orientation or origin (qform_code and sform_code are both 0), "
                        "so tools disagree on where its voxels lie",
                        "re-convert the scan from DICOM (e.g. dcm2niix), or, if its orientation is known, write "
                        "it into the header (nibabel: img.set_sform(affine, code=1))")
    if qcode == 0 or scode == 0:
        return "sform" if scode else "qform"
    apart, voxel = _grid_apart(hdr.get_qform(), hdr.get_sform(), hdr.get_data_shape())
    if not np.isfinite(apart) or apart > 0.5 * voxel:
        raise DataError(path, f"qform and sform disagree: a corner voxel lies {apart:.3g} mm apart under the two "
                        f"(voxel size {voxel:.3g} mm), so tools disagree on where its voxels lie",
                        "make them agree (fslorient -copysform2qform, or nibabel: img.set_qform(img.get_sform(), "
                        "code=1)), or set qform_code to 0 if the sform is right")
    return "sform"


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
