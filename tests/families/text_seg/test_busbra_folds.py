"""BUS-BRA's official 5-fold-cv.csv as the split (data.split.fold): the fold is the test split."""

from __future__ import annotations

import csv

from test_busbra import CONFIG, make_busbra  # same folder (pytest prepend mode)

from medfuse.config import load_config
from medfuse.data.datamodule import resolve_splits


def test_data_split_fold_makes_the_official_fold_the_test_split(tmp_path):
    root = make_busbra(tmp_path / "BUSBRA", n_patients=10)
    folds = {r["ID"]: r["kFold"] for r in csv.DictReader((root / "5-fold-cv.csv").open(encoding="utf-8"))}
    cfg = load_config(CONFIG, [f"data.root={root}", "data.split.fold=2", "data.split.val=0.2"])
    table, by_split = resolve_splits(cfg, tmp_path / "run")
    assert {c.case_id for c in by_split["test"]} == {i for i, k in folds.items() if k == "2"}
    assert by_split["train"] and by_split["val"] and all(folds[c.case_id] != "2" for c in by_split["val"])
    saved = {r["case_id"]: r["split"] for r in csv.DictReader((tmp_path / "run" / "splits.csv").open(encoding="utf-8"))}
    assert saved == {c.case_id: c.split for c in table.cases}  # evaluate reuses exactly this split
