"""``medfuse data check DIR``: dataset integrity rules, one line per problem (DESIGN "Errors").

Rules (the ``[rule]`` tag of each line):

* ``layout`` - the path is not a dataset medfuse can read (no layout matched, bad manifest).
* ``case-id`` - a case id that is not a name (:data:`medfuse.data.paths.CASE_ID_RULE`).
* ``missing`` - an image or mask file does not exist, or a case has no image (or no mask when the
  dataset requires masks).
* ``unreadable`` - the file exists but cannot be read (corrupt, truncated, unsupported, or a header
  that declares more voxels than the file can hold).
* ``dicom`` - a DICOM series that cannot be read truthfully: several series in one folder, missing
  slices, non-uniform spacing, duplicate positions, mixed orientations, a localizer or projection
  set, a truncated slice, a SEG whose referenced series is not found (:mod:`medfuse.data.dicom`).
* ``channels`` - a multi-channel file has fewer channels than the modalities mapped to it.
* ``grid`` - the modalities and mask of one case differ in shape, spacing or affine (between
  modalities not when the sidecar declares ``resample_modalities: true``).
* ``dims`` - a single-slice (2D) image or mask in a case whose other files are 3D volumes, or a
  case of 2D images among cases of 3D volumes (or the reverse).
* ``nonfinite`` - NaN or Inf voxels.
* ``label`` - mask values outside the declared labels, or a case label outside the declared classes
  (for a classification run also a label that is not a whole class index).
* ``empty-mask`` - an all-zero mask where the dataset requires masks.
* ``duplicate-id`` - a case id used more than once.
* ``leak`` - one patient in more than one split.
* ``geometry`` - (CellMap) a crop whose box lies outside its raw volume, or whose classes disagree
  on the box.
* ``hu`` - (CT-RATE) a CT volume whose 1st percentile lies far below air (-1024 HU): rescaled twice.
* ``config`` - (with ``--config``) the config's data settings do not fit the dataset (e.g. a case
  label that ``data.label_map`` lacks), as train would refuse it.

Layout rules: CellMap crops are checked through their Zarr metadata and crop-sized class arrays,
never by reading the raw EM volume (:func:`medfuse.data.containers.cellmap_problems`); OmniAbnorm-CT
records through their slice folders and finding masks; a DICOM SEG mask is read on its case's own
image series (:func:`medfuse.data.seg.read_label`).

Each file is read once and only one case is held in memory at a time.

With a run config (``medfuse data check PATH --config CONFIG.yaml [OVERRIDES]``,
:mod:`medfuse.data.check_config`) the dataset is checked as that run reads it: every DICOM read
uses its ``data.dicom`` (a DWI series holding several b-values reads at ``data.dicom.b_value``),
the table is loaded by
:func:`medfuse.data.datamodule.load_table` itself (``data.layout``, ``data.modalities``,
``data.class_names``, ``data.label_map``, the task's label rules), and a case without one of the
run's modalities is reported under ``missing`` (unless the family takes partial inputs). A load
error that train would raise (a bad ``data.label_map``, a missing modality column) is one
``config`` or ``layout`` line.

One code path: ``train``, ``evaluate`` and ``predict`` run the same rules on the cases they touch.
The table-wide rules run when their cases are loaded (:func:`validate_table`, called by
:func:`medfuse.data.datamodule.load_table`), the per-file rules while each case is read
(:class:`medfuse.data.transforms.LoadCased` calls :func:`nonfinite_problem`, :func:`dims_problem`
and :func:`mask_value_problem`; the header-size rule sits in :func:`medfuse.data.io.read_image`).
There the first problem is raised as a one-line :class:`~medfuse.errors.DataError` (with the count
of the others and a pointer to ``medfuse data check``).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfuse.data.io import Volume, read_image
from medfuse.data.layouts import Case, CaseTable, case_where, load_cases
from medfuse.data.paths import case_id_problem
from medfuse.data.rules import (  # noqa: F401 - the per-file rules live in rules.py, importable here too
    CHANNEL_FIX,
    FIXES,
    MIN_MASK_INSIDE,
    MIN_OVERLAP,
    Problem,
    dataset_dims_problems,
    dims_problem,
    hu_problem,
    mask_outside_problem,
    mask_value_problem,
    nonfinite_problem,
    overlap_problem,
)
from medfuse.data.seg import read_label
from medfuse.data.split import leak_text, patient_splits
from medfuse.errors import DataError, MedfuseError

if TYPE_CHECKING:
    from medfuse.config import Config

_READ_ERRORS = (DataError, OSError, ValueError, EOFError, zlib.error)


def check_dataset(
    path: str | Path | None,
    layout: str = "auto",
    grid_atol: float = 1e-3,
    affine_atol: float = 1e-3,
    max_cases: int | None = None,
    table: CaseTable | None = None,
    table_issues: list[Problem] | None = None,
) -> list[Problem]:
    """Run every rule on a dataset.

    Args:
        path: dataset folder, manifest or dataset.json (as for :func:`~medfuse.data.layouts.load_cases`).
        layout: ``"auto"`` or a layout name.
        grid_atol: tolerance on spacing, in mm.
        affine_atol: tolerance on each affine entry (mm for the origin).
        max_cases: read the files of only the first ``max_cases`` cases (table-wide rules see all).
        table: an already loaded table (then ``path`` and ``layout`` are not read).
        table_issues: with ``table``, its table-wide problems as already found (``data check
            --config``: :func:`medfuse.data.check_config.check_as_run`); default: :func:`table_problems`.

    Returns:
        The problems, table-wide ones first, then per case in table order; empty when clean.
    """
    return _check(path, layout, grid_atol, affine_atol, max_cases, table, table_issues)[1]


def _check(path: str | Path | None, layout: str | None, grid_atol: float, affine_atol: float,
           max_cases: int | None, table: CaseTable | None,
           table_issues: list[Problem] | None) -> tuple[CaseTable | None, list[Problem]]:
    """(the table or None, the problems) of :func:`check_dataset`."""
    if table is not None:
        problems = list(table_issues) if table_issues is not None else table_problems(table)
    elif table_issues is not None:  # loading stopped at these
        return None, list(table_issues)
    else:
        try:
            table = load_cases(path, layout=layout or "auto", check_ids=False)
        except MedfuseError as e:
            return None, [Problem(e.where, "layout", e.problem, e.fix)]
        problems = table_problems(table)
    cases = table.cases if max_cases is None else table.cases[:max_cases]
    first: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # case id -> its first image (the cross-case dims rule)
    for case in cases:
        problems += _case_problems(table, case, grid_atol, affine_atol, first)
    return table, problems + dataset_dims_problems(first)


def format_problems(problems: list[Problem]) -> str:
    """One line per problem."""
    return "\n".join(p.line() for p in problems)


def run_check(
    path: str | Path | None,
    layout: str | None = "auto",
    grid_atol: float = 1e-3,
    affine_atol: float = 1e-3,
    max_cases: int | None = None,
    console=None,
    cfg: Config | None = None,
    settings: str | None = None,
    table: CaseTable | None = None,
    table_issues: list[Problem] | None = None,
) -> int:
    """Check a dataset, print one line per problem and a summary; return the exit code.

    Args:
        path, layout, grid_atol, affine_atol, max_cases, table, table_issues: as for
            :func:`check_dataset` (``table_issues`` without ``table``: loading stopped at them).
        console: a ``rich.console.Console`` to print to (default: stdout).
        cfg: the run config the table was loaded with (``data check --config``,
            :func:`medfuse.data.check_config.run_check_as_run`), for the summary line.
        settings: where the settings in force came from (a config file name, overrides), named in
            the summary line; without ``settings`` and ``cfg`` a DICOM fix that names a
            ``data.dicom`` key says how to give it to this check.

    Returns:
        0 when the dataset is clean, 2 otherwise.
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True, highlight=False)
    table, problems = _check(path, layout, grid_atol, affine_atol, max_cases, table, table_issues)
    if cfg is None and settings is None:
        problems = [_with_check_hint(p) for p in problems]
    for p in problems:
        console.print(p.line(), markup=False, highlight=False, style="red")
    n_cases = 0 if table is None else len(table.cases if max_cases is None else table.cases[:max_cases])
    used = _settings_text(cfg, settings)
    if problems:
        console.print(f"{_plural(len(problems), 'problem')} in {_plural(n_cases, 'case')}{used}", markup=False)
        return 2
    assert table is not None
    for note in table.notes:
        console.print(f"note: {note}", markup=False)
    console.print(
        f"OK: {_plural(n_cases, 'case')}, {_plural(len(table.modalities), 'modality', 'modalities')}, "
        f"layout {table.layout}{used}",
        markup=False,
        style="green",
    )
    return 0


def _with_check_hint(p: Problem) -> Problem:
    """A ``dicom`` problem whose fix names a ``data.dicom`` key, saying how this check takes it."""
    key = re.search(r"data\.dicom\.[a-z_]+", p.fix) if p.rule == "dicom" else None
    if key is None:
        return p
    return replace(p, fix=f"{p.fix.rstrip('.')}; `medfuse data check` takes it from --config <your config> "
                          f"or an override {key.group(0)}=VALUE")


def _settings_text(cfg: Config | None, settings: str | None) -> str:
    """`` (with SETTINGS: the data settings of cfg that shape the check)`` for the summary line."""
    if cfg is None:
        return f" (with {settings})" if settings else ""
    parts = [f"task {cfg.task}"] if cfg.task else []
    for key in ("modalities", "class_names", "label_map"):
        value = getattr(cfg.data, key)
        if value:
            parts.append(f"data.{key} " + (f"[{', '.join(map(str, value))}]" if isinstance(value, list) else
                                           f"{{{', '.join(f'{k}: {v}' for k, v in value.items())}}}"))
    dicom = cfg.data.dicom.model_dump(exclude_defaults=True)
    parts.append("data.dicom " + (", ".join(f"{k}={v}" for k, v in dicom.items()) if dicom else "defaults"))
    return f" (with {settings or 'the config'}: {'; '.join(parts)})"


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# ----------------------------------------------------------------------------- table-wide rules


def table_problems(table: CaseTable, classification: bool = False) -> list[Problem]:
    """The table-wide rules: ``case-id``, ``duplicate-id``, ``leak`` and case ``label``.

    Args:
        table: the loaded cases.
        classification: the cases feed a classification run, so every case needs a label, a class:
            a declared class name or a whole index ``0..K-1`` (``K`` declared classes; without
            declared classes any whole number >= 0). Otherwise labels are checked only against
            declared classes.
    """
    where = str(table.source or table.root)
    problems = []
    for i, c in enumerate(table.cases):
        bad = case_id_problem(c.case_id)
        if bad is not None:
            problems.append(Problem(case_where(table, i), "case-id", bad))
    counts = Counter(c.case_id for c in table.cases)
    for case_id, n in counts.items():
        if n > 1:
            problems.append(
                Problem(where, "duplicate-id", f"case id '{case_id}' is used by {n} cases", case_id=case_id)
            )
    for pid, splits in patient_splits(table.cases).items():
        if len(splits) > 1:
            problems.append(Problem(where, "leak", leak_text(pid, splits)))
    for i, c in enumerate(table.cases):
        bad = label_problem(c.label, table.class_names, classification)
        if bad is not None:
            fix = ("fill the case's label (the manifest's label column) or drop the case" if c.label is None else
                   "use a declared class name or a whole class index 0..K-1, or add the class to class_names")
            problems.append(Problem(case_where(table, i), "label", f"case '{c.case_id}' {bad}", fix,
                                    case_id=c.case_id))
    return problems


def label_problem(label: object, class_names: list[str] | None, classification: bool = False) -> str | None:
    """Why a case label is not a class (see :func:`table_problems`), or None."""
    if label is None:  # a classification run trains and scores on every case's label
        return "has no label, and a classification run needs one for every case" if classification else None
    if class_names:
        if _known_class(label, class_names):
            return None
        return (f"has label {label!r}, not one of the declared classes {class_names} "
                f"(or their 0-based index 0..{len(class_names) - 1})")
    if not classification:
        return None
    if isinstance(label, bool) or not isinstance(label, int | float) or not float(label).is_integer() \
            or label < 0:
        return f"has label {label!r}, which is not a class index (a whole number >= 0)"
    return None


def _known_class(label: object, class_names: list[str]) -> bool:
    if isinstance(label, str):
        return label in class_names
    if isinstance(label, int | float) and not isinstance(label, bool) and float(label).is_integer():
        return 0 <= int(label) < len(class_names)
    return False


def validate_table(table: CaseTable, classification: bool = False,
                   collect: list[Problem] | None = None) -> CaseTable:
    """Raise the first table-wide problem as a one-line DataError (the rules of ``medfuse data check``).

    Called wherever ``train``, ``evaluate`` and ``predict`` load cases. Returns ``table``. With
    ``collect`` (``data check --config``, :func:`medfuse.data.check_config.config_table`) the problems
    are added to it instead.
    """
    problems = table_problems(table, classification)
    if collect is not None:
        collect.extend(problems)
        return table
    raise_first(problems, table.source or table.root)
    return table


def raise_first(problems: list[Problem], dataset: str | Path | None = None) -> None:
    """Raise ``problems[0]`` as a :class:`DataError` (its file, ``[rule] message`` and fix); no-op if empty.

    Args:
        problems: found problems.
        dataset: the dataset to name in the pointer to ``medfuse data check`` when there are more.
    """
    if not problems:
        return
    p = problems[0]
    more = ""
    if len(problems) > 1:
        more = f" ({_plural(len(problems) - 1, 'more problem')}: see `medfuse data check {dataset}`)" \
            if dataset is not None else f" ({_plural(len(problems) - 1, 'more problem')})"
    raise DataError(p.path, f"[{p.rule}] {p.message.rstrip('.')}{more}", p.fix or FIXES.get(p.rule, ""))


# ----------------------------------------------------------------------------- per-case rules


def _case_problems(table: CaseTable, case: Case, grid_atol: float, affine_atol: float,
                   first: dict[str, tuple[str, str, tuple[int, ...]]] | None = None) -> list[Problem]:
    """The per-case rules; ``first`` (case id -> modality, path, shape) gets the case's first readable image."""
    cid = case.case_id
    if table.layout in LAYOUT_RULES:
        return LAYOUT_RULES[table.layout](table, case)
    problems: list[Problem] = []
    # (path, read as the mask) -> volume (None: missing or unreadable); one case only. A mask path that
    # is also an image path is read again as a mask, so a case's image given as its mask is refused.
    volumes: dict[tuple[str, bool], Volume | None] = {}
    first_image = next(iter(case.images.values()), None)

    def load(path: str, what: str) -> Volume | None:
        key = (path, what == "mask")
        if key not in volumes:
            volumes[key] = None
            if not Path(path).exists():
                problems.append(
                    Problem(path, "missing", f"{what} of case '{cid}' does not exist", case_id=cid)
                )
            else:
                try:
                    # a DICOM SEG mask goes on the grid of the case's own image series
                    volumes[key] = read_label(path, first_image) if what == "mask" else read_image(path)
                except _READ_ERRORS as e:
                    reason = e.problem if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
                    rule = getattr(e, "rule", "unreadable")
                    problems.append(Problem(path, rule, f"{what} of case '{cid}' cannot be read: {reason}",
                                            e.fix if rule != "unreadable" and isinstance(e, DataError) else "",
                                            case_id=cid))  # fmt: skip
                else:
                    bad = nonfinite_problem(volumes[key].array, path, what, cid)
                    if bad is None and table.layout == "ctrate" and what != "mask":
                        bad = hu_problem(volumes[key].array, path, cid)
                    problems.extend([bad] if bad else [])
        return volumes[key]

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
        elif channel is None and vol.shape[0] != 1:  # what train, evaluate and predict refuse
            problems.append(Problem(path, "channels", f"image '{m}' of case '{cid}' has {vol.shape[0]} channels "
                                    "(volumes) and none is chosen for it", CHANNEL_FIX.format(m=m, last=vol.shape[0] - 1),
                                    case_id=cid))  # fmt: skip
        if ref is None:
            ref = (m, vol)
            if first is not None:
                first[cid] = (m, path, tuple(vol.shape))
        elif path != case.images[ref[0]]:
            flat = dims_problem(f"image '{ref[0]}'", ref[1].shape, f"image '{m}'", vol.shape, path, cid)
            grid = _grid(ref, (f"image '{m}'", vol), path, cid, grid_atol, affine_atol)
            if grid and table.resample_modalities:  # declared: resampled onto the first, if it overlaps it
                far = overlap_problem(f"image '{ref[0]}'", _geom(ref[1]), f"image '{m}'", _geom(vol), path, cid)
                grid = [far] if far else []
            problems.extend([flat] if flat else grid)
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
        flat = dims_problem(f"image '{ref[0]}'", ref[1].shape, "mask", mask.shape, case.mask, cid)
        problems.extend([flat] if flat else _grid(ref, ("mask", mask), case.mask, cid, grid_atol, affine_atol))
    problems.extend(_mask_values(table, mask, case.mask, cid))
    return problems


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


def _geom(v: Volume) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine (4, 4), shape (i, j, k)) of a (C, D, H, W) volume."""
    return v.affine, tuple(int(n) for n in v.shape[:0:-1])


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _mask_values(table: CaseTable, mask: Volume, path: str, cid: str) -> list[Problem]:
    arr = mask.array
    problems = []
    if table.mask_labels:
        finite = arr[np.isfinite(arr)] if arr.dtype.kind in "fc" else arr
        values, counts = np.unique(finite, return_counts=True)
        bad = mask_value_problem(values, counts, list(table.mask_labels.values()), path, cid)
        problems.extend([bad] if bad else [])
    if table.mask_required and not np.any(np.nan_to_num(arr) if arr.dtype.kind in "fc" else arr):
        problems.append(Problem(path, "empty-mask", f"mask of case '{cid}' is all zero", case_id=cid))
    return problems


def _cellmap_rules(table: CaseTable, case: Case) -> list[Problem]:
    from medfuse.data.containers import cellmap_problems

    raw = case.images.get("raw", "")
    if not case.mask:
        return [Problem(str(table.source or table.root), "missing", f"case '{case.case_id}' has no crop",
                        case_id=case.case_id)]
    return [Problem(p, rule, msg, case_id=case.case_id) for p, rule, msg in cellmap_problems(raw, case.mask,
                                                                                           case.case_id)]


def _omniabnorm_rules(table: CaseTable, case: Case) -> list[Problem]:
    from medfuse.data.io import read_slice_folder
    from medfuse.data.layouts.omniabnorm import omni_region_map

    cid, image = case.case_id, case.images.get("ct", "")
    if not Path(image).is_dir():
        return [Problem(image, "missing", f"slice folder of case '{cid}' does not exist", case_id=cid)]
    try:
        slab = read_slice_folder(image, list(case.extra.get("context") or []))
    except _READ_ERRORS as e:
        reason = e.problem if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        rule = "missing" if "has no slice" in reason else "unreadable"
        return [Problem(image, rule, f"slices of case '{cid}' cannot be read: {reason}", case_id=cid)]
    if case.extra.get("findings") and not (case.mask and Path(case.mask).is_dir()):
        return [Problem(case.mask or image, "missing", f"mask folder of case '{cid}' does not exist", case_id=cid)]
    try:
        groups = [g["ids"] for g in case.extra.get("findings") or []]
        omni_region_map(case.mask, groups, slab.shape[-2:], cid)
    except _READ_ERRORS as e:
        reason = e.problem if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        where = e.where if isinstance(e, DataError) else case.mask
        rule = "missing" if "has no mask" in reason else "grid" if "grid" in reason else "unreadable"
        return [Problem(str(where), rule, f"finding mask of case '{cid}': {reason}", case_id=cid)]
    bad = nonfinite_problem(slab.array, image, "slices", cid)
    return [bad] if bad else []


LAYOUT_RULES = {"cellmap": _cellmap_rules, "omniabnorm": _omniabnorm_rules}
"""Layouts whose cases are not plain image files: their own per-case rules replace the generic ones."""
