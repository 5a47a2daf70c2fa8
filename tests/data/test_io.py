"""Tests for medfuse.data.io: every reader's values, spacing and affine, the NIfTI writer, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from medfuse.data.io import SUPPORTED_SUFFIXES, Volume, image_suffix, read_image, write_nifti
from medfuse.errors import DataError

RNG = np.random.default_rng(0)


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _affine(rotation: np.ndarray, zooms_ijk, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rotation @ np.diag(zooms_ijk)
    aff[:3, 3] = origin
    return aff


# (affine for (i, j, k), expected orientation): anisotropic, flipped, oblique (120 deg in-plane).
AFFINES = {
    "anisotropic": (_affine(np.eye(3), (0.75, 0.5, 2.5), (-10, 20, 5)), "RAS"),
    "flipped": (_affine(np.diag([-1.0, 1.0, -1.0]), (0.75, 0.5, 2.5), (3, -4, 60)), "LAI"),
    "oblique": (_affine(_rot_z(120.0), (0.75, 0.5, 2.5), (1.5, 2.5, -3.5)), "ALS"),
}


# ---------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_nifti_known_values(tmp_path, kind):
    affine, codes = AFFINES[kind]
    data = RNG.normal(size=(5, 6, 4)).astype(np.float32)  # file order (i, j, k)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    vol = read_image(str(path))
    assert vol.shape == (1, 4, 6, 5)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], data.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.5, 0.75), rtol=1e-6)
    assert vol.orientation == codes
    assert vol.meta["format"] == "nifti" and vol.path == str(path)
    assert vol.meta["hu"] is None  # unknown outside DICOM
    # Voxel (d, h, w) sits at affine @ (w, h, d): check one off-centre voxel against nibabel.
    d, h, w = 3, 1, 4
    world = vol.affine @ np.array([w, h, d, 1.0])
    np.testing.assert_allclose(world, nib.load(str(path)).affine @ np.array([w, h, d, 1.0]), atol=1e-5)
    assert vol.array[0, d, h, w] == data[w, h, d]


@pytest.mark.parametrize("kind", sorted(AFFINES))
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_nifti_round_trip(tmp_path, kind, dtype, suffix):
    affine, codes = AFFINES[kind]
    arr = (RNG.normal(size=(1, 4, 6, 5)) * 50).astype(dtype)
    vol = Volume(arr, affine)
    out = write_nifti(vol, tmp_path / "sub" / f"x{suffix}")

    assert out.exists() and out.parent.name == "sub"
    hdr = nib.load(str(out)).header
    assert hdr.get_data_shape() == (5, 6, 4)
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    back = read_image(out)
    assert back.array.dtype == arr.dtype
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert back.orientation == codes
    # The qform alone (what some tools read) also carries the rotation and the flips.
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-5)


def test_write_nifti_float32_exact_affine_and_array_argument(tmp_path):
    affine = AFFINES["flipped"][0]  # every entry representable in float32
    arr = RNG.normal(size=(4, 6, 5)).astype(np.float32)  # (D, H, W) accepted as one channel
    back = read_image(write_nifti(arr, tmp_path / "x.nii.gz", affine=affine))
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(back.array[0], arr)


def test_write_nifti_affine_argument_overrides_volume(tmp_path):
    vol = Volume(np.zeros((1, 2, 3, 4), np.float32), np.eye(4))
    target = AFFINES["anisotropic"][0]
    back = read_image(write_nifti(vol, tmp_path / "x.nii.gz", affine=target))
    np.testing.assert_allclose(back.affine, target, atol=1e-6)


def test_write_nifti_int64_and_bool_are_storable(tmp_path):
    labels = RNG.integers(0, 4, size=(1, 3, 4, 5))  # int64
    back = read_image(write_nifti(labels, tmp_path / "lab.nii.gz"))
    assert back.array.dtype.kind == "i"
    np.testing.assert_array_equal(back.array, labels)
    mask = labels > 1
    back = read_image(write_nifti(mask, tmp_path / "mask.nii.gz"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.astype(np.uint8))


def test_nifti_4d_channels(tmp_path):
    affine = AFFINES["oblique"][0]
    data = RNG.normal(size=(5, 6, 4, 3)).astype(np.float32)  # MSD Task01 layout (X, Y, Z, C)
    path = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    vol = read_image(path)
    assert vol.shape == (3, 4, 6, 5)
    np.testing.assert_array_equal(vol.channel(1).array[0], data[..., 1].transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    # Multi-channel round trip writes the 4D file back in (X, Y, Z, C) order.
    out = write_nifti(vol, tmp_path / "again.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), data)
    np.testing.assert_array_equal(read_image(out).array, vol.array)


def test_nifti_4d_channels_first_option(tmp_path):
    data = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32)  # (C, X, Y, Z)
    path = tmp_path / "cfirst.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    vol = read_image(path, channels_last_4d=False)
    assert vol.shape == (2, 4, 6, 5)
    np.testing.assert_array_equal(vol.array[1], data[1].transpose(2, 1, 0))
    assert read_image(path).shape == (4, 6, 5, 2)  # by default the last file axis is the channel


def test_nifti_itk_vector_image_matches_mha(tmp_path):
    """ITK writes vector NIfTI as (X, Y, Z, 1, C); both files must give the same Volume."""
    arr = RNG.integers(0, 100, size=(3, 4, 5, 2)).astype(np.int16)  # (D, H, W, C)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing((0.5, 0.75, 2.0))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    a, b = read_image(tmp_path / "v.nii.gz"), read_image(tmp_path / "v.mha")
    assert a.shape == b.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(a.array, np.moveaxis(arr, -1, 0))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


# ------------------------------------------------------------------------- NRRD / MHA (SimpleITK)


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_sitk_formats_match_itk_nifti(tmp_path, suffix):
    arr = RNG.integers(-1000, 1000, size=(4, 6, 5)).astype(np.int16)  # (D, H, W)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.6, 2.0))  # (x, y, z) = (w, h, d)
    img.SetOrigin((5.0, -7.0, 12.0))
    img.SetDirection(tuple(_rot_z(30.0).ravel()))  # LPS direction, oblique
    sitk.WriteImage(img, str(tmp_path / f"x{suffix}"))
    sitk.WriteImage(img, str(tmp_path / "oracle.nii.gz"))  # ITK's own LPS -> RAS conversion

    vol = read_image(tmp_path / f"x{suffix}")
    assert vol.shape == (1, 4, 6, 5) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.6, 0.8), rtol=1e-6)
    np.testing.assert_allclose(vol.affine, nib.load(str(tmp_path / "oracle.nii.gz")).affine, atol=1e-5)
    # LPS origin (5, -7, 12) is RAS (-5, 7, 12).
    np.testing.assert_allclose(vol.affine[:3, 3], (-5.0, 7.0, 12.0))
    np.testing.assert_array_equal(read_image(tmp_path / "oracle.nii.gz").array, vol.array)


def test_sitk_float_image_becomes_float32(tmp_path):
    arr = RNG.normal(size=(2, 3, 4))
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "f.mha"))  # float64 on disk
    vol = read_image(tmp_path / "f.mha")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[0], arr, rtol=1e-6)


# ---------------------------------------------------------------------------------------- DICOM

HU = RNG.integers(-1000, 1500, size=(4, 6, 5)).astype(np.int16)  # (D, H, W) in Hounsfield units


def _write_ct_series(
    folder, hu, uid, *, spacing=(0.7, 0.8), dz=2.5, origin=(10.0, -20.0, 30.0), modality="CT"
):
    """One CT series, stored with intercept -1024 / slope 1; geometry: rows along +x, columns along +y."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])  # LPS, in-plane transposed
    normal = np.cross(row_dir, col_dir)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        sl = sitk.GetImageFromArray(hu[k])
        sl.SetSpacing((spacing[1], spacing[0]))  # the writer takes PixelSpacing from the image
        pos = np.asarray(origin) + k * dz * normal
        tags = {
            "0008|0060": modality, "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.1", "0020|000e": uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.3f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.1f}" for v in (*row_dir, *col_dir)),
            "0028|0030": f"{spacing[0]}\\{spacing[1]}", "0018|0050": str(dz),
            "0028|1052": "-1024", "0028|1053": "1",
        }  # fmt: skip
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(sl)
    # Expected RAS affine, derived from the tags: i follows the row direction, j the column direction.
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * spacing[1], col_dir * spacing[0], normal * dz
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("target", ["folder", "file"])
def test_dicom_series_hu_applied_once(tmp_path, target):
    folder = tmp_path / "ct"
    expected_affine = _write_ct_series(folder, HU, "1.2.826.0.1.2.100")
    _write_ct_series(folder, HU[:2], "1.2.826.0.1.2.200", origin=(0.0, 0.0, -50.0))  # smaller series

    stored = np.stack([pydicom.dcmread(str(f)).pixel_array for f in sorted(folder.glob("100_*.dcm"))]).astype(
        np.int32
    )
    assert np.array_equal(stored, HU + 1024)  # the file really holds shifted values

    if target == "folder":  # two series in one folder: refused unless one is named
        from medfuse.data.dicom import use_dicom_options

        with pytest.raises(DataError, match="holds 2 DICOM series"):
            read_image(folder)
        with use_dicom_options({"series": "1.2.826.0.1.2.100"}):
            vol = read_image(folder)
    else:
        vol = read_image(folder / "100_002.dcm")
    assert vol.meta["series_uid"] == "1.2.826.0.1.2.100" and vol.meta["n_files"] == 4
    assert vol.meta["other_series"] == {"1.2.826.0.1.2.200": 2}
    assert vol.meta["hu"] is True and vol.meta["rescale_applied"] is True
    assert vol.meta["rescale_intercept"] == -1024.0 and vol.meta["rescale_slope"] == 1.0
    assert vol.shape == (1, 4, 6, 5)
    np.testing.assert_array_equal(vol.array[0], stored * 1 - 1024)  # stored * slope + intercept, once
    np.testing.assert_allclose(vol.spacing, (2.5, 0.7, 0.8), rtol=1e-6)
    np.testing.assert_allclose(vol.affine, expected_affine, atol=1e-4)
    assert vol.orientation == "PLI"


def test_dicom_mr_is_not_marked_hu(tmp_path):
    _write_ct_series(tmp_path / "mr", HU[:2], "1.2.826.0.1.2.400", modality="MR")
    vol = read_image(tmp_path / "mr")
    assert vol.meta["modality"] == "MR" and vol.meta["hu"] is False
    np.testing.assert_array_equal(vol.array[0], HU[:2])  # the rescale is still applied once


def test_dicom_without_suffix_is_detected(tmp_path):
    folder = tmp_path / "ct"
    _write_ct_series(folder, HU[:3], "1.2.826.0.1.2.300")
    src = folder / "300_001.dcm"
    plain = folder / "IM0001"
    src.rename(plain)
    vol = read_image(plain)
    assert vol.meta["format"] == "dicom"
    np.testing.assert_array_equal(vol.array[0], HU[:3])


def test_empty_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no DICOM series") as err:
        read_image(tmp_path)
    assert str(tmp_path) in err.value.one_line()


# ----------------------------------------------------------------------------------- PNG / JPG


@pytest.mark.parametrize(
    "suffix, mode, shape",
    [(".png", "L", (6, 5)), (".png", "RGB", (6, 5, 3)), (".png", "I;16", (6, 5)), (".bmp", "RGB", (6, 5, 3))],
)
def test_pillow_images(tmp_path, suffix, mode, shape):
    dtype = np.uint16 if mode == "I;16" else np.uint8
    arr = RNG.integers(0, np.iinfo(dtype).max, size=shape).astype(dtype)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path)

    vol = read_image(path)
    channels = 3 if arr.ndim == 3 else 1
    assert vol.shape == (channels, 1, 6, 5)
    expected = np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr[None]
    np.testing.assert_array_equal(vol.array[:, 0], expected)
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.orientation == "RAS"


def test_png_rgba_drops_alpha_and_palette_keeps_indices(tmp_path):
    rgba = RNG.integers(0, 255, size=(4, 3, 4)).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    vol = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(vol.array[:, 0], np.moveaxis(rgba[..., :3], -1, 0))

    labels = RNG.integers(0, 3, size=(4, 3)).astype(np.uint8)
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "p.png")
    vol = read_image(tmp_path / "p.png")
    assert vol.meta["palette"] is True
    np.testing.assert_array_equal(vol.array[0, 0], labels)


def test_jpeg_gray_and_rgb(tmp_path):
    gray = np.full((8, 8), 120, np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "c.jpeg")
    g, c = read_image(tmp_path / "g.jpg"), read_image(tmp_path / "c.jpeg")
    assert g.shape == (1, 1, 8, 8) and c.shape == (3, 1, 8, 8)
    assert abs(float(g.array.mean()) - 120) < 2 and abs(float(c.array.mean()) - 120) < 2


# ------------------------------------------------------------------------------------------ TIFF


def test_tiff_stack_with_imagej_spacing(tmp_path):
    arr = RNG.integers(0, 4000, size=(3, 6, 5)).astype(np.uint16)  # (D, H, W)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        arr,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    vol = read_image(path)
    assert vol.shape == (1, 3, 6, 5) and vol.array.dtype == np.uint16
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.spacing, (2.0e-3, 0.25e-3, 0.5e-3))  # micrometres -> mm
    assert vol.meta["spacing_unit"] == "mm"


def test_tiff_resolution_tags_in_cm(tmp_path):
    arr = RNG.integers(0, 255, size=(2, 3, 4)).astype(np.uint8)
    path = tmp_path / "cm.tiff"
    tifffile.imwrite(path, arr, photometric="minisblack", resolution=(10, 20), resolutionunit="CENTIMETER")
    vol = read_image(path)
    np.testing.assert_array_equal(vol.array[0], arr)
    np.testing.assert_allclose(vol.spacing[1:], (0.5, 1.0))  # 20 px/cm in y, 10 px/cm in x


def test_tiff_without_resolution_has_unit_spacing(tmp_path):
    arr = RNG.normal(size=(2, 3, 4))  # float64 -> float32
    tifffile.imwrite(tmp_path / "f.tif", arr, photometric="minisblack")
    vol = read_image(tmp_path / "f.tif")
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[0], arr, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, kwargs, expected_axes",
    [
        ((3, 6, 5, 3), {"photometric": "rgb"}, (3, 0, 1, 2)),  # RGB stack (D, H, W, S)
        ((3, 2, 6, 5), {"imagej": True, "metadata": {"axes": "ZCYX"}}, (1, 0, 2, 3)),  # hyperstack
        ((6, 5, 3), {"photometric": "rgb"}, None),  # single RGB image (H, W, S)
    ],
)
def test_tiff_named_channel_axes(tmp_path, shape, kwargs, expected_axes):
    arr = RNG.integers(0, 255, size=shape).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", arr, **kwargs)
    vol = read_image(tmp_path / "c.tif")
    expected = np.moveaxis(arr, -1, 0)[:, None] if expected_axes is None else arr.transpose(expected_axes)
    np.testing.assert_array_equal(vol.array, expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_tiff_unnamed_4d_follows_option(tmp_path, channels_last):
    arr = RNG.integers(0, 255, size=(3, 4, 5, 2)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "q.tif", arr, photometric="minisblack")
    vol = read_image(tmp_path / "q.tif", channels_last_4d=channels_last)
    np.testing.assert_array_equal(vol.array, np.moveaxis(arr, -1, 0) if channels_last else arr)


# ------------------------------------------------------------------------------------------- NPZ


@pytest.mark.parametrize("geometry", ["affine", "spacing", "none"])
def test_npz(tmp_path, geometry):
    arr = RNG.normal(size=(2, 4, 6, 5)).astype(np.float32)
    affine = AFFINES["oblique"][0]
    extra = {"affine": affine} if geometry == "affine" else {"spacing": np.array([2.5, 0.5, 0.75])}
    np.savez(tmp_path / "x.npz", array=arr, labels=np.zeros(3), **({} if geometry == "none" else extra))

    vol = read_image(tmp_path / "x.npz")
    np.testing.assert_array_equal(vol.array, arr)
    expected_spacing = (1.0, 1.0, 1.0) if geometry == "none" else (2.5, 0.5, 0.75)
    np.testing.assert_allclose(vol.spacing, expected_spacing)
    if geometry == "affine":
        np.testing.assert_array_equal(vol.affine, affine)
    else:
        np.testing.assert_array_equal(vol.affine, np.diag([*expected_spacing[::-1], 1.0]))


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 5)])
def test_npz_single_key_lower_rank(tmp_path, shape):
    arr = RNG.integers(0, 5, size=shape).astype(np.int32)
    np.savez_compressed(tmp_path / "y.npz", seg=arr)
    vol = read_image(tmp_path / "y.npz")
    assert vol.shape == (1,) * (4 - len(shape)) + shape and vol.array.dtype == np.int32
    assert vol.meta["key"] == "seg"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, "which array"),
        ({"array": np.zeros((2, 2, 2)), "spacing": np.array([1.0, -1.0, 1.0])}, "spacing"),
        ({"array": np.zeros((2, 2, 2)), "affine": np.eye(3)}, "affine"),
        ({"array": np.zeros((2, 2, 2)), "affine": np.eye(4), "spacing": np.array([2.0, 1, 1])}, "disagree"),
        ({"array": np.zeros((1, 1, 2, 2, 2))}, "shape"),
    ],
)
def test_npz_bad_content(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(DataError, match=message) as err:
        read_image(path)
    assert str(path) in err.value.one_line()


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["nothing.nii.gz", "missing_dir/x.png"])
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError, match="file not found") as err:
        read_image(path)
    line = err.value.one_line()
    assert str(path) in line and "Fix:" in line and "\n" not in line


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".png", ".tif", ".mha", ".nrrd", ".npz", ".dcm"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(RNG.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="cannot read") as err:
        read_image(path)
    line = err.value.one_line()
    assert line.startswith(str(path)) and "\n" not in line and len(line) < 400


def test_truncated_nifti(tmp_path):
    path = write_nifti(np.ones((1, 8, 8, 8), np.float32), tmp_path / "t.nii")
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError, match="declares 8 x 8 x 8 voxels of float32") as err:
        read_image(path)
    assert str(path) in err.value.one_line()


def test_unknown_suffix(tmp_path):
    path = tmp_path / "notes.xyz"
    path.write_text("hello")
    with pytest.raises(DataError, match="unsupported") as err:
        read_image(path)
    line = err.value.one_line()
    assert str(path) in line and ".nii.gz" in line and ".dcm" in line


def test_write_nifti_rejects_other_suffix(tmp_path):
    with pytest.raises(DataError, match=r"\.nii") as err:
        write_nifti(np.zeros((2, 2, 2)), tmp_path / "x.mha")
    assert "x.mha" in err.value.one_line()


# ------------------------------------------------------------------------------ Volume, suffixes


def test_volume_channel_is_a_view():
    arr = RNG.normal(size=(3, 2, 3, 4)).astype(np.float32)
    vol = Volume(arr, AFFINES["flipped"][0], "x.nii.gz", {"format": "nifti"})
    last = vol.channel(-1)
    assert last.shape == (1, 2, 3, 4) and last.meta["channel"] == 2
    assert np.shares_memory(last.array, arr)
    np.testing.assert_array_equal(last.affine, vol.affine)
    with pytest.raises(IndexError):
        vol.channel(3)
    assert "(3, 2, 3, 4)" in repr(vol) and "LAI" in repr(vol)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros((1, 1, 2, 3, 4))])
def test_volume_rejects_wrong_rank(bad):
    with pytest.raises(ValueError, match="C, D, H, W"):
        Volume(bad, np.eye(4))


@pytest.mark.parametrize(
    "name, expected",
    [("a/B.NII.GZ", ".nii.gz"), ("x.nii", ".nii"), ("scan.tar.gz", ".gz"), ("folder", ""), ("v.MHA", ".mha")],
)
def test_image_suffix(name, expected):
    assert image_suffix(name) == expected


def test_supported_suffixes_are_all_readable_names():
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)
    assert {".nii.gz", ".dcm", ".nrrd", ".mha", ".npz", ".png", ".tif"} <= set(SUPPORTED_SUFFIXES)


def test_nifti_scaled_on_disk_is_flagged_and_applied_once(tmp_path):
    stored = np.array([[[0, 1000], [2000, 3000]]], dtype=np.int16)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(stored, np.eye(4)), tmp_path / "plain.nii.gz")
    scaled, plain = read_image(tmp_path / "scaled.nii.gz"), read_image(tmp_path / "plain.nii.gz")
    assert scaled.meta["rescale_applied"] is True and plain.meta["rescale_applied"] is False
    np.testing.assert_allclose(scaled.array, plain.array - 1024.0)
