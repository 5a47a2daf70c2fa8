"""Dataset layouts -> :class:`Case` records (DESIGN "data/layouts.py").

These on-disk layouts are understood and auto-detected:

``manifest``
    A CSV or JSON table, one row per case. Columns: ``case_id`` (required), ``patient_id``
    (optional; when absent every case is its own patient), one column per modality named
    ``image_<modality>`` (e.g. ``image_t1``), and optional ``mask`` (segmentation label map),
    ``label`` (case-level class or value), ``text`` (report text), ``split``
    (``train``/``val``/``test`` or empty) and ``channel_<modality>`` (channel of a multi-channel
    file). Any other column is kept in :attr:`Case.extra`. Relative paths are relative to the
    manifest's folder. An empty image cell means that modality is absent for that case.

    A sidecar ``dataset.yaml`` (or ``dataset.yml`` / ``dataset.json``) next to the manifest may
    declare ``modalities`` (list; then a modality column may also be named just ``<modality>``),
    ``mask_labels`` (``{name: value}`` or a list of values), ``class_names`` (list),
    ``mask_required`` (bool) and ``resample_modalities`` (bool: modalities on different grids are
    expected and resampled onto the first one's grid, so ``data check`` does not report them). The JSON form is either a list of row objects or
    ``{"cases": [...], <sidecar keys>}``; a JSON row may also give ``"images": {modality: path}``.
``nnunet``
    nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` and ``file_ending``;
    ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``, optional ``imagesTs``
    (split ``test``).
``msd``
    Medical Segmentation Decathlon: ``dataset.json`` with ``modality``, ``labels``
    (value -> name), ``training`` and ``test``; multi-modal images are 4D files, so every modality
    maps to the same path and :attr:`Case.channel_index` says which channel.
``brats``
    BraTS case folders ``<root>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` or BraTS 2023+
    ``<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (mapped to flair, t1, t1ce, t2).

``cellmap``, ``nsclc``, ``ctrate``, ``omniabnorm``
    CellMap (Zarr), NSCLC-Radiogenomics (DICOM + SEG + clinical CSV), CT-RATE and OmniAbnorm-CT:
    see :mod:`medfuse.data.datasets`.
``busbra``
    BUS-BRA (Zenodo 8231412): ``bus_data.csv`` (read BOM-safe, header names stripped) with ``ID``,
    ``Case`` (the patient), ``Pathology``, ``BIRADS``, ``Histology``, ``Device``, ``Side`` and ``BBOX``
    (``"[x, y, w, h]"``); images ``Images/<ID>.png``, masks ``Masks/mask_<ID without "bus_">.png``
    (0/255, required). One modality ``us``. Extra fields for ``data.params.text_template``:
    ``birads``, ``pathology``, ``histology``, ``device``, ``side``; ``box_x0..box_y1`` (inclusive
    pixels) from ``BBOX``; ``fold`` from the official ``5-fold-cv.csv`` when it is present.

Loading only lists paths; nothing is read, so ``medfuse data check`` can report every bad file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfuse.errors import ConfigError, DataError

LAYOUTS = ("manifest", "nnunet", "msd", "brats", "busbra", "cellmap", "nsclc", "ctrate", "omniabnorm")
SPLITS = ("train", "val", "test")
MANIFEST_NAMES = ("manifest.csv", "manifest.json")
SIDECAR_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")
SIDECAR_KEYS = ("modalities", "mask_labels", "class_names", "mask_required", "resample_modalities")
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test", "ts": "test",
}  # fmt: skip
_CORE_COLUMNS = ("case_id", "patient_id", "label", "mask", "text", "split", "images")
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
_BRATS_2023 = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"}
BRATS_LABELS_CLASSIC = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}
BRATS_LABELS_2023 = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}
_LOOKED_FOR = (
    "a manifest (.csv/.json file, or manifest.csv/manifest.json in the folder), a dataset.json of "
    "nnU-Net v2 (channel_names + file_ending) or MSD (training + modality), or BraTS case folders "
    "(<case>/<case>_flair.nii.gz or <case>/<case>-t2f.nii.gz), BUS-BRA (bus_data.csv), CellMap "
    "(<ds>.zarr/recon-*/labels/groundtruth/crop*), NSCLC-Radiogenomics (clinical CSV with Case ID + patient "
    "folders), CT-RATE (a reports CSV with VolumeName, Findings_EN) or OmniAbnorm-CT (a JSON of records)"
)


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


def load_cases(path: str | Path, layout: str = "auto", modalities: list[str] | None = None,
               check_ids: bool = True) -> CaseTable:
    """Read a dataset description into a :class:`CaseTable` (no image is opened).

    Args:
        path: a manifest file, a ``dataset.json``, or a dataset folder.
        layout: ``"auto"`` (detect) or one of :data:`LAYOUTS`.
        modalities: keep only these modalities, in this order (default: all).
        check_ids: refuse a case id that is not a name (:func:`medfuse.data.paths.check_case_id`);
            ``medfuse data check`` passes False and reports every bad id on its own line.

    Raises:
        DataError: the path matches no layout, its description is incomplete or invalid, or a case
            id is not a name (the line names the manifest row).
        ConfigError: ``layout`` is not a known layout name.
    """
    path = Path(path).absolute()
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError("layout", f"unknown layout '{layout}'", f"use one of auto, {', '.join(LAYOUTS)}")
    if not path.exists():
        raise DataError(path, "does not exist", "pass a manifest file or a dataset folder")
    found, source = _detect(path, layout)
    loader = {"manifest": _load_manifest, "nnunet": _load_nnunet, "msd": _load_msd, "brats": _load_brats,
              "busbra": _load_busbra}
    if found in loader:
        table = loader[found](source)
    else:
        from medfuse.data.datasets import load

        table = load(found, source)
    if check_ids:
        from medfuse.data.paths import check_case_id

        for i, c in enumerate(table.cases):
            check_case_id(c.case_id, case_where(table, i))
    if modalities is not None:
        _select_modalities(table, modalities)
    return table


def case_where(table: CaseTable, index: int) -> str:
    """Where case ``index`` of ``table`` is described: the manifest line or row, else the source."""
    source = table.source or table.root
    if table.layout == "manifest" and table.source is not None:
        csv_file = table.source.suffix.lower() == ".csv"
        return f"{source} ({'line' if csv_file else 'case'} {index + 2 if csv_file else index + 1})"
    return str(source)


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
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    if len(meta) > 1:
        (base / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- detection


def _detect(path: Path, layout: str) -> tuple[str, Path]:
    """Return (layout, source) where source is the describing file (or the BraTS root)."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            found = "manifest"
        elif path.suffix.lower() == ".json":
            from medfuse.data.datasets import omniabnorm_json

            found = _json_kind(path) or ("omniabnorm" if layout in ("auto", "omniabnorm") and omniabnorm_json(path)
                                         else "manifest")
        else:
            raise DataError(
                path,
                f"is not a dataset description; looked for {_LOOKED_FOR}",
                "pass a .csv/.json manifest, a dataset.json, or the dataset folder",
            )
        if layout not in ("auto", found):
            raise DataError(
                path, f"is a {found} description, not layout '{layout}'", f"use --layout {found} or auto"
            )
        return found, path
    for kind, source in _candidates(path, layout):
        if layout in ("auto", kind):
            return kind, source
    wanted = _LOOKED_FOR if layout == "auto" else f"a dataset of layout '{layout}'"
    raise DataError(
        path,
        f"matches no dataset layout; looked for {wanted}",
        "point at the dataset folder or its manifest/dataset.json (see docs/data-formats.md)",
    )


def _candidates(path: Path, layout: str) -> Iterator[tuple[str, Path]]:
    """Layouts a folder matches, most specific first (a manifest wins over a dataset.json beside it)."""
    if layout in ("auto", "manifest"):
        yield from (("manifest", path / n) for n in MANIFEST_NAMES if (path / n).is_file())
    if layout in ("auto", "nnunet", "msd") and (path / "dataset.json").is_file():
        kind = _json_kind(path / "dataset.json")
        if kind:
            yield kind, path / "dataset.json"
    if layout in ("auto", "brats") and _brats_case_dirs(path):
        yield "brats", path
    if layout in ("auto", "busbra") and (path / BUSBRA_CSV).is_file():
        yield "busbra", path
    from medfuse.data.datasets import candidates

    yield from candidates(path, layout)


def _json_kind(path: Path) -> str | None:
    data = _read_json(path)
    if isinstance(data, dict):
        if "channel_names" in data and "file_ending" in data:
            return "nnunet"
        if "training" in data and "modality" in data:
            return "msd"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"is not valid JSON ({e.msg} at line {e.lineno})", "fix the file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({e})", "check the file and its permissions") from e


def _abs(base: Path, p: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(p)))


def _select_modalities(table: CaseTable, wanted: list[str]) -> None:
    """Restrict and reorder ``table`` to ``wanted`` (exact, then case-insensitive match)."""
    lower = {m.lower(): m for m in table.modalities}
    chosen = []
    for m in wanted:
        name = m if m in table.modalities else lower.get(m.lower())
        if name is None:
            raise DataError(
                table.source or table.root,
                f"has no {f'image column image_{m} for modality' if table.layout == 'manifest' else 'modality'} "
                f"'{m}' (it has: {', '.join(table.modalities)})",
                "pass modalities that the dataset provides",
            )
        chosen.append(name)
    table.modalities = chosen
    for c in table.cases:
        c.images = {m: c.images[m] for m in chosen if m in c.images}
        c.channel_index = {m: c.channel_index[m] for m in chosen if m in c.channel_index}


def _unique_names(names: list[str]) -> list[str]:
    """Make modality names unique by suffixing the channel number of repeats."""
    out: list[str] = []
    for k, n in enumerate(names):
        out.append(n if n not in out else f"{n}_{k}")
    return out


# ----------------------------------------------------------------------------- manifest


def _load_manifest(source: Path) -> CaseTable:
    base = source.parent
    meta = _read_sidecar(base)
    if source.suffix.lower() == ".json":
        data = _read_json(source)
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
        image_col = {
            m: f"image_{m}" if f"image_{m}" in columns or m not in columns else m for m in modalities
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
        images = {m: _abs(base, str(v)) for m in modalities if (v := _blank(r.get(image_col[m]))) is not None}
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
            label=_parse_label(r.get("label")), mask=_abs(base, str(mask)) if mask is not None else None,
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
            data = _read_json(p)
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


# ----------------------------------------------------------------------------- nnU-Net v2


def _load_nnunet(source: Path) -> CaseTable:
    root = source.parent
    meta = _read_json(source)
    ending = str(meta["file_ending"])
    try:
        channels = sorted(((int(k), str(v)) for k, v in meta["channel_names"].items()))
    except (AttributeError, ValueError) as e:
        raise DataError(
            f"{source} (key 'channel_names')",
            'must map channel numbers to names, e.g. {"0": "T2"}',
            "fix dataset.json",
        ) from e
    modalities = _unique_names([name for _, name in channels])
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
    return CaseTable(
        root=root, layout="nnunet", modalities=modalities, cases=cases, mask_labels=mask_labels, source=source
    )


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


# ----------------------------------------------------------------------------- MSD


def _load_msd(source: Path) -> CaseTable:
    root = source.parent
    meta = _read_json(source)
    try:
        channels = sorted((int(k), str(v)) for k, v in meta["modality"].items())
        mask_labels = {str(v): int(k) for k, v in (meta.get("labels") or {}).items()} or None
    except (AttributeError, ValueError) as e:
        raise DataError(
            source,
            "has 'modality'/'labels' that do not map numbers to names",
            'fix dataset.json (e.g. "modality": {"0": "FLAIR"})',
        ) from e
    modalities = _unique_names([name for _, name in channels])
    index = {m: k for (k, _), m in zip(channels, modalities, strict=True)}
    cases = []
    for split, entries in ((None, meta.get("training") or []), ("test", meta.get("test") or [])):
        for entry in entries:
            image = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(image, str):
                raise DataError(
                    source,
                    f"has a {split or 'training'} entry without an image path: {entry!r}",
                    'give every entry an "image" path',
                )
            label = entry.get("label") if isinstance(entry, dict) else None
            image_path = _abs(root, image)
            case_id = _case_stem(Path(image_path).name)
            cases.append(
                Case(
                    case_id=case_id,
                    patient_id=case_id,
                    images=dict.fromkeys(modalities, image_path),
                    mask=_abs(root, label) if label else None,
                    split=split,
                    channel_index=dict(index),
                )
            )
    return CaseTable(
        root=root, layout="msd", modalities=modalities, cases=cases, mask_labels=mask_labels, source=source
    )


def _case_stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ----------------------------------------------------------------------------- BraTS


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


def _brats_case_dirs(root: Path) -> list[tuple[Path, dict[str, tuple[str, Path]]]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _brats_files(d)
        if files:
            out.append((d, files))
    return out


def _load_brats(root: Path) -> CaseTable:
    found = _brats_case_dirs(root)
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


# ----------------------------------------------------------------------------- BUS-BRA

BUSBRA_CSV = "bus_data.csv"
BUSBRA_FOLDS = "5-fold-cv.csv"
_BUSBRA_FIELDS = {"BIRADS": "birads", "Pathology": "pathology", "Histology": "histology", "Device": "device",
                  "Side": "side"}


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with BOM-safe, stripped header names and stripped cells."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot be read as CSV ({e})", "save it as UTF-8 CSV") from e


def _load_busbra(root: Path) -> CaseTable:
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
