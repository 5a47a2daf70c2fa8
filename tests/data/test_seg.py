"""DICOM SEG -> label map on the referenced CT's grid (highdicom, and the pydicom fallback)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from test_dicom import write_series  # tests/data is on sys.path (pytest prepend mode)

from medfuse.data.dicom import DicomError
from medfuse.data.io import read_image


def _segment(number: int, label: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )  # fmt: skip


def write_seg(ct_files: list[Path], labels: np.ndarray, out: Path, fractional: bool = False) -> Path:
    """A highdicom SEG of ``labels`` (D, H, W; 0 = background, k = segment k) over ``ct_files`` (z order)."""
    sources = [pydicom.dcmread(str(p)) for p in ct_files]
    n = int(labels.max())
    if fractional:
        pixels = labels.astype(np.float32) / max(n, 1)  # one fractional segment
        seg_type, segs = hd.seg.SegmentationTypeValues.FRACTIONAL, [_segment(1, "tumour")]
    else:
        pixels = np.stack([labels == k for k in range(1, n + 1)], axis=-1).astype(np.uint8)
        seg_type, segs = hd.seg.SegmentationTypeValues.BINARY, [_segment(k, f"s{k}") for k in range(1, n + 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=seg_type, segment_descriptions=segs,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medfuse", manufacturer_model_name="test", software_versions="0", device_serial_number="1",
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


def _ct(tmp_path: Path, n: int = 5) -> list[Path]:
    zs = [3.0 * k for k in range(n)]
    return write_series(tmp_path / "study" / "ct", zs)


def _labels(n: int = 5) -> np.ndarray:
    lab = np.zeros((n, 128, 128), dtype=np.uint8)
    lab[1:3, 40:70, 50:90] = 1
    lab[2, 60:80, 60:100] = 2  # overlaps segment 1 on slice 2: the higher number wins
    return lab  # slices 0, 3 and 4 empty: highdicom omits their frames


def test_highdicom_seg_reads_as_the_written_label_map_on_the_ct_grid(tmp_path):
    ct = _ct(tmp_path)
    lab = _labels()
    seg_path = write_seg(ct, lab, tmp_path / "study" / "seg.dcm")  # CT is in a folder below the SEG
    assert pydicom.dcmread(str(seg_path)).NumberOfFrames < 2 * lab.shape[0]  # empty frames are absent
    vol = read_image(seg_path)
    image = read_image(tmp_path / "study" / "ct")
    assert vol.meta["reader"] == "highdicom" and vol.meta["segments"] == 2
    assert vol.shape == image.shape and np.allclose(vol.affine, image.affine)
    np.testing.assert_array_equal(vol.array[0], lab)


def test_fractional_seg_is_thresholded(tmp_path):
    from medfuse.data.dicom import use_dicom_options

    ct = _ct(tmp_path)
    lab = _labels()
    seg_path = write_seg(ct, lab, tmp_path / "study" / "frac.dcm", fractional=True)  # values 0, 0.5, 1
    np.testing.assert_array_equal(read_image(seg_path).array[0], (lab >= 1).astype(np.uint8))
    with use_dicom_options({"seg_threshold": 0.75}):
        np.testing.assert_array_equal(read_image(seg_path).array[0], (lab == 2).astype(np.uint8))


def test_early_slicer_seg_without_segment_identification_uses_the_pydicom_fallback(tmp_path):
    ct = _ct(tmp_path)
    lab = (_labels() > 0).astype(np.uint8)
    seg_path = write_seg(ct, lab, tmp_path / "study" / "slicer.dcm")
    ds = pydicom.dcmread(str(seg_path))
    groups = [*ds.PerFrameFunctionalGroupsSequence, *ds.SharedFunctionalGroupsSequence]
    for item in groups:  # as NSCLC-Radiogenomics' 3D Slicer SEGs: no per-frame segment identification
        if "SegmentIdentificationSequence" in item:
            del item.SegmentIdentificationSequence
    ds.save_as(str(seg_path))
    vol = read_image(seg_path)
    assert vol.meta["reader"] == "pydicom"
    np.testing.assert_array_equal(vol.array[0], lab)


def test_seg_with_reference_elsewhere(tmp_path):
    ct = _ct(tmp_path)
    seg_path = write_seg(ct, _labels(), tmp_path / "other" / "segs" / "seg.dcm")  # not below, not beside
    with pytest.raises(DicomError, match="references series"):
        read_image(seg_path)
    from medfuse.data.seg import read_label, read_seg

    np.testing.assert_array_equal(read_seg(seg_path, reference=tmp_path / "study" / "ct").array[0], _labels())
    np.testing.assert_array_equal(read_label(seg_path, image=ct[0]).array[0], _labels())  # the case's image


def test_seg_beside_its_ct_in_a_tcia_study_folder_is_paired(tmp_path):
    ct = write_series(tmp_path / "R01-001" / "study" / "2.000000-CT-1234", [3.0 * k for k in range(5)])
    seg_path = write_seg(ct, _labels(), tmp_path / "R01-001" / "study" / "1000.000000-3D Slicer segmentation result-5" / "1-1.dcm")
    np.testing.assert_array_equal(read_image(seg_path).array[0], _labels())


def test_rtstruct_is_refused_with_a_conversion_hint(tmp_path):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    (tmp_path / "rt").mkdir()
    ds.save_as(str(tmp_path / "rt" / "rtstruct.dcm"), enforce_file_format=True)
    for path in (tmp_path / "rt" / "rtstruct.dcm", tmp_path / "rt"):
        with pytest.raises(DicomError, match="RTSTRUCT") as err:
            read_image(path)
        line = err.value.one_line()
        assert "\n" not in line and "convert it to DICOM SEG or NIfTI" in line


@pytest.mark.parametrize("cut", ["pixel_data", "file"])
@pytest.mark.parametrize("early_slicer", [False, True])
def test_truncated_seg_is_a_data_error_naming_it(tmp_path, cut, early_slicer):
    """Header intact, pixel data short: one DataError naming the SEG (``data check``: unreadable), not
    pydicom's bare ValueError, whichever reader (highdicom or the fallback) gets the frames."""
    from medfuse.data.seg import read_label
    from medfuse.errors import DataError

    ct = _ct(tmp_path)
    seg_path = write_seg(ct, (_labels() > 0).astype(np.uint8), tmp_path / "study" / "seg.dcm")
    ds = pydicom.dcmread(str(seg_path))
    if early_slicer:
        for item in [*ds.PerFrameFunctionalGroupsSequence, *ds.SharedFunctionalGroupsSequence]:
            if "SegmentIdentificationSequence" in item:
                del item.SegmentIdentificationSequence
    if cut == "pixel_data":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(str(seg_path))
    if cut == "file":
        data = seg_path.read_bytes()
        seg_path.write_bytes(data[: len(data) - len(ds.PixelData) // 2])
    for read in (lambda: read_image(seg_path), lambda: read_label(seg_path, ct[0])):
        with pytest.raises(DataError, match="pixel data") as err:
            read()
        assert not isinstance(err.value, DicomError)  # the `unreadable` rule of data check, as before
        line = err.value.one_line()
        assert str(seg_path) in line and "\n" not in line


def _cut_seg(tmp_path: Path, n_bytes: int | str) -> tuple[list[Path], Path]:
    """A CT and its SEG cut after ``n_bytes`` bytes (``"before_pixels"``: just before PixelData)."""
    ct = _ct(tmp_path)
    seg_path = write_seg(ct, (_labels() > 0).astype(np.uint8), tmp_path / "study" / "seg" / "seg.dcm")
    data = seg_path.read_bytes()
    if n_bytes == "before_pixels":
        n_bytes = data.rindex(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) PixelData tag, little endian
    seg_path.write_bytes(data[: int(n_bytes)])
    return ct, seg_path


@pytest.mark.parametrize("n_bytes", [300, 700, 2000, "before_pixels"])
def test_seg_cut_short_anywhere_in_its_header_is_one_line_naming_it(tmp_path, n_bytes):
    """`head -c 2000` of a SEG given as a case's mask (a generic manifest: read_label with the case's CT)
    raised AttributeError ('FileDataset' object has no attribute 'Rows'); every cut is now a DataError
    naming the SEG (data check: unreadable)."""
    from medfuse.data.seg import read_label, read_seg
    from medfuse.errors import DataError

    ct, seg_path = _cut_seg(tmp_path, n_bytes)
    for read in (lambda: read_label(seg_path, ct[0].parent), lambda: read_label(seg_path, ct[0]),
                 lambda: read_seg(seg_path, reference=ct[0].parent)):
        # which reader notices depends on where the cut falls (highdicom's random UIDs move it): the
        # header reader ("not a readable DICOM file") or the SEG reader ("cut short")
        with pytest.raises(DataError, match="truncated or corrupt|not a readable DICOM file") as err:
            read()
        line = err.value.one_line()
        assert line.startswith(str(seg_path)) and "\n" not in line and "Fix:" in line


def test_generic_manifest_with_a_cut_seg_an_empty_file_and_ct_files_as_masks(tmp_path):
    """data check of a manifest (image_ct = the CT series, mask = ...): one problem per bad mask, naming
    it, and no exception out of the check (the cut SEG was an AttributeError traceback)."""
    import csv

    from medfuse.data.checks import check_dataset

    ct, seg_path = _cut_seg(tmp_path, 2000)
    good = write_seg(ct, (_labels() > 0).astype(np.uint8), tmp_path / "good" / "seg.dcm")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    lone = tmp_path / "lone" / "slice.dcm"  # one CT slice copied out of its series
    lone.parent.mkdir()
    lone.write_bytes(ct[0].read_bytes())
    masks = {"cut": seg_path, "empty": empty, "lone_slice": lone, "ct_file": ct[2], "ct_folder": ct[0].parent,
             "good": good}
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "patient_id", "image_ct", "mask"])
        for cid, m in masks.items():
            w.writerow([cid, cid, str(ct[0].parent), str(m)])
    problems = check_dataset(tmp_path / "manifest.csv")
    by_case = {p.case_id: p for p in problems}
    assert set(by_case) == {"cut", "empty", "lone_slice", "ct_file", "ct_folder"}, problems
    cut = by_case["cut"]  # unreadable by the SEG reader, or by the header reader (where the cut falls)
    assert (cut.rule, "cut short" in cut.message) == ("unreadable", True) or \
        (cut.rule, "not a readable DICOM file" in cut.message) == ("dicom", True), cut
    assert by_case["empty"].rule in {"unreadable", "dicom"}
    # a file of the CT series, beside it or copied out of it: the CT was read as a label map of HU values
    for cid in ("lone_slice", "ct_file", "ct_folder"):  # the folder: the very path of image_ct, read once
        assert by_case[cid].rule == "dicom" and "image series" in by_case[cid].message
    for cid, p in by_case.items():
        assert p.path == str(masks[cid])


@pytest.mark.parametrize("as_folder", [False, True])
def test_the_case_image_series_given_as_its_mask_is_refused(tmp_path, as_folder):
    """read_label(mask, image) with the mask a file or the folder of the image's own series read the CT as
    a label map of HU values (text_seg: every voxel above 0 HU a target); now one line naming it."""
    from medfuse.data.seg import read_label

    ct = _ct(tmp_path)
    mask = ct[0].parent if as_folder else ct[1]
    with pytest.raises(DicomError, match="is part of the case's image series") as err:
        read_label(mask, ct[0].parent)
    assert err.value.one_line().startswith(str(mask))
    assert read_label(ct[1]).shape[1] == 5  # without the case's image: an image read as before
