"""Modalities and masks on other grids are resampled onto the first image only where their headers
place them over it: a modality that covers under 10% of the first's field of view, or a mask whose
labels fall mostly outside the image, is refused in one line (it used to become zeros, silently)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfuse.data.checks import check_dataset
from medfuse.data.io import Volume, write_nifti
from medfuse.data.transforms import LoadCased
from medfuse.data.volume import inside_fraction, voxel_lattice
from medfuse.errors import DataError

SHAPE = (8, 16, 16)  # (D, H, W)
T2 = np.diag([1.0, 1.0, 2.0, 1.0])  # (i, j, k) = (w, h, d) spacing 1, 1, 2 mm


def _write(path: Path, affine: np.ndarray, shape=SHAPE, value: float | None = None, mask=None) -> str:
    if mask is not None:
        arr = mask[None].astype(np.uint8)
    else:
        arr = np.random.default_rng(0).normal(100, 10, (1, *shape)).astype(np.float32)
        if value is not None:
            arr[:] = value
    return str(write_nifti(Volume(arr, affine), path))


def _load(images: list[str], mask: str | None = None) -> dict:
    item = {"case_id": "c1", "image": images, **({"mask": mask} if mask else {})}
    return LoadCased(["t2w", "dwi"][: len(images)], load_mask=mask is not None)(item)


def _shifted(mm: float, spacing=(2.0, 2.0, 4.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[0, 3] = mm
    return aff


def test_inside_fraction_counts_the_part_of_the_lattice_in_the_box():
    pts = voxel_lattice((16, 16, 8))
    assert pts.shape == (16 * 16 * 8, 3)
    assert inside_fraction(pts, T2, T2, (16, 16, 8)) == 1.0
    half = T2.copy()
    half[0, 3] = 8.0  # the other grid starts 8 mm along x: covers x = 7.5..23.5 of 15.5
    assert inside_fraction(pts, T2, half, (16, 16, 8)) == pytest.approx(0.5)
    assert inside_fraction(pts, T2, np.zeros((4, 4)), (16, 16, 8)) == 0.0


def test_a_modality_placed_away_from_the_first_is_refused(tmp_path):
    t2 = _write(tmp_path / "t2.nii.gz", T2)
    far = _write(tmp_path / "dwi.nii.gz", _shifted(300.0), shape=(4, 8, 8))
    with pytest.raises(DataError) as err:
        _load([t2, far])
    msg = str(err.value)
    assert msg.startswith(far) and "covers 0% of the field of view of image 't2w'" in msg and "\n" not in msg


def test_a_coarser_overlapping_modality_is_resampled(tmp_path):
    t2 = _write(tmp_path / "t2.nii.gz", T2)
    dwi = _write(tmp_path / "dwi.nii.gz", _shifted(8.0), shape=(4, 8, 8), value=50.0)  # covers half along x
    out = _load([t2, dwi])
    img = out["image"].numpy()  # (M, i, j, k)
    assert img.shape == (2, 16, 16, 8)
    assert np.all(img[1, 9:14, :14, :6] == pytest.approx(50.0)) and np.all(img[1, :6] == 0.0)
    # predict says so, once per case (engine.predict.Predictor.note_resampled); one grid: nothing to say
    assert out["resampled"] == "image(s) 'dwi' resampled (trilinear) onto the grid of image 't2w'"
    assert _load([t2, _write(tmp_path / "same.nii.gz", T2)])["resampled"] == ""


def test_an_oblique_modality_over_the_same_place_is_resampled(tmp_path):
    t2 = _write(tmp_path / "t2.nii.gz", T2)
    theta = np.deg2rad(20)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    centre = np.eye(4)
    centre[:3, 3] = [7.5, 7.5, 7.0]
    back = np.eye(4)
    back[:3, 3] = -centre[:3, 3]
    dwi = _write(tmp_path / "dwi.nii.gz", centre @ rot @ back @ T2)
    assert _load([t2, dwi])["image"].shape == (2, 16, 16, 8)


def test_a_mask_whose_labels_lie_outside_the_image_is_refused(tmp_path):
    t2 = _write(tmp_path / "t2.nii.gz", T2)
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:6, 4:12, 4:12] = 1
    aff = T2.copy()
    aff[2, 3] = 40.0  # the mask's slices sit 40 mm above the image's 16 mm
    m = _write(tmp_path / "m.nii.gz", aff, mask=lab)
    with pytest.raises(DataError, match=r"m\.nii\.gz.*100% of its labelled voxels outside the field of view"):
        _load([t2], m)


def test_a_mask_cropped_to_its_box_lands_where_its_header_puts_it(tmp_path):
    t2 = _write(tmp_path / "t2.nii.gz", T2)
    box = np.ones((2, 4, 4), np.uint8)  # (D, H, W) of a crop starting at voxel (w, h, d) = (5, 6, 3)
    aff = T2.copy()
    aff[:3, 3] = [5.0, 6.0, 6.0]
    out = _load([t2], _write(tmp_path / "crop.nii.gz", aff, mask=box))
    mask = out["mask"].numpy()[0]  # (i, j, k)
    assert mask.sum() == 2 * 4 * 4 and mask[5:9, 6:10, 3:5].all()


def test_data_check_reports_a_declared_resample_that_does_not_overlap(tmp_path):
    _write(tmp_path / "a_t2.nii.gz", T2)
    _write(tmp_path / "a_dwi.nii.gz", _shifted(8.0), shape=(4, 8, 8))
    _write(tmp_path / "b_t2.nii.gz", T2)
    _write(tmp_path / "b_dwi.nii.gz", _shifted(-300.0), shape=(4, 8, 8))
    (tmp_path / "manifest.csv").write_text("case_id,image_t2w,image_dwi\na,a_t2.nii.gz,a_dwi.nii.gz\n"
                                           "b,b_t2.nii.gz,b_dwi.nii.gz\n")
    (tmp_path / "dataset.yaml").write_text("resample_modalities: true\n")
    problems = check_dataset(tmp_path)
    assert [(p.case_id, p.rule) for p in problems] == [("b", "grid")]
    assert "covers 0%" in problems[0].message
