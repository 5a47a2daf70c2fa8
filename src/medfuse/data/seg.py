"""DICOM SEG -> a label map on the grid of the image series it segments.

:func:`read_seg` returns a :class:`~medfuse.data.io.Volume` ``(1, D, H, W)`` on the referenced
series' grid (the same shape and affine as ``read_image`` of that series): voxel values are
segment numbers (a binary one-segment SEG gives 0/1; where segments overlap the highest number
wins), fractional segments are thresholded at ``DicomOptions.seg_threshold`` (of the maximum
fractional value), and slices the SEG has no frame for are background.

The referenced series is the SEG's ``ReferencedSeriesSequence`` UID, searched in the SEG's folder
and the folders below it, then beside it (the study folder of a TCIA download), or given as
``reference=``/``data.dicom.reference`` (per case: :func:`read_label` with the case's image). Frames are placed
with highdicom (``get_pixels_by_source_instance``); SEGs that highdicom cannot parse, such as the
early 3D Slicer SEGs of NSCLC-Radiogenomics without per-frame ``SegmentIdentificationSequence``,
go through a pydicom fallback that maps each frame by its ``ReferencedSOPInstanceUID`` and then by
its position along the slice normal.

RTSTRUCT is not read (:func:`medfuse.data.dicom.rtstruct_error`): convert it to SEG or NIfTI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.data.dicom import (
    DicomError,
    DicomOptions,
    _short,
    current_options,
    looks_like_dicom,
    read_dicom,
    read_header,
    scan_folder,
)
from medfuse.errors import DataError

log = logging.getLogger(__name__)


def referenced_series_uid(ds) -> str | None:
    """The SeriesInstanceUID the SEG's ReferencedSeriesSequence names (None when absent)."""
    for item in ds.get("ReferencedSeriesSequence") or []:
        uid = str(item.get("SeriesInstanceUID", "")).strip()
        if uid:
            return uid
    for item in ds.get("ReferencedPerformedProcedureStepSequence") or []:  # pragma: no cover - rare
        uid = str(item.get("SeriesInstanceUID", "")).strip()
        if uid:
            return uid
    return None


def find_reference(seg_path: Path, series_uid: str) -> Path:
    """A file of series ``series_uid``: in the SEG's folder or below it, else beside the SEG's folder.

    The second place is the study folder of TCIA downloads (NSCLC-Radiogenomics), where the SEG and
    its CT are sibling series folders. A quick pass reads one header per folder; a full pass reads
    every header (folders holding several series).
    """
    below = [seg_path.parent, *sorted(p for p in seg_path.parent.rglob("*") if p.is_dir())]
    study = seg_path.parent.parent
    beside = [p for p in sorted(study.rglob("*")) if p.is_dir() and p not in below] \
        if study != seg_path.parent else []
    for folders in (below, beside):
        for folder in folders:  # quick pass: the first DICOM file of each folder
            first = next((f for f in sorted(folder.iterdir()) if f.is_file() and looks_like_dicom(f)), None)
            if first is None:
                continue
            try:
                h = read_header(first)
            except DicomError:
                continue
            if h.series_uid == series_uid and h.is_image:
                return h.path
        for folder in folders:
            headers, _ = scan_folder(folder)
            hits = [h for h in headers if h.series_uid == series_uid and h.is_image]
            if hits:
                return hits[0].path
    raise DicomError(seg_path, f"references series {series_uid}, which is not in its folder, below it or beside it",
                     "put the CT series beside the SEG or pass reference= (data.dicom.reference)")


def read_seg(path: str | Path, reference: str | Path | None = None, options: DicomOptions | None = None) -> Any:
    """Read a DICOM SEG as a label map on its referenced series' grid.

    Args:
        path: the SEG file.
        reference: the image series (folder or one file); default: found by UID.
        options: threshold and default reference (defaults to the options in force).

    Returns:
        A Volume ``(1, D, H, W)`` of uint8 (uint16 beyond 255 segments) segment numbers.
    """
    import pydicom

    from medfuse.data.io import Volume

    opts = options or current_options()
    path = Path(path)
    head = read_header(path)
    try:
        ref_uid = referenced_series_uid(head.ds)
    except Exception:  # noqa: BLE001 - pydicom parses sequences lazily and raises many types on one cut short
        raise _cut_short(path, "its ReferencedSeriesSequence cannot be read") from None
    if not (head.rows and head.cols):  # before the CT is searched and read: a cut header misleads both
        raise _cut_short(path, "no Rows/Columns")
    reference = reference or opts.reference
    if reference is None:
        if ref_uid is None:
            raise DicomError(path, "is a SEG without ReferencedSeriesSequence", "pass reference= (the CT series)")
        reference = find_reference(path, ref_uid)
    ref = Path(reference)
    if ref.is_dir() and ref_uid is not None:
        headers, _ = scan_folder(ref)
        hits = [h for h in headers if h.series_uid == ref_uid and h.is_image]
        ref = hits[0].path if hits else ref
    # on_gap stays "error": a SEG places its frames by SOP UID, slice by slice; b_value picks the DWI frames
    image = read_dicom(ref, DicomOptions(series=ref_uid if ref.is_dir() else None, on_gap="error", b_value=opts.b_value))
    sops: list[str] = image.meta.get("sop_uids") or []
    if ref_uid is not None and image.meta.get("series_uid") != ref_uid:
        raise DicomError(path, f"references series {ref_uid}, but {reference} is series "
                         f"{image.meta.get('series_uid')}", "pass the series the SEG was drawn on")
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise _unreadable(path, exc) from None
    _, d, h, w = image.shape
    size = _frame_size(path, ds)
    if size != (h, w):
        raise DicomError(path, f"frames are {size[0]} x {size[1]} but the referenced series is {h} x {w}",
                         "pass the series the SEG was drawn on")
    labels = None
    try:
        labels = _with_highdicom(ds, sops, opts)
        how = "highdicom"
    except Exception as exc:  # noqa: BLE001 - highdicom refuses many early SEGs; the fallback decides
        log.info("%s: highdicom could not read the SEG (%s); using the pydicom fallback", path, exc)
    if labels is None:
        labels = _with_pydicom(path, ds, image, opts)
        how = "pydicom"
    n_seg = len(ds.get("SegmentSequence") or [])
    meta = {"format": "dicom-seg", "reader": how, "referenced_series": image.meta.get("series_uid"),
            "reference": image.path, "segments": n_seg, "hu": None}
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return Volume(labels.astype(dtype)[None], image.affine.copy(), str(path), meta)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    """A corrupt or truncated SEG (``medfuse data check`` rule ``unreadable``), naming the file."""
    return DataError(path, f"cannot read the SEG's pixel data ({_short(exc)})",
                     "re-export or re-download the SEG (it is corrupt or truncated), or leave the case out")


def _cut_short(path: Path, why: str) -> DataError:
    """A SEG whose header ends early (a truncated download or copy), naming the file (rule ``unreadable``)."""
    return DataError(path, f"is a DICOM SEG whose header is cut short ({why}): the file is truncated or corrupt",
                     "re-export or re-download the SEG, or leave the case out")


def _frame_size(path: Path, ds) -> tuple[int, int]:
    """(Rows, Columns) of the SEG's frames; a header without them, or without pixel data, is cut short."""
    try:
        size = (int(ds.get("Rows")), int(ds.get("Columns")))
    except Exception:  # noqa: BLE001 - absent (None) or unparsable values of a damaged header
        raise _cut_short(path, "no Rows/Columns") from None
    if "PixelData" not in ds:
        raise _cut_short(path, "no pixel data")
    return size


def _segment_numbers(ds) -> list[int]:
    return [int(s.SegmentNumber) for s in ds.get("SegmentSequence") or []] or [1]


def _threshold(ds, opts: DicomOptions) -> float:
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        return float(opts.seg_threshold)
    return 0.5


def _with_highdicom(ds, sops: list[str], opts: DicomOptions) -> np.ndarray:
    import highdicom as hd

    if not sops:
        raise ValueError("the referenced series has no per-slice SOP instance UIDs")
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    numbers = _segment_numbers(ds)
    # (D, H, W, S): one channel per segment in the order asked, fractional values rescaled to 0..1
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, segment_numbers=numbers,
                                           combine_segments=False, rescale_fractional=True, dtype=np.float32)
    return _combine(px >= _threshold(ds, opts) if px.dtype.kind == "f" else px > 0, numbers)


def _combine(masks: np.ndarray, numbers: list[int]) -> np.ndarray:
    """(D, H, W, S) booleans -> (D, H, W) segment numbers; the highest number wins an overlap."""
    out = np.zeros(masks.shape[:3], dtype=np.int32)
    for s in np.argsort(numbers):
        out[masks[..., s]] = numbers[s]
    return out


def _with_pydicom(path: Path, ds, image, opts: DicomOptions) -> np.ndarray:
    """Place each SEG frame by ReferencedSOPInstanceUID, else by its position along the normal."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr = np.asarray(ds.pixel_array)
        arr = arr.reshape(n_frames, *arr.shape[-2:]).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types on damaged pixel data
        raise _unreadable(path, exc) from None
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        arr = arr / float(ds.get("MaximumFractionalValue", 255) or 255)
    masks = arr >= _threshold(ds, opts)
    numbers = _segment_numbers(ds)
    sops: list[str] = image.meta.get("sop_uids") or []
    slice_of = {uid: k for k, uid in enumerate(sops)}
    z = np.asarray(image.meta.get("slice_z") or [])
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    normal = ras_to_lps @ image.affine[:3, 2]
    normal = normal / np.linalg.norm(normal)
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = np.zeros(image.shape[1:], dtype=np.int32)
    spacing = image.spacing[0]
    for f in range(n_frames):
        item = per[f] if f < len(per) else None
        k = None
        seg_no = numbers[0] if len(numbers) == 1 else None
        if item is not None:
            for der in item.get("DerivationImageSequence") or []:
                for src in der.get("SourceImageSequence") or []:
                    k = slice_of.get(str(src.get("ReferencedSOPInstanceUID", "")), k)
            ident = item.get("SegmentIdentificationSequence")
            if ident:
                seg_no = int(ident[0].ReferencedSegmentNumber)
            if k is None and item.get("PlanePositionSequence") and len(z):
                p = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
                dist = np.abs(z - float(p @ normal))
                if dist.min() <= 0.5 * spacing:
                    k = int(np.argmin(dist))
        if k is None:
            raise DicomError(path, f"frame {f + 1} matches no slice of series {image.meta.get('series_uid')} "
                             "(neither by ReferencedSOPInstanceUID nor by position)",
                             "pass the series the SEG was drawn on")
        if seg_no is None:
            raise DicomError(path, f"frame {f + 1} does not say which of {len(numbers)} segments it holds",
                             "re-export the SEG with a SegmentIdentificationSequence per frame")
        out[k][masks[f]] = np.maximum(out[k][masks[f]], seg_no)
    return out


def read_label(path: str | Path, image: str | Path | None = None) -> Any:
    """A case's label map: a DICOM SEG on the grid of the case's own ``image`` (when it is DICOM),
    any other mask through :func:`medfuse.data.io.read_image`."""
    from medfuse.data.io import read_image

    p = Path(path)
    head = None
    if p.is_file() and looks_like_dicom(p):
        try:
            head = read_header(p)
        except DicomError:
            head = None  # read_image names the file and what is wrong
        if head is not None and not head.sop_class and not head.modality:
            raise DataError(p, "is a DICOM file whose header is cut short (no SOPClassUID or Modality): the file is "
                            "truncated or corrupt", "re-export or re-download the mask, or leave the case out")
    if image is not None and head is not None and head.is_seg:
        ref = Path(image)
        if ref.is_dir() or looks_like_dicom(ref):
            return read_seg(path, reference=ref)
    if image is not None:
        _refuse_the_image_as_its_mask(p, Path(image))
    return read_image(path)


def _first_dicom_header(path: Path):
    """The header of ``path`` (a DICOM file) or of the first DICOM file directly in it (a folder); None
    when there is none or it cannot be read."""
    try:
        first = path if path.is_file() else next(
            (f for f in sorted(path.iterdir()) if f.is_file() and looks_like_dicom(f)), None)
        return None if first is None or not looks_like_dicom(first) else read_header(first)
    except (OSError, DicomError):
        return None


def _refuse_the_image_as_its_mask(mask: Path, image: Path) -> None:
    """A mask that is a file or folder of the case's own DICOM image series (a manifest's ``mask`` column
    pointing at the CT) would be read as a label map of HU values: refused by name."""
    if not (mask.is_dir() or looks_like_dicom(mask)) or not (image.is_dir() or looks_like_dicom(image)):
        return
    m, i = _first_dicom_header(mask), _first_dicom_header(image)
    if m is None or i is None or not m.is_image or not m.series_uid or m.series_uid != i.series_uid:
        return
    raise DicomError(mask, f"is part of the case's image series {i.series_uid} ({image}), not a mask",
                    "give the case's mask: its DICOM SEG or a label map (NIfTI, NRRD, PNG) on the image's grid")
