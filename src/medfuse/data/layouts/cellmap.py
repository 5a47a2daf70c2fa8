"""``cellmap`` layout (seed 004): CellMap Zarr containers with ground-truth crops (see the package doc).
"""

from __future__ import annotations

from pathlib import Path

from medfuse.data.layouts.cases import Case, CaseTable, safe_id
from medfuse.errors import DataError


def cellmap_containers(root: Path) -> list[Path]:
    """``.zarr`` containers under ``root`` (itself, one or two levels down) with ground-truth crops."""
    if not root.is_dir():
        return []
    found = [root] if root.suffix.lower() == ".zarr" else [*sorted(root.glob("*.zarr")), *sorted(root.glob("*/*.zarr"))]
    return [z for z in found if any(z.glob("recon-*/labels/groundtruth/crop*"))]


def _raw_group(recon: Path) -> Path | None:
    em = recon / "em"
    groups = sorted(d for d in em.iterdir() if d.is_dir()) if em.is_dir() else []
    preferred = [d for d in groups if d.name == "fibsem-uint8"]
    return (preferred or groups or [None])[0]


def load_cellmap(root: Path) -> CaseTable:
    from medfuse.data.containers import crop_classes

    cases, notes = [], []
    for container in cellmap_containers(root):
        ds = container.name[: -len(".zarr")]
        recons = sorted(container.glob("recon-*"))
        for recon in recons:
            raw = _raw_group(recon)
            for crop in sorted(recon.glob("labels/groundtruth/crop*"), key=lambda p: (len(p.name), p.name)):
                cid = f"{ds}_{crop.name}" if len(recons) == 1 else f"{ds}_{recon.name}_{crop.name}"
                cases.append(Case(case_id=safe_id(cid), patient_id=ds,
                                  images={"raw": str(raw if raw is not None else recon / "em" / "fibsem-uint8")},
                                  mask=str(crop), extra={"dataset": ds, "crop": crop.name,
                                                         "classes": ";".join(crop_classes(crop))}))
    if not cases:
        raise DataError(root, "holds no CellMap crop (<ds>.zarr/recon-*/labels/groundtruth/crop*)",
                        "point at the folder the CellMap data was fetched into")
    notes.append("CellMap: the classes of the label map are chosen by data.params.classes")
    return CaseTable(root=root, layout="cellmap", modalities=["raw"], cases=cases, mask_required=True,
                     patient_ids_given=True, source=root, notes=notes)
