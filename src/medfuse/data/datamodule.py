"""Cases -> tensors for Lightning: split bookkeeping, seeded sampling, the generic CaseDataModule.

Exact resume relies on two things done here. The sampler's permutation is a function of
``(seed, epoch)`` only, and every sample carries its own seed, derived from ``(seed, epoch,
index)``, which re-seeds the random transforms right before that sample is built. A resumed run
therefore sees the same batches and the same augmentations as an uninterrupted one, whatever the
number of workers.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medfuse.config import Config
from medfuse.errors import ConfigError, DataError
from medfuse.fileio import atomic_open

SPLITS = ("train", "val", "test")


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any parts (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**31 - 1)


class SeededSampler(Sampler):
    """Yields ``(index, sample_seed)``; the order depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also after a resume).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "perm", self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for i in order:
            yield (i, derive_seed(self.seed, "sample", self.epoch, i))


class SeededDataset(Dataset):
    """Wraps a MONAI dataset; re-seeds its random transforms per sample (see module doc)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from medfuse.data.transforms import set_transform_seed

        if isinstance(key, tuple):
            idx, seed = key
            transform = getattr(self.base, "transform", None)
            if transform is not None:
                set_transform_seed(transform, seed)
        else:
            idx = key
        return self.base[idx]


def _pad_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing ``len(size)`` axes of ``x`` at their end up to ``size``."""
    pad: list[int] = []
    for s, t in zip(reversed(x.shape[-len(size):]), reversed(size), strict=True):
        pad += [0, int(t) - int(s)]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate, but strings and missing keys stay lists and ``None`` is kept.

    Volumes of different spatial sizes (``image`` (C, D, H, W) and the tensors sharing its spatial
    size, e.g. ``mask``) are zero-padded at the far end of each axis to the largest in the batch
    (MONAI ``pad_list_data_collate`` semantics, with the affine's origin voxel unchanged), and
    ``spatial_shape`` (B, 3) records each case's own (D, H, W) so outputs can be cropped back.
    """
    out: dict[str, Any] = {}
    img = [b.get("image") for b in batch]
    sizes = [tuple(x.shape[-3:]) for x in img if isinstance(x, torch.Tensor) and x.ndim >= 4]
    target = None
    if len(sizes) == len(batch) and len(set(sizes)) > 1:
        target = tuple(max(s[i] for s in sizes) for i in range(3))
        out["spatial_shape"] = torch.tensor(sizes, dtype=torch.long)
    for key in batch[0]:
        vals = [b.get(key) for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals):
            if target is not None and all(v.ndim >= 4 and tuple(v.shape[-3:]) == s
                                          for v, s in zip(vals, sizes, strict=True)):
                vals = [_pad_to(v, target) for v in vals]
            out[key] = torch.stack(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = torch.as_tensor(vals)
        elif all(hasattr(v, "shape") and hasattr(v, "dtype") for v in vals):
            out[key] = torch.stack([torch.as_tensor(v) for v in vals])
        else:
            out[key] = vals
    return out


# ----------------------------------------------------------------------------------------------
# splits


def data_root(cfg: Config, what: str = "a folder or manifest") -> Path:
    """``data.root`` as a path that exists (the engine generates ``data.demo``'s phantom before this).

    Args:
        what: what the root should be, for the error message's fix.
    """
    if cfg.data.root is None:
        raise ConfigError("data.root", "no dataset given", f"set data.root=PATH ({what})")
    root = Path(cfg.data.root)
    if not root.exists():
        raise DataError(root, "dataset not found", f"set data.root to an existing {what.removeprefix('a ')}")
    return root


def load_table(cfg: Config, collect: list | None = None):
    """Load and check the case table of a config (the table-wide rules of ``medfuse data check``).

    Case ids are checked while loading; duplicate ids, patient leaks and case labels that are not
    classes (for a classification run: a declared class name or a whole index) are refused with
    one line (:func:`medfuse.data.checks.validate_table`). Class-name labels of a classification
    run become their class index. With ``collect`` (a list), the table-wide problems, bad case ids
    included, are added to it instead of the first being raised.
    """
    from medfuse.data.checks import validate_table
    from medfuse.data.dicom import set_dicom_options

    set_dicom_options(cfg.data.dicom)  # data.dicom applies to every DICOM read of this run
    from medfuse.data.layouts import load_cases

    root = data_root(cfg)
    # collecting (data check --config): every bad case id is a problem of validate_table, not the first one raised
    table = load_cases(root, layout=cfg.data.layout, modalities=cfg.data.modalities, check_ids=collect is None)
    classification = cfg.task == "classification"
    if classification:
        if table.class_names is None and cfg.data.class_names and not cfg.data.label_map:
            table.class_names = list(cfg.data.class_names)  # labels may name the config's classes (T1..T4)
        class_index_labels(table)
    table = regroup_labels(table, cfg.data.label_map, cfg.data.class_names)
    return validate_table(table, classification=classification, collect=collect)


def class_index_labels(table) -> None:
    """Turn case labels that name a declared class into that class's index (in place)."""
    names = table.class_names or []
    for c in table.cases:
        if isinstance(c.label, str) and c.label in names:
            c.label = names.index(c.label)
        elif isinstance(c.label, float) and c.label.is_integer():
            c.label = int(c.label)


def regroup_labels(table, label_map: dict[int, int] | None, class_names: list[str] | None):
    """Apply ``data.label_map`` to every case label and ``data.class_names`` to the table.

    Args:
        table: the loaded case table (changed in place and returned).
        label_map: old label -> new label; every case label must be a key.
        class_names: names of the new classes (``None`` keeps the table's own).
    """
    if label_map:
        for c in table.cases:
            if c.label is None:
                continue
            try:
                if isinstance(c.label, bool) or not float(c.label).is_integer():
                    raise ValueError(c.label)
                c.label = label_map[int(float(c.label))]
            except (KeyError, ValueError, TypeError):
                raise ConfigError("data.label_map", f"case {c.case_id} has label {c.label!r}, which the map lacks",
                                  f"add it to data.label_map (keys now: {sorted(label_map)})") from None
        n_new = max(label_map.values()) + 1
        if class_names is None:
            class_names = [str(i) for i in range(n_new)]
        elif len(class_names) != n_new:
            raise ConfigError("data.class_names", f"{len(class_names)} names for {n_new} mapped classes",
                              "give one name per value of data.label_map")
    if class_names is not None:
        table.class_names = list(class_names)
    return table


def resolve_splits(cfg: Config, run_dir: Path | None, table: Any = None,
                   stratify: bool | None = None) -> tuple[Any, dict[str, list]]:
    """The run's split: read from ``run_dir/splits.csv`` if present, else computed and saved there.

    Saving the split makes evaluation and resume use exactly the cases training used.

    Args:
        table: a family's own case table (default: ``load_table(cfg)``).
        stratify: overrides ``data.split.stratify`` (families without class labels pass False).
    """
    from medfuse.data.split import assign_splits

    if table is None:
        table = load_table(cfg)
    else:  # a family's own table: the same table-wide rules
        from medfuse.data.checks import validate_table

        validate_table(table)
    saved = run_dir / "splits.csv" if run_dir is not None else None
    if saved is not None and saved.is_file():
        split_of = read_splits(saved)
        for c in table.cases:
            if c.case_id not in split_of:
                raise DataError(saved, f"case {c.case_id} is not in the run's saved split",
                                "the dataset changed since training; start a new run")
            c.split = split_of[c.case_id]
    else:
        s = cfg.data.split
        # data.split.fold: an official fold file is the split (the chosen fold is the test split)
        table = assign_splits(table, val=s.val, test=s.test, seed=s.seed,
                              stratify=s.stratify if stratify is None else stratify,
                              fold=s.fold)
        if saved is not None:
            with atomic_open(saved, "w", newline="", encoding="utf-8") as f:  # every DDP rank writes the same file at once
                w = csv.writer(f)
                w.writerow(["case_id", "patient_id", "split"])
                for c in table.cases:
                    w.writerow([c.case_id, c.patient_id, c.split])
    by_split = {s: [c for c in table.cases if c.split == s] for s in SPLITS}
    return table, by_split


def read_splits(path: Path) -> dict[str, str]:
    """``case_id -> split`` from a run's ``splits.csv``, or a one-line DataError naming the file."""
    fix = "restore splits.csv from a backup; it records which cases were trained on, so a changed split is a new run"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"case_id", "split"} <= set(reader.fieldnames):
                raise DataError(path, f"is not a split table (columns {reader.fieldnames or []}; "
                                "case_id and split are needed)", fix)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot be read ({type(e).__name__}: {e})", fix) from None
    out: dict[str, str] = {}
    for i, r in enumerate(rows, start=2):
        if r.get("split") not in SPLITS or not r.get("case_id"):
            raise DataError(f"{path} (line {i})", f"has split {r.get('split')!r} for case {r.get('case_id')!r}, "
                            f"not one of {', '.join(SPLITS)}", fix)
        out[r["case_id"]] = r["split"]
    return out


def mask_values(table) -> list[int] | None:
    """The mask label values the dataset declares (None: none declared)."""
    return sorted(set(int(v) for v in table.mask_labels.values())) if table.mask_labels else None


def run_mask_values(table, cfg: Config) -> list[int] | None:
    """The label values a mask of the run of ``cfg`` may hold: the dataset's declared ones, else
    ``0 .. data.num_classes - 1`` for a segmentation run that sets it (None: not declared). A mask
    value outside them is refused when the case is read (and by ``data check --config``)."""
    values = mask_values(table)
    if values is None and cfg.task == "segmentation" and cfg.data.num_classes:
        values = list(range(cfg.data.num_classes))
    return values


class CaseDataModule(L.LightningDataModule):
    """Train/val/test dataloaders over a case table, transforms from the config."""

    partial_modalities: ClassVar[bool] = False
    """Whether a case may lack some of the modalities (incomplete_seg, context_seg say True);
    otherwise :meth:`setup` for ``fit`` refuses such a case (it trained on zeros without a word)."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, table: Any = None):
        """Args:
            cfg: the experiment config.
            run_dir: the run directory (its saved split is reused).
            table: a family's own case table (default: :func:`load_table` of ``cfg``).
        """
        super().__init__()
        self.cfg = cfg
        self.run_dir = run_dir
        self.table, self.cases = resolve_splits(cfg, run_dir, table)
        self.modalities = self.table.modalities
        # The dataset's own label values, read before a family renames table.mask_labels; a
        # mask value outside them is refused when the case is read (the `label` rule of data check).
        self.mask_values = run_mask_values(self.table, cfg)
        self._datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Lightning's hook; for ``fit`` (called by train before anything is written): refuse a case
        without every modality, unless :attr:`partial_modalities`."""
        if stage in (None, "fit") and not self.partial_modalities:
            from medfuse.data.checks import raise_first
            from medfuse.data.rules import modality_problems

            raise_first(modality_problems(self.table), self.cfg.data.root)

    @property
    def has_mask(self) -> bool:
        return any(c.mask for c in self.table.cases)

    @property
    def class_values(self) -> list[int] | None:
        """The label-file value of each class index a segmentation model trains on, from
        ``table.mask_labels`` as this data module holds them when the loaders are built
        (:func:`~medfuse.data.labels.label_class_values`: class k = the k-th declared value;
        None: the file values are the class indices). A family that renames ``table.mask_labels``
        to its own classes 0..K-1 (incomplete_seg's canonical labels) maps its masks itself."""
        if self.cfg.task != "segmentation":
            return None
        from medfuse.data.labels import label_class_values

        return label_class_values(self.table.mask_labels, self.cfg.data.num_classes)

    def dataset(self, split: str) -> Dataset:
        from medfuse.data.cache import build_dataset
        from medfuse.data.transforms import build_transforms, case_to_item

        if split not in self._datasets:
            cases = self.cases[split]
            if not cases:
                raise DataError(self.cfg.data.root or "data", f"the {split} split is empty",
                                "add cases or change data.split fractions")
            tf = build_transforms(self.cfg.data.transforms, self.modalities, train=(split == "train"),
                                  has_mask=self.has_mask, mask_values=self.mask_values,
                                  crop_eval=self.cfg.task != "segmentation", mask_classes=self.class_values)
            items = [case_to_item(c, self.modalities) for c in cases]
            cache = self.cfg.data.cache_dir
            # data.dicom travels with the dataset: a spawned DataLoader worker has no other way to see it
            self._datasets[split] = SeededDataset(build_dataset(items, tf, cache_dir=cache, dicom=self.cfg.data.dicom))
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        ds = self.dataset(split)
        seed = derive_seed(self.cfg.train.seed, split)
        nw = self.cfg.data.num_workers
        return DataLoader(ds, batch_size=batch_size, sampler=SeededSampler(len(ds), seed, shuffle=shuffle),
                          num_workers=nw, collate_fn=collate, persistent_workers=False,
                          drop_last=False, generator=torch.Generator().manual_seed(seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.cfg.data.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.cfg.data.eval_batch_size or self.cfg.data.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.cfg.data.eval_batch_size or self.cfg.data.batch_size)

    def loader(self, split: str) -> DataLoader:
        """An unshuffled loader over any split (used by evaluate)."""
        return self._loader(split, False, self.cfg.data.eval_batch_size or self.cfg.data.batch_size)
