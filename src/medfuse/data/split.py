"""Patient-level train/val/test splits (DESIGN "Evaluation honesty": splits are by patient).

All cases of one patient land in one split. Cases that already have a split keep it; the
unassigned ones are distributed so that each split gets about its fraction of all cases, stratified
by the patients' case labels when labels exist. The result depends only on the table and the seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

from medfuse.data.layouts import SPLITS, Case, CaseTable
from medfuse.errors import ConfigError, DataError

LEAK_FIX = "give all cases of this patient the same split, or clear their split so that medfuse assigns one"


def patient_splits(cases: Iterable[Case]) -> dict[str, dict[str, list[str]]]:
    """Patient id -> {split: [case ids]} for the cases that have a split."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for c in cases:
        if c.split is not None:
            out[c.patient_id][c.split].append(c.case_id)
    return out


def leak_text(pid: str, splits: dict[str, list[str]]) -> str:
    parts = "; ".join(
        f"{s}: {', '.join(ids)}" for s, ids in sorted(splits.items(), key=lambda kv: SPLITS.index(kv[0]))
    )
    return f"patient '{pid}' is in {len(splits)} splits ({parts})"


def check_no_patient_leak(cases: Iterable[Case]) -> list[str]:
    """One line per patient whose cases sit in more than one split (empty when there is no leak)."""
    return [f"{leak_text(pid, s)}. Fix: {LEAK_FIX}" for pid, s in patient_splits(cases).items() if len(s) > 1]


def assign_splits(
    table: CaseTable, val: float = 0.15, test: float = 0.15, seed: int = 0, stratify: bool = True,
    fold: int | str | None = None,
) -> CaseTable:
    """Assign a split to every case that has none, keeping patients together.

    Fractions are of all cases (pre-assigned ones included): if a dataset ships an official test
    set of 20 %, ``test=0.15`` adds no further test cases. A patient with some pre-assigned cases
    puts the rest in the same split. When the table has no patient ids, every case is its own
    patient; a note says so (``table.notes`` and a ``UserWarning``).

    Args:
        table: the cases; it is not modified.
        val: fraction of cases for validation.
        test: fraction of cases for testing.
        seed: seed of the shuffle; the same seed gives the same split.
        stratify: balance the case labels (majority label per patient) across splits.
        fold: use an official fold file as the split (:func:`fold_split`): the cases of this fold
            are the test split, ``test`` is ignored and the rest go to train/val by patient.

    Returns:
        A copy of ``table`` whose cases all have a split.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to 1 or more.
        DataError: the existing assignment already puts one patient in two splits.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(
            "split",
            f"val={val} and test={test} are not fractions that leave cases for training",
            "use 0 <= val, test and val + test < 1",
        )
    if fold is not None:  # the fold's share of the cases is the test target, so val keeps its fraction
        table = fold_split(table, fold)
        test = sum(c.split == "test" for c in table.cases) / max(1, len(table.cases))
        if val + test >= 1:
            raise ConfigError("data.split.val", f"{val} leaves no training cases beside fold {fold} "
                              f"({test:.0%} of the cases)", "lower data.split.val")
    for pid, splits in patient_splits(table.cases).items():
        if len(splits) > 1:
            raise DataError(table.source or table.root, leak_text(pid, splits), LEAK_FIX)
    notes = list(table.notes)
    if not table.patient_ids_given:
        note = "no patient ids: split by case id (add a patient_id column so that a patient's cases stay together)"
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)

    groups: dict[str, list[int]] = defaultdict(list)  # patient -> case indices, in table order
    for i, c in enumerate(table.cases):
        groups[c.patient_id].append(i)
    fixed = {
        pid: next((table.cases[i].split for i in idx if table.cases[i].split), None)
        for pid, idx in groups.items()
    }
    strata = _strata(table, groups) if stratify else dict.fromkeys(groups, "")

    # Integer case targets per stratum by cumulative rounding, so that the strata's rounding errors
    # cancel and the overall fractions hold even for many small strata.
    size: Counter = Counter()
    count: dict[str, Counter] = defaultdict(Counter)  # stratum -> split -> cases so far
    for pid, idx in groups.items():
        size[strata[pid]] += len(idx)
        if fixed[pid]:
            count[strata[pid]][fixed[pid]] += len(idx)
    order = sorted(size)
    cum = np.cumsum([0] + [size[k] for k in order])
    target: dict[str, dict[str, int]] = {}
    for k, stratum in enumerate(order):
        t = {
            s: int(np.floor(f * cum[k + 1] + 0.5) - np.floor(f * cum[k] + 0.5))
            for s, f in (("val", val), ("test", test))
        }
        target[stratum] = {"train": size[stratum] - t["val"] - t["test"], **t}
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    candidates = [s for s in SPLITS if fractions[s] > 0]
    rng = np.random.default_rng(seed)
    chosen = dict(fixed)
    for stratum in order:
        free = [pid for pid in groups if strata[pid] == stratum and not fixed[pid]]
        for j in rng.permutation(len(free)):
            pid = free[j]
            # Greedy: the split furthest below its target; ties go to the larger fraction.
            deficit = {s: target[stratum][s] - count[stratum][s] for s in candidates}
            best = max(candidates, key=lambda s: (deficit[s], fractions[s], SPLITS.index(s)))
            chosen[pid] = best
            count[stratum][best] += len(groups[pid])
    cases = [dataclasses.replace(c, split=chosen[c.patient_id]) for c in table.cases]
    return dataclasses.replace(table, cases=cases, notes=notes)


def _strata(table: CaseTable, groups: dict[str, list[int]]) -> dict[str, str]:
    """Patient -> stratum key: the patient's most common case label, or '' when unusable.

    Stratifying is skipped (all '') when no case has a label or a label is a non-integer number
    (a regression target).
    """
    labels = [c.label for c in table.cases]
    usable = any(v is not None for v in labels) and not any(
        isinstance(v, float) and not float(v).is_integer() for v in labels
    )
    if not usable:
        return dict.fromkeys(groups, "")
    out = {}
    for pid, idx in groups.items():
        counts = Counter(repr(_norm(table.cases[i].label)) for i in idx)
        out[pid] = min(counts, key=lambda k: (-counts[k], k))
    return out


def _norm(label: object) -> object:
    """1.0 and 1 are one class."""
    return int(label) if isinstance(label, float) and label.is_integer() else label


FOLD_KEY = "fold"
"""The :attr:`Case.extra` field holding a case's official fold (BUS-BRA: ``kFold`` of ``5-fold-cv.csv``)."""


def _fold_name(value: object) -> str:
    text = str(value).strip()
    try:
        return str(int(float(text)))
    except ValueError:
        return text


def fold_split(table: CaseTable, fold: int | str) -> CaseTable:
    """The cases of official fold ``fold`` become the test split; the others stay unassigned.

    BUS-BRA's ``5-fold-cv.csv`` is a cross-validation partition grouped by patient: in round k the
    authors test on fold k and train on the other four, so the chosen fold is the *test* split and
    the validation cases (for model selection) are drawn from the other folds, by patient.

    Raises:
        ConfigError: the dataset has no fold field, or no case is in ``fold``.
        DataError: a case has no fold, or one patient's cases sit in the chosen fold and another.
    """
    where = table.source or table.root
    folds = [c.extra.get(FOLD_KEY) for c in table.cases]
    if all(f in (None, "") for f in folds):
        raise ConfigError("data.split.fold", f"the dataset at {where} has no official folds",
                          "remove data.split.fold (BUS-BRA: put 5-fold-cv.csv beside bus_data.csv)")
    missing = [c.case_id for c, f in zip(table.cases, folds, strict=True) if f in (None, "")]
    if missing:
        raise DataError(where, f"{len(missing)} case(s) have no official fold (e.g. {missing[0]})",
                        "complete the fold file or remove data.split.fold")
    names = sorted({_fold_name(f) for f in folds})
    want = _fold_name(fold)
    if want not in names:
        raise ConfigError("data.split.fold", f"no case is in fold {fold!r} (folds: {', '.join(names)})",
                          f"use one of {', '.join(names)}")
    in_fold = {c.patient_id for c, f in zip(table.cases, folds, strict=True) if _fold_name(f) == want}
    out_fold = {c.patient_id for c, f in zip(table.cases, folds, strict=True) if _fold_name(f) != want}
    both = sorted(in_fold & out_fold)
    if both:
        raise DataError(where, f"patient '{both[0]}' has cases in fold {want} and in another fold "
                        f"({len(both)} such patient(s)), so the fold split would leak", LEAK_FIX)
    cases = [dataclasses.replace(c, split="test" if _fold_name(f) == want else None)
             for c, f in zip(table.cases, folds, strict=True)]
    notes = [*table.notes, f"split: official fold {want} is the test split; the other folds are train/val by patient"]
    return dataclasses.replace(table, cases=cases, notes=notes)
