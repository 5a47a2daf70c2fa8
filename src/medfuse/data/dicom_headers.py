"""DICOM headers without pixels: what each file is and which series a folder holds (pydicom).

:func:`read_header` reads one file's header (``stop_before_pixels``) into a :class:`Header`
(UIDs, modality, ImageType, size, position, orientation, pixel spacing); :func:`scan_folder` reads
the files directly in a folder, keeping the DICOM-looking ones that fail (:func:`looks_like_dicom`:
a ``.dcm`` name or the ``DICM`` marker, :func:`has_dicom_marker`); :func:`group_series` groups the
image headers by SeriesInstanceUID and :func:`series_summary` lists them for an error line.
:class:`DicomError` (``rule = "dicom"``) is the one-line error of every DICOM reader.

No pixel data is decoded here: reading a series into a Volume is :func:`medfuse.data.dicom.read_dicom`.
The names that moved here from :mod:`medfuse.data.dicom` stay importable from it, and
:func:`has_dicom_marker` stays importable from :mod:`medfuse.data.io`, where it used to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.errors import DataError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "SR", "KO", "PR", "ECG", "REG", "DOC", "RWV"}
RULE = "dicom"


class DicomError(DataError):
    """A DICOM file or series that cannot be read truthfully (``medfuse data check`` rule ``dicom``)."""

    rule = RULE


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def has_dicom_marker(path: Path) -> bool:
    """The ``DICM`` marker at byte 128 (DICOM Part 10)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ----------------------------------------------------------------------------------- headers


@dataclass
class Header:
    """What the folder scan keeps of one file (its header only)."""

    path: Path
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    description: str
    number: str
    rows: int | None
    cols: int | None
    frames: int
    image_type: tuple[str, ...]
    position: np.ndarray | None  # (3,) LPS mm
    orientation: np.ndarray | None  # (6,) row then column direction cosines
    spacing: tuple[float, float] | None  # PixelSpacing (row spacing, column spacing)
    ds: Any = field(repr=False, default=None)

    @property
    def is_seg(self) -> bool:
        return self.sop_class == SEG_SOP_CLASS or self.modality == "SEG"

    @property
    def is_image(self) -> bool:
        return bool(self.rows and self.cols) and not self.is_seg and self.modality not in _NON_IMAGE_MODALITIES


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _header(path: Path, ds) -> Header:
    def text(key: str) -> str:
        value = ds.get(key, "")
        return "" if value is None else str(value).strip()

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    spacing = _floats(ds.get("PixelSpacing", None) or [], 2)
    return Header(
        path=path, series_uid=text("SeriesInstanceUID"), sop_uid=text("SOPInstanceUID"),
        sop_class=text("SOPClassUID"), modality=text("Modality").upper(), description=text("SeriesDescription"),
        number=text("SeriesNumber"), rows=ds.get("Rows"), cols=ds.get("Columns"), frames=frames,
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
        position=_floats(ds.get("ImagePositionPatient", None) or [], 3),
        orientation=_floats(ds.get("ImageOrientationPatient", None) or [], 6),
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])), ds=ds,
    )  # fmt: skip


def read_header(path: Path) -> Header:
    """The header of one file; :class:`DicomError` naming it when it is not readable DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise DicomError(path, f"cannot read DICOM: not a readable DICOM file ({_short(exc)})",
                         "re-export the file or remove it from the folder") from exc
    return _header(path, ds)


def looks_like_dicom(path: Path) -> bool:
    """``.dcm`` suffix or the ``DICM`` marker at byte 128."""
    return path.suffix.lower() == ".dcm" or has_dicom_marker(path)


def scan_folder(folder: Path) -> tuple[list[Header], list[tuple[Path, str]]]:
    """Headers of the DICOM files directly in ``folder`` and the DICOM-looking files that failed."""
    headers, bad = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            headers.append(read_header(p))
        except DicomError as e:
            if looks_like_dicom(p):
                bad.append((p, e.problem))
    return headers, bad


def group_series(headers: list[Header]) -> dict[str, list[Header]]:
    """Image headers grouped by SeriesInstanceUID (file order)."""
    out: dict[str, list[Header]] = {}
    for h in headers:
        if h.is_image:
            out.setdefault(h.series_uid, []).append(h)
    return out


def series_summary(series: dict[str, list[Header]]) -> str:
    """``UID 'description' (N slices); ...`` for an error line."""
    parts = []
    for uid, hs in series.items():
        n = sum(h.frames for h in hs)
        desc = hs[0].description or "no description"
        parts.append(f"{uid or '(no UID)'} '{desc}' #{hs[0].number or '?'} ({n} slice{'s' if n != 1 else ''})")
    return "; ".join(parts)

