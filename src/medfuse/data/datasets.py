"""Layouts of the datasets the seeds name (besides BraTS and BUS-BRA in :mod:`medfuse.data.layouts`).

Each loader turns a dataset folder into a :class:`~medfuse.data.layouts.CaseTable` from its file
names, CSV/JSON tables and, where pairing needs it, DICOM headers; no voxel is read. The facts
about each layout are in REFERENCE.md ("Datasets the seeds name").

``cellmap`` (seed 004)
    ``<root>/<ds>/<ds>.zarr`` (or ``<root>/<ds>.zarr``, or the ``.zarr`` itself) with
    ``recon-*/em/<raw>/s0..`` and ``recon-*/labels/groundtruth/crop<N>/<class>/s0..``. One case per
    crop (``<ds>_crop<N>``); the patient is the dataset (crops of one sample stay in one split).
    ``images["raw"]`` is the EM multiscales group, ``mask`` the crop group; ``extra`` holds
    ``dataset``, ``crop`` and ``classes`` (``;``-joined). Read with
    :func:`medfuse.data.containers.read_cellmap_crop`.
``nsclc`` (seed 002, NSCLC-Radiogenomics from TCIA)
    A clinical CSV in the root (header names stripped; keyed by ``Case ID``) and one folder per
    patient (``AMC-*``, ``R01-*``, at the root or one level down) holding series folders. The SEG
    series (an early 3D Slicer SEG) names its CT through ``ReferencedSeriesSequence``; one header per
    series folder is read to pair them. One case per patient with a SEG: ``images["ct"]`` the CT
    series folder, ``mask`` the SEG file; ``extra`` holds every CSV column in snake case plus
    ``histology``, ``t_stage``, ``n_stage``, ``m_stage``. Patients without a SEG or a CSV row are left
    out (a note says how many).
``ctrate`` (seed 001)
    CT-RATE: a reports CSV (``VolumeName``, ``Findings_EN``, ``Impressions_EN``) in the root or one
    folder down, volumes ``**/<VolumeName>`` (``train_N_a_M.nii.gz``: patient ``train_N``), optional
    region masks ``masks/<VolumeName>`` and a metadata CSV (``RescaleSlope``, ``RescaleIntercept``).
``omniabnorm`` (seed 001, OmniAbnorm-CT)
    A JSON dict keyed by sample id whose records hold ``image`` (a folder with the centre slice
    ``0.jpeg`` and neighbours named by offset), ``context`` (the offsets), ``mask`` (a folder with one
    ``<finding id>.jpeg`` per finding) and ``abnormality`` (``id``, ``group_id``, ``label``,
    ``description``, ...; none = normal). One case per sample; the patient is the image folder's
    parent (the source scan), so neighbouring slices of one scan stay together. Ids that are not
    names have their other characters replaced by ``_``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfuse.data.layouts import Case, CaseTable, read_csv_rows
from medfuse.errors import DataError

DATASET_LAYOUTS = ("cellmap", "nsclc", "ctrate", "omniabnorm")
NSCLC_FIELDS = {"histology": "histology", "pathological_t_stage": "t_stage", "pathological_n_stage": "n_stage",
                "pathological_m_stage": "m_stage"}
_CTRATE_NAME = re.compile(r"^(?P<patient>(?:train|valid|test)_\d+)_(?P<scan>[a-z]+)_(?P<rec>\d+)$")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".npz")


def candidates(path: Path, layout: str) -> Iterator[tuple[str, Path]]:
    """The dataset layouts a folder matches (cheap checks first), as ``(layout, source)``."""
    if layout in ("auto", "cellmap") and cellmap_containers(path):
        yield "cellmap", path
    if layout in ("auto", "nsclc") and (csv := nsclc_csv(path)) is not None:
        yield "nsclc", csv
    if layout in ("auto", "ctrate") and ctrate_reports(path):
        yield "ctrate", path
    if layout in ("auto", "omniabnorm") and (js := omniabnorm_json(path)) is not None:
        yield "omniabnorm", js


def load(layout: str, source: Path) -> CaseTable:
    """The table of one of :data:`DATASET_LAYOUTS` (``source`` from :func:`candidates`)."""
    return {"cellmap": load_cellmap, "nsclc": load_nsclc, "ctrate": load_ctrate,
            "omniabnorm": load_omniabnorm}[layout](source)


def snake(name: str) -> str:
    """``"Pathological T stage "`` -> ``"pathological_t_stage"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def safe_id(text: str) -> str:
    """A case id from any sample id: characters outside ``A-Z a-z 0-9 . _ -`` become ``_``."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip("._-")
    return out[:128] or "_"


# ----------------------------------------------------------------------------------- CellMap


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


# -------------------------------------------------------------------------------------- NSCLC


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


# ------------------------------------------------------------------------------------ CT-RATE


def _header_of(path: Path) -> set[str]:
    try:
        return {c.strip() for c in path.open(encoding="utf-8-sig").readline().strip().split(",")}
    except (OSError, UnicodeDecodeError):
        return set()


def ctrate_reports(root: Path) -> list[Path]:
    """Reports CSVs (``VolumeName`` + ``Findings_EN``) in ``root`` or one folder down."""
    if not root.is_dir():
        return []
    csvs = [*sorted(root.glob("*.csv")), *sorted(root.glob("*/*.csv"))]
    return [p for p in csvs if {"VolumeName", "Findings_EN"} <= _header_of(p)]


def volume_stem(name: str) -> str:
    name = Path(str(name)).name
    low = name.lower()
    return next((name[: -len(s)] for s in _VOLUME_SUFFIXES if low.endswith(s)), name)


def load_ctrate(root: Path) -> CaseTable:
    reports = ctrate_reports(root)
    masks = root / "masks"
    meta_csvs = [p for p in [*root.glob("*.csv"), *root.glob("*/*.csv")] if {"VolumeName", "RescaleSlope"} <= _header_of(p)]
    meta = {volume_stem(r.get("VolumeName", "")): r for p in meta_csvs for r in read_csv_rows(p)}
    index = {volume_stem(f.name): f for f in sorted(root.rglob("*"))
             if f.is_file() and f.name.lower().endswith(_VOLUME_SUFFIXES) and masks not in f.parents}
    mask_index = {volume_stem(f.name): f for f in masks.rglob("*") if f.is_file()} if masks.is_dir() else {}
    cases, missing = [], 0
    for source in reports:
        for r in read_csv_rows(source):
            stem = volume_stem(r.get("VolumeName", ""))
            if stem not in index:
                missing += 1
                continue
            m = _CTRATE_NAME.match(stem)
            row = meta.get(stem)
            cases.append(Case(case_id=safe_id(stem), patient_id=m["patient"] if m else stem,
                              images={"ct": str(index[stem])},
                              mask=str(mask_index[stem]) if stem in mask_index else None,
                              text=r.get("Impressions_EN") or r.get("Findings_EN") or None,
                              extra={"findings": r.get("Findings_EN", ""),
                                     "rescale": None if row is None else [row.get("RescaleSlope", ""),
                                                                          row.get("RescaleIntercept", "")]}))
    if not cases:
        raise DataError(root, "none of the volumes its reports CSV names is under it",
                        "point at the CT-RATE dataset folder holding the volumes")
    notes = [f"CT-RATE: {len(cases)} volumes" + (f"; {missing} listed volumes are not on disk" if missing else "")
             + ("" if mask_index else "; no masks/ folder (ct_encoder needs region masks)")]
    return CaseTable(root=root, layout="ctrate", modalities=["ct"], cases=cases,
                     patient_ids_given=any(_CTRATE_NAME.match(c.case_id) for c in cases), source=reports[0],
                     notes=notes)


# ------------------------------------------------------------------------------ OmniAbnorm-CT


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
