"""The case records every layout reader returns (:class:`Case`, :class:`CaseTable`) and the
helpers the readers share (JSON and CSV reading, paths, names and ids).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfuse.errors import ConfigError, DataError

LAYOUTS = ("manifest", "nnunet", "msd", "brats", "busbra", "cellmap", "nsclc", "ctrate", "omniabnorm")
SPLITS = ("train", "val", "test")


@dataclass
class Case:
    """One case (a study) with its files.

    Attributes:
        case_id: unique id of the case.
        patient_id: id of the patient; equals ``case_id`` when the layout has none.
        images: modality name -> absolute path, ordered as :attr:`CaseTable.modalities`.
        label: case-level class label or value (classification / staging).
        mask: absolute path of the segmentation label map.
        text: report or prompt text.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (unassigned).
        channel_index: modality -> channel for multi-channel (4D) files.
        extra: other manifest columns.
    """

    case_id: str
    patient_id: str
    images: dict[str, str]
    label: int | float | str | None = None
    mask: str | None = None
    text: str | None = None
    split: str | None = None
    channel_index: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseTable:
    """All cases of a dataset plus what the dataset declares about them.

    Attributes:
        root: folder the dataset lives in (relative paths were resolved against it).
        layout: one of :data:`LAYOUTS`.
        modalities: modality names, in channel order.
        cases: the cases, in file order.
        mask_labels: declared mask values, name -> value (``None``: not declared).
        class_names: declared case-level classes (``None``: not declared).
        mask_required: every non-test case must have a non-empty mask.
        resample_modalities: the dataset declares that its modalities sit on different grids by
            design (e.g. DWI beside T2W) and are resampled onto the first one's grid when read;
            ``data check`` then reports no ``grid`` problem between images (masks are still checked).
        patient_ids_given: the layout gave patient ids (else patient id = case id).
        source: the file describing the dataset (manifest, dataset.json) or the BraTS root.
        notes: remarks for the user (e.g. "split by case id").
    """

    root: Path
    layout: str
    modalities: list[str]
    cases: list[Case]
    mask_labels: dict[str, int] | None = None
    class_names: list[str] | None = None
    mask_required: bool = False
    resample_modalities: bool = False
    patient_ids_given: bool = False
    source: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases)

    def by_split(self, split: str | None) -> list[Case]:
        """Cases whose split is ``split`` (``None`` selects the unassigned ones)."""
        if split is not None and split not in SPLITS:
            raise ConfigError("split", f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
        return [c for c in self.cases if c.split == split]

    def to_rows(self) -> list[dict[str, Any]]:
        """Manifest rows (absolute paths); ``patient_id`` only when patient ids were given."""
        extra_keys = list(dict.fromkeys(k for c in self.cases for k in c.extra))
        channel_mods = [m for m in self.modalities if any(m in c.channel_index for c in self.cases)]
        rows = []
        for c in self.cases:
            row: dict[str, Any] = {"case_id": c.case_id}
            if self.patient_ids_given:
                row["patient_id"] = c.patient_id
            row.update({f"image_{m}": c.images.get(m) for m in self.modalities})
            row.update({f"channel_{m}": c.channel_index.get(m) for m in channel_mods})
            row.update(label=c.label, mask=c.mask, text=c.text, split=c.split)
            row.update({k: c.extra.get(k) for k in extra_keys})
            rows.append(row)
        return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"is not valid JSON ({e.msg} at line {e.lineno})", "fix the file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({e})", "check the file and its permissions") from e


def abs_path(base: Path, p: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(p)))


def unique_names(names: list[str]) -> list[str]:
    """Make modality names unique by suffixing the channel number of repeats."""
    out: list[str] = []
    for k, n in enumerate(names):
        out.append(n if n not in out else f"{n}_{k}")
    return out


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with BOM-safe, stripped header names and stripped cells."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot be read as CSV ({e})", "save it as UTF-8 CSV") from e


def snake(name: str) -> str:
    """``"Pathological T stage "`` -> ``"pathological_t_stage"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def safe_id(text: str) -> str:
    """A case id from any sample id: characters outside ``A-Z a-z 0-9 . _ -`` become ``_``."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip("._-")
    return out[:128] or "_"
