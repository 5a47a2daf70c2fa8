"""Data for the ``text_seg`` family (seed 002, Talk2MedSAM): 2D images + masks + text + box prompts.

A dataset is a manifest CSV (the platform's ``manifest`` layout, :mod:`medfuse.data.layouts`): one
row per image with ``case_id``, ``patient_id``, ``image_<modality>`` (PNG, JPG, a single DICOM file,
or a NIfTI / DICOM volume with a ``slice`` column), ``mask`` and either a free ``text`` column or
attribute columns that ``data.params.text_template`` turns into text (e.g.
``"{birads} lesion, {margin} margins"``). Boxes come from the masks (MedSAM's tight box, jittered
outwards in training) or, with ``box_source: csv``, from a ``box`` column (``"x0 y0 x1 y1"``) or
``box_x0 .. box_y1`` columns in original pixels (x = column, y = row, inclusive extents).

NSCLC-Radiogenomics (layout ``nsclc``, :mod:`medfuse.data.layouts.nsclc`): each patient's CT series
and DICOM SEG become one record per slice through the tumour (:func:`tumour_slice_records`), with
the clinical CSV's fields (``histology``, ``t_stage``, ...) for the template.

Splits are by patient (:func:`medfuse.data.split.assign_splits`); ``split_by: image`` is refused
when patient ids exist, since BUS-BRA-like data hold several images per patient and a per-image
split leaks patients into the test set (the peer's flaw).

Reading a record's pixels (image plane, mask, box from the mask) lives in
:mod:`medfuse.families.text_seg.pixels`, where a volume is read once for all its slices in a pass
(:class:`~medfuse.families.text_seg.pixels.VolumeCache`: the last few volumes read, keyed by their
files' size and mtime); with ``cache_in_memory`` the first slice of a volume that
:class:`TextSegDataset` loads loads all of that volume's slices, so a shuffled first epoch also reads
each series once.

The text of a record (template, checks of the fields against the table) lives in
:mod:`medfuse.families.text_seg.prompts`.

Each item: ``image`` (3, S, S) in [0, 1] (MedSAM preprocessing, 2.5D optional), ``mask``
(1, m, m) binary, ``box`` (4,) in model-input pixels, ``text`` (str), ``orig_size`` (2,).
Counterfactual text (``FIELD=shuffle|VALUE``) replaces one field of the split's text before
rendering; :meth:`TextSegDataModule.loader` applies it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medfuse.config import validate_params
from medfuse.data.datamodule import CaseDataModule, SeededSampler, collate, derive_seed, load_table
from medfuse.data.dicom import current_options, use_dicom_options
from medfuse.errors import ConfigError, DataError
from medfuse.families.text_seg.params import TextSegDataParams
from medfuse.families.text_seg.pixels import _volume, box_from_mask, is_volume, read_mask, read_plane
from medfuse.families.text_seg.prompts import case_fields, check_text_fields, render_text

log = logging.getLogger(__name__)

__all__ = ["Record", "SplitRecords", "TextSegDataModule", "TextSegDataset", "apply_counterfactual",
           "records_from_cases", "tumour_slice_records"]

BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")


@dataclasses.dataclass
class Record:
    """One 2D sample: where its pixels are and what its prompt is.

    Attributes:
        case_id: unique id.
        image: image path.
        mask: mask path (``None`` for prediction).
        fields: text fields (the ``text`` column and the attribute columns).
        box: (x0, y0, x1, y1) in original pixels from the CSV, or ``None``.
        slice_index: slice of a volume file, or ``None`` for a 2D file.
        patient_id: the patient (several records of one patient are resampled together by the
            evaluation bootstrap).
    """

    case_id: str
    image: str
    mask: str | None
    fields: dict[str, str]
    box: tuple[float, float, float, float] | None = None
    slice_index: int | None = None
    patient_id: str | None = None


# ----------------------------------------------------------------------------------------------
# records and text


def _parse_box(case_id: str, extra: dict[str, Any]) -> tuple[float, float, float, float] | None:
    if extra.get("box") not in (None, ""):
        parts = [v for v in re.split(r"[,\s;]+", str(extra["box"]).strip("[]() ")) if v]
    elif all(extra.get(c) not in (None, "") for c in BOX_COLUMNS):
        parts = [str(extra[c]) for c in BOX_COLUMNS]
    else:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except ValueError:
        raise DataError(case_id, f"box {parts} is not 4 numbers", "write the box as 'x0 y0 x1 y1' in pixels") from None
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise DataError(case_id, f"box {parts} is not 4 finite numbers", "write the box as 'x0 y0 x1 y1' in pixels")
    if not (x1 >= x0 and y1 >= y0):
        raise DataError(case_id, f"box {parts} has x1 < x0 or y1 < y0", "write the box as 'x0 y0 x1 y1'")
    return (x0, y0, x1, y1)


def records_from_cases(cases: list, modality: str, need_mask: bool = True) -> list[Record]:
    """Manifest cases -> :class:`Record` (the image of ``modality``; text fields from the CSV)."""
    out = []
    for c in cases:
        if modality not in c.images:
            raise DataError(c.case_id, f"has no '{modality}' image", f"fill its image_{modality} cell")
        if need_mask and not c.mask:
            raise DataError(c.case_id, "has no mask", "give every training / evaluation image a mask")
        fields = case_fields(c)
        sl = fields.get("slice", "")
        try:
            slice_index = int(float(sl)) if sl != "" else None
        except ValueError:
            raise DataError(c.case_id, f"slice '{sl}' is not an integer", "give the slice index (0-based)") from None
        out.append(Record(c.case_id, c.images[modality], c.mask, fields, _parse_box(c.case_id, fields), slice_index,
                          patient_id=c.patient_id))
    return out


def tumour_slice_records(cases: list, modality: str) -> list[Record]:
    """NSCLC-Radiogenomics style volumes -> one :class:`Record` per slice through the tumour.

    Each case is a CT series with a DICOM SEG (layout ``nsclc``); the SEG is read once on the CT's
    grid and every slice holding tumour becomes a record ``<case>_z<slice>`` (2.5D with
    ``data.params.two_and_half_d``). A patient's slices share the patient's split.
    """
    out = []
    for rec in records_from_cases(cases, modality):
        labels = _volume(rec.mask, rec.image)[0]  # (D, H, W) on the CT grid
        slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
        if slices.size == 0:
            raise DataError(rec.mask, f"the SEG of case {rec.case_id} marks no tumour voxel",
                            "check the segmentation, or leave the patient out")
        out += [dataclasses.replace(rec, case_id=f"{rec.case_id}_z{int(k):03d}", slice_index=int(k)) for k in slices]
    return out


def apply_counterfactual(records: list[Record], template: str | None, spec: str, seed: int = 0) -> dict[str, str]:
    """Wrong text for every record, ``FIELD=shuffle|wrong|VALUE[,FIELD=...]``: case_id -> text.

    ``shuffle`` gives each record another record's value of FIELD (a cyclic permutation), ``wrong``
    always changes it (a derangement of values), ``VALUE`` sets it; ``FIELD`` is a template field or
    ``text``. The rules live in :func:`medfuse.families.text_seg.evaluate.counterfactual_texts`.
    """
    from medfuse.families.text_seg.evaluate import counterfactual_texts

    return counterfactual_texts(records, template, spec, seed).texts


class TextSegDataset(Dataset):
    """2D samples for text_seg (see the module docstring for the item).

    Indexing takes an index or ``(index, seed)`` from :class:`~medfuse.data.datamodule.SeededSampler`;
    the seed drives the training box jitter and flips, so a resumed run sees the same samples.

    Args:
        records: the samples.
        params: validated ``data.params``.
        train: jitter boxes (and flip when ``params.flip``).
        texts: case_id -> text overriding the rendered text (counterfactuals).
        need_mask: load masks (False for prediction).
    """

    def __init__(self, records: list[Record], params: TextSegDataParams, train: bool = False,
                 texts: dict[str, str] | None = None, need_mask: bool = True):
        self.records, self.p, self.train, self.need_mask = records, params, train, need_mask
        self.texts = {r.case_id: (texts or {}).get(r.case_id) or render_text(r, params.text_template)
                      for r in records}
        self._cache: dict[int, dict[str, Any]] = {}
        self._series: dict[str, list[int]] = {}  # volume -> its slice records (read together when cached)
        # data.dicom in force now travels with the dataset: a spawned DataLoader worker starts at the defaults
        self.dicom = current_options()
        for i, r in enumerate(records):
            if r.slice_index is not None:
                self._series.setdefault(r.image, []).append(i)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, i: int) -> dict[str, Any]:
        """Record ``i``'s preprocessed pixels and box. With ``cache_in_memory``, the first record of a
        volume loads all the volume's slice records while the volume is in
        :data:`~medfuse.families.text_seg.pixels.VOLUMES`, so even a shuffled first epoch reads each
        series once."""
        if i in self._cache:
            return self._cache[i]
        with use_dicom_options(self.dicom):
            item = self._read(i)
            if self.p.cache_in_memory:
                self._cache[i] = item
                for j in self._series.get(self.records[i].image, []):
                    if j not in self._cache:
                        self._cache[j] = self._read(j)
        return item

    def _read(self, i: int) -> dict[str, Any]:
        from medfuse.families.text_seg.sam_prompt import medsam_image

        rec, p = self.records[i], self.p
        plane = read_plane(rec.image, rec.slice_index, p.two_and_half_d, rec.case_id)  # (C, H, W)
        if not np.isfinite(plane).all():
            raise DataError(rec.image, "holds NaN or infinite pixels", "fix or drop the image")
        h, w = plane.shape[-2:]
        window = tuple(p.window) if p.window is not None else None
        item: dict[str, Any] = {"image": medsam_image(plane, p.image_size, p.intensity, window).half(),
                                "orig_size": (h, w)}
        mask = read_mask(rec, p.mask_value, (h, w)) if self.need_mask and rec.mask else None
        if mask is not None:
            m = torch.from_numpy(mask.astype(np.float32))[None, None]
            item["mask"] = (F.interpolate(m, size=(p.mask_size,) * 2, mode="area")[0] >= 0.5).float()
        box = rec.box if p.box_source == "csv" else (box_from_mask(mask) if mask is not None else rec.box)
        if box is None:
            what = "a box column" if p.box_source == "csv" or mask is None else "a non-empty mask"
            raise DataError(rec.case_id, "has no box prompt", f"give it {what}")
        x0, y0, x1, y1 = box
        if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
            raise DataError(rec.case_id, f"box {list(box)} lies outside its {w} x {h} image",
                            "give the box as 'x0 y0 x1 y1' in this image's pixels")
        item["box"] = box
        return item

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from medfuse.families.text_seg.sam_prompt import scale_boxes

        i, seed = key if isinstance(key, tuple) else (key, None)
        rec, base = self.records[i], self._load(i)
        h, w = base["orig_size"]
        x0, y0, x1, y1 = base["box"]
        if self.train and self.p.box_jitter > 0:
            rng = np.random.default_rng(seed if seed is not None else derive_seed("box", i))
            j = float(self.p.box_jitter)
            dx0, dy0, dx1, dy1 = rng.uniform(0, j, 4) * [x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1]
            x0, y0, x1, y1 = max(0.0, x0 - dx0), max(0.0, y0 - dy0), min(w - 1.0, x1 + dx1), min(h - 1.0, y1 + dy1)
        image, mask = base["image"].float(), base.get("mask")
        if self.train and self.p.flip and np.random.default_rng([seed or 0, 1]).random() < 0.5:
            image, mask = image.flip(-1), None if mask is None else mask.flip(-1)
            x0, x1 = w - 1.0 - x1, w - 1.0 - x0
        box = scale_boxes(torch.tensor([[x0, y0, x1, y1]]), h, w, self.p.image_size)[0]
        item = {"case_id": rec.case_id, "image": image, "box": box, "text": self.texts[rec.case_id],
                "orig_size": torch.tensor([h, w])}
        if mask is not None:
            item["mask"] = mask
        return item


# ----------------------------------------------------------------------------------------------


class SplitRecords(Mapping):
    """split -> its :class:`Record` list, each split's records built the first time they are asked for.

    Enumerating records reads pixels for NSCLC (:func:`tumour_slice_records` reads every SEG and CT
    to find the tumour slices), so the test split is read only when something asks for it, which
    only ``evaluate`` does: training never opens a test case's files.

    Args:
        cases: split -> the split's cases.
        to_records: cases -> records.
    """

    def __init__(self, cases: dict[str, list], to_records: Callable[[list], list[Record]]):
        self._cases, self._to_records = cases, to_records
        self._built: dict[str, list[Record]] = {}

    def __getitem__(self, split: str) -> list[Record]:
        if split not in self._built:
            cases = self._cases[split]  # KeyError for an unknown split, as a dict gives
            self._built[split] = self._to_records(cases) if cases else []
        return self._built[split]

    def __contains__(self, split: object) -> bool:  # Mapping's default would build (read) the split
        return split in self._cases

    def __iter__(self) -> Iterator[str]:
        return iter(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def build(self, *splits: str) -> None:
        """Build (read) these splits' records now; a split without cases is skipped."""
        for split in splits:
            if split in self._cases:
                self[split]

    def built(self) -> list[str]:
        """The splits whose records have been built (read)."""
        return list(self._built)


class TextSegDataModule(CaseDataModule):
    """Patient-level splits of a 2D image + mask + text manifest; loaders of :class:`TextSegDataset`.

    Args:
        cfg: the experiment config (``data.params``: :class:`~medfuse.families.text_seg.params.TextSegDataParams`).
        run_dir: the run directory (its saved split is reused).
    """

    partial_modalities = True  # a manifest may name other images; the run reads data.params.modality only

    def __init__(self, cfg, run_dir: Path | None = None):
        self.params: TextSegDataParams = validate_params(TextSegDataParams, cfg.data.params, "data.params")
        table = load_table(cfg)
        if self.params.split_by == "image" and table.patient_ids_given:
            raise ConfigError("data.params.split_by", "split by image refused: the manifest has patient ids, so one "
                              "patient's images would land in several splits", "remove split_by (splits are by patient)")
        check_text_fields(table, self.params.text_template)  # before the split is saved and any pixel is read
        super().__init__(cfg, run_dir, table=table)
        mod = self.params.modality or self.modalities[0]
        if mod not in self.modalities:
            raise ConfigError("data.params.modality", f"'{mod}' is not a modality of the manifest",
                              f"use one of: {', '.join(self.modalities)}")
        self.modality = mod
        if table.layout == "nsclc":  # after the refusals: the patients left out, and why (data check's note)
            for note in (n for n in table.notes if "left out" in n):
                log.warning("%s", note)
        to_records = tumour_slice_records if self.table.layout == "nsclc" else records_from_cases
        # Every split's records are built when first asked for: training builds train and val in
        # setup("fit"), which the engine calls before anything is written, so their data errors come
        # first; evaluate and predict read only what they score (honesty: fit never reads a test case).
        self.records = SplitRecords(self.cases, lambda cases: to_records(cases, mod))
        self._by_id: dict[str, dict[str, Record]] = {}
        self._pixels: dict[str, dict[int, dict[str, Any]]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Lightning's hook: for ``fit``, refuse a frozen image side that no weights reach
        (:func:`~medfuse.families.text_seg.params.check_image_side_weights`), then build (read) the
        training and validation records now. ``train`` calls it before anything is written;
        ``evaluate`` and ``predict`` never do."""
        if stage == "fit":
            from medfuse.engine.checkpoint import checkpoint_dir
            from medfuse.families.text_seg.params import TextSegParams, check_image_side_weights

            # --resume, or a stage started from an earlier stage's checkpoint: trained weights arrive
            trained = self.run_dir is not None and any(checkpoint_dir(self.run_dir).rglob("*.ckpt"))
            check_image_side_weights(validate_params(TextSegParams, self.cfg.model.params, "model.params"),
                                     self.cfg.model.weights, trained)
        if stage in (None, "fit"):
            self.records.build("train", "val")

    def trained_on_volumes(self) -> bool | None:
        """Whether the run's images are slices of 3D volumes (NSCLC's CT series; a manifest's volumes
        with a slice column) rather than 2D images (PNG, JPG, one DICOM file): from the layout, else
        the first training image (a folder or a NIfTI header; no series is read). None: not known
        (no training image here, or it cannot be read)."""
        if self.table.layout == "nsclc":
            return True
        path = next((p for c in self.cases.get("train") or [] if (p := c.images.get(self.modality))), None)
        if path is None or not Path(path).exists():
            return None
        try:
            return is_volume(path)
        except DataError:
            return None

    def record_index(self, split: str) -> dict[str, Record]:
        """case_id -> record of a split."""
        if split not in self._by_id:
            self._by_id[split] = {r.case_id: r for r in self.records[split]}
        return self._by_id[split]

    def dataset(self, split: str, counterfactual: str | None = None, augment: bool | None = None) -> TextSegDataset:
        """The split's dataset.

        Args:
            split: ``train``, ``val`` or ``test``.
            counterfactual: ``FIELD=shuffle|wrong|VALUE[,FIELD=...]`` replacing the text (the test split also takes
                ``data.params.test_counterfactual`` when none is given).
            augment: jitter the boxes (default: only for the training split).
        """
        if counterfactual is None and split == "test":
            counterfactual = self.params.test_counterfactual
        augment = split == "train" if augment is None else augment
        key = f"{split}|{counterfactual}|{augment}"
        if key not in self._datasets:
            recs = self.records[split]
            if not recs:
                raise DataError(self.cfg.data.root or "data", f"the {split} split is empty",
                                "add cases or change data.split fractions")
            texts = None
            if counterfactual is not None:
                seed = derive_seed(self.cfg.train.seed, "counterfactual", counterfactual)
                texts = apply_counterfactual(recs, self.params.text_template, counterfactual, seed)
            ds = TextSegDataset(recs, self.params, train=augment, texts=texts)
            ds._cache = self._pixels.setdefault(split, {})  # the pixels do not depend on text or jitter
            self._datasets[key] = ds
        return self._datasets[key]

    def true_texts(self, split: str) -> dict[str, str]:
        """case_id -> the correct text of a split's records."""
        return {r.case_id: render_text(r, self.params.text_template) for r in self.records[split]}

    def _loader(self, split: str, shuffle: bool, batch_size: int, counterfactual: str | None = None,
                augment: bool | None = None) -> DataLoader:
        ds = self.dataset(split, counterfactual, augment)
        seed = derive_seed(self.cfg.train.seed, split)
        return DataLoader(ds, batch_size=batch_size, sampler=SeededSampler(len(ds), seed, shuffle=shuffle),
                          num_workers=self.cfg.data.num_workers, collate_fn=collate, drop_last=False,
                          generator=torch.Generator().manual_seed(seed))

    def loader(self, split: str, counterfactual: str | None = None) -> DataLoader:
        """An unshuffled, unjittered loader over any split, optionally with counterfactual text."""
        bs = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
        return self._loader(split, False, bs, counterfactual, augment=False)
