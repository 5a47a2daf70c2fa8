"""``ctrate`` layout (seed 001): CT-RATE (a reports CSV, volumes, optional region masks and
metadata CSV).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, read_csv_rows, safe_id
from medfuse.errors import DataError

CTRATE_NAME = re.compile(r"^(?P<patient>(?:train|valid|test)_\d+)_(?P<scan>[a-z]+)_(?P<rec>\d+)$")

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".npz")


def _header_of(path: Path) -> set[str]:
    try:
        return {c.strip() for c in path.open(encoding="utf-8-sig").readline().strip().split(",")}
    except (OSError, UnicodeDecodeError):
        return set()


def ctrate_reports(root: Path) -> list[Path]:
    """Reports CSVs (``VolumeName`` + ``Findings_EN``) in ``root`` or one folder down."""
    if not root.is_dir():
        return []
    csvs = [*sorted(root.glob("*.csv")), *sorted(root.glob("*/*.csv"))]
    return [p for p in csvs if {"VolumeName", "Findings_EN"} <= _header_of(p)]


def volume_stem(name: str) -> str:
    name = Path(str(name)).name
    low = name.lower()
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if low.endswith(s)), name)


def load_ctrate(root: Path) -> CaseTable:
    reports = ctrate_reports(root)
    masks = root / "masks"
    meta_csvs = [p for p in [*root.glob("*.csv"), *root.glob("*/*.csv")] if {"VolumeName", "RescaleSlope"} <= _header_of(p)]
    meta = {volume_stem(r.get("VolumeName", "")): r for p in meta_csvs for r in read_csv_rows(p)}
    index = {volume_stem(f.name): f for f in sorted(root.rglob("*"))
             if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES) and masks not in f.parents}
    mask_index = {volume_stem(f.name): f for f in masks.rglob("*") if f.is_file()} if masks.is_dir() else {}
    cases, missing = [], 0
    for source in reports:
        for r in read_csv_rows(source):
            stem = volume_stem(r.get("VolumeName", ""))
            if stem not in index:
                missing += 1
                continue
            m = CTRATE_NAME.match(stem)
            row = meta.get(stem)
            cases.append(Case(case_id=safe_id(stem), patient_id=m["patient"] if m else stem,
                              images={"ct": str(index[stem])},
                              mask=str(mask_index[stem]) if stem in mask_index else None,
                              text=r.get("Impressions_EN") or r.get("Findings_EN") or None,
                              extra={"findings": r.get("Findings_EN", ""),
                                     "rescale": None if row is None else [row.get("RescaleSlope", ""),
                                                                          row.get("RescaleIntercept", "")]}))
    if not cases:
        raise DataError(root, "none of the volumes its reports CSV names is under it",
                        "point at the CT-RATE dataset folder holding the volumes")
    notes = [f"CT-RATE: {len(cases)} volumes" + (f"; {missing} listed volumes are not on disk" if missing else "")
             + ("" if mask_index else "; no masks/ folder (ct_encoder needs region masks)")]
    return CaseTable(root=root, layout="ctrate", modalities=["ct"], cases=cases,
                     patient_ids_given=any(CTRATE_NAME.match(c.case_id) for c in cases), source=reports[0],
                     notes=notes)


def read_csv_records(path: Path | str) -> list[tuple[int, dict[str, str]]]:
    """The rows of a CSV as :func:`read_csv_rows` reads them (BOM-safe, stripped header names and
    cells), each with the physical line its record starts on (the header is line 1; blank lines are
    skipped). A quoted field may span several lines, as CT-RATE's multi-line findings do, so a row's
    place among the records is not its line in the file."""
    path, end = Path(path), 0
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            names = next(reader, None)
            if names is None:
                return []
            rows, end = [], reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:
                    continue
                raw: dict[str | None, Any] = dict(zip(names, row, strict=False))
                for key in names[len(row):]:
                    raw[key] = None  # a short row: the missing cells read empty (csv.DictReader's restval)
                rows.append((start, {k.strip(): (v or "").strip() for k, v in raw.items() if k}))
            return rows
    except csv.Error as e:  # the record that starts after the last one read
        raise DataError(f"{path} (line {end + 1})", f"cannot be read as CSV ({e})",
                        "fix that record (e.g. its quotes) or save the file as UTF-8 CSV") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read as CSV ({e})", "save it as UTF-8 CSV") from e


def rescale_of(row: dict[str, Any], where: Path | str, stem: str) -> list[float]:
    """[slope, intercept] of a metadata row (empty = 1, 0), finite, slope non-zero; else a one-line DataError."""
    try:
        hu = [float(row.get("RescaleSlope") or 1.0), float(row.get("RescaleIntercept") or 0.0)]
    except ValueError:
        hu = [float("nan")] * 2
    if not all(math.isfinite(v) for v in hu) or hu[0] == 0:
        raise DataError(where, f"RescaleSlope/RescaleIntercept of {stem} are {row.get('RescaleSlope')!r}/"
                        f"{row.get('RescaleIntercept')!r}, not finite numbers with a non-zero slope",
                        "fix the row (CT-RATE v1: slope 1, intercept -1024)")
    return hu
