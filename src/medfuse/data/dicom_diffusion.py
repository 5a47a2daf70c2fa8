"""Diffusion-weighted MR series that hold several b-values (or directions): which frames to read.

Scanners often store every b-value of a DWI acquisition (b=0, 50, 800, 1000 ...) in ONE series, the
same slice positions repeating once per b-value, sometimes with the diffusion directions and a
trace image too. :func:`pick_frames` reads each frame's b-value from its header and keeps the
frames of the b-value that :attr:`~medfuse.data.dicom.DicomOptions.b_value` (config
``data.dicom.b_value``) asks for; the geometry checks of :mod:`medfuse.data.dicom` then run on
those frames only. Nothing is guessed:

* **b-value of a frame**: DiffusionBValue (0018,9087) (per-frame MRDiffusionSequence (0018,9117)
  of an enhanced multi-frame file, else top level), then the private tags of Siemens (0019,100C,
  creator ``SIEMENS MR HEADER``), GE (0043,1039 first value, ``1000000000 + b`` on some versions,
  creator ``GEMS_PARM_01``) and Philips (2001,1003 FL, creator ``Philips Imaging DD 001``), also
  when pydicom keeps them as raw bytes (VR UN); the private tags count in MR files only. A frame
  without any is "no b-value". Values within 1% (at least 1 s/mm²) of each other are one b-value.
* A series with one b-value or none reads as before, whatever ``b_value`` says (a T2W is read with
  the same options; a single b > 0 is recorded in ``meta["b_value"]`` and its positions go through
  the directions step below); several b-values (or b-values beside frames without one) without
  ``b_value`` are refused in one line listing them with their slice counts.
* **Directions**: if positions still repeat at the chosen b-value, the frames are diffusion
  directions (or averages). When each position has exactly one trace frame (DiffusionDirectionality
  (0018,9075) ISOTROPIC, Philips 2001,1004 ``I``; or, when no frame says ISOTROPIC but some carry a
  direction, the frames without DiffusionDirectionality and without a gradient direction) those
  are read (``meta["diffusion"] = "trace"``); otherwise the series is refused, pointing at the
  trace / ADC series. Directions come from DiffusionGradientOrientation (0018,9089) and Siemens
  (0019,100D/100E); GE's private gradient tags are not read, so a GE series mixing directions is
  refused rather than guessed.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.data.dicom_headers import DicomError, Header
from medfuse.errors import ConfigError

log = logging.getLogger(__name__)

_FIX = 'set data.dicom.b_value to one of them (or "highest")'
_TRACE_FIX = ("read the trace (or ADC) series of this scan instead (scanners usually store it as a separate "
              "series), or split this one (e.g. dcm2niix) and give one image per position")
_PHILIPS_DIRECTION = {"I": "ISOTROPIC", "N": "NONE", "R": "DIRECTIONAL", "P": "DIRECTIONAL",
                      "S": "DIRECTIONAL", "O": "DIRECTIONAL"}


@dataclass(frozen=True)
class Diffusion:
    """What a frame's header says about its diffusion weighting."""

    b: float | None = None  # s/mm²; None: no b-value tag
    directionality: str = ""  # ISOTROPIC, DIRECTIONAL, NONE, BMATRIX; "" when not given
    direction: str | None = None  # the gradient (rounded) or a vendor direction label; None when not given


def parse_b_value(value: Any) -> float | str | None:
    """``data.dicom.b_value`` as None, ``"highest"`` or a b-value in s/mm² (:class:`ConfigError` otherwise)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "highest":
        return "highest"
    if not isinstance(value, bool):
        try:
            b = float(value)
        except (TypeError, ValueError):
            b = float("nan")
        if math.isfinite(b) and b >= 0:
            return b
    raise ConfigError("data.dicom.b_value", f"must be a b-value in s/mm² (a number >= 0) or \"highest\", got {value!r}",
                      'set it to e.g. 800 or "highest", or leave it unset for series with one b-value')


def _tol(b: float) -> float:
    return max(1.0, 0.01 * abs(b))


# ------------------------------------------------------------------------------- header values


def _number(value: Any, binary: str | None = None) -> float | None:
    """The first number of an element value (a number, text, a multi-value, or raw bytes of VR UN)."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        if binary and len(raw) == struct.calcsize(binary):
            v = struct.unpack(binary, raw)[0]
            if math.isfinite(v) and 0 <= v < 1e6:
                return float(v)
        value = raw.decode("ascii", "replace").strip("\0 ").split("\\")[0]
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    try:
        v = float(str(value).strip("\0 ")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else ""
    return "" if value is None else str(value).strip("\0 ").upper()


def _private(ds, group: int, creator: str, offset: int) -> Any:
    """Value of private element ``offset`` of ``creator``'s block in ``group`` (None when absent)."""
    for el in range(0x10, 0x100):
        owner = ds.get((group, el))
        if owner is None:
            continue
        if _text(owner.value) == creator.upper():
            item = ds.get((group, (el << 8) | offset))
            return None if item is None else item.value
    return None


def _gradient(value: Any) -> str | None:
    try:
        g = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if g.shape != (3,) or not np.all(np.isfinite(g)) or np.linalg.norm(g) < 1e-6:
        return None  # absent or zero: no direction
    g = g / np.linalg.norm(g)
    return ",".join(f"{v:.3f}" for v in g + 0.0)


def _standard(item) -> Diffusion:
    """DiffusionBValue / Directionality / GradientOrientation of a dataset or MRDiffusionSequence item."""
    if item is None:
        return Diffusion()
    b = _number(item.get("DiffusionBValue", None))
    grad = item.get("DiffusionGradientOrientation", None)
    if grad is None and (seq := item.get("DiffusionGradientDirectionSequence", None)):
        grad = seq[0].get("DiffusionGradientOrientation", None)
    return Diffusion(b, _text(item.get("DiffusionDirectionality", "")), None if grad is None else _gradient(grad))


def _vendor(ds) -> Diffusion:
    """The private tags of Siemens, GE and Philips classic (one image per file) MR; MR files only
    (a GE CT carries the same private block, with other meanings)."""
    if _text(ds.get("Modality", "")) not in ("MR", ""):
        return Diffusion()
    b = _number(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C))
    if b is None and (ge := _number(_private(ds, 0x0043, "GEMS_PARM_01", 0x39))) is not None:
        b = ge - 1e9 * math.floor(ge / 1e9) if ge >= 1e9 else ge  # "1000000000 + b" on some GE versions
    if b is None:
        b = _number(_private(ds, 0x2001, "Philips Imaging DD 001", 0x03), binary="<f")
    directionality = _text(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0D))
    direction = None
    if (grad := _private(ds, 0x0019, "SIEMENS MR HEADER", 0x0E)) is not None:
        if isinstance(grad, (bytes, bytearray)) and len(grad) == 24:
            grad = struct.unpack("<3d", bytes(grad))
        direction = _gradient(grad)
    philips = _text(_private(ds, 0x2001, "Philips Imaging DD 001", 0x04))
    if philips in _PHILIPS_DIRECTION:
        directionality = directionality or _PHILIPS_DIRECTION[philips]
        if _PHILIPS_DIRECTION[philips] == "DIRECTIONAL" and direction is None:
            direction = f"philips {philips}"
    return Diffusion(b, directionality, direction)


def _merge(*found: Diffusion) -> Diffusion:
    """Each field from the first source that has it."""
    b = next((d.b for d in found if d.b is not None), None)
    directionality = next((d.directionality for d in found if d.directionality), "")
    direction = next((d.direction for d in found if d.direction is not None), None)
    return Diffusion(b, directionality, direction)


def frame_diffusion(ds, frames: int) -> list[Diffusion]:
    """Per-frame :class:`Diffusion` of a (header) dataset with ``frames`` frames."""
    if ds is None:
        return [Diffusion()] * frames
    top_seq = ds.get("MRDiffusionSequence", None)
    top = _merge(_standard(ds), _standard(top_seq[0] if top_seq else None), _vendor(ds))
    per = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    if not per or len(per) != frames:
        return [top] * frames
    shared = (ds.get("SharedFunctionalGroupsSequence", None) or [None])[0]
    out = []
    for item in per:
        seq = item.get("MRDiffusionSequence", None) or (shared.get("MRDiffusionSequence", None) if shared else None)
        out.append(_merge(_standard(seq[0] if seq else None), top))
    return out


# --------------------------------------------------------------------------------- selection


def _groups(values: list[float]) -> list[list[float]]:
    """Sorted b-values split where a value is beyond the tolerance of its group's first value."""
    out: list[list[float]] = []
    for v in sorted(values):
        if out and v - out[-1][0] <= _tol(out[-1][0]):
            out[-1].append(v)
        else:
            out.append([v])
    return out


def _label(group: list[float]) -> float:
    values, counts = np.unique(np.asarray(group), return_counts=True)
    return float(values[np.argmax(counts)])


def _listing(labels: list[float], counts: list[int], unknown: int) -> str:
    parts = [f"b={b:g} ({n} slice{'s' if n != 1 else ''})" for b, n in zip(labels, counts, strict=True)]
    if unknown:
        parts.append(f"no b-value ({unknown} slice{'s' if unknown != 1 else ''})")
    return ", ".join(parts)


Geometry = Callable[[Header], tuple[list[np.ndarray | None], list[np.ndarray | None]]]


def pick_frames(where: Path, headers: list[Header], want: float | str | None,
                geometry: Geometry) -> tuple[list[Header], list[list[int] | None], dict[str, Any]]:
    """The headers and frames of the chosen b-value (see the module docstring).

    Args:
        where: the folder (or file) named in errors.
        headers: the series' headers (one per file, a file may hold several frames).
        want: ``data.dicom.b_value`` (None, ``"highest"`` or a b-value).
        geometry: per-frame ImagePositionPatient and ImageOrientationPatient of a header (from its
            header dataset, no pixels read).

    Returns:
        The headers to read, for each the frame indices to keep (None: all) and the meta to record
        (``b_value``, ``diffusion``).
    """
    info = [d for h in headers for d in frame_diffusion(h.ds, h.frames)]
    known = [d.b for d in info if d.b is not None]
    if not known:
        return headers, [None] * len(headers), {}
    uid = headers[0].series_uid or "?"
    groups = _groups(known)
    labels = [_label(g) for g in groups]
    member = np.full(len(info), -1)
    for i, d in enumerate(info):
        if d.b is not None:
            member[i] = next(k for k, g in enumerate(groups) if g[0] <= d.b <= g[-1])
    unknown = int(np.sum(member < 0))
    counts = [int(np.sum(member == k)) for k in range(len(groups))]
    listing = _listing(labels, counts, unknown)
    if len(groups) == 1 and not unknown:
        if labels[0] <= _tol(0.0):  # b=0 only (or a vendor tag at 0 on a T2W): nothing to pick
            return headers, [None] * len(headers), {}
        chosen = 0
        if isinstance(want, float) and abs(labels[0] - want) > _tol(want):
            log.warning("%s: series %s holds only b=%g, not data.dicom.b_value %g: read as it is",
                        where, uid, labels[0], want)
    elif want is None:
        raise DicomError(where, f"series {uid} holds {len(groups)} b-value{'s' if len(groups) > 1 else ''}"
                         f"{' and images without one' if unknown else ''} ({listing})", _FIX)
    elif want == "highest":
        chosen = len(groups) - 1
    else:
        near = [k for k, g in enumerate(groups) if any(abs(v - want) <= _tol(want) for v in g)]
        if not near:
            raise DicomError(where, f"series {uid} has no images at data.dicom.b_value {want:g} (it holds {listing})",
                             _FIX)
        chosen = min(near, key=lambda k: abs(labels[k] - want))
    keep = member == chosen
    b = labels[chosen]
    meta: dict[str, Any] = {"b_value": b}
    keep = _one_per_position(where, uid, info, keep, b, headers, geometry, meta)
    out_headers, out_frames, start = [], [], 0
    for h in headers:
        idx = [i for i in range(h.frames) if keep[start + i]]
        start += h.frames
        if idx:
            out_headers.append(h)
            out_frames.append(None if len(idx) == h.frames else idx)
    return out_headers, out_frames, meta


def _one_per_position(where: Path, uid: str, info: list[Diffusion], keep: np.ndarray, b: float,
                      headers: list[Header], geometry: Geometry, meta: dict[str, Any]) -> np.ndarray:
    """``keep`` when its frames have one position each; the trace frames when each position has one."""
    pos, ori = [], []
    for h in headers:
        p, o = geometry(h)
        pos += p
        ori += o
    idx = np.flatnonzero(keep)
    if len(idx) < 2 or any(pos[i] is None or ori[i] is None for i in idx):
        return keep  # the geometry checks of the reader refuse it
    normal = np.cross(ori[idx[0]][:3], ori[idx[0]][3:])
    z = np.asarray([float(pos[i] @ normal) for i in idx])
    order = np.argsort(z, kind="stable")
    run = np.cumsum(np.r_[True, np.diff(z[order]) >= 1e-3]) - 1
    slot = np.empty(len(idx), dtype=int)
    slot[order] = run  # the position of each kept frame
    n_pos = int(run[-1]) + 1
    if n_pos == len(idx):
        return keep
    frames = [info[i] for i in idx]
    trace = [d.directionality == "ISOTROPIC" for d in frames]
    if not any(trace) and any(d.directionality == "DIRECTIONAL" or d.direction is not None for d in frames):
        trace = [not d.directionality and d.direction is None for d in frames]
    per_pos = np.bincount(slot[np.asarray(trace, dtype=bool)], minlength=n_pos) if any(trace) else np.zeros(n_pos)
    if np.all(per_pos == 1):
        out = np.zeros_like(keep)
        out[idx[np.asarray(trace, dtype=bool)]] = True
        meta["diffusion"] = "trace"
        return out
    directions = {d.direction for d in frames if d.direction is not None}
    most = int(np.bincount(slot).max())
    if len(directions) > 1:
        raise DicomError(where, f"series {uid} holds {len(directions)} diffusion directions at b={b:g} "
                         f"({len(idx)} images at {n_pos} positions) and no trace image for every position",
                         _TRACE_FIX)
    raise DicomError(where, f"series {uid} holds {len(idx)} images at {n_pos} positions at b={b:g} (up to {most} "
                     "per position: diffusion directions, averages or repeats that the headers do not tell apart)",
                     _TRACE_FIX)
