"""Data side of the ``incomplete_seg`` family (seed 003, UniMRSeg): region labels, modality subsets,
hybrid shuffled masking, and the inputs of ``medfuse predict``.

Regions. Brain-tumour sub-regions are nested sets of label values, outer to inner: BraTS WT =
{1, 2, 4} (3 in BraTS 2023+), TC = {1, 4}, ET = {4}. ``data.params.regions`` gives them as a preset
name or a mapping ``{name: [label values]}``; the default ``auto`` reads the data set's declared
label names (BraTS classic and 2023+, MSD Task01, nnU-Net v2 region-based ``dataset.json``). The
data module turns a raw mask into *canonical* labels ``0..R`` (= how many regions hold the voxel),
so region ``r`` is ``mask >= r`` and a softmax over ``R + 1`` labels is still possible
(:class:`IncompleteSegDataModule`, the family's data module). The network's region probabilities
become canonical labels by one rule, :func:`region_labels` (count of regions with ``q > 0.5``), and
canonical labels become the data set's own values by :func:`raw_label_values`; ``predict`` and
``evaluate`` both write and score what these give.

Modality subsets. :func:`modality_combinations` enumerates the ``2^M - 1`` non-empty subsets once
each; :func:`random_keep` draws a proper subset per case (never empty); :func:`hybrid_masking` is
stage 1's hybrid shuffled masking (modality dropout + shuffle + voxel/patch masking).

Shapes: B batch, M modalities, R regions, ``*S`` = (D, H, W).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfuse.config import Config, validate_params
from medfuse.data.datamodule import CaseDataModule
from medfuse.errors import ConfigError, DataError
from medfuse.families.incomplete_seg.params import REGION_PRESETS, IncompleteSegDataParams

# ----------------------------------------------------------------------------------- combinations


def modality_combinations(m: int) -> list[tuple[int, ...]]:
    """All ``2^m - 1`` non-empty subsets of ``range(m)``, by size then lexicographically.

    For BraTS (m = 4) that is 4 singles, 6 pairs, 4 triples and the full set; the last entry is
    always the complete set.
    """
    if m < 1:
        raise ValueError(f"need at least one modality, got {m}")
    return [c for k in range(1, m + 1) for c in itertools.combinations(range(m), k)]


def combination_mask(combos: list[tuple[int, ...]], m: int) -> torch.Tensor:
    """(len(combos), M) float presence masks of ``combos``."""
    out = torch.zeros(len(combos), m)
    for i, c in enumerate(combos):
        out[i, list(c)] = 1.0
    return out


def combination_name(combo: tuple[int, ...], modalities: list[str]) -> str:
    return "+".join(modalities[i] for i in combo)


def random_keep(present: torch.Tensor, p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Modality dropout: per case, with probability ``p`` keep a random proper subset of its modalities.

    The number kept is uniform in ``1..n-1`` (n = modalities the case has), then which ones is
    uniform. A case with a single modality keeps it. Never returns an empty row for a case that
    has at least one modality.

    Args:
        present: (B, M) 1 where the case has the modality.
        p: probability of dropping anything.
        generator: random generator (default: torch's global one).

    Returns:
        (B, M) float keep mask, a subset of ``present``.
    """
    keep = present.clone().float()
    for i in range(present.shape[0]):
        avail = (present[i] > 0.5).nonzero().flatten()
        n = int(avail.numel())
        if n < 2 or float(torch.rand((), generator=generator)) >= p:
            continue
        k = int(torch.randint(1, n, (), generator=generator))  # 1..n-1
        chosen = avail[torch.randperm(n, generator=generator)[:k]]
        keep[i] = 0.0
        keep[i, chosen] = 1.0
    return keep


def spatial_mask(shape: tuple[int, ...], ratio: float, granularity: str = "patch", patch: int = 4,
                 generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
    """A (B, M, *S) float mask with 0 on about ``ratio`` of the voxels (voxel or cubic-patch granularity)."""
    b, m, *s = shape
    if granularity == "voxel":
        drop = torch.rand(b, m, *s, generator=generator) < ratio
    elif granularity == "patch":
        coarse = [max(1, -(-n // patch)) for n in s]
        drop = torch.rand(b, m, *coarse, generator=generator) < ratio
        drop = F.interpolate(drop.float(), scale_factor=patch, mode="nearest")[(..., *[slice(0, n) for n in s])] > 0.5
    else:
        raise ConfigError("model.params.mask_granularity", f"unknown granularity '{granularity}'", "use voxel or patch")
    return (~drop).float().to(device)


def hybrid_masking(image: torch.Tensor, present: torch.Tensor, drop_p: float = 0.5, shuffle: bool = True,
                   mask_ratio: float = 0.15, granularity: str = "patch", patch: int = 4,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's hybrid shuffled masking of a batch.

    1. Modality dropout (:func:`random_keep` with ``drop_p``): the dropped channels become 0.
    2. Shuffle (``shuffle``): each case's kept modalities are packed into its first channels in a
       random order (the peer's "pack the kept ones into the first channels"), so the network
       must tell modalities apart by content, not by channel index.
    3. Spatial masking: about ``mask_ratio`` of each kept channel's voxels (or ``patch``-sized
       cubes) are zeroed.

    Args:
        image: (B, M, *S) complete input.
        present: (B, M) modalities the cases really have.
        drop_p, shuffle, mask_ratio, granularity, patch: see above.
        generator: random generator.

    Returns:
        ``(masked (B, M, *S), channel_present (B, M), order (B, M))``: ``order[b, j]`` is the source
        modality of channel ``j`` (-1 for an empty channel), so ``masked[b, j]`` comes from
        ``image[b, order[b, j]]``; ``channel_present`` flags the non-empty channels.
    """
    b, m = image.shape[:2]
    keep = random_keep(present, drop_p, generator)
    order = torch.full((b, m), -1, dtype=torch.long)
    for i in range(b):
        kept = (keep[i] > 0.5).nonzero().flatten()
        if shuffle:
            kept = kept[torch.randperm(kept.numel(), generator=generator)]
            order[i, : kept.numel()] = kept
        else:
            order[i, kept] = kept
    chan_present = (order >= 0).float().to(image.device)
    idx = order.clamp(min=0).to(image.device)
    gathered = torch.gather(image, 1, idx.view(b, m, *([1] * (image.ndim - 2))).expand_as(image))
    masked = gathered * chan_present.view(b, m, *([1] * (image.ndim - 2)))
    if mask_ratio > 0:
        masked = masked * spatial_mask(tuple(image.shape), mask_ratio, granularity, patch, generator, image.device)
    return masked, chan_present, order


# ---------------------------------------------------------------------------------------- regions


def _regions_from_names(labels: dict[str, int]) -> dict[str, list[int]] | None:
    """WT/TC/ET from declared label names (BraTS, BraTS 2023+, MSD Task01 wording)."""
    et = [v for n, v in labels.items() if re.search(r"enhanc", n, re.I) and not re.search(r"non", n, re.I)]
    core = [v for n, v in labels.items() if re.search(r"necro|non.?enhanc|ncr|net\b", n, re.I)]
    ed = [v for n, v in labels.items() if re.search(r"o?edema", n, re.I)]
    if len(et) == 1 and len(core) == 1 and len(ed) == 1:
        return {"WT": sorted(et + core + ed), "TC": sorted(et + core), "ET": et}
    return None


def _regions_from_nnunet(source: Path | None) -> dict[str, list[int]] | None:
    """Region-based nnU-Net v2 ``labels`` (``{"whole tumor": [1, 2, 3], ...}``), outer to inner."""
    if source is None or source.name != "dataset.json" or not source.is_file():
        return None
    labels = json.loads(source.read_text(encoding="utf-8")).get("labels") or {}
    regions = {str(k): sorted(int(x) for x in (v if isinstance(v, list) else [v]))
               for k, v in labels.items() if k != "background" and (isinstance(v, list) or int(v) != 0)}
    if any(isinstance(v, list) for v in labels.values()):
        return dict(sorted(regions.items(), key=lambda kv: -len(kv[1])))
    return None


def resolve_regions(spec: Any, table: Any) -> dict[str, list[int]]:
    """The ordered ``{region: [raw label values]}`` of ``data.params.regions`` for a case table.

    Raises:
        ConfigError: an unknown preset, a malformed mapping, regions that do not nest, or ``auto``
            on a data set whose label names are not recognised.
    """
    key = "data.params.regions"
    if spec in (None, "auto"):
        found = None
        if table.layout == "nnunet":
            found = _regions_from_nnunet(table.source)
        if found is None and table.mask_labels:
            found = _regions_from_names({n: int(v) for n, v in table.mask_labels.items()})
        if found is None:
            raise ConfigError(key, f"cannot infer WT/TC/ET from the data set's labels {table.mask_labels}",
                              "set data.params.regions to brats | brats2023 | msd or {name: [label values]}")
        spec = found
    if isinstance(spec, str):
        if spec not in REGION_PRESETS:
            raise ConfigError(key, f"unknown preset '{spec}'", f"use auto, {', '.join(REGION_PRESETS)} or a mapping")
        spec = REGION_PRESETS[spec]
    if not isinstance(spec, dict) or not spec or not all(
            isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v) for v in spec.values()):
        raise ConfigError(key, f"invalid regions {spec!r}", "give {name: [positive label values]}, outer to inner")
    regions = {str(k): sorted(set(v)) for k, v in spec.items()}
    sets = [set(v) for v in regions.values()]
    for outer, inner, name in zip(sets, sets[1:], list(regions)[1:], strict=False):
        if not inner < outer:
            raise ConfigError(key, f"region '{name}' is not strictly inside the region before it",
                              "list nested regions outer to inner (e.g. WT, TC, ET)")
    return regions


def canonical_labels(mask: torch.Tensor, regions: dict[str, list[int]], where: str = "mask") -> torch.Tensor:
    """Raw label map -> canonical labels ``0..R`` (the number of regions that contain each voxel).

    Raises:
        DataError: a label value that no region lists (and is not 0).
    """
    known = torch.tensor(sorted(set().union(*regions.values())), dtype=mask.dtype)
    values = torch.unique(mask)
    bad = [int(v) for v in values if int(v) != 0 and int(v) not in set(known.tolist())]
    if bad:
        raise DataError(where, f"has label value(s) {bad} that no region in data.params.regions lists",
                        f"add them to a region (now {regions}) or fix the mask")
    out = torch.zeros_like(mask)
    for vals in regions.values():
        out += torch.isin(mask, torch.tensor(vals, dtype=mask.dtype)).to(mask.dtype)
    return out


class RegionLabelDataset(Dataset):
    """Wraps a case dataset (e.g. the engine's seeded one); its masks come out as canonical labels.

    Keys (plain indices or the seeded sampler's ``(index, seed)`` pairs) pass through unchanged.
    """

    def __init__(self, base: Dataset, regions: dict[str, list[int]]):
        self.base, self.regions = base, regions

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        item = self.base[key]
        if "mask" in item:
            item["mask"] = canonical_labels(item["mask"], self.regions, f"case {item.get('case_id', '?')}")
        return item


def canonical_to_raw(regions: dict[str, list[int]]) -> dict[int, int] | None:
    """Canonical label -> the single raw value it stands for (None when a label merges several values)."""
    sets = [set(v) for v in regions.values()] + [set()]
    out = {0: 0}
    for k in range(1, len(sets)):
        diff = sets[k - 1] - sets[k]
        if len(diff) != 1:
            return None
        out[k] = diff.pop()
    return out


REGION_THRESHOLD = 0.5
"""A region holds a voxel when its probability is above this."""


def region_labels(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Nested region probabilities (R on axis ``dim``, outer to inner) -> canonical labels ``0..R``:
    the number of regions whose probability is above :data:`REGION_THRESHOLD` (so label ``k`` is
    "inside the first k regions": 0 background, R the innermost region, e.g. ET).

    The family's one region -> label rule: ``predict``'s files, ``evaluate``'s files and full-input
    label metrics, and (as ``labels >= r``) its per-combination region scores and validation Dice
    all come from it, so one model gives one prediction. Not the argmax of
    ``IncompleteSegNet.labels_from_regions``: with q = (0.6, 0.3, 0.1) that is background
    (P = 0.4), while WT holds the voxel.
    """
    return (q > REGION_THRESHOLD).sum(dim)


def raw_label_values(labels: np.ndarray, regions: dict[str, list[int]]) -> np.ndarray:
    """Canonical labels -> the data set's own label values (BraTS <= 2021: 0/2/1/4 for 0..3, BraTS
    2023+: 0/2/1/3) by :func:`canonical_to_raw`; the canonical labels themselves when a canonical
    label stands for several raw values (the regions do not allow a single value)."""
    raw = canonical_to_raw(regions)
    if raw is None:
        return labels
    lut = np.array([raw[k] for k in range(len(raw))], dtype=np.int64)
    return lut[np.asarray(labels, dtype=np.int64)]


class IncompleteSegDataModule(CaseDataModule):
    """The engine's case data module with canonical nested-region masks (see the module docstring).

    ``data.params`` (:class:`~medfuse.families.incomplete_seg.params.IncompleteSegDataParams`):
    ``regions`` (``auto`` | ``brats`` | ``brats2023`` | ``msd`` | ``{name: [values]}``).

    Attributes:
        raw_regions: ``{region: raw label values}``, outer to inner.
        region_names: the region names.
        raw_mask_labels: the data set's own label declaration.

    Its ``table.mask_labels`` names the canonical labels, so the engine's ``num_classes`` is R + 1.
    """

    partial_modalities = True  # any subset of the modalities is a valid case (UniMRSeg)

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        params = validate_params(IncompleteSegDataParams, cfg.data.params, "data.params")  # before any data is read
        super().__init__(cfg, run_dir)
        self.data_params = params
        self.raw_regions = resolve_regions(params.regions, self.table)
        self.region_names = list(self.raw_regions)
        self.raw_mask_labels = dict(self.table.mask_labels or {})
        names = self.region_names
        labels = ["background", *[f"{a} not {b}" for a, b in zip(names, names[1:], strict=False)], names[-1]]
        self.table.mask_labels = {n: i for i, n in enumerate(labels)}
        self._region_datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The split's seeded case dataset, its masks turned into canonical labels."""
        if split not in self._region_datasets:
            self._region_datasets[split] = RegionLabelDataset(super().dataset(split), self.raw_regions)
        return self._region_datasets[split]


# ---------------------------------------------------------------------------------- predict inputs

_ALIASES = {"flair": ("flair", "t2f", "t2-flair", "t2flair"), "t1ce": ("t1ce", "t1c", "t1gd", "t1-ce"),
            "t1": ("t1", "t1n"), "t2": ("t2", "t2w")}
_IMAGE = re.compile(r"\.(nii\.gz|nii|mha|mhd|nrrd|npz)$", re.I)


def modality_of(path: str | Path, modalities: list[str]) -> str | None:
    """The run modality a file name ends with (``case_t1ce.nii.gz``, ``case-t1c.nii.gz``), else None."""
    stem = _IMAGE.sub("", Path(path).name).lower()
    hits = []
    for m in modalities:
        names = {m.lower(), *_ALIASES.get(m.lower(), ())}
        if any(re.search(rf"(^|[_\-.]){re.escape(n)}$", stem) for n in names):
            hits.append(m)
    return hits[0] if len(hits) == 1 else None


def _case_of(path: str | Path, modality: str) -> str:
    """A file's case id: its name without the image ending and a trailing ``modality`` (or alias)."""
    names = {modality, *_ALIASES.get(modality.lower(), ())}
    return re.sub(r"[_\-.](" + "|".join(re.escape(a) for a in names) + r")$", "",
                  _IMAGE.sub("", Path(path).name), flags=re.I)


def resolve_predict_inputs(inputs: list[str], modalities: list[str] | None,
                           run_modalities: list[str]) -> tuple[str, dict[str, str]]:
    """``medfuse predict`` inputs -> (case id, {modality: path}) with any non-empty subset.

    ``inputs`` are image files (their modalities named by ``--modalities`` in the same order, or
    read from the file names) or one case folder (its files are matched by name; modalities
    without a file are missing).

    Raises:
        DataError: no modality at all, a missing file, a name that matches no run modality, a
            modality given twice, a count that does not match ``--modalities``, a file whose name
            says another modality than ``--modalities`` gives it, or files of two different cases.
    """
    fix = f"give files named <case>_<modality> for some of {', '.join(run_modalities)}, or --modalities"
    for p in inputs:  # first: a mistyped path is "not found", not a naming problem
        if not Path(p).exists():
            raise DataError(p, "file not found", "check the path")
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folder = Path(inputs[0])
        found: dict[str, str] = {}
        for p in sorted(folder.iterdir()):
            m = modality_of(p, run_modalities) if _IMAGE.search(p.name) else None
            if m is not None and not re.search(r"(^|[_\-.])seg$", _IMAGE.sub("", p.name).lower()):
                if m in found:
                    raise DataError(p, f"is a second '{m}' image in the folder", "keep one file per modality")
                found[m] = str(p)
        if not found:
            raise DataError(folder, "holds no image of any modality (an empty modality set)", fix)
        return folder.name, found
    if not inputs:
        raise DataError("INPUTS", "no input image (an empty modality set)", fix)
    said = [modality_of(p, run_modalities) for p in inputs]  # what each file's name says (or None)
    if modalities:
        if len(modalities) != len(inputs):
            raise DataError(" ".join(inputs), f"{len(inputs)} inputs for --modalities {modalities}",
                            "give one file per named modality")
        names = list(modalities)
    else:
        names = said
        for p, m in zip(inputs, names, strict=True):
            if m is None:
                raise DataError(p, "its name does not say which modality it is", fix)
    for m in names:
        if m not in run_modalities:
            raise DataError(m, "not a modality of this run", f"use some of: {', '.join(run_modalities)}")
    if len(set(names)) != len(names):
        raise DataError(" ".join(inputs), f"a modality is given twice ({names})", "give each modality once")
    for p, s, m in zip(inputs, said, names, strict=True):
        if s is not None and s != m:
            raise DataError(p, f"its name says '{s}' but --modalities gives it as '{m}'",
                            "drop --modalities (the file names say the modalities) or fix its order")
    cases = {p: _case_of(p, s) for p, s in zip(inputs, said, strict=True) if s is not None}
    (a, ca), *rest = list(cases.items()) or [(inputs[0], "")]
    for b, cb in rest:
        if cb != ca:
            raise DataError(f"{a}, {b}", f"are files of two cases ({ca}, {cb}), given as one case",
                            "give the files of one case, or its folder")
    case = _case_of(inputs[0], names[0])
    return case or "case", dict(zip(names, inputs, strict=True))
