"""Tests of medfuse.data.transforms: the MONAI dict-transform chain and the cached dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

import medfuse.data.cache as cache
import medfuse.data.transforms as tr
from medfuse.config import AugmentConfig, IntensityConfig, TransformsConfig
from medfuse.data.io import Volume, write_nifti
from medfuse.data.layouts import Case
from medfuse.errors import ConfigError, DataError

SHAPE = (6, 20, 24)  # (D, H, W)
NONE = {"*": IntensityConfig(kind="none")}
# A non-trivial RAS affine for (i, j, k) = (w, h, d): anisotropic spacing, a small shear, an origin.
AFFINE = np.array([[1.5, 0.1, 0.0, 10.0], [0.0, 1.2, 0.0, 20.0], [0.0, 0.0, 3.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
AUG_ALL = AugmentConfig(
    flip_prob=0.5, flip_axes=[0, 1, 2], rotate_prob=0.5, scale_prob=0.5, intensity_prob=0.5, noise_prob=0.5
)


def _vol(seed: int, loc: float = 100.0, scale: float = 30.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, (1, *SHAPE)).astype(np.float32)


def _mask() -> np.ndarray:
    m = np.zeros((1, *SHAPE), np.uint8)
    m[0, 2:4, 5:12, 6:15] = 1
    m[0, 3:5, 12:16, 15:20] = 2
    return m


def _write(path: Path, arr: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    return str(write_nifti(Volume(arr, affine), path))


def _flipped_ij(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with i and j reversed (an LPS twin of a RAS file)."""
    ni, nj = arr.shape[3], arr.shape[2]
    flip = np.array([[-1.0, 0, 0, ni - 1], [0, -1.0, 0, nj - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(arr[:, :, ::-1, ::-1]), affine @ flip


def _item(paths: list[str | None], mask: str | None = None, **extra) -> dict:
    item = {
        "case_id": "c1",
        "patient_id": "p1",
        "image": paths,
        "channel_index": [None] * len(paths),
        **extra,
    }
    if mask is not None:
        item["mask"] = mask
    return item


@pytest.fixture
def case(tmp_path: Path) -> dict:
    """Two modalities (an MR-like and a CT-like volume) plus a mask, on one grid."""
    t1, ct = _vol(0), _vol(1, loc=0.0, scale=400.0)
    paths = {
        "t1": _write(tmp_path / "t1.nii.gz", t1),
        "ct": _write(tmp_path / "ct.nii.gz", ct),
        "mask": _write(tmp_path / "mask.nii.gz", _mask()),
    }
    return {
        "paths": paths,
        "t1": t1,
        "ct": ct,
        "item": _item([paths["t1"], paths["ct"]], paths["mask"], label=1),
    }


def _run(item: dict, modalities=("t1", "ct"), *, train: bool = False, has_mask: bool = True, **cfg) -> dict:
    t = tr.build_transforms(TransformsConfig(**cfg), list(modalities), train=train, has_mask=has_mask)
    tr.set_transform_seed(t, 0)
    return t(item)


def _same(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(
        torch.equal(a[k], b[k])
        if isinstance(a.get(k), torch.Tensor)
        else np.array_equal(a[k], b[k])
        if isinstance(a.get(k), np.ndarray)
        else a.get(k) == b.get(k)
        for k in keys
    )


# ------------------------------------------------------------------------------------------ items


def test_case_to_item_plain_types() -> None:
    c = Case(
        "c7",
        "p3",
        {"t1": "/d/a.nii.gz", "t2": "/d/a.nii.gz"},
        label=2,
        mask=None,
        text="report",
        channel_index={"t1": 0, "t2": 1},
    )
    item = tr.case_to_item(c, ["t2", "flair", "t1"])
    assert item == {
        "case_id": "c7",
        "patient_id": "p3",
        "image": ["/d/a.nii.gz", None, "/d/a.nii.gz"],
        "channel_index": [1, None, 0],
        "label": 2,
        "text": "report",
    }
    assert cache.file_state_hash(item) == cache.file_state_hash(dict(item))


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(("train", "crop", "size"), [
    (False, "center", (4, 16, 16)),
    (False, "center", (8, 24, 16)),  # pads D and H, crops W
    (True, "center", (4, 16, 16)),
    (True, "random", (8, 16, 28)),
    (True, "foreground", (4, 12, 12)),
])  # fmt: skip
def test_output_shapes(case: dict, train: bool, crop: str, size: tuple) -> None:
    out = _run(case["item"], train=train, spatial_size=size, train_crop=crop, augment=AUG_ALL)
    assert out["image"].shape == (2, *size) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (1, *size) and out["mask"].dtype == torch.int64
    assert type(out["image"]) is torch.Tensor and out["image"].is_contiguous()
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2}
    assert out["present"].tolist() == [1.0, 1.0] and out["label"] == 1
    assert out["affine"].shape == (4, 4) and out["affine"].dtype == np.float64


def test_no_mask_chain_drops_mask(case: dict) -> None:
    out = _run(case["item"], has_mask=False, spatial_size=(4, 16, 16))
    assert "mask" not in out and out["image"].shape == (2, 4, 16, 16)


# --------------------------------------------------------------------------------------- intensity


def test_per_modality_intensity(case: dict) -> None:
    intensity = {
        "t1": IntensityConfig(kind="zscore"),
        "ct": IntensityConfig(kind="ct_window", level=40, width=400),
    }
    out = _run(case["item"], orientation=None, intensity=intensity)
    t1, ct = out["image"][0].double(), out["image"][1].double()
    assert abs(t1.mean().item()) < 1e-4 and abs(t1.std(unbiased=False).item() - 1) < 1e-3
    expected_ct = np.clip((case["ct"][0] - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(ct.numpy(), expected_ct, atol=1e-5)
    assert t1.min() < -1  # z-scored, not windowed (a window would give [0, 1])


@pytest.mark.parametrize("default", ["*", None])
def test_percentile_matches_monai_and_default_key(case: dict, default: str | None) -> None:
    cfg = IntensityConfig(kind="percentile", lower=1, upper=99)
    intensity = {default: cfg} if default else {"ct": IntensityConfig(kind="none")}
    out = _run(case["item"], orientation=None, intensity=intensity)
    ref = ScaleIntensityRangePercentiles(
        lower=1 if default else 0.5, upper=99 if default else 99.5, b_min=0, b_max=1, clip=True
    )(torch.from_numpy(case["t1"]))
    np.testing.assert_allclose(out["image"][0].numpy(), ref[0].numpy(), atol=1e-5)
    assert out["image"][0].min() == 0 and out["image"][0].max() == 1
    if not default:  # the unnamed t1 got the schema default, the named ct was left alone
        np.testing.assert_allclose(out["image"][1].numpy(), case["ct"][0], rtol=1e-6)


def test_percentile_nonzero_keeps_zeros(tmp_path: Path) -> None:
    arr = _vol(3)
    arr[:, :, :8] = 0.0
    item = _item([_write(tmp_path / "a.nii.gz", arr)])
    out = _run(
        item,
        ["mr"],
        has_mask=False,
        orientation=None,
        intensity={"*": IntensityConfig(kind="percentile", nonzero=True)},
    )["image"][0]
    assert torch.all(out[:, :8] == 0) and out.min() >= 0 and out.max() <= 1
    assert out[:, 8:].min() == 0 and out[:, 8:].max() == 1  # percentiles of the nonzero part


# ------------------------------------------------------------------------------------------ geometry


def test_orientation_lps_twin_equals_ras(tmp_path: Path) -> None:
    ras = _vol(4)
    aff = np.diag([1.5, 1.2, 3.0, 1.0])
    lps, lps_aff = _flipped_ij(ras, aff)
    assert not np.array_equal(lps, ras)
    a = _run(_item([_write(tmp_path / "ras.nii.gz", ras, aff)]), ["x"], has_mask=False, intensity=NONE)
    b = _run(_item([_write(tmp_path / "lps.nii.gz", lps, lps_aff)]), ["x"], has_mask=False, intensity=NONE)
    assert torch.equal(a["image"], b["image"])
    np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-5)


@pytest.mark.parametrize(
    ("spacing", "expected"), [((1.5, 0.6, 0.75), (11, 39, 47)), ((3.0, 2.28, 3.45), (6, 11, 11))]
)
def test_spacing_resamples_shape(tmp_path: Path, spacing: tuple, expected: tuple) -> None:
    aff = np.diag([1.5, 1.2, 3.0, 1.0])  # spacing (d, h, w) = (3, 1.2, 1.5)
    item = _item([_write(tmp_path / "a.nii.gz", _vol(5), aff)], _write(tmp_path / "m.nii.gz", _mask(), aff))
    out = _run(item, ["x"], spacing=spacing, intensity=NONE)
    # MONAI keeps the corner-to-corner extent: n_new = (n - 1) * old / new + 1.
    old = (3.0, 1.2, 1.5)
    assert expected == tuple(round((n - 1) * o / s) + 1 for n, o, s in zip(SHAPE, old, spacing, strict=True))
    assert out["image"].shape == (1, *expected) and out["mask"].shape == (1, *expected)
    np.testing.assert_allclose(np.linalg.norm(out["affine"][:3, :3], axis=0), spacing[::-1], atol=1e-6)
    assert set(out["mask"].unique().tolist()) == {0, 1, 2}  # nearest keeps label values


def test_other_grid_modality_and_mask_are_resampled(tmp_path: Path) -> None:
    a, m = _vol(6), _mask()
    b_arr, b_aff = _flipped_ij(a, AFFINE)  # same image and world grid, stored the other way round
    m_arr, m_aff = _flipped_ij(m, AFFINE)
    item = _item(
        [_write(tmp_path / "a.nii.gz", a), _write(tmp_path / "b.nii.gz", b_arr, b_aff)],
        _write(tmp_path / "m.nii.gz", m_arr, m_aff),
    )
    out = _run(item, ["a", "b"], orientation=None, intensity=NONE)
    np.testing.assert_allclose(out["image"][1].numpy(), a[0], atol=1e-3)
    assert torch.equal(out["mask"][0], torch.from_numpy(m[0]).long())


def test_other_shape_modality_on_first_grid(tmp_path: Path) -> None:
    a = _vol(7)
    coarse = np.diag([3.0, 2.4, 3.0, 1.0])
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32)[None, None, None], (1, 6, 10, 12)).copy()
    item = _item(
        [
            _write(tmp_path / "a.nii.gz", a, np.diag([1.5, 1.2, 3.0, 1.0])),
            _write(tmp_path / "b.nii.gz", ramp, coarse),
        ]
    )
    out = _run(item, ["a", "b"], orientation=None, intensity=NONE)
    assert out["image"].shape == (2, *SHAPE)
    # world x = 1.5 w on the fine grid = 3 * (coarse index): a linear ramp is interpolated exactly.
    np.testing.assert_allclose(out["image"][1, 2, 5, :22].numpy(), np.arange(22) * 0.5, atol=1e-4)


def test_missing_modality_is_zero_and_flagged(case: dict) -> None:
    item = _item([case["paths"]["t1"], None], case["paths"]["mask"])
    aug = AugmentConfig(intensity_prob=1.0, intensity_shift=0.5, noise_prob=1.0)
    out = _run(item, train=True, spatial_size=(4, 16, 16), augment=aug)
    assert out["present"].tolist() == [1.0, 0.0]
    assert torch.all(out["image"][1] == 0) and out["image"][0].abs().sum() > 0


@pytest.mark.parametrize("cfg", [
    dict(orientation=None),
    dict(orientation="RAS"),
    dict(orientation="LPI", spatial_size=(4, 30, 16)),
])  # fmt: skip
def test_affine_maps_voxels_to_same_world_point(tmp_path: Path, cfg: dict) -> None:
    arr = _vol(8)
    out = _run(_item([_write(tmp_path / "a.nii.gz", arr)]), ["x"], has_mask=False, intensity=NONE, **cfg)
    if cfg["orientation"] is None:
        np.testing.assert_allclose(out["affine"], AFFINE, atol=1e-5)
        assert torch.equal(out["image"], torch.from_numpy(arr))
    img, inv = out["image"][0].numpy(), np.linalg.inv(AFFINE)
    d, h, w = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")
    vox = np.stack([w.ravel(), h.ravel(), d.ravel(), np.ones(w.size)])  # (4, N) as (w, h, d, 1)
    src = np.rint(inv @ out["affine"] @ vox).astype(int)[:3]  # (w, h, d) in the file
    inside = np.all((src >= 0) & (src < np.array(SHAPE[::-1])[:, None]), axis=0)
    assert inside.sum() > 0.5 * img.size
    w_src, h_src, d_src = src[:, inside]
    np.testing.assert_array_equal(img.ravel()[inside], arr[0][d_src, h_src, w_src])


# ------------------------------------------------------------------------------------- augmentation


def test_train_chain_seeded(case: dict) -> None:
    t = tr.build_transforms(
        TransformsConfig(spatial_size=(4, 16, 16), train_crop="foreground", augment=AUG_ALL),
        ["t1", "ct"],
        train=True,
        has_mask=True,
    )
    tr.set_transform_seed(t, 123)
    first = [t(case["item"]) for _ in range(3)]
    tr.set_transform_seed(t, 123)
    again = [t(case["item"]) for _ in range(3)]
    tr.set_transform_seed(t, 7)
    other = [t(case["item"]) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert not all(_same(a, b) for a, b in zip(first, other, strict=True))
    assert not _same(first[0], first[1])  # successive calls draw new augmentations


def test_eval_chain_deterministic(case: dict) -> None:
    t = tr.build_transforms(
        TransformsConfig(spatial_size=(4, 16, 16), augment=AUG_ALL), ["t1", "ct"], train=False, has_mask=True
    )
    assert _same(t(case["item"]), t(case["item"]))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_axes_are_array_axes(case: dict, axis: int) -> None:
    aug = AugmentConfig(flip_prob=1.0, flip_axes=[axis])
    base = _run(case["item"], orientation=None, intensity=NONE)
    out = _run(case["item"], train=True, orientation=None, intensity=NONE, augment=aug)
    assert torch.equal(out["image"], base["image"].flip(axis + 1))
    assert torch.equal(out["mask"], base["mask"].flip(axis + 1))


def test_rotation_stays_within_slices(tmp_path: Path) -> None:
    arr = np.broadcast_to(np.arange(1, 7, dtype=np.float32)[None, :, None, None], (1, *SHAPE)).copy()
    aug = AugmentConfig(rotate_prob=1.0, rotate_deg=30.0)
    out = _run(
        _item([_write(tmp_path / "a.nii.gz", arr, np.eye(4))]),
        ["x"],
        train=True,
        has_mask=False,
        orientation=None,
        intensity=NONE,
        augment=aug,
    )["image"][0]
    assert (out == 0).any()  # rotated in-plane: corners came from outside the slice (zero padding)
    # The slice centres keep their own slice's value: nothing was mixed across slices.
    centre = out[:, 6:14, 8:16]
    torch.testing.assert_close(centre, torch.arange(1.0, 7.0).view(-1, 1, 1).expand_as(centre))


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cfg", [dict(intensity={"T1": IntensityConfig()}), dict(augment=AugmentConfig(flip_axes=[3]))]
)
def test_config_errors(cfg: dict) -> None:
    with pytest.raises(ConfigError):
        tr.build_transforms(TransformsConfig(**cfg), ["t1", "ct"], train=True, has_mask=False)


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    nan = _vol(9)
    nan[0, 1, 2, 3] = np.nan
    nan_path = _write(tmp_path / "nan.nii.gz", nan)
    for path in (str(bad), str(tmp_path / "absent.nii.gz"), nan_path):
        with pytest.raises(DataError, match=Path(path).name):
            _run(_item([path]), ["x"], has_mask=False)


@pytest.mark.parametrize(("channels", "ok"), [([1, 0], True), ([None, None], False), ([0, 5], False)])
def test_4d_file_channel_index(tmp_path: Path, channels: list, ok: bool) -> None:
    arr = np.concatenate([_vol(10), _vol(11)])  # (2, D, H, W) -> a 4D NIfTI
    path = _write(tmp_path / "multi.nii.gz", arr)
    item = {**_item([path, path]), "channel_index": channels}
    if not ok:
        with pytest.raises(DataError, match="multi.nii.gz"):
            _run(item, ["a", "b"], has_mask=False)
        return
    out = _run(item, ["a", "b"], has_mask=False, orientation=None, intensity=NONE)
    assert torch.equal(out["image"], torch.from_numpy(arr[::-1].copy()))


# ------------------------------------------------------------------------------------------- caching


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import medfuse.data.load as load  # LoadCased reads through load.read_image

    calls: list[str] = []
    real = load.read_image

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(load, "read_image", counting)
    return calls


@pytest.mark.parametrize("train", [False, True])
def test_persistent_cache(case: dict, tmp_path: Path, count_reads: list[str], train: bool) -> None:
    cfg = TransformsConfig(spatial_size=(4, 16, 16), train_crop="random", augment=AUG_ALL)
    t = tr.build_transforms(cfg, ["t1", "ct"], train=train, has_mask=True)
    items = [case["item"], _item([case["paths"]["ct"], None], case["paths"]["mask"])]
    plain, cached = cache.build_dataset(items, t), cache.build_dataset(items, t, cache_dir=tmp_path / "cache")

    def run(ds) -> list[dict]:
        tr.set_transform_seed(t, 5)
        return [ds[i] for i in range(len(items))]

    first = run(cached)
    assert len(count_reads) == 5 and len(list((tmp_path / "cache").iterdir())) == 2
    count_reads.clear()
    second = run(cached)
    assert count_reads == []
    reference = run(plain)
    assert all(_same(a, b) for a, b in zip(first, second, strict=True))
    assert all(_same(a, b) for a, b in zip(second, reference, strict=True))
    assert all(isinstance(x["affine"], np.ndarray) for x in second)


def test_touched_file_invalidates_cache(case: dict, tmp_path: Path, count_reads: list[str]) -> None:
    t = tr.build_transforms(TransformsConfig(intensity=NONE), ["t1", "ct"], train=False, has_mask=True)
    ds = cache.build_dataset([case["item"]], t, cache_dir=tmp_path / "cache")
    before = ds[0]
    count_reads.clear()
    path = case["paths"]["t1"]
    _write(Path(path), case["t1"] + 1000.0)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = ds[0]
    assert sorted(count_reads) == sorted([path, case["paths"]["ct"], case["paths"]["mask"]])
    torch.testing.assert_close(after["image"][0], before["image"][0] + 1000.0, atol=1e-2, rtol=0)
    count_reads.clear()
    assert _same(ds[0], after) and count_reads == []


@pytest.mark.parametrize("cached", [False, True])
def test_dataset_raises_data_error_unwrapped(tmp_path: Path, cached: bool) -> None:
    t = tr.build_transforms(TransformsConfig(), ["x"], train=False, has_mask=False)
    ds = cache.build_dataset([_item([str(tmp_path / "absent.nii.gz")])], t, tmp_path / "c" if cached else None)
    with pytest.raises(DataError, match="absent.nii.gz"):
        ds[0]


def test_unlabelled_case_with_mask_chain(case: dict) -> None:
    item = {k: v for k, v in case["item"].items() if k != "mask"}
    out = _run(item, spatial_size=(4, 16, 16))  # eval (e.g. predict): the mask is optional
    assert "mask" not in out and out["image"].shape == (2, 4, 16, 16)
    with pytest.raises(DataError, match="no mask"):
        _run(item, train=True, spatial_size=(4, 16, 16), train_crop="foreground")


def test_cache_key_of_dicom_items_follows_the_series_and_the_dicom_options(tmp_path) -> None:
    """One file of a series is read with its series, and data.dicom changes what is read: both are in
    the key (a slice removed beside the named file, or on_gap changed, must not reuse the entry)."""
    from medfuse.data.dicom import use_dicom_options

    series = tmp_path / "t2w"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i:04d}.dcm").write_bytes(bytes(200 + i))
    nifti = tmp_path / "a.nii.gz"
    nifti.write_bytes(b"\x1f\x8b")
    one, folder, plain = ({"case_id": "c", "image": [str(p)]} for p in (series / "IM0000.dcm", series, nifti))
    keys = [cache.file_state_hash(it) for it in (one, folder, plain)]
    with use_dicom_options({"on_gap": "resample"}):
        new = [cache.file_state_hash(it) for it in (one, folder, plain)]
        assert new[0] != keys[0] and new[1] != keys[1] and new[2] == keys[2]  # a NIfTI item reads no DICOM
    (series / "IM0002.dcm").unlink()  # a slice beside the named file goes
    assert cache.file_state_hash(one) != keys[0] and cache.file_state_hash(folder) != keys[1]
    assert cache.file_state_hash(plain) == keys[2]
