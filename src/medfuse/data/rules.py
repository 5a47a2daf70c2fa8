"""The rules ``medfuse data check`` and the loader share, one function each (one code path).

:mod:`medfuse.data.checks` walks a dataset and applies them to every case;
:class:`medfuse.data.transforms.LoadCased` applies the per-file ones to each case it reads and raises
the first as a one-line DataError. Each returns a :class:`Problem` or None:

* :func:`nonfinite_problem` (``nonfinite``), :func:`dims_problem` (``dims``),
  :func:`mask_value_problem` (``label``), :func:`hu_problem` (``hu``, CT-RATE);
* :func:`overlap_problem` and :func:`mask_outside_problem` (``grid``): a modality or mask on another
  grid is resampled onto the case's first image only where its header places it over that image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfuse.data.layouts import CaseTable, case_where
from medfuse.data.paths import CASE_ID_FIX
from medfuse.data.split import LEAK_FIX

FIXES = {
    "layout": "point at a manifest, a dataset.json or a dataset folder (see docs/data-formats.md)",
    "case-id": CASE_ID_FIX,
    "dims": "give every modality and the mask of a case as 3D volumes (or all as 2D images)",
    "missing": "restore the file or correct its path in the dataset description",
    "unreadable": "re-export the file (it is corrupt, truncated or not a supported image) or remove the case",
    "channels": "store one channel per declared modality, or correct the modality list",
    "grid": "resample this case's modalities and mask onto one grid (e.g. MONAI ResampleToMatch) or fix the header",
    "nonfinite": "replace NaN/Inf voxels (e.g. with 0) or re-export the image",
    "label": "remap the mask values to the declared labels, or declare them (mask_labels, labels in dataset.json, or "
             "a segmentation run's data.num_classes)",
    "empty-mask": "check the segmentation, or set mask_required: false if empty masks are expected",
    "duplicate-id": "give every case a unique case_id",
    "leak": LEAK_FIX,
    "geometry": "re-export the crop with the raw volume's translation and scale (OME-NGFF, nm), or drop it",
    "hu": "the file is already in HU and was rescaled again: re-export it, or convert with slope 1, intercept 0",
}
# A multi-volume file given for one modality without a channel choice (shared with the loader's error).
CHANNEL_FIX = ("give one 3D volume per modality, or in a manifest choose one with a channel_{m} column "
               "(0..{last})")


@dataclass
class Problem:
    """One integrity problem.

    Attributes:
        path: the file at fault (or the dataset description for table-wide rules).
        rule: the rule name, e.g. ``"grid"``.
        message: what is wrong, naming the case.
        fix: what to do (default: the rule's usual fix).
        case_id: the case concerned, when there is one.
    """

    path: str
    rule: str
    message: str
    fix: str = ""
    case_id: str | None = None

    def line(self) -> str:
        """``PATH: [rule] message. Fix: ...`` on one line."""
        fix = (self.fix or FIXES.get(self.rule, "")).rstrip(".")
        text = f"{self.path}: [{self.rule}] {self.message.rstrip('.')}" + (f". Fix: {fix}" if fix else "")
        return " ".join(text.split())


def nonfinite_problem(array: np.ndarray, path: str, what: str, cid: str) -> Problem | None:
    """The ``nonfinite`` rule on one array (any layout): NaN/Inf voxels, or None."""
    if array.dtype.kind not in "fc":
        return None
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    if not n_nan and not n_inf:
        return None
    return Problem(path, "nonfinite", f"{what} of case '{cid}' has {n_nan + n_inf} of {array.size} voxels "
                   f"non-finite ({n_nan} NaN, {n_inf} Inf)", case_id=cid)  # fmt: skip


def dims_problem(ref_name: str, ref_shape: tuple[int, ...], name: str, shape: tuple[int, ...], path: str,
                 cid: str) -> Problem | None:
    """The ``dims`` rule: one of two (C, D, H, W) shapes is a single slice (2D) and the other is 3D."""
    if (ref_shape[1] == 1) == (shape[1] == 1):
        return None
    flat, deep = (name, ref_name) if shape[1] == 1 else (ref_name, name)
    n = max(ref_shape[1], shape[1])
    return Problem(path, "dims", f"{flat} of case '{cid}' is a 2D image (one slice) but {deep} is a 3D volume "
                   f"({n} slices)", case_id=cid)


def dataset_dims_problems(first: dict[str, tuple[str, str, tuple[int, ...]]]) -> list[Problem]:
    """The ``dims`` rule across cases: a case whose first image is a 2D image (one slice) among cases
    of 3D volumes, or the reverse (the fewer kind is reported; on a tie the 2D ones). A model trains
    on one kind: the odd case would be padded to the others' size and trained on without a word.

    Args:
        first: case id -> (modality, path, (C, D, H, W) shape) of the case's first readable image.
    """
    flat = [cid for cid, (_, _, shape) in first.items() if shape[1] == 1]
    n_flat, n_deep = len(flat), len(first) - len(flat)
    if not n_flat or not n_deep:
        return []
    odd = flat if n_flat <= n_deep else [cid for cid in first if cid not in set(flat)]
    problems = []
    for cid in odd:
        m, path, shape = first[cid]
        what = (f"is a 2D image (one slice) but {n_deep} of the dataset's {len(first)} cases are 3D volumes"
                if shape[1] == 1 else
                f"is a 3D volume ({shape[1]} slices) but {n_flat} of the dataset's {len(first)} cases are 2D images")
        problems.append(Problem(path, "dims", f"image '{m}' of case '{cid}' {what}",
                                "give every case as a 3D volume (or every case as a 2D image), or drop this case",
                                case_id=cid))
    return problems


MIN_OVERLAP = 0.1
"""A modality on another grid must cover at least this fraction of the first modality's field of view."""
MIN_MASK_INSIDE = 0.5
"""A mask on another grid must keep at least this fraction of its labelled voxels inside the image."""


def overlap_problem(ref_name: str, ref: tuple[np.ndarray, tuple[int, ...]], name: str,
                    other: tuple[np.ndarray, tuple[int, ...]], path: str, cid: str) -> Problem | None:
    """The ``grid`` rule for a modality resampled onto the first one: its field of view must cover
    at least :data:`MIN_OVERLAP` of the first's (a 16^3 lattice of its voxels), else their headers
    place them apart (another scan or patient, a broken origin) and resampling would fill zeros.

    Args:
        ref, other: ``(affine (4, 4), shape (i, j, k))`` of the first modality and of this one.
    """
    from medfuse.data.volume import inside_fraction, voxel_lattice

    (ref_aff, ref_ijk), (aff, ijk) = ref, other
    cover = inside_fraction(voxel_lattice(ref_ijk), ref_aff, aff, ijk)
    if cover >= MIN_OVERLAP:
        return None
    return Problem(path, "grid", f"{name} of case '{cid}' covers {cover:.0%} of the field of view of {ref_name}: "
                   "their headers place the two scans apart, and resampling would fill it with zeros",
                   "check that both files belong to this case and that their origins and directions are right",
                   case_id=cid)


def mask_outside_problem(ref_name: str, ref: tuple[np.ndarray, tuple[int, ...]], mask_ijk: np.ndarray,
                         affine: np.ndarray, path: str, cid: str) -> Problem | None:
    """The ``grid`` rule for a mask resampled onto its image: at least :data:`MIN_MASK_INSIDE` of its
    labelled voxels must lie inside the image's field of view, else the labels would be lost.

    Args:
        ref: ``(affine (4, 4), shape (i, j, k))`` of the image.
        mask_ijk: (i, j, k) label array of the mask (non-zero = labelled); affine: its (4, 4) affine.
    """
    from medfuse.data.volume import inside_fraction

    fg = np.argwhere(np.asarray(mask_ijk) != 0)  # (N, 3)
    if not len(fg):
        return None
    fg = fg[:: max(1, len(fg) // 20000)]
    inside = inside_fraction(fg, affine, *ref)
    if inside >= MIN_MASK_INSIDE:
        return None
    return Problem(path, "grid", f"mask of case '{cid}' has {1 - inside:.0%} of its labelled voxels outside the "
                   f"field of view of {ref_name}, so resampling onto it would drop them",
                   "check that the mask belongs to this case and that its origin and direction are right",
                   case_id=cid)


def mask_value_problem(values: np.ndarray, counts: np.ndarray, declared: list[int] | None, path: str,
                       cid: str) -> Problem | None:
    """The ``label`` rule on a mask's unique ``values`` (with their voxel ``counts``): values outside
    the ``declared`` label values, or non-integer values. None when fine or nothing is declared."""
    whole = np.mod(values, 1) == 0 if values.dtype.kind in "fc" else np.ones(values.shape, bool)
    if declared is None:
        if whole.all():
            return None
        bad = ~whole
        tail = "; a mask holds whole-number labels"
    else:
        bad = ~np.isin(values, np.asarray(sorted(set(declared)))) | ~whole
        tail = f", outside the declared labels {{{', '.join(str(v) for v in sorted(set(declared)))}}}"
    if not bad.any():
        return None
    shown = ", ".join(f"{v:g}" for v in values[bad][:10].tolist()) + (" ..." if bad.sum() > 10 else "")
    return Problem(path, "label", f"mask of case '{cid}' has values {{{shown}}} in {int(counts[bad].sum())} voxels"
                   f"{tail}", case_id=cid)  # fmt: skip


def hu_problem(array: np.ndarray, path: str, cid: str) -> Problem | None:
    """The ``hu`` rule: a CT whose air (:func:`medfuse.data.hu.air_level`: the 1st percentile with the
    fill outside the scan circle left out) lies more than 600 HU below -1024 was rescaled twice
    (CT-RATE v2 files are already in HU; applying the metadata slope/intercept again shifts them)."""
    from medfuse.data.hu import AIR_HU, BELOW_AIR, air_level

    if array.size == 0:
        return None
    p1, fill = air_level(array)
    if not p1 < AIR_HU - BELOW_AIR:
        return None
    left_out = f" (the voxels at the minimum, {fill:.0f}, left out as fill)" if fill is not None else ""
    return Problem(path, "hu", f"CT of case '{cid}' has its 1st percentile at {p1:.0f} HU{left_out}, far below "
                   f"air ({AIR_HU:.0f})", case_id=cid)


def modality_problems(table: CaseTable) -> list[Problem]:
    """A case that has some of the run's modalities but not all (``missing``; table order).

    Train refuses such a case (:meth:`medfuse.data.datamodule.CaseDataModule.setup`; it used to
    read the absent modality as zeros) and ``medfuse predict`` refuses it, so a run config's data
    check reports it (families built for partial inputs skip this rule).
    """
    problems = []
    for i, c in enumerate(table.cases):
        missing = [m for m in table.modalities if not c.images.get(m)]
        if missing and len(missing) < len(table.modalities):  # no image at all: the per-case rule says so
            problems.append(Problem(
                case_where(table, i), "missing",
                f"case '{c.case_id}' has no {' / '.join(repr(m) for m in missing)} image of the run's modalities "
                f"({', '.join(table.modalities)})",
                f"give the case every modality ({', '.join(table.modalities)}), or drop it (incomplete_seg "
                "trains on cases with missing modalities)",
                case_id=c.case_id))
    return problems
