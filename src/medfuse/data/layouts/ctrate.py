"""``ctrate`` layout (seed 001): CT-RATE (a reports CSV, volumes, optional region masks and
metadata CSV, optional ``regions.json``).

The reports CSV is found by CT-RATE's ``VolumeName`` column: the one with ``Findings_EN``, else
one whose name says "report" or whose header has a findings/impression column under another name
(a renamed header is then refused by :func:`reports_header_problem`, naming the columns, instead of
the layout going undetected). With a ``regions.json`` (``{"region_names": {"1": ..., ...}}``) the
masks' values are declared: 0 (no region) and 1..R (:func:`region_mask_labels`), as the ct_encoder
family's training reads them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, read_csv_rows, safe_id
from medfuse.errors import DataError

CTRATE_NAME = re.compile(r"^(?P<patient>(?:train|valid|test)_\d+)_(?P<scan>[a-z]+)_(?P<rec>\d+)$")

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".npz")

REPORT_COLUMNS = {"VolumeName": ("VolumeName",), "Findings_EN": ("Findings_EN", "findings"),
                  "Impressions_EN": ("Impressions_EN", "impression")}
"""The reports CSV's columns, each with the names it is read under (CT-RATE's first)."""

REGIONS_JSON = "regions.json"
"""The region vocabulary beside the data (``data.params.regions``' default)."""


def csv_columns(path: Path | str) -> list[str]:
    """The header names of a CSV (BOM-safe, stripped), in file order; [] when it cannot be read."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _looks_like_reports(path: Path, header: set[str]) -> bool:
    """A CT-RATE CSV (``VolumeName``) meant as the reports: named so, or with a findings/impression column."""
    words = ("finding", "impression")
    return "VolumeName" in header and ("report" in path.name.lower()
                                       or any(w in c.lower() for c in header for w in words))


def ctrate_reports(root: Path) -> list[Path]:
    """Reports CSVs in ``root`` or one folder down: those with ``VolumeName`` + ``Findings_EN``; when
    none has them, the ``VolumeName`` CSVs that look like reports (a renamed header: read by
    :func:`load_ctrate`, which refuses it naming the columns)."""
    if not root.is_dir():
        return []
    csvs = [*sorted(root.glob("*.csv")), *sorted(root.glob("*/*.csv"))]
    headers = {p: set(csv_columns(p)) for p in csvs}
    found = [p for p in csvs if {"VolumeName", "Findings_EN"} <= headers[p]]
    return found or [p for p in csvs if _looks_like_reports(p, headers[p])]


def reports_header_problem(path: Path | str, columns: list[str]) -> DataError | None:
    """The one-line refusal of a reports CSV whose header lacks ``VolumeName`` or the findings column
    (``Findings_EN``; ``Impressions_EN`` is optional, the findings stand in), naming the columns it
    has and which to rename; None when the header is fine. Checked before any row, so a renamed
    column is not reported as rows without findings."""
    have = set(columns)
    missing = [c for c, names in REPORT_COLUMNS.items() if not have & set(names)]
    if not {"VolumeName", "Findings_EN"} & set(missing):
        return None
    stems = {"VolumeName": "volume", "Findings_EN": "finding", "Impressions_EN": "impression"}
    renames = [f"{c} -> {want}" for want in missing
               if (c := next((c for c in columns if stems[want] in c.lower()), None)) is not None]
    found = ", ".join(columns) if columns else "no header"
    fix = (f"rename {', '.join(renames)}" if renames else f"rename the columns to {', '.join(missing)}") \
        + " (CT-RATE's reports columns: VolumeName, Findings_EN, Impressions_EN)"
    return DataError(path, f"has no {'/'.join(missing)} column{'s' if len(missing) > 1 else ''} (found: {found})",
                     fix)


def read_regions(path: Path) -> dict[str, Any]:
    """A ``regions.json`` (``{"region_names": {...}, "region_groups": {...}}``); a DataError naming
    it when it is not a JSON object."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"is not valid JSON ({e})", "fix the file") from e
    if not isinstance(meta, dict):
        raise DataError(path, f"holds a {type(meta).__name__}, not an object with region_names",
                        'write {"region_names": {"1": "<name>", ...}}')
    return meta


def region_ids(names: dict[Any, str] | list[str], where: Path | str) -> dict[int, str]:
    """``{id: name}`` of a region vocabulary (a dict id -> name, or a list: ids 1..R), checked:
    region k is the region masks' value k, so the ids must be 1..R (others never match a mask).

    Raises:
        DataError: ids that are not 1..R, naming ``where`` (the file or key that gave them).
    """
    if isinstance(names, list):
        return {i + 1: str(n) for i, n in enumerate(names)}
    try:
        out = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError, AttributeError):
        raise DataError(where, "region ids must be whole numbers 1..R",
                        'number the regions as in the masks, e.g. {"1": "right lung", ...}') from None
    ids = sorted(out)
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(where, f"numbers the regions {ids[:6]}{'...' if len(ids) > 6 else ''}, but region k is "
                        f"the region masks' value k", f"number the {len(ids)} regions 1..{len(ids)} as in the masks")
    return out


def region_mask_labels(regions: dict[int, str]) -> dict[str, int]:
    """The mask values a region vocabulary ``{id: name}`` declares, name -> value: 0 (no region)
    and 1..R (a name given twice is told apart by its id)."""
    names = list(regions.values())
    out = {"no region": 0}
    for k, name in sorted(regions.items()):
        out[name if names.count(name) == 1 and name != "no region" else f"{name} ({k})"] = k
    return out


def volume_stem(name: str) -> str:
    name = Path(str(name)).name
    low = name.lower()
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if low.endswith(s)), name)


def load_ctrate(root: Path) -> CaseTable:
    """A CT-RATE folder as cases (nothing but CSV/JSON is read); a reports CSV with a renamed header
    and an invalid ``regions.json`` are refused in one line (as ct_encoder's training refuses them)."""
    reports = ctrate_reports(root)
    for source in reports:
        bad = reports_header_problem(source, csv_columns(source))
        if bad is not None:
            raise bad
    regions_path = root / REGIONS_JSON
    mask_labels = None
    if regions_path.is_file():
        names = read_regions(regions_path).get("region_names")
        if names:
            mask_labels = region_mask_labels(region_ids(names, regions_path))
    masks = root / "masks"
    meta_csvs = [p for p in [*root.glob("*.csv"), *root.glob("*/*.csv")] if {"VolumeName", "RescaleSlope"} <= set(csv_columns(p))]
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
    return CaseTable(root=root, layout="ctrate", modalities=["ct"], cases=cases, mask_labels=mask_labels,
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
