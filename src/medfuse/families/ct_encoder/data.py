"""Data for the ``ct_encoder`` family: CT-RATE layout + reports + chain-of-thought + region masks
(seed 001, "Data Processing Pipeline").

Layout (``data.root`` is a folder; every file name below is a ``data.params`` key with this
default, relative to the root)::

    <root>/**/<VolumeName>            volumes anywhere under the root (CT-RATE nests them as
                                      train/train_1/train_1_a/train_1_a_1.nii.gz)
    <root>/reports.csv                VolumeName, Findings_EN, Impressions_EN (CT-RATE's columns)
    <root>/masks/<VolumeName>         region-ID mask per volume (0 = no region, 1..R)
    <root>/regions.json               {"region_names": {"1": "right upper lobe", ...},
                                       "region_groups": {"right lung": [1, 2, 3], ...}}
    <root>/metadata.csv   (optional)  VolumeName, RescaleSlope, RescaleIntercept
    <root>/labels.csv     (optional)  VolumeName + one 0/1 column per abnormality (zero-shot AUROC,
                                      linear probe, clinical efficacy of generated reports)
    <root>/cot.json       (optional)  chain-of-thought records (JSON list or JSONL), the seed's schema:
                                      {"volumename" | "case_id", "cot_reasoning": [{"step", "text",
                                       "anatomical_entities", "mask_region", "lesion"?}], ...}; a
                                      CT-RATE-Thinking's vqa.jsonl / report.jsonl records (reasoning and
                                      answer; see cot.py) are split into sentences.
    <root>/lesions/<VolumeName> (optional) lesion mask per volume (label k = the lesion a CoT step
                                      names with "lesion": k), for localization IoU

Per case the batch carries ``text`` (the impression; findings if there is none), ``findings``,
``region_text`` (``[[region_id, sentences of the findings that name exactly that region]]``),
``steps`` (``[[step text, [region ids of its mask_region]]]``), ``step_lesions`` (the lesion label
of each step, 0 = none), ``labels`` (abnormality vector, NaN when unknown), ``image`` (B, 1, D, H,
W), ``mask`` (B, 1, D, H, W) and, when any case has a lesion mask, ``lesion`` (B, 1, D, H, W) (zeros
for a case without one). The lesion mask rides through every transform as a second mask channel, so
flips and crops move it with the image (the transform chain: :mod:`medfuse.families.ct_encoder.transforms`).

**HU conversion is explicit and applied once** (REFERENCE: CT-RATE v2 files are already in HU and
applying slope/intercept again is CT-CLIP's issues #28/#50): ``data.params.hu`` is ``none`` (files
are HU), ``metadata`` (slope/intercept per volume from the metadata CSV) or ``fixed``
(``hu_slope``/``hu_intercept``). It runs right after loading, before windowing. A file whose
NIfTI header already rescales, air far below -1024 HU after conversion (rescaled twice) or, under
``hu: none``, air far above it (stored values, CT-RATE v1: air near 0) raise a DataError instead of
silently training on shifted volumes (:mod:`medfuse.families.ct_encoder.hu`; ``hu_check: false`` skips the air checks).
CSV errors name the file line a record starts on (quoted findings span several lines).

Spacing, window and crop/pad come from ``data.transforms`` (``spacing``, ``intensity.ct``
``kind: ct_window``, ``spatial_size``; the seed's size is (64, 512, 512) and [0, 1] after
windowing). The mask is resampled with nearest neighbour onto the image grid.

The report side (region vocabulary, region sentences, CoT steps and the CoT file reader) is in
:mod:`medfuse.families.ct_encoder.cot`; the options are
:class:`~medfuse.families.ct_encoder.params.CTEncoderDataParams`.
:func:`predict_cases` reads ``medfuse predict``'s inputs (a ``VOLUME MASK`` pair or a folder in this
layout) for :class:`~medfuse.families.ct_encoder.predict.CTEncoderPredictor`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from medfuse.config import Config, validate_params
from medfuse.data.datamodule import CaseDataModule, SeededDataset, SeededSampler, data_root, resolve_splits
from medfuse.data.layouts import Case, CaseTable
from medfuse.data.layouts.ctrate import (
    CTRATE_NAME,
    VOLUME_SUFFIXES,
    csv_columns,
    read_csv_records,
    read_regions,
    region_ids,
    reports_header_problem,
    rescale_of,
    volume_stem,
)
from medfuse.data.paths import check_case_id
from medfuse.errors import ConfigError, DataError
from medfuse.families.ct_encoder.cot import (
    RegionVocab,
    check_cot_coverage,
    cot_step_lesions,
    cot_steps,
    merge_cot,
    read_cot,
    region_sentences,
)
from medfuse.families.ct_encoder.params import CTEncoderDataParams
from medfuse.families.ct_encoder.transforms import case_item, ct_transforms

_NOT_LABELS = {"VolumeName", "case_id", "volumename"}
RETRIEVAL_MONITORS = ("val/mean_recall", "val/i2t_R@", "val/t2i_R@")
"""Monitors read from validation retrieval (Recall@k over the split's pairs)."""

log = logging.getLogger(__name__)


def check_params(cfg: Config) -> CTEncoderDataParams:
    """The validated ``data.params`` (unknown keys and bad values raise a one-line ConfigError naming
    ``data.params.<key>``), after checking the data options the family needs."""
    p = validate_params(CTEncoderDataParams, cfg.data.params, "data.params")
    if cfg.data.modalities not in (None, ["ct"]):
        raise ConfigError("data.modalities", f"ct_encoder reads one CT per case, got {cfg.data.modalities}",
                          "set data.modalities=[ct] or leave it unset")
    if cfg.data.transforms.spatial_size is None:
        raise ConfigError("data.transforms.spatial_size", "is not set; volumes must share one size to batch",
                          "set it to (D, H, W), e.g. [64, 512, 512] (the seed's)")
    return p


_csv = read_csv_records  # BOM-safe, stripped headers and cells; each row with the file line it starts on


def _optional(root: Path, p: CTEncoderDataParams, key: str) -> Path | None:
    """The path of data param ``key``: a given one must exist; the default one may be missing."""
    value = getattr(p, key)
    if value is None:
        return None
    path = root / str(value)
    if not path.exists():
        if str(value) == CTEncoderDataParams.model_fields[key].default:
            return None
        raise DataError(path, "not found", f"fix data.params or place the file under {root}")
    return path


def _cot_paths(root: Path, p: CTEncoderDataParams) -> list[Path]:
    """The chain-of-thought files: ``data.params.cot`` (one name or a list, e.g. CT-RATE-Thinking's
    ``[vqa.jsonl, report.jsonl]``); a missing default file is no error."""
    if isinstance(p.cot, list):
        paths = [root / str(v) for v in p.cot]
        for path in paths:
            if not path.is_file():
                raise DataError(path, "not found", f"fix data.params.cot or place the file under {root}")
        return paths
    path = _optional(root, p, "cot")
    return [path] if path is not None else []


def region_vocab(root: Path, p: CTEncoderDataParams) -> RegionVocab:
    """The region vocabulary of a dataset: ``data.params.region_names``/``region_groups``, else the
    ``regions.json`` under ``root`` (``{"region_names": {...}, "region_groups": {...}}``)."""
    meta: dict[str, Any] = {}
    path = _optional(root, p, "regions")
    if path is not None:
        meta = read_regions(path)  # the layout's reader: `data check` declares the same mask values
    names = p.region_names or meta.get("region_names")
    if not names:
        raise ConfigError("data.params.region_names", "no region names given",
                          f"set data.params.region_names (id -> name) or write {root / 'regions.json'}")
    # region k is mask value k: other ids would never match a mask
    names = region_ids(names, "data.params.region_names" if p.region_names else (path or "region_names"))
    return RegionVocab(names, p.region_groups or meta.get("region_groups"))


# ------------------------------------------------------------------------------------- the table


def _labels_of(entry: tuple[int, dict[str, str]] | None, abnormalities: list[str], path: Path | None,
               stem: str) -> list[float]:
    """The abnormality vector of a volume from its labels CSV row (an empty cell or no row: NaN); a
    cell that is no number is refused naming the file line its record starts on."""
    if entry is None:
        return [float("nan")] * len(abnormalities)
    line, row = entry
    out = []
    for a in abnormalities:
        cell = row.get(a, "")
        try:
            out.append(float(cell) if cell != "" else float("nan"))
        except ValueError:
            raise DataError(f"{path} (line {line})", f"label {a!r} of {stem} is {cell!r}, not a number",
                            "write 0 or 1 (empty: unknown)") from None
    return out


def read_ctrate(root: str | Path, p: CTEncoderDataParams) -> tuple[CaseTable, RegionVocab, list[str]]:
    """Read a CT-RATE-style folder into cases (nothing but CSV/JSON is opened).

    Returns:
        ``(table, vocab, abnormalities)``; each case has ``images={"ct": path}``, ``mask``,
        ``text`` (impression) and ``extra`` with ``findings``, ``region_text``, ``steps``,
        ``labels`` and ``hu`` ([slope, intercept] or None).
    """
    root = Path(root).absolute()
    vocab = region_vocab(root, p)
    reports_path = root / str(p.reports)
    if not reports_path.is_file():
        raise DataError(reports_path, "reports CSV not found", "set data.params.reports (e.g. train_reports.csv)")
    bad_header = reports_header_problem(reports_path, csv_columns(reports_path))  # before any row's findings
    if bad_header is not None:
        raise bad_header
    reports = _csv(reports_path)
    if not reports:
        raise DataError(reports_path, "has no rows", "give the reports CSV one row per volume (VolumeName, "
                        "Findings_EN, Impressions_EN)")
    masks = root / str(p.masks)
    if not masks.is_dir():
        raise DataError(masks, "region mask folder not found", "set data.params.masks (one mask per volume)")
    lesions = _optional(root, p, "lesions")
    lesion_index = {volume_stem(f.name): f for f in lesions.rglob("*") if f.is_file()} if lesions else {}
    index = {volume_stem(f.name): f for f in sorted(root.rglob("*"))
             if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES) and masks not in f.parents
             and (lesions is None or lesions not in f.parents)}
    mask_index = {volume_stem(f.name): f for f in masks.rglob("*") if f.is_file()}

    meta_path = _optional(root, p, "metadata")
    meta = {volume_stem(r.get("VolumeName", "")): (n, r) for n, r in _csv(meta_path)} if meta_path else {}
    if p.hu == "metadata" and not meta:
        raise ConfigError("data.params.hu", "is 'metadata' but no metadata CSV was found",
                          "set data.params.metadata, or hu=none if the volumes are already in HU")
    labels_path = _optional(root, p, "labels")
    label_rows = {volume_stem(r.get("VolumeName", "")): (n, r) for n, r in _csv(labels_path)} if labels_path else {}
    abnormalities = [c for c in next(iter(label_rows.values()), (0, {}))[1] if c not in _NOT_LABELS]
    cot: dict[str, dict[str, Any]] = {}
    cot_files = _cot_paths(root, p)
    for cot_path in cot_files:
        merge_cot(cot, read_cot(cot_path))
    if cot_files and not cot:
        raise DataError(", ".join(map(str, cot_files)), "holds no record that names a volume",
                        "give each record its volume (image, VolumeName or volume_name: e.g. train_1_a_1.nii.gz)")
    # CoT from a report belongs to every reconstruction of its scan (they share the report)
    cot_by_scan = {(m["patient"], m["scan"]): rec for key, rec in sorted(cot.items())
                   if (m := CTRATE_NAME.match(key))}

    cases, missing, seen_scans = [], [], set()
    for line, r in reports:  # line: where the record starts in the file (findings span several lines)
        stem = volume_stem(r["VolumeName"])
        m = CTRATE_NAME.match(stem)
        if stem not in index:  # before the scan counts as kept: its next reconstruction may be on disk
            missing.append(stem)
            continue
        if p.reconstructions == "first" and m:
            scan = (m["patient"], m["scan"])
            if scan in seen_scans:
                continue  # another reconstruction of a scan already listed: same report, same patient
            seen_scans.add(scan)
        if stem not in mask_index:
            raise DataError(masks / r["VolumeName"], f"no region mask for volume {stem}",
                            "give every volume a mask of the same name in data.params.masks")
        rec = cot.get(stem) or (cot_by_scan.get((m["patient"], m["scan"])) if m else None) or {}
        findings = r.get("Findings_EN") or r.get("findings") or ""
        impression = r.get("Impressions_EN") or r.get("impression") or rec.get("impression") or findings
        if not impression:
            raise DataError(f"{reports_path} (line {line})", f"volume {stem} has neither findings nor impression",
                            "fill Findings_EN/Impressions_EN or drop the row")
        hu = None
        if p.hu == "metadata":
            if stem not in meta:
                raise DataError(meta_path or "metadata", f"no RescaleSlope/RescaleIntercept for {stem}",
                                "add the row, or set data.params.hu=none if the volumes are in HU")
            meta_line, row = meta[stem]
            hu = rescale_of(row, f"{meta_path} (line {meta_line})", stem)
        elif p.hu == "fixed":
            hu = [float(p.hu_slope), float(p.hu_intercept)]
        labels = _labels_of(label_rows.get(stem), abnormalities, labels_path, stem)
        cases.append(Case(
            case_id=stem, patient_id=m["patient"] if m else stem, images={"ct": str(index[stem])},
            mask=str(mask_index[stem]), text=impression,
            extra={"findings": findings, "region_text": region_sentences(findings, vocab),
                   "steps": cot_steps(rec, vocab) if rec else [], "step_lesions": cot_step_lesions(rec) if rec else [],
                   "lesion": str(lesion_index[stem]) if stem in lesion_index else None,
                   "labels": labels, "hu": hu}))
    if missing:
        log.warning("%d volumes of %s are not under %s (e.g. %s); they are skipped", len(missing),
                    reports_path.name, root, missing[0])
    if not cases:
        raise DataError(root, f"none of the {len(reports)} volumes of {reports_path.name} was found",
                        "set data.root to the folder holding the volumes")
    if cot_files:
        check_cot_coverage({c.case_id: c.extra["steps"] for c in cases}, cot, cot_files, reports_path.name)
    table = CaseTable(root=root, layout="ctrate", modalities=["ct"], cases=cases, class_names=abnormalities or None,
                      patient_ids_given=any(CTRATE_NAME.match(c.case_id) for c in cases), source=reports_path)
    return table, vocab, abnormalities


def read_omniabnorm(root: str | Path, p: CTEncoderDataParams) -> tuple[CaseTable, RegionVocab, list[str]]:
    """OmniAbnorm-CT records as ct_encoder cases: each sample is a thin slab (centre slice + context
    slices), finding group k is region k (its mask on the centre slice, also its lesion label), and
    each finding's description is its region text and one CoT step anchored in that region."""
    from medfuse.data.layouts.omniabnorm import load_omniabnorm, omniabnorm_json

    root = Path(root).absolute()
    source = root / p.records if p.records else omniabnorm_json(root)
    if source is None or not source.is_file():
        raise DataError(source or root, "no OmniAbnorm-CT records JSON found",
                        "set data.params.records to the JSON of records (sample id -> image, mask, abnormality)")
    table = load_omniabnorm(source)
    names = p.region_names or {k: f"finding {k}" for k in range(1, p.max_findings + 1)}
    vocab = RegionVocab(names if isinstance(names, dict) else dict(enumerate(names, start=1)), p.region_groups)
    for c in table.cases:
        groups = list(c.extra.get("findings") or [])[: p.max_findings]
        texts = [g["description"] or g["label"] or f"finding {k}" for k, g in enumerate(groups, start=1)]
        c.extra = {"findings": c.text or "", "region_text": [[k, t] for k, t in enumerate(texts, start=1)],
                   "steps": [[t, [k]] for k, t in enumerate(texts, start=1)],
                   "step_lesions": list(range(1, len(texts) + 1)), "labels": [], "hu": None,
                   "lesion": "omniabnorm" if groups else None,
                   "omni": {"image": c.images["ct"], "mask": c.mask, "context": list(c.extra.get("context") or []),
                            "groups": [list(g["ids"]) for g in groups]}}
        c.mask = None
    return table, vocab, []


def read_dataset(root: str | Path, p: CTEncoderDataParams) -> tuple[CaseTable, RegionVocab, list[str]]:
    """:func:`read_ctrate` or :func:`read_omniabnorm`, as ``data.params.source`` says."""
    return read_omniabnorm(root, p) if p.source == "omniabnorm" else read_ctrate(root, p)


class CTEncoderDataModule(CaseDataModule):
    """Train/val/test loaders over a CT-RATE-style folder (see module doc).

    Attributes:
        params: the validated ``data.params``.
        vocab: the :class:`RegionVocab`.
        abnormalities: label names of ``labels.csv`` (zero-shot classes), possibly empty.
    """

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        L.LightningDataModule.__init__(self)
        self.cfg, self.run_dir = cfg, run_dir
        self.params = check_params(cfg)
        root = data_root(cfg, "a CT-RATE-style folder or OmniAbnorm-CT records")
        self.table, self.vocab, self.abnormalities = read_dataset(root, self.params)
        n_regions = cfg.model.params.get("num_regions")
        if n_regions is not None and int(n_regions) != len(self.vocab.names):
            raise ConfigError("model.params.num_regions", f"is {n_regions} but the dataset names "
                              f"{len(self.vocab.names)} regions", f"set model.params.num_regions={len(self.vocab.names)}")
        self.table, self.cases = resolve_splits(cfg, run_dir, self.table, stratify=False)
        self.modalities = ["ct"]
        self._datasets = {}

    @property
    def has_mask(self) -> bool:
        return True

    def setup(self, stage: str | None = None) -> None:
        """The platform's checks; for ``fit``, one warning (once per data module) when a retrieval
        monitor (``val/mean_recall``, ``val/i2t_R@k``, ``val/t2i_R@k``) reads a validation split of
        fewer than 2 patients: Recall@k over a gallery of one is 1.0 every epoch, so ``best.ckpt``
        would be chosen on a constant."""
        super().setup(stage)
        if stage not in (None, "fit") or getattr(self, "_warned_val", False):
            return
        self._warned_val = True
        monitor = str(self.cfg.train.monitor)
        patients = {c.patient_id for c in self.cases.get("val") or []}
        if monitor.startswith(RETRIEVAL_MONITORS) and len(patients) < 2:
            log.warning("train.monitor=%s: the validation split holds %d patient(s); Recall@k needs other "
                        "patients to rank against (with one it is 1.0 every epoch), so model selection on it is "
                        "uninformative; give data.split.val 2 or more patients", monitor, len(patients))

    def dataset(self, split: str):
        from medfuse.data.cache import build_dataset

        if split not in self._datasets:
            if not self.cases[split]:
                raise DataError(self.cfg.data.root or "data", f"the {split} split is empty",
                                "add cases or change data.split fractions")
            items = [case_item(c) for c in self.cases[split]]
            tf = ct_transforms(self.cfg, train=(split == "train"), lesions=self.has_lesions,
                               regions=len(self.vocab.names))
            self._datasets[split] = SeededDataset(build_dataset(items, tf, cache_dir=self.cfg.data.cache_dir,
                                                                    dicom=self.cfg.data.dicom))
        return self._datasets[split]

    @property
    def has_lesions(self) -> bool:
        """Whether any case has a lesion mask (then every batch carries ``lesion``)."""
        return any(c.extra.get("lesion") for c in self.table.cases)

    def eval_loader(self, split: str):
        """An unshuffled loader over ``split`` with the evaluation transforms (no augmentation), e.g.
        the training cases for the linear probe and the nearest-neighbour baseline."""
        from torch.utils.data import DataLoader

        from medfuse.data.cache import build_dataset
        from medfuse.data.datamodule import collate, derive_seed

        if split != "train":
            return self.loader(split)
        key = "train:eval"
        if key not in self._datasets:
            items = [case_item(c) for c in self.cases["train"]]
            tf = ct_transforms(self.cfg, train=False, lesions=self.has_lesions, regions=len(self.vocab.names))
            self._datasets[key] = SeededDataset(build_dataset(items, tf, cache_dir=self.cfg.data.cache_dir,
                                                                    dicom=self.cfg.data.dicom))
        ds = self._datasets[key]
        return DataLoader(ds, batch_size=self.cfg.data.eval_batch_size or self.cfg.data.batch_size,
                          sampler=SeededSampler(len(ds), derive_seed(self.cfg.train.seed, key), shuffle=False),
                          num_workers=self.cfg.data.num_workers, collate_fn=collate)


def ct_encoder_datamodule(cfg: Config, run_dir: Path | None = None) -> CTEncoderDataModule:
    """The ct_encoder family's data module (``Family.datamodule``)."""
    return CTEncoderDataModule(cfg, run_dir)


def predict_cases(inputs: list[str], p: CTEncoderDataParams,
                  name: Callable[[str, str], str] = check_case_id) -> list[Case]:
    """``medfuse predict``'s inputs as cases: ``VOLUME MASK`` (HU conversion as configured; ``hu:
    metadata`` needs a folder) or one CT-RATE-style folder (all its volumes). ``name(default,
    where)`` gives the id of a ``VOLUME MASK`` case (the predictor's ``--case-id``, or the checked
    file name)."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return read_dataset(inputs[0], p)[0].cases
    if len(inputs) == 2:
        for path in inputs:
            if not Path(path).exists():
                raise DataError(path, "file not found", "check the path")
        if p.hu == "metadata":
            raise DataError(inputs[0], "this run converts to HU with per-volume metadata",
                            "pass a dataset folder with its metadata CSV instead of single files")
        hu = [float(p.hu_slope), float(p.hu_intercept)] if p.hu == "fixed" else None
        stem = name(Path(inputs[0]).name.split(".")[0], inputs[0])
        return [Case(case_id=stem, patient_id=stem, images={"ct": inputs[0]}, mask=inputs[1], text="",
                     extra={"hu": hu})]
    raise DataError(" ".join(inputs), "ct_encoder predicts from a VOLUME MASK pair or one dataset folder",
                    "run `medfuse predict RUN volume.nii.gz mask.nii.gz` or `medfuse predict RUN folder/`")
