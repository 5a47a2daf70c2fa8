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
    lines = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
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
    rows = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
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
    assert (run / "splits.csv").read_text(encoding="utf-8") == saved  # regression guard: only a split this call wrote goes
    assert run.is_dir()  # a run folder that was there before the call stays


def test_families_built_for_partial_inputs_take_them():
    from medfuse.data.datamodule import CaseDataModule
    from medfuse.families.context_seg.data import ContextSegDataModule
    from medfuse.families.incomplete_seg.data import IncompleteSegDataModule

    assert not CaseDataModule.partial_modalities
    assert IncompleteSegDataModule.partial_modalities and ContextSegDataModule.partial_modalities


def test_a_run_refused_while_training_before_its_first_checkpoint_keeps_no_split(cls_dataset, tmp_path):
    """A NaN volume (case004, a training case) is found when the case is read, after the split was saved: the mended rerun, here
    with the bad case dropped and a new one added, must split afresh, not meet 'dataset changed'."""
    import nibabel as nib
    import numpy as np

    from medfuse.engine.trainer import fit

    data = tmp_path / "data"
    shutil.copytree(cls_dataset.parent, data)
    bad = data / "images" / "case004_a.nii.gz"
    img = nib.load(bad)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), bad)
    cfg = tiny_cls_config(data / "manifest.csv", tmp_path / "runs", train__max_epochs=1)
    with pytest.raises(DataError) as err:
        fit(validate(cfg))
    assert "case004_a.nii.gz" in err.value.one_line()
    assert not (tmp_path / "runs" / "t" / "splits.csv").exists()
    assert not (tmp_path / "runs" / "t").exists()  # the folder this refused call created goes too
    assert (tmp_path / "runs").is_dir()  # ... not its parent
    lines = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
    extra = lines[1].replace("case000", "case099").replace("p000", "p099")
    shutil.copy(data / "images" / "case000_a.nii.gz", data / "images" / "case099_a.nii.gz")
    shutil.copy(data / "images" / "case000_b.nii.gz", data / "images" / "case099_b.nii.gz")
    (data / "manifest.csv").write_text("\n".join([ln for ln in lines if "case004" not in ln] + [extra]) + "\n")
    run = fit(validate(cfg))
    assert (run / "checkpoints").exists() and "case099" in (run / "splits.csv").read_text(encoding="utf-8")
