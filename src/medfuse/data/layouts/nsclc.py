"""``nsclc`` layout (seed 002): NSCLC-Radiogenomics from TCIA (DICOM series, a SEG per patient,
the clinical CSV).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, read_csv_rows, safe_id, snake
from medfuse.errors import DataError

NSCLC_FIELDS = {"histology": "histology", "pathological_t_stage": "t_stage", "pathological_n_stage": "n_stage",
                "pathological_m_stage": "m_stage"}


def nsclc_csv(root: Path) -> Path | None:
    """The clinical CSV of an NSCLC-Radiogenomics folder (a ``Case ID`` column and a T stage)."""
    if not root.is_dir():
        return None
    for csv_path in sorted(root.glob("*.csv")):
        try:
            header = csv_path.open(encoding="utf-8-sig").readline()
        except (OSError, UnicodeDecodeError):
            continue
        cols = {snake(c) for c in header.split(",")}
        if "case_id" in cols and "pathological_t_stage" in cols:
            return csv_path
    return None


def _leaf_folders(folder: Path) -> list[Path]:
    return sorted(p for p in [folder, *folder.rglob("*")] if p.is_dir() and any(f.is_file() for f in p.iterdir()))


def _first_header(folder: Path):
    from medfuse.data.dicom import DicomError, looks_like_dicom, read_header

    for f in sorted(folder.iterdir()):
        if f.is_file() and looks_like_dicom(f):
            try:
                return read_header(f)
            except DicomError:
                continue
    return None


def nsclc_pair(patient: Path) -> tuple[Path, Path] | None:
    """(CT series folder, SEG file) of one patient folder: the SEG's referenced series, by UID."""
    from medfuse.data.seg import referenced_series_uid

    headers = [(f, h) for f in _leaf_folders(patient) if (h := _first_header(f)) is not None]
    for _, seg in ((f, h) for f, h in headers if h.is_seg):
        uid = referenced_series_uid(seg.ds)
        ct = next((f for f, h in headers if h.is_image and h.series_uid == uid), None)
        if ct is not None:
            return ct, seg.path
    return None


def load_nsclc(source: Path) -> CaseTable:
    root = source.parent
    rows = read_csv_rows(source)
    folders = {p.name: p for p in [*root.iterdir(), *root.glob("*/*")] if p.is_dir()}
    cases, no_seg, no_folder = [], 0, 0
    for i, r in enumerate(rows, start=2):
        fields = {snake(k): v for k, v in r.items()}
        pid = fields.get("case_id", "")
        if not pid:
            raise DataError(f"{source} (line {i})", "has an empty Case ID", "give every row a Case ID")
        if pid not in folders:
            no_folder += 1
            continue
        pair = nsclc_pair(folders[pid])
        if pair is None:
            no_seg += 1
            continue
        extra: dict[str, Any] = dict(fields)
        extra.update({short: fields.get(long, "") for long, short in NSCLC_FIELDS.items()})
        cases.append(Case(case_id=safe_id(pid), patient_id=pid, images={"ct": str(pair[0])}, mask=str(pair[1]),
                          extra=extra))
    if not cases:
        raise DataError(root, f"has no patient with both a folder and a SEG among the {len(rows)} rows of "
                        f"{source.name}", "point at the NSCLC-Radiogenomics download (patient folders + CSV)")
    notes = [f"NSCLC: {len(cases)} patients with a tumour SEG"
             + (f"; {no_seg} without a SEG and {no_folder} without a folder are left out" if no_seg or no_folder
                else "")]
    return CaseTable(root=root, layout="nsclc", modalities=["ct"], cases=cases,
                     mask_labels={"background": 0, "tumour": 1}, mask_required=True, patient_ids_given=True,
                     source=source, notes=notes)
