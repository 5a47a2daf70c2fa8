"""Diffusion MR series holding several b-values (``data.dicom.b_value``), written with pydicom.

Each series repeats its slice positions once per b-value (interleaved, as scanners export them),
the b-value in the standard DiffusionBValue or in a vendor's private tag. Every plane holds its own
constant so that a wrong b-value or a wrong slice order shows in the voxels.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medfuse.data.dicom import DicomError, DicomOptions, read_dicom, use_dicom_options
from medfuse.data.io import read_image
from medfuse.errors import ConfigError

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
ZS = [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]  # 6 slice positions, 4 mm apart


def _base() -> Dataset:
    ds = pydicom.dcmread(str(CT_SMALL))
    ds.remove_private_tags()  # CT_small is a GE CT: its private blocks would sit where the vendors' go
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    for key in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if key in ds:
            delattr(ds, key)
    return ds


def value(b_index: int, z_index: int, extra: int = 0) -> int:
    """The constant of the plane at b-value ``b_index``, position ``z_index`` (and direction ``extra``)."""
    return 1000 * b_index + 10 * z_index + 100 * extra + 1


def _set_b(ds: Dataset, b: float | None, tag: str) -> None:
    if b is None:
        return
    if tag == "standard":
        ds.DiffusionBValue = float(b)
    elif tag == "siemens":
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", str(int(b)))
    elif tag == "siemens_bytes":
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "UN", f"{int(b)} ".encode())
    elif tag == "ge":  # first of four values, 1000000000 + b
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [str(int(1e9 + b)), "8", "0", "0"])
    elif tag == "ge_bytes":
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "UN", f"{int(1e9 + b)}\\8\\0\\0".encode())
    elif tag == "philips":
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", float(b))
    elif tag == "philips_bytes":
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "UN", struct.pack("<f", b))
    else:
        raise ValueError(tag)


def write_dwi(folder: Path, bs, *, zs=ZS, tag: str = "standard", directions=None, siemens_directions: bool = False,
              series_uid: str | None = None, description: str = "ep2d_diff") -> list[Path]:
    """One series: for each position, one image per b-value in ``bs`` (interleaved).

    ``directions``: ``{b_index: [(directionality, gradient or None), ...]}`` writes one image per
    entry at that b-value (standard DiffusionDirectionality / DiffusionGradientOrientation, or
    Siemens (0019,100D) / (0019,100E) with ``siemens_directions``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = _base()
    series_uid = series_uid or generate_uid()
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    paths, n = [], 0
    for zi, z in enumerate(zs):
        for bi, b in enumerate(bs):
            for di, (kind, grad) in enumerate((directions or {}).get(bi, [(None, None)])):
                ds = copy.deepcopy(base)
                ds.SeriesInstanceUID = series_uid
                ds.SeriesDescription = description
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.InstanceNumber = n + 1
                ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + [0.0, 0.0, z]]
                _set_b(ds, b, tag)
                if siemens_directions:
                    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
                    if kind is not None:
                        block.add_new(0x0D, "CS", kind)
                    if grad is not None:
                        block.add_new(0x0E, "FD", [float(v) for v in grad])
                else:
                    if kind is not None:
                        ds.DiffusionDirectionality = kind
                    if grad is not None:
                        ds.DiffusionGradientOrientation = [float(v) for v in grad]
                ds.PixelData = np.full((128, 128), value(bi, zi, di), dtype=np.int16).tobytes()
                p = folder / f"{series_uid[-6:]}_{n:03d}.dcm"
                ds.save_as(str(p), enforce_file_format=True)
                paths.append(p)
                n += 1
    return paths


def write_enhanced(path: Path, bs, zs=ZS) -> Path:
    """One enhanced MR file: a frame per (position, b-value), interleaved, the b-value in each frame's
    MRDiffusionSequence."""
    ds = _base()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = ds.ImageOrientationPatient
    measures.PixelSpacing = ds.PixelSpacing
    measures.SliceThickness = 4.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    frames, planes = [], []
    for zi, z in enumerate(zs):
        for bi, b in enumerate(bs):
            item, plane, diff = Dataset(), Dataset(), Dataset()
            plane.ImagePositionPatient = [f"{v:.4f}" for v in origin + [0.0, 0.0, z]]
            diff.DiffusionBValue = float(b)
            diff.DiffusionDirectionality = "ISOTROPIC" if b else "NONE"
            item.PlanePositionSequence = Sequence([plane])
            item.MRDiffusionSequence = Sequence([diff])
            frames.append(item)
            planes.append(np.full((128, 128), value(bi, zi), dtype=np.int16))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(planes).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _expected(b_index: int, zs=ZS, extra: int = 0) -> np.ndarray:
    return np.stack([np.full((128, 128), value(b_index, zi, extra), dtype=np.int16) for zi in range(len(zs))])[None]


def _reference(tmp_path: Path) -> object:
    """The same 6 positions written as a plain series (no b-value): the grid a selection must give."""
    write_dwi(tmp_path / "ref", [None])
    return read_image(tmp_path / "ref")


# ------------------------------------------------------------------------------------ b-values


@pytest.mark.parametrize("tag", ["standard", "siemens", "siemens_bytes", "ge", "ge_bytes", "philips", "philips_bytes"])
def test_two_b_values_are_refused_without_the_option_and_selected_with_it(tmp_path, tag, monkeypatch):
    if tag.endswith("_bytes"):  # pydicom keeps an element of VR UN as raw bytes (a creator it does not know)
        monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    folder = tmp_path / "dwi"
    paths = write_dwi(folder, [0, 800], tag=tag)
    with pytest.raises(DicomError) as err:
        read_image(folder)
    line = err.value.one_line()
    assert "\n" not in line and str(folder) in line
    assert "b=0 (6 slices), b=800 (6 slices)" in line and 'data.dicom.b_value' in line and '"highest"' in line
    assert "shared position" not in line  # not the generic duplicate-positions message

    ref = _reference(tmp_path)
    for want in (800, "highest", "800", 805.0):  # within 1%
        with use_dicom_options({"b_value": want}):
            vol = read_image(folder)
        np.testing.assert_array_equal(vol.array, _expected(1))
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
        np.testing.assert_allclose(vol.spacing, [4.0, 0.661468, 0.661468], atol=1e-5)
        assert vol.meta["b_value"] == 800 and vol.meta["n_files"] == 6
    with use_dicom_options({"b_value": 0}):
        vol = read_image(paths[3])  # one file reads its series, the same way
    np.testing.assert_array_equal(vol.array, _expected(0))
    assert vol.meta["b_value"] == 0


def test_four_b_values_listed_with_counts_and_a_missing_one_refused(tmp_path):
    folder = tmp_path / "dwi"
    write_dwi(folder, [0, 50, 800, 1000])
    with pytest.raises(DicomError, match=r"holds 4 b-values \(b=0 \(6 slices\), b=50 \(6 slices\), b=800 \(6 slices\), "
                       r"b=1000 \(6 slices\)\)"):
        read_image(folder)
    with use_dicom_options({"b_value": 1500}), pytest.raises(DicomError) as err:
        read_image(folder)
    line = err.value.one_line()
    assert "b_value 1500" in line and "b=0 (6 slices)" in line and "b=1000 (6 slices)" in line and str(folder) in line
    with use_dicom_options({"b_value": "highest"}):
        np.testing.assert_array_equal(read_image(folder).array, _expected(3))
    with use_dicom_options({"b_value": 50}):
        np.testing.assert_array_equal(read_image(folder).array, _expected(1))


def test_selected_b_value_still_gets_the_geometry_checks(tmp_path):
    write_dwi(tmp_path / "gap", [0, 800], zs=[0.0, 4.0, 12.0, 16.0])
    with use_dicom_options({"b_value": 800}), pytest.raises(DicomError, match="missing 1 slice"):
        read_image(tmp_path / "gap")
    with use_dicom_options({"b_value": 800, "on_gap": "resample"}):
        vol = read_image(tmp_path / "gap")
    assert vol.shape == (1, 5, 128, 128) and vol.meta["b_value"] == 800 and "resampled" in vol.meta


def test_images_without_a_b_value_beside_b_values_are_listed(tmp_path):
    folder = tmp_path / "dwi"
    write_dwi(folder, [None, 800])
    with pytest.raises(DicomError, match=r"holds 1 b-value and images without one \(b=800 \(6 slices\), "
                       r"no b-value \(6 slices\)\)"):
        read_image(folder)
    with use_dicom_options({"b_value": 800}):
        np.testing.assert_array_equal(read_image(folder).array, _expected(1))


@pytest.mark.parametrize("want", [None, 800, "highest"])
def test_one_b_value_or_none_reads_as_before_whatever_the_option(tmp_path, want, caplog):
    write_dwi(tmp_path / "b1000", [1000])
    write_dwi(tmp_path / "t2w", [None])
    write_dwi(tmp_path / "b0", [0], tag="ge")  # GE writes (0043,1039) = 0 on other MR series too
    with use_dicom_options({"b_value": want}), caplog.at_level("WARNING"):
        dwi, t2w, b0 = (read_image(tmp_path / name) for name in ("b1000", "t2w", "b0"))
    for vol in (dwi, t2w, b0):
        np.testing.assert_array_equal(vol.array, _expected(0))
    assert dwi.meta["b_value"] == 1000 and "b_value" not in t2w.meta and "b_value" not in b0.meta
    assert ("holds only b=1000, not data.dicom.b_value 800" in caplog.text) == (want == 800)


def test_option_is_validated_and_keys_the_cache():
    from dataclasses import asdict

    assert DicomOptions(b_value="800").b_value == 800.0 and DicomOptions(b_value="Highest").b_value == "highest"
    assert asdict(DicomOptions(b_value=800)) != asdict(DicomOptions(b_value="highest"))
    with pytest.raises(ConfigError, match="data.dicom.b_value"):
        DicomOptions(b_value="max")
    from medfuse.config import DicomConfig

    assert DicomConfig(b_value=800).b_value == 800 and DicomConfig(b_value="highest").b_value == "highest"


# ---------------------------------------------------------------------------------- directions

DIRECTIONS = [("DIRECTIONAL", (1, 0, 0)), ("DIRECTIONAL", (0, 1, 0)), ("DIRECTIONAL", (0, 0, 1))]


@pytest.mark.parametrize(("tag", "siemens"), [("standard", False), ("siemens", True)], ids=["standard", "siemens"])
def test_directions_without_a_trace_are_refused(tmp_path, tag, siemens):
    folder = tmp_path / "dwi"
    write_dwi(folder, [0, 800], tag=tag, directions={1: DIRECTIONS}, siemens_directions=siemens)
    with use_dicom_options({"b_value": 800}), pytest.raises(DicomError) as err:
        read_image(folder)
    line = err.value.one_line()
    assert "3 diffusion directions at b=800 (18 images at 6 positions)" in line and "trace" in line
    assert "\n" not in line and str(folder) in line
    with use_dicom_options({"b_value": 0}):  # b=0 has one image per position
        np.testing.assert_array_equal(read_image(folder).array, _expected(0))


@pytest.mark.parametrize("trace", [("ISOTROPIC", None), (None, None)], ids=["isotropic", "no_gradient"])
def test_directions_with_a_trace_per_position_read_the_trace(tmp_path, trace):
    folder = tmp_path / "dwi"
    write_dwi(folder, [0, 800], directions={1: [*DIRECTIONS, trace]})
    with use_dicom_options({"b_value": "highest"}):
        vol = read_image(folder)
    np.testing.assert_array_equal(vol.array, _expected(1, extra=3))
    assert vol.meta["b_value"] == 800 and vol.meta["diffusion"] == "trace"
    np.testing.assert_allclose(vol.affine, _reference(tmp_path).affine, atol=1e-6)


def test_philips_direction_labels_and_isotropic_image(tmp_path):
    folder = tmp_path / "dwi"
    paths = write_dwi(folder, [0, 1000], tag="philips", directions={1: [(None, None)] * 4})
    for p in paths:  # Philips (2001,1004): R, P, S directions and I (isotropic) at b=1000
        ds = pydicom.dcmread(str(p))
        if int(ds.InstanceNumber) % 5 != 1:
            label = "RPSI"[(int(ds.InstanceNumber) - 2) % 5]
            ds.private_block(0x2001, "Philips Imaging DD 001").add_new(0x04, "CS", label)
            ds.save_as(str(p), enforce_file_format=True)
    with use_dicom_options({"b_value": 1000}):
        vol = read_image(folder)
    np.testing.assert_array_equal(vol.array, _expected(1, extra=3))
    assert vol.meta["diffusion"] == "trace"


def test_repeats_the_headers_do_not_tell_apart_are_refused(tmp_path):
    folder = tmp_path / "dwi"
    write_dwi(folder, [0, 800], directions={1: [(None, None), (None, None)]})
    with use_dicom_options({"b_value": 800}), pytest.raises(DicomError, match=r"12 images at 6 positions at b=800 "
                                                               r"\(up to 2 per position"):
        read_image(folder)


# ---------------------------------------------------------------------------- enhanced multi-frame


def test_enhanced_multiframe_b_values_from_per_frame_groups(tmp_path):
    path = write_enhanced(tmp_path / "emr" / "dwi.dcm", [0, 800])
    with pytest.raises(DicomError, match=r"b=0 \(6 slices\), b=800 \(6 slices\)"):
        read_image(path)
    with pytest.raises(DicomError, match=r"b=0 \(6 slices\), b=800 \(6 slices\)"):
        read_image(path.parent)
    ref = _reference(tmp_path)
    with use_dicom_options({"b_value": 800}):
        vol = read_image(path)
        assert read_dicom(path.parent).shape == vol.shape
    np.testing.assert_array_equal(vol.array, _expected(1))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    assert vol.meta["b_value"] == 800


# ------------------------------------------------------------------------------------- datasets


def test_config_b_value_reaches_the_dataset(tmp_path):
    from test_dicom_workers import dicom_cls_manifest

    from conftest import tiny_cls_config
    from medfuse.config import validate
    from medfuse.data.datamodule import CaseDataModule

    root = dicom_cls_manifest(tmp_path / "data", lambda folder: write_dwi(folder, [0, 800]), "dwi")
    cfg = validate(tiny_cls_config(root, tmp_path, name="r", data__dicom={"b_value": "highest"}))
    with use_dicom_options(None):
        dm = CaseDataModule(cfg, tmp_path / "r")
        item = dm.dataset("val")[(0, 7)]
    assert tuple(item["image"].shape) == (1, 6, 128, 128)


def test_a_seg_drawn_on_the_high_b_images_of_a_dwi_series(tmp_path):
    """A SEG references the SOP instances of one b-value: the reference series is read at data.dicom.b_value."""
    pytest.importorskip("highdicom")
    from test_seg import write_seg

    from medfuse.data.dicom import use_dicom_options
    from medfuse.data.seg import read_label

    paths = write_dwi(tmp_path / "study" / "dwi", [0, 800])  # interleaved: (z0, b0), (z0, b800), ...
    b800 = paths[1::2]
    lab = np.zeros((len(b800), 128, 128), np.uint8)
    lab[2:4, 30:60, 40:80] = 1
    seg = write_seg(b800, lab, tmp_path / "study" / "seg" / "seg.dcm")
    with pytest.raises(DicomError, match="b=0 .* b=800"):
        read_label(seg)  # which b-value's grid? the option must say
    with use_dicom_options({"b_value": 800}):
        out = read_label(seg)
    assert out.array.shape == (1, len(b800), 128, 128) and out.array[0, 2:4, 30:60, 40:80].all()
    assert int(out.array.sum()) == int(lab.sum())
