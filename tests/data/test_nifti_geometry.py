"""NIfTI headers whose geometry readers disagree on are refused (DESIGN "Geometry": never guess)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfuse.data.io import read_image
from medfuse.errors import DataError


def _save(path: Path, qform: np.ndarray | None, qcode: int, sform: np.ndarray | None, scode: int) -> Path:
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), None)
    img.set_qform(qform, code=qcode)
    img.set_sform(sform, code=scode)
    nib.save(img, str(path))
    return path


AFF = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3, 5], [0, 0, 0, 1]])


def test_both_codes_zero_is_refused_in_one_line(tmp_path):
    f = _save(tmp_path / "a.nii.gz", None, 0, None, 0)
    assert (int(nib.load(f).header["qform_code"]), int(nib.load(f).header["sform_code"])) == (0, 0)
    with pytest.raises(DataError) as err:
        read_image(f)
    msg = str(err.value)
    assert "a.nii.gz" in msg and "qform_code and sform_code are both 0" in msg and "\n" not in msg


def test_qform_and_sform_far_apart_are_refused(tmp_path):
    moved = AFF.copy()
    moved[:3, 3] += [50.0, 0, 0]  # 50 mm apart
    f = _save(tmp_path / "b.nii", AFF, 1, moved, 1)
    with pytest.raises(DataError, match=r"b\.nii.*qform and sform disagree.*50 mm"):
        read_image(f)


def test_rotation_that_moves_a_corner_beyond_half_a_voxel_is_refused(tmp_path):
    theta = np.deg2rad(5.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    f = _save(tmp_path / "c.nii.gz", AFF, 1, rot @ AFF, 2)
    with pytest.raises(DataError, match="disagree"):
        read_image(f)


@pytest.mark.parametrize(("qcode", "scode", "source"), [(1, 1, "sform"), (0, 2, "sform"), (1, 0, "qform")])
def test_consistent_or_single_geometry_is_read(tmp_path, qcode, scode, source):
    nudged = AFF.copy()
    nudged[:3, 3] += 0.2  # 0.35 mm at every voxel: under half of the 1.5 mm voxel
    f = _save(tmp_path / "d.nii.gz", AFF if qcode else None, qcode, nudged if scode else None, scode)
    vol = read_image(f)
    assert vol.meta["affine_source"] == source
    np.testing.assert_allclose(vol.affine, nudged if scode else AFF, atol=1e-5)
    assert vol.shape == (1, 6, 5, 4)


def test_real_files_shipped_with_nibabel_and_nilearn_read():
    """The shipped test and template files (qform == sform to 1e-4, or sform only) all pass."""
    import nilearn
    from nibabel.testing import data_path

    files = [Path(data_path) / n for n in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
                                            "standard.nii.gz")]
    files += sorted(Path(nilearn.__file__).parent.joinpath("datasets", "data").rglob("*t1*nlin*.nii.gz"))[:1]
    assert len(files) == 5
    for f in files:
        assert read_image(f).meta["affine_source"] == "sform"


def test_written_shear_is_sform_only_and_reads_back(tmp_path):
    """write_nifti stores a sheared affine as the sform alone: a qform without the shear would be refused."""
    from medfuse.data.io import Volume, write_nifti

    shear = np.array([[1.5, 0.1, 0.0, 10.0], [0.0, 1.2, 0.0, 20.0], [0.0, 0.0, 3.0, -5.0], [0, 0, 0, 1.0]])
    f = write_nifti(Volume(np.zeros((1, 6, 20, 24), np.float32), shear), tmp_path / "s.nii.gz")
    hdr = nib.load(f).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 1)
    np.testing.assert_allclose(read_image(f).affine, shear, atol=1e-5)
    plain = write_nifti(Volume(np.zeros((1, 6, 20, 24), np.float32), AFF), tmp_path / "p.nii.gz")
    assert int(nib.load(plain).header["qform_code"]) == 1
