"""train refuses a case without one of the run's modalities before anything is written (it trained
on zeros for it without a word); families built for partial inputs take such cases."""

from __future__ import annotations

import shutil

import pytest

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.errors import DataError


def test_a_case_without_a_modality_is_refused_before_the_run_folder_is_written(cls_dataset, tmp_path):
    from medfuse.engine.trainer import fit

    data = tmp_path / "data"
    shutil.copytree(cls_dataset.parent, data)
    lines = (data / "manifest.csv").read_text().splitlines()
    lines[3] = lines[3].replace("images/case002_b.nii.gz", "")  # case002 has no 'b' image
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        fit(validate(tiny_cls_config(data / "manifest.csv", tmp_path / "runs", train__max_epochs=1)))
    line = err.value.one_line()
    assert "(line 4): [missing] case 'case002' has no 'b' image" in line and "incomplete_seg" in line
    assert not (tmp_path / "runs" / "t" / "config.yaml").exists()
    # nor its split: a rerun on the mended data (here with a case more) must not meet a stale splits.csv
    assert not (tmp_path / "runs" / "t" / "splits.csv").exists()


def test_a_refused_data_check_keeps_the_split_of_a_run_that_had_one(cls_dataset, tmp_path):
    from medfuse.engine.trainer import fit

    data = tmp_path / "data"
    shutil.copytree(cls_dataset.parent, data)
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    rows = (data / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    id_col = header.index("case_id")
    saved = "case_id,patient_id,split\n" + "".join(f"{r.split(',')[id_col]},{r.split(',')[id_col]},train\n"
                                                  for r in rows[1:])
    (run / "splits.csv").write_text(saved)
    rows[3] = rows[3].replace("images/case002_b.nii.gz", "")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        fit(validate(tiny_cls_config(data / "manifest.csv", tmp_path / "runs", train__max_epochs=1)))
    assert "has no 'b' image" in err.value.one_line()
    assert (run / "splits.csv").read_text() == saved  # regression guard: only a split this call wrote goes


def test_families_built_for_partial_inputs_take_them():
    from medfuse.data.datamodule import CaseDataModule
    from medfuse.families.context_seg.data import ContextSegDataModule
    from medfuse.families.incomplete_seg.data import IncompleteSegDataModule

    assert not CaseDataModule.partial_modalities
    assert IncompleteSegDataModule.partial_modalities and ContextSegDataModule.partial_modalities
