"""``busbra`` layout: BUS-BRA (``bus_data.csv``, ``Images/``, ``Masks/``, optional ``5-fold-cv.csv``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, read_csv_rows
from medfuse.errors import DataError

BUSBRA_CSV = "bus_data.csv"

BUSBRA_FOLDS = "5-fold-cv.csv"

_BUSBRA_FIELDS = {"BIRADS": "birads", "Pathology": "pathology", "Histology": "histology", "Device": "device",
                  "Side": "side"}


def load_busbra(root: Path) -> CaseTable:
    source = root / BUSBRA_CSV
    rows = read_csv_rows(source)
    missing = [c for c in ("ID", "Case") if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(source, f"has no {'rows' if not rows else 'column ' + repr(missing[0])}",
                        "use the bus_data.csv of BUS-BRA (columns ID, Case, Pathology, BIRADS, ...)")
    folds: dict[str, str] = {}
    notes = []
    if (root / BUSBRA_FOLDS).is_file():
        folds = {r.get("ID", ""): r.get("kFold", "") for r in read_csv_rows(root / BUSBRA_FOLDS)}
        notes.append(f"official folds from {BUSBRA_FOLDS} are in the 'fold' field")
    cases = []
    for i, r in enumerate(rows, start=2):
        cid = r.get("ID", "")
        if not cid:
            raise DataError(f"{source} (line {i})", "has an empty ID", "give every row an ID")
        extra: dict[str, Any] = {v: r.get(k, "") for k, v in _BUSBRA_FIELDS.items()}
        bbox = r.get("BBOX", "")
        if bbox:
            try:
                x, y, w, h = (float(v) for v in bbox.strip("[]() ").replace(",", " ").split())
            except ValueError as e:
                raise DataError(f"{source} (line {i})", f"BBOX '{bbox}' is not [x, y, w, h]",
                                "fix the cell or remove it (boxes then come from the mask)") from e
            extra.update(box_x0=x, box_y0=y, box_x1=x + w - 1, box_y1=y + h - 1)
        if folds:
            extra["fold"] = folds.get(cid) or None
        stem = cid[len("bus_"):] if cid.startswith("bus_") else cid
        cases.append(Case(case_id=cid, patient_id=r.get("Case") or cid, images={"us": str(root / "Images" / f"{cid}.png")},
                          mask=str(root / "Masks" / f"mask_{stem}.png"), extra=extra))
    return CaseTable(root=root, layout="busbra", modalities=["us"], cases=cases,
                     mask_labels={"background": 0, "lesion": 255}, mask_required=True,
                     patient_ids_given=True, source=source, notes=notes)
