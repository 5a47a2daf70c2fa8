from pathlib import Path

import pytest

from medfuse.data.datamodule import regroup_labels
from medfuse.data.layouts import Case, CaseTable
from medfuse.errors import ConfigError

BINARY = {0: 0, 1: 0, 2: 1, 3: 1}


def _table(labels):
    cases = [Case(case_id=f"c{i}", patient_id=f"p{i}", images={"t2w": "x"}, label=lab) for i, lab in enumerate(labels)]
    return CaseTable(root=Path("."), layout="manifest", modalities=["t2w"], cases=cases,
                     class_names=["T1", "T2", "T3", "T4"])


def test_binary_regrouping_maps_every_label_and_names():
    t = regroup_labels(_table([0, 1, 2, 3, 3]), BINARY, ["T1-2", "T3-4"])
    assert [c.label for c in t.cases] == [0, 0, 1, 1, 1]
    assert t.class_names == ["T1-2", "T3-4"]


def test_unmapped_label_names_key_and_case():
    with pytest.raises(ConfigError, match="c1.*label 5"):
        regroup_labels(_table([0, 5]), BINARY, ["T1-2", "T3-4"])


def test_class_name_count_must_match_map():
    with pytest.raises(ConfigError, match="data.class_names"):
        regroup_labels(_table([0, 1]), BINARY, ["a", "b", "c"])


def test_no_map_keeps_labels():
    t = regroup_labels(_table([0, 3]), None, None)
    assert [c.label for c in t.cases] == [0, 3] and t.class_names == ["T1", "T2", "T3", "T4"]
