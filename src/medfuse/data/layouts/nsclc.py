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


_FIX = "re-download or re-export the file, or remove the patient's folder"
"""The fix of a damaged file that keeps a patient's SEG from being paired (:func:`nsclc_pair`)."""


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
    """(the first readable DICOM header of ``folder`` or None, the DicomError of its first unreadable
    DICOM file or None)."""
    from medfuse.data.dicom import DicomError, looks_like_dicom, read_header

    bad = None
    for f in sorted(folder.iterdir()):
        if f.is_file() and looks_like_dicom(f):
            try:
                return read_header(f), bad
            except DicomError as e:
                bad = bad or e
    return None, bad


def _referenced_uid(head) -> tuple[str | None, str | None]:
    """(the SEG's referenced series UID or None, what is wrong when its header is cut short or None).

    pydicom parses sequences lazily, so a truncated header fails only when the sequence is read.
    """
    from medfuse.data.seg import referenced_series_uid

    try:
        uid = referenced_series_uid(head.ds)
    except Exception:  # noqa: BLE001 - pydicom raises many types on a sequence cut short
        return None, "its ReferencedSeriesSequence cannot be read"
    if uid is None:
        return None, "no ReferencedSeriesSequence"
    return uid, None if head.rows and head.cols else "no Rows/Columns"


def nsclc_pair(patient: Path) -> tuple[Path | None, Path] | None:
    """(CT series folder, SEG file) of one patient folder: the SEG's referenced series, by UID.

    None: the patient has no SEG (left out with a note). ``(None, SEG)``: a readable SEG whose CT
    series is not in the patient's folder (a partial download: left out with a note naming the
    patient, as a patient without a folder is). A patient whose SEG cannot be paired because a file
    is damaged is not taken for one without a SEG or a CT: a folder whose DICOM files are all
    unreadable, a header without a SOPClassUID, or a SEG header cut short (no
    ReferencedSeriesSequence, no Rows/Columns: a truncated file) is refused by name.

    Raises:
        DicomError: no SEG pairs with a CT series and one of the patient's files is damaged as above.
    """
    from medfuse.data.dicom import DicomError

    headers, damaged, unpaired = [], [], None
    for folder in _leaf_folders(patient):
        head, bad = _first_header(folder)
        if head is not None and not head.sop_class and not head.modality:
            bad, head = DicomError(head.path, "is a DICOM file whose header is cut short (no SOPClassUID or "
                                   "Modality): the file is truncated or corrupt", _FIX), None
        if head is not None:
            headers.append((folder, head))
        elif bad is not None:
            damaged.append(bad)
    for _, seg in ((f, h) for f, h in headers if h.is_seg):
        uid, why = _referenced_uid(seg)
        if why is not None:
            damaged.append(DicomError(seg.path, f"is a DICOM SEG whose header is cut short ({why}): the file "
                                      "is truncated or corrupt", _FIX))
            continue
        ct = next((f for f, h in headers if h.is_image and h.series_uid == uid), None)
        if ct is not None:
            return ct, seg.path
        unpaired = unpaired or seg.path
    if damaged:
        raise damaged[0]  # the absent CT may be the damaged folder: refused by name, not left out
    return None if unpaired is None else (None, unpaired)


def load_nsclc(source: Path) -> CaseTable:
    root = source.parent
    rows = read_csv_rows(source)
    folders = {p.name: p for p in [*root.iterdir(), *root.glob("*/*")] if p.is_dir()}
    cases, no_seg, no_folder, no_ct = [], 0, 0, []
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
        if pair[0] is None:
            no_ct.append(pid)
            continue
        extra: dict[str, Any] = dict(fields)
        # a renamed or missing column stays missing (data.params.text_template names it as not a column)
        extra.update({short: fields[long] for long, short in NSCLC_FIELDS.items() if long in fields})
        cases.append(Case(case_id=safe_id(pid), patient_id=pid, images={"ct": str(pair[0])}, mask=str(pair[1]),
                          extra=extra))
    if not cases:
        ct_hint = f"; {_no_ct_text(no_ct)}" if no_ct else ""
        raise DataError(root, f"has no patient with a folder, a SEG and the SEG's CT series among the {len(rows)} "
                        f"rows of {source.name}{ct_hint}",
                        "point at the NSCLC-Radiogenomics download (patient folders with their CT and SEG series + CSV)")
    left = [f"{no_seg} without a SEG" if no_seg else "", f"{no_folder} without a folder" if no_folder else "",
            _no_ct_text(no_ct) if no_ct else ""]
    left = [t for t in left if t]
    notes = [f"NSCLC: {len(cases)} patients with a tumour SEG"
             + (f"; {_join(left)} {'is' if no_seg + no_folder + len(no_ct) == 1 else 'are'} left out" if left else "")]
    return CaseTable(root=root, layout="nsclc", modalities=["ct"], cases=cases,
                     mask_labels={"background": 0, "tumour": 1}, mask_required=True, patient_ids_given=True,
                     source=source, notes=notes)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _no_ct_text(pids: list[str], show: int = 5) -> str:
    """'N with a SEG but not ... (ids ...; what to do)' for the patients whose SEG's CT series is absent."""
    ids = ", ".join(pids[:show]) + (f" and {len(pids) - show} more" if len(pids) > show else "")
    return (f"{len(pids)} with a SEG but not the CT series it references ({ids}; a partial download? download "
            f"{'its' if len(pids) == 1 else 'their'} CT series into the patient's folder to use "
            f"{'it' if len(pids) == 1 else 'them'})")
