"""``manifest`` layout: a CSV or JSON table, one row per case, with an optional ``dataset.yaml``
sidecar (see the package doc); :func:`write_manifest` writes any table back as one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from medfuse.data.layouts.cases import Case, CaseTable, abs_path, read_json
from medfuse.errors import DataError

MANIFEST_NAMES = ("manifest.csv", "manifest.json")

SIDECAR_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")

SIDECAR_KEYS = ("modalities", "mask_labels", "class_names", "mask_required", "resample_modalities")

_SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test", "ts": "test",
}  # fmt: skip

_CORE_COLUMNS = ("case_id", "patient_id", "label", "mask", "text", "split", "images")


def load_manifest(source: Path) -> CaseTable:
    base = source.parent
    meta = _read_sidecar(base)
    if source.suffix.lower() == ".json":
        data = read_json(source)
        if isinstance(data, dict):
            meta.update({k: _check_meta(source, k, data[k]) for k in SIDECAR_KEYS if k in data})
            data = data.get("cases")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(
                source,
                'must hold a list of case objects (or {"cases": [...]})',
                "write one object per case with case_id and image_<modality> keys",
            )
        rows = [_flatten_json_row(r) for r in data]
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        try:
            with source.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = [
                    {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
                    for r in reader
                ]
                columns = [c.strip() for c in (reader.fieldnames or [])]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(source, f"cannot be read as CSV ({e})", "save it as UTF-8 CSV") from e
    if "case_id" not in columns:
        raise DataError(source, "has no 'case_id' column", "add a case_id column (one unique id per case)")
    if "modalities" in meta:
        modalities = list(meta["modalities"])
        lower = {c.lower(): c for c in columns}
        image_col = {  # image_<m>, else the column m, else either spelled in another case (image_T1 for t1)
            m: f"image_{m}" if f"image_{m}" in columns else m if m in columns
            else lower.get(f"image_{m}".lower()) or lower.get(m.lower()) or f"image_{m}" for m in modalities
        }
    else:
        modalities = [c[len("image_") :] for c in columns if c.startswith("image_")]
        image_col = {m: f"image_{m}" for m in modalities}
    if not modalities:
        raise DataError(
            source,
            "has no image column",
            "name each modality's path column image_<modality>, "
            "e.g. image_t1, or list the modalities in a dataset.yaml sidecar",
        )
    for m, col in image_col.items():
        if col not in columns:
            raise DataError(
                source,
                f"has no image column '{col}' for modality '{m}'",
                f"add an '{col}' column with the paths of the {m} images",
            )
    used = set(_CORE_COLUMNS) | set(image_col.values()) | {f"channel_{m}" for m in modalities}
    patient_ids_given = "patient_id" in columns and any(_blank(r.get("patient_id")) is not None for r in rows)
    cases = []
    for i, r in enumerate(rows, start=2 if source.suffix.lower() == ".csv" else 1):
        where = f"{source} ({'line' if source.suffix.lower() == '.csv' else 'case'} {i})"
        case_id = _blank(r.get("case_id"))
        if case_id is None:
            raise DataError(where, "has an empty case_id", "give every row a case_id")
        images = {m: abs_path(base, str(v)) for m in modalities if (v := _blank(r.get(image_col[m]))) is not None}
        channels = {}
        for m in modalities:
            if (v := _blank(r.get(f"channel_{m}"))) is not None:
                try:
                    channels[m] = int(float(v))
                except ValueError as e:
                    raise DataError(
                        where, f"channel_{m} '{v}' is not an integer", "give a channel number"
                    ) from e
        mask = _blank(r.get("mask"))
        text = _blank(r.get("text"))
        cases.append(Case(
            case_id=str(case_id), patient_id=str(_first(r.get("patient_id"), case_id)), images=images,
            label=_parse_label(r.get("label")), mask=abs_path(base, str(mask)) if mask is not None else None,
            text=None if text is None else str(text), split=_parse_split(r.get("split"), where),
            channel_index=channels, extra={k: _blank(v) for k, v in r.items() if k not in used},
        ))  # fmt: skip
    return CaseTable(
        root=base,
        layout="manifest",
        modalities=modalities,
        cases=cases,
        mask_labels=meta.get("mask_labels"),
        class_names=meta.get("class_names"),
        mask_required=bool(meta.get("mask_required", False)),
        resample_modalities=bool(meta.get("resample_modalities", False)),
        patient_ids_given=patient_ids_given,
        source=source,
    )


def write_manifest(table: CaseTable, path: str | Path) -> Path:
    """Write ``table`` as a manifest (paths relative to its folder when inside it).

    A ``.json`` path gets ``{"cases": [...], <declarations>}``. Otherwise a CSV is written and,
    when the table declares mask labels, classes or ``mask_required``, a ``dataset.yaml`` sidecar
    beside it (overwriting one that exists).

    Returns:
        The path written.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent
    path_cols = {f"image_{m}" for m in table.modalities} | {"mask"}

    def rel(key: str, value: Any) -> Any:
        if key in path_cols and value:
            p = Path(value)
            return p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
        return value

    rows = [{k: rel(k, v) for k, v in row.items()} for row in table.to_rows()]
    meta: dict[str, Any] = {"modalities": list(table.modalities)}
    if table.mask_labels:
        meta["mask_labels"] = dict(table.mask_labels)
    if table.class_names:
        meta["class_names"] = list(table.class_names)
    if table.mask_required:
        meta["mask_required"] = True
    if table.resample_modalities:
        meta["resample_modalities"] = True
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"cases": rows, **meta}, indent=2))
        return path
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["case_id"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    if len(meta) > 1:
        (base / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def _flatten_json_row(row: dict[str, Any]) -> dict[str, Any]:
    images = row.get("images")
    out = {k: v for k, v in row.items() if k != "images"}
    if isinstance(images, dict):
        out.update({f"image_{m}": p for m, p in images.items()})
    return out


def _read_sidecar(base: Path) -> dict[str, Any]:
    for name in SIDECAR_NAMES:
        p = base / name
        if not p.is_file():
            continue
        if p.suffix == ".json":
            data = read_json(p)
        else:
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(p, f"is not UTF-8 text (byte {e.start})", "save it as UTF-8") from None
            except yaml.YAMLError as e:
                from medfuse.config import refused_tag

                tag = refused_tag(e)
                if tag:
                    raise DataError(p, f"refused the YAML tag '{tag}': a sidecar holds plain values, nothing is "
                                    "executed", "remove the tag") from None
                raise DataError(p, f"is not valid YAML ({str(e).splitlines()[0]})", "fix the file") from e
        if not isinstance(data, dict):
            return {}
        return {k: _check_meta(p, k, data[k]) for k in SIDECAR_KEYS if k in data}
    return {}


def _check_meta(where: Path, key: str, value: Any) -> Any:
    """Validate one sidecar declaration and normalise mask_labels to {name: int}."""
    ok = {
        "modalities": isinstance(value, list) and value and all(isinstance(v, str) for v in value),
        "class_names": isinstance(value, list) and all(isinstance(v, str | int) for v in value),
        "mask_required": isinstance(value, bool),
        "resample_modalities": isinstance(value, bool),
        "mask_labels": (isinstance(value, dict) and all(isinstance(v, int) for v in value.values()))
        or (isinstance(value, list) and all(isinstance(v, int) for v in value)),
    }[key]
    if not ok:
        hint = {
            "modalities": "a non-empty list of names", "class_names": "a list of class names",
            "mask_required": "true or false", "resample_modalities": "true or false", "mask_labels": "a mapping name: integer value, or a list of integers",
        }[key]  # fmt: skip
        raise DataError(f"{where} (key '{key}')", f"has an invalid value {value!r}", f"make it {hint}")
    if key == "mask_labels" and isinstance(value, list):
        return {f"label_{v}": v for v in value}
    if key == "class_names":
        return [str(v) for v in value]
    return value


def _blank(value: Any) -> Any:
    """Empty strings and NaN-like cells become None."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    return value


def _first(value: Any, default: Any) -> Any:
    value = _blank(value)
    return default if value is None else value


def _parse_label(value: Any) -> int | float | str | None:
    value = _blank(value)
    if value is None or not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _parse_split(value: Any, where: str) -> str | None:
    value = _blank(value)
    if value is None:
        return None
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise DataError(where, f"has unknown split '{value}'", "use train, val, test or leave it empty")
    return split
