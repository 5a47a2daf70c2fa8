"""``brats`` layout: BraTS case folders, classic (``<case>_flair.nii.gz``, ET = 4) or 2023+
(``<case>-t2f.nii.gz``, ET = 3).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from medfuse.data.layouts.cases import Case, CaseTable
from medfuse.errors import DataError

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")

_BRATS_2023 = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"}

BRATS_LABELS_CLASSIC = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}

BRATS_LABELS_2023 = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}


def _brats_files(case_dir: Path) -> dict[str, tuple[str, Path]]:
    """``{key: (scheme, path)}`` for files named after ``case_dir`` (key: modality or 'seg')."""
    name = re.escape(case_dir.name)
    pattern = re.compile(rf"^{name}(?:_(flair|t1|t1ce|t2|seg)|-(t2f|t1n|t1c|t2w|seg))\.nii(?:\.gz)?$", re.I)
    found: dict[str, tuple[str, Path]] = {}
    for p in sorted(case_dir.iterdir()):
        if m := pattern.match(p.name):
            classic = m.group(1) is not None
            key = (m.group(1) or m.group(2)).lower()
            found.setdefault(
                key if classic or key == "seg" else _BRATS_2023[key], ("classic" if classic else "2023", p)
            )
    return found


def brats_case_dirs(root: Path) -> list[tuple[Path, dict[str, tuple[str, Path]]]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _brats_files(d)
        if files:
            out.append((d, files))
    return out


def _misnamed(root: Path, found: list[tuple[Path, dict]]) -> list[Path]:
    """NIfTI files in folders under ``root`` that are not case folders (no file named after the folder)."""
    cases = {d for d, _ in found}
    return [f for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p not in cases)
            for f in sorted(d.glob("*.nii*"))[:1]]


def load_brats(root: Path) -> CaseTable:
    found = brats_case_dirs(root)
    skipped = _misnamed(root, found)
    if skipped:  # a renamed case folder would otherwise vanish from the data without a word
        warnings.warn(f"{len(skipped)} folder(s) under {root} hold NIfTI files not named after the folder "
                      f"(e.g. {skipped[0].relative_to(root)}) and are skipped; a BraTS case folder <case>/ holds "
                      "<case>_flair.nii.gz ... or <case>-t2f.nii.gz ...", stacklevel=2)
    schemes = {s for _, files in found for s, _ in files.values()}
    if len(schemes) > 1:
        raise DataError(
            root,
            "mixes classic BraTS names (_flair, label 4 = ET) with BraTS 2023+ names (-t2f, label 3 = ET)",
            "convert one set of cases so that all use one naming scheme",
        )
    scheme = schemes.pop()
    any_seg = any("seg" in files for _, files in found)
    sep = "_" if scheme == "classic" else "-"
    file_key = {m: m if scheme == "classic" else k for k, m in _BRATS_2023.items()}
    cases = []
    for d, files in found:
        images = {
            m: str(files[m][1] if m in files else d / f"{d.name}{sep}{file_key[m]}.nii.gz")
            for m in BRATS_MODALITIES
        }
        mask = str(files["seg"][1] if "seg" in files else d / f"{d.name}{sep}seg.nii.gz") if any_seg else None
        # BraTS 2023+ ids are BraTS-<cohort>-<patient>-<timepoint>: follow-ups share a patient.
        m = re.match(r"^(BraTS-[A-Za-z]+-\d+)-\d+$", d.name)
        cases.append(Case(case_id=d.name, patient_id=m.group(1) if m else d.name, images=images, mask=mask))
    labels = BRATS_LABELS_CLASSIC if scheme == "classic" else BRATS_LABELS_2023
    return CaseTable(
        root=root,
        layout="brats",
        modalities=list(BRATS_MODALITIES),
        cases=cases,
        mask_labels=dict(labels),
        mask_required=any_seg,
        patient_ids_given=any(c.patient_id != c.case_id for c in cases),
        source=root,
    )
