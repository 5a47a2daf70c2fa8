"""``medfuse predict`` inputs of incomplete_seg refused in one line (DESIGN "Errors"): files of two
cases given as one, ``--modalities`` contradicting the file names, a mistyped path, and a 2D image
for a run trained on 3D volumes. No training: file names and NIfTI headers are all that is read."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medfuse.errors import DataError

MODS = ["flair", "t1", "t1ce", "t2"]


def _files(tmp_path, *names):
    out = []
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")  # only the names are read here
        out.append(str(p))
    return out


def _refusal(inputs, modalities=None) -> str:
    from medfuse.families.incomplete_seg.data import resolve_predict_inputs

    with pytest.raises(DataError) as e:
        resolve_predict_inputs(inputs, modalities, MODS)
    line = str(e.value)
    assert "\n" not in line and ". Fix: " in line
    return line


def test_files_of_two_cases_are_refused(tmp_path):
    a, b = _files(tmp_path, "BraTS2021_00008/BraTS2021_00008_flair.nii.gz",
                  "BraTS2021_00009/BraTS2021_00009_t1.nii.gz")
    line = _refusal([a, b])
    assert a in line and b in line
    assert "BraTS2021_00008" in line.split(": ", 1)[1] and "BraTS2021_00009" in line.split(": ", 1)[1]
    assert "two cases" in line and "files of one case" in line


def test_files_of_one_case_still_make_one_case(tmp_path):
    from medfuse.families.incomplete_seg.data import resolve_predict_inputs

    a, b = _files(tmp_path, "X-01_flair.nii.gz", "X-01_t1c.nii.gz")
    assert resolve_predict_inputs([a, b], None, MODS) == ("X-01", {"flair": a, "t1ce": b})
    # --modalities matching the names, and names that say nothing, are both fine
    assert resolve_predict_inputs([b, a], ["t1ce", "flair"], MODS) == ("X-01", {"t1ce": b, "flair": a})
    c, d = _files(tmp_path, "scan1.nii.gz", "scan2.nii.gz")
    assert resolve_predict_inputs([c, d], ["t1", "t2"], MODS) == ("scan1", {"t1": c, "t2": d})


def test_modalities_contradicting_the_file_names_are_refused(tmp_path):
    flair, t2 = _files(tmp_path, "X_flair.nii.gz", "X_t2.nii.gz")
    line = _refusal([flair, t2], ["t2", "flair"])
    assert line.startswith(f"{flair}: ")
    assert "name says 'flair'" in line and "--modalities gives it as 't2'" in line
    assert "drop --modalities" in line


def test_mistyped_path_is_file_not_found(tmp_path):
    (good,) = _files(tmp_path, "X_t1.nii.gz")
    typo = str(tmp_path / "X_flairr.nii.gz")
    assert _refusal([typo]) == f"{typo}: file not found. Fix: check the path"
    assert _refusal([good, typo]) == f"{typo}: file not found. Fix: check the path"
    folder = str(tmp_path / "BraTS2021_0008")  # a case folder that does not exist
    assert _refusal([folder]) == f"{folder}: file not found. Fix: check the path"


@pytest.fixture
def predictor_3d():
    """The family's predictor for a run whose training images are (4, 16, 16, 16) volumes."""
    from medfuse.engine.predict import PackagedData, PackagedTable
    from medfuse.families.incomplete_seg.predict import IncompleteSegPredictor

    dm = PackagedData(MODS, [0, 1, 2, 3], PackagedTable(None, None), reference_shape=(4, 16, 16, 16))
    return IncompleteSegPredictor(None, dm, None)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1)])
def test_2d_image_for_a_3d_run_is_refused(tmp_path, predictor_3d, shape):
    path = tmp_path / "flat_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError) as e:
        predictor_3d.cases([str(path)], None)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path)) and "2D image" in line
    # --skip-refused: noted for refused.csv, not raised
    predictor_3d.skip_refused = True
    cases = predictor_3d.cases([str(path)], None)
    assert [c.case_id for c, _ in predictor_3d.refused] == [c.case_id for c in cases] == ["flat"]


def test_3d_volume_for_a_3d_run_is_accepted(tmp_path, predictor_3d):
    path = tmp_path / "deep_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(path))
    cases = predictor_3d.cases([str(path)], None)
    assert [c.case_id for c in cases] == ["deep"] and cases[0].images == {"flair": str(path)}
