"""Patient-level splits: no leak, deterministic, fractions, pre-assigned splits."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from medfuse.data.layouts import Case, CaseTable
from medfuse.data.split import assign_splits, check_no_patient_leak
from medfuse.errors import ConfigError, DataError


def _table(
    n_patients: int = 60, cases_per_patient=(1, 2, 3), labels: bool = True, ids: bool = True
) -> CaseTable:
    cases = []
    for p in range(n_patients):
        for k in range(cases_per_patient[p % len(cases_per_patient)]):
            cid = f"p{p}_c{k}"
            cases.append(Case(case_id=cid, patient_id=f"p{p}" if ids else cid, images={"t1": f"/x/{cid}.nii.gz"},
                              label=(p % 3 == 0) * 1 if labels else None))  # fmt: skip
    return CaseTable(
        root=Path("/x"), layout="manifest", modalities=["t1"], cases=cases, patient_ids_given=ids
    )


def _splits_of_patients(table: CaseTable) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = defaultdict(set)
    for c in table.cases:
        out[c.patient_id].add(c.split)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("stratify", [True, False])
def test_no_patient_in_two_splits(seed, stratify):
    out = assign_splits(_table(), seed=seed, stratify=stratify)
    assert all(len(s) == 1 and None not in s for s in _splits_of_patients(out).values())
    assert check_no_patient_leak(out.cases) == []


def test_deterministic_and_seed_dependent():
    table = _table()
    a = [c.split for c in assign_splits(table, seed=3).cases]
    b = [c.split for c in assign_splits(table, seed=3).cases]
    c = [c.split for c in assign_splits(table, seed=4).cases]
    assert a == b
    assert a != c
    assert all(case.split is None for case in table.cases)  # input not modified


@pytest.mark.parametrize("val, test", [(0.15, 0.15), (0.2, 0.1), (0.1, 0.0)])
def test_fractions_respected(val, test):
    table = _table(n_patients=90)
    n = len(table.cases)
    counts = Counter(c.split for c in assign_splits(table, val=val, test=test, seed=1).cases)
    assert abs(counts["val"] - val * n) <= 3
    assert abs(counts["test"] - test * n) <= 3
    assert counts["train"] + counts["val"] + counts["test"] == n


def test_stratified_by_label():
    table = _table(n_patients=120, cases_per_patient=(1,))
    out = assign_splits(table, val=0.2, test=0.2, seed=0)
    for split in ("train", "val", "test"):
        labels = [c.label for c in out.cases if c.split == split]
        assert abs(sum(labels) / len(labels) - 1 / 3) < 0.05, split


def test_preassigned_kept_and_patients_follow():
    table = _table(n_patients=30)
    first = {c.patient_id: c for c in table.cases}
    fixed = {"p0": "test", "p1": "val", "p2": "train"}
    for pid, split in fixed.items():
        next(c for c in table.cases if c.patient_id == pid).split = split
    out = assign_splits(table, seed=5)
    splits = _splits_of_patients(out)
    assert {pid: splits[pid] for pid in fixed} == {pid: {s} for pid, s in fixed.items()}
    assert len(first) == len(splits)


def test_preassigned_count_towards_fractions():
    table = _table(n_patients=40, cases_per_patient=(1,))
    for c in table.cases[:10]:
        c.split = "test"  # an official 25 % test set
    out = assign_splits(table, val=0.15, test=0.15, seed=0)
    assert [c.case_id for c in out.cases if c.split == "test"] == [c.case_id for c in table.cases[:10]]


def test_preassigned_leak_raises():
    table = _table(n_patients=5)
    p2 = [c for c in table.cases if c.patient_id == "p2"]
    p2[0].split, p2[1].split = "train", "test"
    with pytest.raises(DataError) as e:
        assign_splits(table)
    assert "'p2'" in e.value.problem and p2[0].case_id in e.value.problem and p2[1].case_id in e.value.problem
    assert "same split" in e.value.fix
    lines = check_no_patient_leak(table.cases)
    assert len(lines) == 1 and "'p2'" in lines[0] and "Fix:" in lines[0]


def test_without_patient_ids_splits_by_case_and_notes_it():
    table = _table(ids=False)
    with pytest.warns(UserWarning, match="case id"):
        out = assign_splits(table, seed=0)
    assert any("case id" in n for n in out.notes)
    assert all(c.split in ("train", "val", "test") for c in out.cases)


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions(val, test):
    from medfuse.errors import ConfigError

    with pytest.raises(ConfigError):
        assign_splits(_table(n_patients=4), val=val, test=test)


# --------------------------------------------------------------------------- official folds


def _fold_table(folds: dict[str, tuple[str, str]]) -> CaseTable:
    """case id -> (patient, fold)."""
    cases = [Case(case_id=cid, patient_id=pid, images={"us": f"/x/{cid}.png"}, extra={"fold": fold})
             for cid, (pid, fold) in folds.items()]
    return CaseTable(root=Path("/x"), layout="busbra", modalities=["us"], cases=cases, patient_ids_given=True)


def test_official_fold_is_the_test_split_and_the_rest_train_val_by_patient():
    folds = {f"c{i}": (f"p{i // 2}", str(i // 2 % 5 + 1)) for i in range(40)}  # 2 images per patient
    out = assign_splits(_fold_table(folds), val=0.2, test=0.4, seed=1, fold=3)
    by_id = {c.case_id: c for c in out.cases}
    assert {cid for cid, c in by_id.items() if c.split == "test"} == {cid for cid, (_, f) in folds.items() if f == "3"}
    rest = [c for c in out.cases if c.extra["fold"] != "3"]
    assert {c.split for c in rest} == {"train", "val"}  # test=0.4 is ignored: the fold decides
    assert sum(c.split == "val" for c in rest) == 8  # val is a fraction of all cases
    assert check_no_patient_leak(out.cases) == [] and any("official fold 3" in n for n in out.notes)


def test_fold_errors_are_one_line():
    folds = {"a": ("p1", "1"), "b": ("p1", "2"), "c": ("p2", "2")}
    with pytest.raises(DataError, match="patient 'p1' has cases in fold 1 and in another fold"):
        assign_splits(_fold_table(folds), fold=1)
    with pytest.raises(ConfigError, match="no case is in fold 7"):
        assign_splits(_fold_table({"a": ("p1", "1")}), fold=7)
    table = _fold_table({"a": ("p1", "1")})
    table.cases[0].extra = {}
    with pytest.raises(ConfigError, match="has no official folds"):
        assign_splits(table, fold=1)
