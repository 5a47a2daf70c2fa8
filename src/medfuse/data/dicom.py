"""DICOM reading that never lies (pydicom; DESIGN "Arrays" contract).

:func:`read_dicom` returns a :class:`~medfuse.data.io.Volume` ``(C, D, H, W)`` with a RAS+ mm affine
for ``(i, j, k) = (w, h, d)``, or raises a one-line :class:`DicomError` (a ``DataError`` with
``rule = "dicom"``, reported by ``medfuse data check`` as ``[dicom]``). Every decision is made from
the headers; nothing is guessed and nothing is dropped silently:

* **A path to one file** reads that file's series only: the files beside it with the same
  ``SeriesInstanceUID``. Copies of one instance (same ``SOPInstanceUID``, e.g. the same image in
  several transfer syntaxes) count once, the named file winning. A neighbour that is not DICOM or
  cannot be parsed never breaks a valid file. Files without ``ImagePositionPatient`` cannot be
  ordered, so such a file is read alone (a 2D image, or its frames for a multi-frame file).
* **A folder** must hold one image series. Several are refused with the list (UID, description,
  number of slices) unless :attr:`DicomOptions.series` (config ``data.dicom.series``: a UID, a
  SeriesNumber or a SeriesDescription) names one; pointing the manifest at one file of the series
  does the same. A file with the DICOM marker or a ``.dcm`` name that cannot be parsed is an error
  for the folder. SEG, RTSTRUCT, SR and other non-image objects are not candidate series.
* **Geometry** comes from ``ImagePositionPatient`` / ``ImageOrientationPatient`` (per-frame
  functional groups or ``GridFrameOffsetVector`` for multi-frame files). Refused, with one line
  naming the folder and the problem: localizers (``ImageType`` LOCALIZER) and projection images
  (PROJECTION IMAGE, MIP, MINIP), mixed orientations, slices of different sizes or pixel
  spacings, missing positions, duplicate positions, missing slices (a gap of a whole multiple of
  the spacing) and non-uniform spacing. With ``on_gap="resample"`` (``data.dicom.on_gap``) the
  last two are linearly resampled onto a uniform grid at the smallest spacing, logged as a warning
  and recorded in ``meta["resampled"]``. Gantry tilt (equal steps not along the slice normal) is
  kept exactly as a sheared affine.
* **Diffusion series holding several b-values** (the same positions once per b-value) are refused
  with the b-values listed unless :attr:`DicomOptions.b_value` (``data.dicom.b_value``: a b-value
  or ``"highest"``) picks one; the geometry checks then run on its frames, a trace image per
  position is picked from direction images, and ``meta["b_value"]`` records it
  (:mod:`medfuse.data.dicom_diffusion`).
* **Voxels** are pydicom's ``pixel_array`` of each slice times its ``RescaleSlope`` plus its
  ``RescaleIntercept`` (per-frame ``PixelValueTransformationSequence`` for enhanced files),
  applied once. Integral results are stored as int16/int32, others as float32, untouched values
  keep their stored dtype. A slice that cannot be decoded (truncated, unsupported compression) is
  an error naming the file; a slice is never dropped. Colour images give ``C = 3``.
* A SEG file is read by :func:`medfuse.data.seg.read_seg` (a label map on its CT's grid).
* An RTSTRUCT (a file, or a folder holding only one) is refused with one line saying how to convert
  it to SEG or NIfTI (:func:`rtstruct_error`).

Everything here is deterministic; no SimpleITK/GDCM warning is the only sign of a problem.

Per-file headers, the folder scan and series grouping (:func:`read_header`, :func:`scan_folder`,
:func:`group_series`) and :class:`DicomError` are in :mod:`medfuse.data.dicom_headers` (all still
importable from here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medfuse.data.dicom_diffusion import parse_b_value, pick_frames
from medfuse.data.dicom_headers import (  # noqa: F401 - the names that moved to dicom_headers.py stay importable here
    _NON_IMAGE_MODALITIES,
    RTSTRUCT_SOP_CLASS,
    RULE,
    SEG_SOP_CLASS,
    DicomError,
    Header,
    _floats,
    _header,
    _short,
    group_series,
    looks_like_dicom,
    read_header,
    scan_folder,
    series_summary,
)
from medfuse.data.volume import Volume

log = logging.getLogger(__name__)

_PROJECTION_TYPES = {"PROJECTION IMAGE", "MIP", "MINIP", "MAXIP", "MNIP", "AVERAGE PROJECTION"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rtstruct_error(path: Path) -> DicomError:
    """The one line for an RTSTRUCT given as an image or a label.

    RTSTRUCT holds planar contours, not voxels; turning them into a mask needs polygon filling,
    hole and interpolation rules that no well-kept package covers (rt-utils and dcmrtstruct2nii
    have had no release since early 2023), so medfuse does not read it and says how to convert it.
    """
    return DicomError(path, "is a DICOM RTSTRUCT (contours, not a voxel mask), which medfuse does not read",
                      "convert it to DICOM SEG or NIfTI on the CT's grid (e.g. 3D Slicer, plastimatch convert, "
                      "dcmrtstruct2nii) and give that file as the mask")


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM folders are read (config ``data.dicom``).

    Attributes:
        series: the series to read from a folder holding several: a SeriesInstanceUID, a
            SeriesNumber or a SeriesDescription. ``None``: the folder must hold one series.
        on_gap: ``"error"`` refuses missing slices and non-uniform spacing; ``"resample"``
            interpolates onto a uniform grid (linear, at the smallest spacing).
        seg_threshold: fractional SEG segments are binarised at this value.
        reference: the image series a SEG is placed on (a folder or one of its files); default:
            found by the SEG's ReferencedSeriesSequence UID in its folder and the folders below.
        b_value: the b-value (s/mm², within 1%) to read from a diffusion series holding several,
            or ``"highest"``; series with one b-value or none read as they are. ``None``: several
            b-values are refused with their list (:mod:`medfuse.data.dicom_diffusion`).
    """

    series: str | None = None
    on_gap: Literal["error", "resample"] = "error"
    seg_threshold: float = 0.5
    reference: str | None = None
    b_value: float | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "b_value", parse_b_value(self.b_value))  # 800, "800" and 800.0 key alike


_OPTIONS: ContextVar[DicomOptions | None] = ContextVar("medfuse_dicom_options", default=None)


def current_options() -> DicomOptions:
    """The options in force (set by :func:`use_dicom_options`; defaults otherwise)."""
    return _OPTIONS.get() or DicomOptions()


def set_dicom_options(options: DicomOptions | dict[str, Any] | None) -> None:
    """Set the options for every later read in this context (``data.dicom`` of a run's config).

    This is state of the calling process only: a DataLoader worker started with ``spawn`` (the
    macOS and Windows default) starts at the defaults, so a dataset carries its own options
    (:func:`medfuse.data.cache.build_dataset`) and sets them around each item it reads.
    """
    _OPTIONS.set(as_dicom_options(options))


@contextmanager
def use_dicom_options(options: DicomOptions | dict[str, Any] | None) -> Iterator[DicomOptions]:
    """Read DICOM with ``options`` inside the ``with`` block."""
    token = _OPTIONS.set(as_dicom_options(options))
    try:
        yield current_options()
    finally:
        _OPTIONS.reset(token)


def as_dicom_options(options: DicomOptions | dict[str, Any] | Any | None) -> DicomOptions:
    """``options`` as a :class:`DicomOptions`: a dict or a config section (``data.dicom``) of its
    fields, or None for the defaults."""
    if options is None:
        return DicomOptions()
    if isinstance(options, DicomOptions):
        return options
    if hasattr(options, "model_dump"):
        options = options.model_dump()
    return DicomOptions(**{k: v for k, v in dict(options).items() if k in DicomOptions.__dataclass_fields__})


# ------------------------------------------------------------------------------------ reading


def read_dicom(path: str | Path, options: DicomOptions | None = None) -> Any:
    """Read a DICOM file (its series) or a folder holding one series; see the module docstring.

    Args:
        path: a DICOM file, or a folder of DICOM files.
        options: defaults to :func:`current_options`.

    Returns:
        A :class:`~medfuse.data.io.Volume` ``(C, D, H, W)``.

    Raises:
        DicomError: one line naming the file or folder and what is wrong.
    """
    opts = options or current_options()
    path = Path(path)
    if path.is_dir():
        headers, bad = scan_folder(path)
        if bad:
            raise DicomError(path, f"holds {len(bad)} unreadable DICOM file(s), first {bad[0][0].name}: "
                             f"{bad[0][1]}", "re-export or remove the damaged files")
        series = group_series(headers)
        if not series:
            segs = [h for h in headers if h.is_seg]
            if len(segs) == 1:
                from medfuse.data.seg import read_seg

                return read_seg(segs[0].path, options=opts)
            rt = [h for h in headers if h.modality == "RTSTRUCT" or h.sop_class == RTSTRUCT_SOP_CLASS]
            if rt:
                raise rtstruct_error(rt[0].path)
            raise DicomError(path, "no DICOM series found in this folder",
                             "point to the folder that directly holds the .dcm files")
        uid = _choose_series(path, series, opts.series)
        return _read_series(path, series[uid], opts, other={u: len(h) for u, h in series.items() if u != uid})
    head = read_header(path)
    if head.is_seg:
        from medfuse.data.seg import read_seg

        return read_seg(path, options=opts)
    if head.modality == "RTSTRUCT" or head.sop_class == RTSTRUCT_SOP_CLASS:
        raise rtstruct_error(path)
    if not head.is_image:
        raise DicomError(path, f"is a DICOM {head.modality or 'object'} without an image",
                         "point at an image series (CT, MR, ...) or a SEG")
    if head.position is None or head.orientation is None or head.frames > 1:
        return _read_series(path, [head], opts, other={})
    headers, _ = scan_folder(path.parent)  # unreadable neighbours never break a valid file
    members = {head.sop_uid or str(path): head}
    for h in headers:
        if h.series_uid == head.series_uid and h.is_image and h.frames == 1 and h.position is not None:
            members.setdefault(h.sop_uid or str(h.path), h)
    series = group_series(headers)
    other = {u: len(hs) for u, hs in series.items() if u != head.series_uid}
    return _read_series(path.parent, list(members.values()), opts, other=other, named=path)


def _choose_series(folder: Path, series: dict[str, list[Header]], wanted: str | None) -> str:
    if wanted is None:
        if len(series) == 1:
            return next(iter(series))
        raise DicomError(folder, f"holds {len(series)} DICOM series: {series_summary(series)}",
                         "set data.dicom.series to one UID (or point the manifest at one file of the series)")
    for key in ("uid", "number", "description"):
        hits = [u for u, hs in series.items()
                if (u if key == "uid" else hs[0].number if key == "number" else hs[0].description) == str(wanted)]
        if len(hits) == 1:
            return hits[0]
    raise DicomError(folder, f"has no single series matching data.dicom.series '{wanted}' (it holds "
                     f"{series_summary(series)})", "set data.dicom.series to one of these UIDs")


def _rescale_of(item) -> tuple[float, float]:
    """(slope, intercept) of a dataset or functional-group item (1, 0 when absent)."""
    def num(key: str, default: float) -> float:
        value = item.get(key, None)
        try:
            return default if value is None or value == "" else float(value)
        except (TypeError, ValueError):
            return default

    return num("RescaleSlope", 1.0), num("RescaleIntercept", 0.0)


def _pixels(h: Header) -> tuple[np.ndarray, Any]:
    """Full dataset of ``h`` and its pixel_array as (F, H, W, S)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(h.path))
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data
        raise DicomError(h.path, f"slice {h.path.name} of series {h.series_uid or '?'} cannot be decoded ({_short(exc)})",
                         "re-export the series (this file is truncated, damaged or uses an unsupported "
                         "compression); a slice is never dropped") from exc
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = h.frames
    if spp == 1:
        arr = arr.reshape(frames, *arr.shape[-2:], 1) if arr.ndim == 2 or frames > 1 else arr[None, ..., None]
    else:
        arr = arr.reshape(frames, *arr.shape[-3:])
    if arr.shape[1:3] != (int(h.rows), int(h.cols)):
        raise DicomError(h.path, f"decodes to {arr.shape[1:3]} pixels but declares {h.rows} x {h.cols}",
                         "re-export the series")
    return arr, ds


def _frame_geometry(h: Header, ds) -> tuple[list[np.ndarray | None], list[np.ndarray | None],
                                            list[tuple[float, float] | None], list[tuple[float, float]]]:
    """Per-frame position, orientation, spacing and rescale of a (multi-frame) dataset."""
    n = h.frames
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    pos, ori, spc, resc = [h.position] * n, [h.orientation] * n, [h.spacing] * n, [_rescale_of(ds)] * n
    if per and len(per) == n:
        def group(i: int, name: str):
            item = per[i].get(name) or (shared.get(name) if shared is not None else None)
            return item[0] if item else None

        for i in range(n):
            if (g := group(i, "PlanePositionSequence")) is not None:
                pos[i] = _floats(g.get("ImagePositionPatient", None) or [], 3)
            if (g := group(i, "PlaneOrientationSequence")) is not None:
                ori[i] = _floats(g.get("ImageOrientationPatient", None) or [], 6)
            if (g := group(i, "PixelMeasuresSequence")) is not None:
                s = _floats(g.get("PixelSpacing", None) or [], 2)
                spc[i] = None if s is None else (float(s[0]), float(s[1]))
            if (g := group(i, "PixelValueTransformationSequence")) is not None:
                resc[i] = _rescale_of(g)
    elif n > 1 and "GridFrameOffsetVector" in ds and h.position is not None and h.orientation is not None:
        offsets = _floats(ds.GridFrameOffsetVector, n)
        if offsets is not None:
            normal = np.cross(h.orientation[:3], h.orientation[3:])
            base = offsets - offsets[0] if offsets[0] != 0 else offsets
            pos = [h.position + float(o) * normal for o in base]
    elif n > 1:
        pos = [None] * n  # frames without positions (cine, ultrasound): not slices of a volume
    return pos, ori, spc, resc


def _apply_rescale(stack: np.ndarray, rescale: list[tuple[float, float]]) -> np.ndarray:
    if all(s == 1.0 and i == 0.0 for s, i in rescale):
        return stack
    out = stack.astype(np.float64)
    for k, (s, i) in enumerate(rescale):
        out[k] = out[k] * s + i
    if np.all(np.isfinite(out)) and np.array_equal(out, np.round(out)):
        for dt in (np.int16, np.int32):
            info = np.iinfo(dt)
            if out.size == 0 or (out.min() >= info.min and out.max() <= info.max):
                return out.astype(dt)
    return out.astype(np.float32)


def _refuse_kind(where: Path, headers: list[Header]) -> None:
    for h in headers:
        if "LOCALIZER" in h.image_type:
            kind = "/".join(h.image_type)
            raise DicomError(where, f"is a localizer (ImageType {kind}, {h.path.name}), "
                             "not a volume", "point at the diagnostic series instead")
        proj = _PROJECTION_TYPES.intersection(h.image_type)
        if proj:
            raise DicomError(where, f"holds projection images (ImageType {sorted(proj)[0]}, {h.path.name}), "
                             "not a volume", "point at the original axial series instead")


def _read_series(where: Path, headers: list[Header], opts: DicomOptions, other: dict[str, int],
                 named: Path | None = None) -> Any:
    _refuse_kind(where, headers)
    headers, picked, diffusion = pick_frames(where, headers, opts.b_value, lambda h: _frame_geometry(h, h.ds)[:2])
    slabs, positions, orientations, spacings, rescales, datasets, sops = [], [], [], [], [], [], []
    sizes = {(int(h.rows), int(h.cols)) for h in headers}
    if len(sizes) > 1:
        raise DicomError(where, f"series {headers[0].series_uid} mixes slice sizes {sorted(sizes)}",
                         "set data.dicom.series or split the folder so that one series is read")
    for h, keep in zip(headers, picked, strict=True):
        arr, ds = _pixels(h)
        pos, ori, spc, resc = _frame_geometry(h, ds)
        if keep is not None:  # some frames of a multi-frame file (one b-value of several)
            arr = arr[keep]
            pos, ori, spc, resc = ([v[i] for i in keep] for v in (pos, ori, spc, resc))
        sops += [h.sop_uid] * arr.shape[0]
        slabs.append(arr)
        positions += pos
        orientations += ori
        spacings += spc
        rescales += resc
        datasets.append(ds)
    stack = np.concatenate(slabs, axis=0)  # (N, H, W, S)
    n = stack.shape[0]
    first = headers[0]
    meta: dict[str, Any] = {
        "format": "dicom", "series_uid": first.series_uid, "n_files": len(headers), "modality": first.modality,
        "rescale_slope": rescales[0][0], "rescale_intercept": rescales[0][1], "rescale_applied": True,
        "hu": first.modality == "CT", "other_series": other, "description": first.description, **diffusion,
    }  # fmt: skip
    no_geometry = any(p is None for p in positions) or any(o is None for o in orientations)
    if no_geometry:
        if len(headers) > 1:
            raise DicomError(where, f"series {first.series_uid}: {len(headers)} files without "
                             "ImagePositionPatient/ImageOrientationPatient cannot be ordered into a volume",
                             "point the manifest at one file")
        sp = spacings[0] or (1.0, 1.0)
        meta["geometry"] = "none (frames)" if n > 1 else "none (2D)"
        affine = np.diag([sp[1], sp[0], 1.0, 1.0])
        vol = np.moveaxis(_apply_rescale(stack, rescales), -1, 0)  # (S, N, H, W)
        return Volume(np.ascontiguousarray(vol), affine, str(named or first.path), meta)
    ori0 = orientations[0]
    if any(np.max(np.abs(o - ori0)) > 1e-3 for o in orientations):
        n_dist = len({tuple(np.round(o, 3)) for o in orientations})
        raise DicomError(where, f"series {first.series_uid} mixes {n_dist} slice orientations (a localizer or "
                         "rotating projections, not a volume)", "point at a series with one orientation")
    sp0 = spacings[0]
    if sp0 is None or any(s is None or abs(s[0] - sp0[0]) > 1e-4 or abs(s[1] - sp0[1]) > 1e-4 for s in spacings):
        raise DicomError(where, f"series {first.series_uid} has missing or mixed PixelSpacing",
                         "re-export the series with one pixel spacing")
    row, col = ori0[:3], ori0[3:]
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z, pos, stack = z[order], pos[order], stack[order]
    rescales = [rescales[i] for i in order]
    meta["sop_uids"] = [sops[i] for i in order] if len(headers) == n else []  # slice k's SOPInstanceUID
    meta["slice_z"] = z.tolist()
    data = _apply_rescale(stack, rescales)  # (N, H, W, S)
    step = pos[-1] - pos[0]
    if n > 1:
        dz = np.diff(z)
        if np.min(dz) < 1e-3:  # z is sorted: runs of equal positions
            starts = np.r_[True, dz >= 1e-3]
            sizes = np.diff(np.r_[np.flatnonzero(starts), len(z)])
            shared = sizes[sizes > 1]
            first_z = float(z[np.flatnonzero(starts)[np.argmax(sizes > 1)]])
            raise DicomError(where, f"series {first.series_uid} has {int(shared.sum())} images at {len(shared)} shared "
                             f"position{'s' if len(shared) > 1 else ''} (up to {int(shared.max())} per position, first z={first_z:.2f} mm; several "
                             "echoes, b-values, phases or copies in one series?)",
                             "split the series into one image per position (e.g. by echo or b-value with dcm2niix) "
                             "and give the one to use")
        d = float(np.min(dz))
        tol = max(0.01, 0.01 * d)
        if np.max(dz) - d > tol:
            # missing slices: every step a whole multiple of the smallest, at least half of them equal to it
            ratio = dz / d
            whole = bool(np.all(np.abs(ratio - np.round(ratio)) < tol / d) and np.mean(dz - d <= tol) >= 0.5)
            k = int(np.argmax(dz))
            what = (f"is missing {int(round(np.sum(np.round(ratio) - 1)))} slice(s) (a {dz[k]:.2f} mm step "
                    f"after z={z[k]:.2f} mm where the spacing is {d:.2f} mm)" if whole else
                    f"has non-uniform slice spacing ({', '.join(f'{v:.2f}' for v in dz)} mm)")
            if opts.on_gap != "resample":
                raise DicomError(where, f"series {first.series_uid} {what}",
                                 "re-export the complete series, or set data.dicom.on_gap: resample")
            data, z_new = _resample_uniform(data.astype(np.float32), z, d)
            unit = (pos[-1] - pos[0]) / (z[-1] - z[0])
            meta["resampled"] = f"{what}; resampled linearly to {len(z_new)} slices at {d:.3f} mm"
            log.warning("%s: %s", where, meta["resampled"])
            step = unit * d * (len(z_new) - 1)
            n = len(z_new)
            meta["sop_uids"], meta["slice_z"] = [], z_new.tolist()
        off = (pos[1:] - pos[:-1]) - np.outer(dz, normal)
        if "resampled" not in meta and np.max(np.abs(off - off.mean(0))) > tol:
            raise DicomError(where, f"series {first.series_uid} has slices that do not line up (uneven in-plane "
                             "shifts between positions)", "re-export the series")
    lps = np.eye(4)
    lps[:3, 0] = row * sp0[1]
    lps[:3, 1] = col * sp0[0]
    lps[:3, 2] = step / (n - 1) if n > 1 else normal * _thickness(datasets[0])
    lps[:3, 3] = pos[0]
    vol = np.moveaxis(data, -1, 0)
    return Volume(np.ascontiguousarray(vol), _LPS_TO_RAS @ lps, str(named or where), meta)


def _thickness(ds) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(ds.get(key, 0) or 0)
        except (TypeError, ValueError):
            v = 0.0
        if v > 0:
            return v
    return 1.0


def _resample_uniform(data: np.ndarray, z: np.ndarray, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``data`` (N, H, W, S) at positions ``z`` onto a grid of step ``d``."""
    n_new = int(np.floor((z[-1] - z[0]) / d + 1e-6)) + 1
    z_new = z[0] + d * np.arange(n_new)
    hi = np.clip(np.searchsorted(z, z_new, side="right"), 1, len(z) - 1)
    lo = hi - 1
    w = ((z_new - z[lo]) / (z[hi] - z[lo])).clip(0, 1)[:, None, None, None]
    out = (1 - w) * data[lo] + w * data[hi]
    return out.astype(np.float32), z_new
