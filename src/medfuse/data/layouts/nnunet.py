"""``nnunet`` layout: nnU-Net v2 raw (``dataset.json`` with ``channel_names`` and ``file_ending``,
``imagesTr``/``labelsTr``, optional ``imagesTs``/``labelsTs``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from medfuse.data.layouts.cases import Case, CaseTable, read_json, unique_names
from medfuse.errors import DataError


def dataset_json_kind(path: Path) -> str | None:
    data = read_json(path)
    if isinstance(data, dict):
        if "channel_names" in data and "file_ending" in data:
            return "nnunet"
        if "training" in data and "modality" in data:
            return "msd"
    return None


def load_nnunet(source: Path) -> CaseTable:
    root = source.parent
    meta = read_json(source)
    ending = str(meta["file_ending"])
    try:
        channels = sorted(((int(k), str(v)) for k, v in meta["channel_names"].items()))
    except (AttributeError, ValueError) as e:
        raise DataError(
            f"{source} (key 'channel_names')",
            'must map channel numbers to names, e.g. {"0": "T2"}',
            "fix dataset.json",
        ) from e
    modalities = unique_names([name for _, name in channels])
    mask_labels = _nnunet_labels(source, meta.get("labels"))
    if not (root / "imagesTr").is_dir():
        raise DataError(
            root / "imagesTr", "does not exist (nnU-Net v2 layout)", "put the training images there"
        )
    cases = []
    for folder, labels, split in (("imagesTr", "labelsTr", None), ("imagesTs", "labelsTs", "test")):
        for case_id in _nnunet_case_ids(root / folder, ending):
            images = {
                m: str(root / folder / f"{case_id}_{k:04d}{ending}")
                for (k, _), m in zip(channels, modalities, strict=True)
            }
            mask = root / labels / f"{case_id}{ending}"
            if split == "test" and not mask.exists():
                continue  # an unlabelled imagesTs case is for `medfuse predict`, not for the split
            has_mask = True
            cases.append(
                Case(
                    case_id=case_id,
                    patient_id=case_id,
                    images=images,
                    split=split,
                    mask=str(mask) if has_mask else None,
                )
            )
    _check_count(source, root / "imagesTr", ending, [c for c in cases if c.split is None], meta.get("numTraining"))
    return CaseTable(
        root=root, layout="nnunet", modalities=modalities, cases=cases, mask_labels=mask_labels, source=source
    )


def _check_count(source: Path, images: Path, ending: str, found: list, declared: Any) -> None:
    """Refuse an imagesTr whose files all have another ending than ``file_ending`` (a wrong ending
    found nothing and trained on nothing); warn when fewer training cases match it than ``numTraining`` declares
    (a case saved with another ending would drop out without a word)."""
    endings = sorted({"".join(p.suffixes) for p in images.iterdir() if p.is_file() and p.suffixes})
    if not found and endings:  # files are there, but none has the declared ending
        raise DataError(f"{source} (key 'file_ending')", f"is '{ending}', but no imagesTr file <case>_0000{ending} "
                        f"exists (imagesTr holds {', '.join(endings)} files)",
                        "set file_ending to the images' ending, e.g. \".nii.gz\"")
    try:
        n = int(declared)
    except (TypeError, ValueError):
        return
    if n > len(found):
        warnings.warn(f"{source}: numTraining is {n}, but {len(found)} imagesTr cases end in '{ending}'; the "
                      "others are left out (another file ending?)", stacklevel=3)


def _nnunet_case_ids(folder: Path, ending: str) -> list[str]:
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    ids = {
        m.group(1) for p in folder.iterdir() if not p.name.startswith(".") and (m := pattern.match(p.name))
    }
    return sorted(ids)


def _nnunet_labels(source: Path, labels: Any) -> dict[str, int] | None:
    """``{name: value}``; region-based entries (lists of values) contribute the union of values."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise DataError(f"{source} (key 'labels')", "must map label names to values", "fix dataset.json")
    out: dict[str, int] = {}
    try:
        for name, value in labels.items():
            region = isinstance(value, list | tuple)
            for v in map(int, value if region else [value]):
                if v not in out.values():
                    out[f"{name}_{v}" if region else name] = v
    except (TypeError, ValueError) as e:
        raise DataError(
            f"{source} (key 'labels')", f"has a non-integer label value ({e})", "fix dataset.json"
        ) from e
    return out
