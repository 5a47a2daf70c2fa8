"""``medfuse data check DIR``: dataset integrity rules, one line per problem (DESIGN "Errors").

Rules (the ``[rule]`` tag of each line):

* ``layout`` - the path is not a dataset medfuse can read (no layout matched, bad manifest).
* ``missing`` - an image or mask file does not exist, or a case has no image (or no mask when the
  dataset requires masks).
* ``unreadable`` - the file exists but cannot be read (corrupt, truncated, unsupported).
* ``channels`` - a multi-channel file has fewer channels than the modalities mapped to it.
* ``grid`` - the modalities and mask of one case differ in shape, spacing or affine.
* ``nonfinite`` - NaN or Inf voxels.
* ``label`` - mask values outside the declared labels, or a case label outside the declared classes.
* ``empty-mask`` - an all-zero mask where the dataset requires masks.
* ``duplicate-id`` - a case id used more than once.
* ``leak`` - one patient in more than one split.

Each file is read once and only one case is held in memory at a time.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfuse.data.io import Volume, read_image
from medfuse.data.layouts import Case, CaseTable, load_cases
from medfuse.data.split import LEAK_FIX, leak_text, patient_splits
from medfuse.errors import DataError, MedfuseError

FIXES = {
    "layout": "point at a manifest, a dataset.json or a dataset folder (see docs/data-formats.md)",
    "missing": "restore the file or correct its path in the dataset description",
    "unreadable": "re-export the file (it is corrupt, truncated or not a supported image) or remove the case",
    "channels": "store one channel per declared modality, or correct the modality list",
    "grid": "resample this case's modalities and mask onto one grid (e.g. MONAI ResampleToMatch) or fix the header",
    "nonfinite": "replace NaN/Inf voxels (e.g. with 0) or re-export the image",
    "label": "remap the mask values to the declared labels, or declare them (mask_labels, or labels in dataset.json)",
    "empty-mask": "check the segmentation, or set mask_required: false if empty masks are expected",
    "duplicate-id": "give every case a unique case_id",
    "leak": LEAK_FIX,
}
_READ_ERRORS = (DataError, OSError, ValueError, EOFError, zlib.error)


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


def check_dataset(
    path: str | Path,
    layout: str = "auto",
    grid_atol: float = 1e-3,
    affine_atol: float = 1e-3,
    max_cases: int | None = None,
    table: CaseTable | None = None,
) -> list[Problem]:
    """Run every rule on a dataset.

    Args:
        path: dataset folder, manifest or dataset.json (as for :func:`~medfuse.data.layouts.load_cases`).
        layout: ``"auto"`` or a layout name.
        grid_atol: tolerance on spacing, in mm.
        affine_atol: tolerance on each affine entry (mm for the origin).
        max_cases: read the files of only the first ``max_cases`` cases (table-wide rules see all).
        table: an already loaded table (then ``path`` and ``layout`` are not read).

    Returns:
        The problems, table-wide ones first, then per case in table order; empty when clean.
    """
    if table is None:
        try:
            table = load_cases(path, layout=layout)
        except MedfuseError as e:
            return [Problem(e.where, "layout", e.problem, e.fix)]
    problems = _table_problems(table)
    cases = table.cases if max_cases is None else table.cases[:max_cases]
    for case in cases:
        problems += _case_problems(table, case, grid_atol, affine_atol)
    return problems


def format_problems(problems: list[Problem]) -> str:
    """One line per problem."""
    return "\n".join(p.line() for p in problems)


def run_check(
    path: str | Path,
    layout: str = "auto",
    grid_atol: float = 1e-3,
    affine_atol: float = 1e-3,
    max_cases: int | None = None,
    console=None,
) -> int:
    """Check a dataset, print one line per problem and a summary; return the exit code.

    Args:
        path, layout, grid_atol, affine_atol, max_cases: as for :func:`check_dataset`.
        console: a ``rich.console.Console`` to print to (default: stdout).

    Returns:
        0 when the dataset is clean, 2 otherwise.
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True, highlight=False)
    try:
        table = load_cases(path, layout=layout)
    except MedfuseError as e:
        table, problems = None, [Problem(e.where, "layout", e.problem, e.fix)]
    else:
        problems = check_dataset(
            path, grid_atol=grid_atol, affine_atol=affine_atol, max_cases=max_cases, table=table
        )
    for p in problems:
        console.print(p.line(), markup=False, highlight=False, style="red")
    n_cases = 0 if table is None else len(table.cases if max_cases is None else table.cases[:max_cases])
    if problems:
        console.print(f"{_plural(len(problems), 'problem')} in {_plural(n_cases, 'case')}", markup=False)
        return 2
    assert table is not None
    for note in table.notes:
        console.print(f"note: {note}", markup=False)
    console.print(
        f"OK: {_plural(n_cases, 'case')}, {_plural(len(table.modalities), 'modality', 'modalities')}, "
        f"layout {table.layout}",
        markup=False,
        style="green",
    )
    return 0


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# ----------------------------------------------------------------------------- table-wide rules


def _table_problems(table: CaseTable) -> list[Problem]:
    where = str(table.source or table.root)
    problems = []
    counts = Counter(c.case_id for c in table.cases)
    for case_id, n in counts.items():
        if n > 1:
            problems.append(
                Problem(where, "duplicate-id", f"case id '{case_id}' is used by {n} cases", case_id=case_id)
            )
    for pid, splits in patient_splits(table.cases).items():
        if len(splits) > 1:
            problems.append(Problem(where, "leak", leak_text(pid, splits)))
    if table.class_names:
        for c in table.cases:
            if c.label is not None and not _known_class(c.label, table.class_names):
                problems.append(Problem(where, "label", f"case '{c.case_id}' has label {c.label!r}, not one of the "
                                        f"declared classes {table.class_names} (or their 0-based index)",
                                        "use a declared class name, or add the class to class_names",
                                        case_id=c.case_id))  # fmt: skip
    return problems


def _known_class(label: object, class_names: list[str]) -> bool:
    if isinstance(label, str):
        return label in class_names
    if isinstance(label, int | float) and float(label).is_integer():
        return 0 <= int(label) < len(class_names) or str(int(label)) in class_names
    return False


# ----------------------------------------------------------------------------- per-case rules


def _case_problems(table: CaseTable, case: Case, grid_atol: float, affine_atol: float) -> list[Problem]:
    cid = case.case_id
    problems: list[Problem] = []
    volumes: dict[str, Volume | None] = {}  # path -> volume (None: missing or unreadable); one case only

    def load(path: str, what: str) -> Volume | None:
        if path not in volumes:
            volumes[path] = None
            if not Path(path).exists():
                problems.append(
                    Problem(path, "missing", f"{what} of case '{cid}' does not exist", case_id=cid)
                )
            else:
                try:
                    volumes[path] = read_image(path)
                except _READ_ERRORS as e:
                    reason = e.problem if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
                    problems.append(Problem(path, "unreadable", f"{what} of case '{cid}' cannot be read: {reason}",
                                            case_id=cid))  # fmt: skip
                else:
                    problems.extend(_nonfinite(volumes[path], path, what, cid))
        return volumes[path]

    if not case.images:
        problems.append(
            Problem(str(table.source or table.root), "missing", f"case '{cid}' has no image", case_id=cid)
        )
    ref: tuple[str, Volume] | None = None
    for m, path in case.images.items():
        vol = load(path, f"image '{m}'")
        if vol is None:
            continue
        channel = case.channel_index.get(m)
        if channel is not None and channel >= vol.shape[0]:
            problems.append(Problem(path, "channels", f"image '{m}' of case '{cid}' is channel {channel}, but the "
                                    f"file has {vol.shape[0]} channel(s)", case_id=cid))  # fmt: skip
        if ref is None:
            ref = (m, vol)
        elif path != case.images[ref[0]]:
            problems.extend(_grid(ref, (f"image '{m}'", vol), path, cid, grid_atol, affine_atol))
    if case.mask is None:
        if table.mask_required and case.split != "test":
            problems.append(
                Problem(
                    str(table.source or table.root),
                    "missing",
                    f"case '{cid}' has no mask but the dataset requires masks",
                    case_id=cid,
                )
            )
        return problems
    mask = load(case.mask, "mask")
    if mask is None:
        return problems
    if ref is not None:
        problems.extend(_grid(ref, ("mask", mask), case.mask, cid, grid_atol, affine_atol))
    problems.extend(_mask_values(table, mask, case.mask, cid))
    return problems


def _nonfinite(vol: Volume, path: str, what: str, cid: str) -> list[Problem]:
    if vol.array.dtype.kind not in "fc":
        return []
    n_nan = int(np.isnan(vol.array).sum())
    n_inf = int(np.isinf(vol.array).sum())
    if not n_nan and not n_inf:
        return []
    return [Problem(path, "nonfinite", f"{what} of case '{cid}' has {n_nan + n_inf} of {vol.array.size} voxels "
                    f"non-finite ({n_nan} NaN, {n_inf} Inf)", case_id=cid)]  # fmt: skip


def _grid(
    ref: tuple[str, Volume],
    other: tuple[str, Volume],
    path: str,
    cid: str,
    grid_atol: float,
    affine_atol: float,
) -> list[Problem]:
    (ref_name, a), (name, b) = ref, other
    diffs = []
    if a.shape[1:] != b.shape[1:]:
        diffs.append(f"shape (D, H, W) {tuple(b.shape[1:])} vs {tuple(a.shape[1:])}")
    if not np.allclose(a.spacing, b.spacing, rtol=0, atol=grid_atol):
        diffs.append(f"spacing (d, h, w) {_fmt(b.spacing)} mm vs {_fmt(a.spacing)} mm")
    elif not np.allclose(a.affine, b.affine, rtol=0, atol=affine_atol):
        delta = float(np.abs(a.affine - b.affine).max())
        diffs.append(
            f"affine differs by up to {delta:.4g} (origin {_fmt(b.affine[:3, 3])} vs {_fmt(a.affine[:3, 3])})"
        )
    if not diffs:
        return []
    return [Problem(path, "grid", f"{name} of case '{cid}' is not on the grid of image '{ref_name}' "
                    f"({a.path}): {'; '.join(diffs)}", case_id=cid)]  # fmt: skip


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _mask_values(table: CaseTable, mask: Volume, path: str, cid: str) -> list[Problem]:
    arr = mask.array
    problems = []
    if table.mask_labels:
        finite = arr[np.isfinite(arr)] if arr.dtype.kind in "fc" else arr
        values, counts = np.unique(finite, return_counts=True)
        declared = np.asarray(sorted(set(table.mask_labels.values())))
        bad = ~np.isin(values, declared)
        if bad.any():
            shown = ", ".join(f"{v:g}" for v in values[bad][:10].tolist()) + (
                " ..." if bad.sum() > 10 else ""
            )
            problems.append(Problem(path, "label", f"mask of case '{cid}' has values {{{shown}}} in "
                                    f"{int(counts[bad].sum())} voxels, outside the declared labels "
                                    f"{{{', '.join(str(v) for v in declared.tolist())}}}", case_id=cid))  # fmt: skip
    if table.mask_required and not np.any(np.nan_to_num(arr) if arr.dtype.kind in "fc" else arr):
        problems.append(Problem(path, "empty-mask", f"mask of case '{cid}' is all zero", case_id=cid))
    return problems
