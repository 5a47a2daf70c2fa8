"""DICOM that never lies: real pydicom test files read in place, and series built from CT_small.dcm."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medfuse.data.checks import check_dataset
from medfuse.data.dicom import DicomError, use_dicom_options
from medfuse.data.io import read_image
from medfuse.errors import DataError

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
TEST_FILES = CT_SMALL.parent


def _expected(ds) -> np.ndarray:
    """pydicom's own pixel_array * RescaleSlope + RescaleIntercept, as (C, D, H, W)."""
    arr = np.asarray(ds.pixel_array).astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    arr = arr * slope + inter
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp == 1:
        arr = arr.reshape(frames, *arr.shape[-2:])[None]
    else:
        arr = np.moveaxis(arr.reshape(frames, *arr.shape[-3:]), -1, 0)
    return arr


def _image_files() -> list[Path]:
    out = []
    for p in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not every test file is valid DICOM
            continue
        if "Rows" in ds and str(ds.get("Modality", "")) not in ("SEG", "SR", "RTPLAN", "ECG"):
            out.append(p)
    return out


@pytest.mark.parametrize("path", _image_files(), ids=lambda p: p.name)
def test_every_pydicom_image_reads_in_place_to_pixel_array_times_slope_plus_intercept(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(str(path))
            expected = _expected(ds)
        except Exception:  # noqa: BLE001 - pydicom itself cannot decode it: we must refuse, never guess
            with pytest.raises(DataError) as err:
                read_image(path)
            assert path.name in err.value.one_line()
            return
        vol = read_image(path)
    # a frame series sorted by position may reorder frames: compare as pydicom orders them when
    # the file has positions along the normal (rtdose: offsets ascend already)
    assert vol.shape == expected.shape, (vol.shape, expected.shape)
    if vol.array.dtype.kind == "f":
        np.testing.assert_allclose(vol.array, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(vol.array, expected)


def test_ct_small_in_place_is_hu_and_one_slice():
    vol = read_image(CT_SMALL)  # its folder holds ~80 other files, several unreadable: none matters
    ds = pydicom.dcmread(str(CT_SMALL))
    assert vol.meta["hu"] is True and vol.meta["n_files"] == 1 and vol.shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(vol.array[0, 0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    np.testing.assert_allclose(vol.spacing[1:], [float(v) for v in ds.PixelSpacing])


# --------------------------------------------------------------------------- series from CT_small


def write_series(folder: Path, zs, *, series_uid: str | None = None, description: str = "axial",
                 truncate: int | None = None, orient=None, image_type=None, values=None) -> list[Path]:
    """Copies of CT_small.dcm at positions ``zs`` along its normal, one new series."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(str(CT_SMALL))
    series_uid = series_uid or generate_uid()
    iop = np.asarray([float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    plane = base.pixel_array.copy()
    paths = []
    for k, z in enumerate(zs):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + z * normal]
        if orient is not None:
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in orient(k)]
        if image_type is not None:
            ds.ImageType = image_type
        if values is not None:
            ds.PixelData = values[k].astype(plane.dtype).tobytes()
        else:  # a distinct plane per slice so that order mistakes show
            ds.PixelData = (plane.astype(np.int32) + k).astype(plane.dtype).tobytes()
        p = folder / f"{series_uid[-6:]}_{k:03d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(p)
    if truncate is not None:
        data = paths[truncate].read_bytes()
        paths[truncate].write_bytes(data[: len(data) - 4000])
    return paths


def test_uniform_series_reads_in_order_with_its_spacing(tmp_path):
    paths = write_series(tmp_path / "ct", [6.0, 0.0, 3.0, 9.0])  # files out of order on purpose
    vol = read_image(tmp_path / "ct")
    assert vol.shape == (1, 4, 128, 128)
    np.testing.assert_allclose(vol.spacing[0], 3.0, atol=1e-4)
    base = pydicom.dcmread(str(CT_SMALL))
    hu0 = base.pixel_array.astype(np.float64) + float(base.RescaleIntercept)
    for d, k in enumerate([1, 2, 0, 3]):  # z order 0, 3, 6, 9 -> written index
        np.testing.assert_array_equal(vol.array[0, d], hu0 + k)
    assert read_image(paths[2]).shape == vol.shape  # one file reads its whole series


@pytest.mark.parametrize(("zs", "words"), [
    ([0.0, 3.0, 9.0, 12.0], "missing 1 slice"),
    ([0.0, 3.0, 6.0, 15.0, 16.0], "non-uniform slice spacing"),
    ([0.0, 3.0, 3.0, 6.0], "2 images at 1 shared position "),
    ([0.0, 0.0, 3.0, 3.0, 6.0, 6.0, 9.0, 9.0], r"8 images at 4 shared positions \(up to 2 per position"),  # 2 b-values
])
def test_gaps_uneven_and_duplicates_are_refused(tmp_path, zs, words):
    write_series(tmp_path / "ct", zs)
    with pytest.raises(DicomError, match=words) as err:
        read_image(tmp_path / "ct")
    line = err.value.one_line()
    assert "\n" not in line and str(tmp_path / "ct") in line


def test_on_gap_resample_gives_a_uniform_grid(tmp_path, caplog):
    write_series(tmp_path / "ct", [0.0, 3.0, 9.0, 12.0])
    with use_dicom_options({"on_gap": "resample"}), caplog.at_level("WARNING"):
        vol = read_image(tmp_path / "ct")
    assert vol.shape == (1, 5, 128, 128) and "resampled" in vol.meta
    np.testing.assert_allclose(vol.spacing[0], 3.0, atol=1e-4)
    base = pydicom.dcmread(str(CT_SMALL)).pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(vol.array[0, 2], base + 1.5, atol=1e-3)  # halfway between planes 1 and 2
    assert "resampled" in caplog.text


def test_truncated_slice_is_an_error_for_its_series(tmp_path):
    write_series(tmp_path / "ct", [0.0, 3.0, 6.0], truncate=1)
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "ct")
    assert "_001.dcm" in err.value.one_line()


def test_two_series_are_refused_with_the_list_unless_one_is_named(tmp_path):
    a = write_series(tmp_path / "ct", [0.0, 3.0, 6.0], description="soft tissue")
    write_series(tmp_path / "ct", [0.0, 5.0], description="lung")
    with pytest.raises(DicomError, match="holds 2 DICOM series") as err:
        read_image(tmp_path / "ct")
    line = err.value.one_line()
    assert "soft tissue" in line and "lung" in line and "(3 slices)" in line and "data.dicom.series" in line
    uid = pydicom.dcmread(str(a[0])).SeriesInstanceUID
    with use_dicom_options({"series": uid}):
        assert read_image(tmp_path / "ct").shape[1] == 3
    assert read_image(a[1]).shape[1] == 3  # one file names its series


def test_unreadable_neighbour_never_breaks_a_valid_file(tmp_path):
    paths = write_series(tmp_path / "ct", [0.0, 3.0])
    (tmp_path / "ct" / "junk.dcm").write_bytes(b"not dicom at all")
    assert read_image(paths[0]).shape[1] == 2
    with pytest.raises(DicomError, match="unreadable DICOM"):
        read_image(tmp_path / "ct")  # a folder read refuses: that file could be a slice


def test_localizer_and_rotating_projections_are_refused(tmp_path):
    write_series(tmp_path / "loc", [0.0, 3.0], image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(DicomError, match="localizer"):
        read_image(tmp_path / "loc")
    angles = np.deg2rad([0, 30, 60])
    write_series(tmp_path / "proj", [0.0, 0.0, 0.0],
                 orient=lambda k: [np.cos(angles[k]), np.sin(angles[k]), 0, 0, 0, -1])
    with pytest.raises(DicomError, match="orientations"):
        read_image(tmp_path / "proj")


def test_data_check_reports_each_faulty_series_on_one_line(tmp_path):
    good = tmp_path / "good"
    write_series(good, [0.0, 3.0, 6.0])
    write_series(tmp_path / "gap", [0.0, 3.0, 9.0])
    write_series(tmp_path / "uneven", [0.0, 3.0, 6.0, 15.0, 16.0])
    write_series(tmp_path / "two", [0.0, 3.0])
    write_series(tmp_path / "two", [0.0, 3.0])
    write_series(tmp_path / "trunc", [0.0, 3.0, 6.0], truncate=2)
    rows = ["case_id,image_ct"] + [f"{n},{n}" for n in ("good", "gap", "uneven", "two", "trunc")]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    problems = check_dataset(tmp_path)
    by_case = {p.case_id: p for p in problems}
    assert set(by_case) == {"gap", "uneven", "two", "trunc"} and len(problems) == 4
    assert all(p.rule == "dicom" for p in problems)
    assert "missing 1 slice" in by_case["gap"].line() and "non-uniform" in by_case["uneven"].line()
    assert "2 DICOM series" in by_case["two"].line() and "_002.dcm" in by_case["trunc"].line()


def test_data_check_cli_exit_2(tmp_path):
    from typer.testing import CliRunner

    from medfuse.cli import app

    write_series(tmp_path / "gap", [0.0, 3.0, 9.0])
    (tmp_path / "manifest.csv").write_text("case_id,image_ct\ngap,gap\n")
    res = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert res.exit_code == 2 and "[dicom]" in res.output and "missing 1 slice" in res.output


def test_copy_of_test_file_outside_its_folder_reads_the_same(tmp_path):
    shutil.copy(CT_SMALL, tmp_path / "a.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "a.dcm").array, read_image(CT_SMALL).array)
