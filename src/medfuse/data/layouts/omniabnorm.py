"""``omniabnorm`` layout (seed 001): OmniAbnorm-CT (a JSON of records: centre slice and neighbours,
finding masks and descriptions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, safe_id
from medfuse.errors import DataError


def omniabnorm_json(root: Path) -> Path | None:
    """The OmniAbnorm-CT records file in ``root``: a JSON dict of records with ``image`` and ``mask``."""
    if root.is_file():
        return root if root.suffix.lower() == ".json" and _omni_records(root, quiet=True) else None
    if not root.is_dir():
        return None
    for p in sorted(root.glob("*.json")):
        if p.name != "dataset.json" and _omni_records(p, quiet=True):
            return p
    return None


def _omni_records(path: Path, quiet: bool = False) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if quiet:
            return {}
        raise DataError(path, f"is not readable JSON ({e})", "fix the file") from e
    if not isinstance(data, dict) or not data:
        return {}
    first = next(iter(data.values()))
    if not isinstance(first, dict) or not {"image", "mask"} <= set(first):
        return {}
    return data


def omni_findings(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's findings grouped by ``group_id`` (first-seen order): ``[{"ids", "label",
    "description"}]``; masks of one group combine by pixelwise max."""
    groups: dict[str, dict[str, Any]] = {}
    for item in record.get("abnormality") or []:
        if not isinstance(item, dict):
            continue
        key = str(item.get("group_id", item.get("id", len(groups))))
        g = groups.setdefault(key, {"ids": [], "label": str(item.get("label") or "").strip(),
                                    "description": ""})
        g["ids"].append(str(item.get("id", "")))
        text = str(item.get("description") or item.get("rewritten_findings") or item.get("label") or "").strip()
        if text and text not in g["description"]:
            g["description"] = f"{g['description']} {text}".strip()
    return list(groups.values())


def omni_text(record: dict[str, Any]) -> str:
    """The findings text of a record (the group descriptions), or ``"No abnormality."``."""
    parts = [g["description"] or g["label"] for g in omni_findings(record)]
    return " ".join(p if p.endswith(".") else p + "." for p in parts if p) or "No abnormality."


def load_omniabnorm(source: Path) -> CaseTable:
    root = source.parent
    records = _omni_records(source)
    cases = []
    for sid, rec in records.items():
        image = (root / str(rec.get("image", ""))).resolve()
        mask = (root / str(rec.get("mask", ""))).resolve() if rec.get("mask") else None
        context = [int(o) for o in rec.get("context") or []]
        cases.append(Case(case_id=safe_id(sid), patient_id=safe_id(image.parent.name or sid),
                          images={"ct": str(image)}, mask=None if mask is None else str(mask), text=omni_text(rec),
                          extra={"sample_id": str(sid), "context": context, "findings": omni_findings(rec)}))
    return CaseTable(root=root, layout="omniabnorm", modalities=["ct"], cases=cases, patient_ids_given=True,
                     source=source, notes=["OmniAbnorm-CT: patient = the image folder's parent (the source scan)"])


def omni_region_map(mask_folder: str | Path | None, groups: list[list[str]], shape: tuple[int, int],
                    case_id: str) -> Any:
    """The finding masks of an OmniAbnorm-CT sample as one (H, W) map: value k = finding group k.

    Args:
        mask_folder: the record's mask folder (``<finding id>.jpeg`` per finding).
        groups: finding ids per group, in region order (:func:`omni_findings`'s ``ids``).
        shape: (H, W) of the centre slice.
        case_id: for messages.

    Masks are JPEGs, so a pixel belongs to a finding where its mask exceeds 127; a group's masks
    combine by pixelwise max, and a later group wins where two overlap.

    Raises:
        DataError: a finding's mask file is missing, unreadable or not on the slice's grid.
    """
    import numpy as np

    from medfuse.data.io import read_image

    out = np.zeros(shape, dtype=np.uint8)
    folder = Path(mask_folder) if mask_folder else None
    for k, ids in enumerate(groups, start=1):
        for fid in ids:
            hits = sorted(folder.glob(f"{fid}.*")) if folder is not None and folder.is_dir() else []
            if not hits:
                raise DataError(folder or case_id, f"has no mask for finding '{fid}' of case '{case_id}'",
                                "restore <finding id>.jpeg in the record's mask folder")
            m = read_image(hits[0]).array.max(axis=0)[0]  # (H, W)
            if m.shape != tuple(shape):
                raise DataError(hits[0], f"mask is {m.shape[0]}x{m.shape[1]} but the slice is "
                                f"{shape[0]}x{shape[1]} (not on the slice's grid)", "give masks on the slice's grid")
            out[m > 127] = k
    return out
