"""text_seg data: manifest -> items, boxes, text templates, counterfactuals, splits, file formats."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medfuse.config import validate, validate_params
from medfuse.errors import ConfigError, DataError
from medfuse.families.text_seg.data import (
    Record,
    TextSegDataModule,
    TextSegDataset,
    apply_counterfactual,
)
from medfuse.families.text_seg.params import TextSegDataParams
from medfuse.families.text_seg.pixels import box_from_mask, read_plane

TEMPLATE = "{shade} mass, {margin} margins"


def check_params(raw: dict) -> TextSegDataParams:
    """``data.params`` validated as the data module does it."""
    return validate_params(TextSegDataParams, raw, "data.params")


def _write(root, n: int = 16, patients: bool = True, extra_cols: dict | None = None, size=(40, 60)):
    """n PNG images (H, W) = size with one bright square each; 2 images per patient."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.uniform(0, 50, size).astype(np.uint8)
        mask = np.zeros(size, np.uint8)
        y, x = 5 + i % 10, 8 + 2 * (i % 7)
        img[y: y + 8, x: x + 12] = 220
        mask[y: y + 8, x: x + 12] = 255
        Image.fromarray(img).save(root / "img" / f"c{i}.png")
        Image.fromarray(mask).save(root / "img" / f"c{i}_m.png")
        row = {"case_id": f"c{i}", "image_us": f"img/c{i}.png", "mask": f"img/c{i}_m.png",
               "shade": ["bright", "dark"][i % 2], "margin": ["smooth", "irregular", "lobulated"][i % 3],
               "text": f"free text {i}", "box": f"{x - 2} {y - 1} {x + 13} {y + 9}"}
        if patients:
            row["patient_id"] = f"p{i // 2}"
        row.update({k: v[i] for k, v in (extra_cols or {}).items()})
        rows.append(row)
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "dataset.json").write_text(json.dumps({"modalities": ["us"]}))
    return root


def _cfg(root, out, **params):
    return validate({"name": "ts", "family": "text_seg", "model": {"name": "text_seg"}, "output_dir": str(out),
                     "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.25, "test": 0.25, "stratify": False},
                              "params": {"image_size": 32, "mask_size": 16, "text_template": TEMPLATE, **params}}})


@pytest.fixture()
def dataset(tmp_path):
    return _write(tmp_path / "data")


def test_items_shapes_text_and_patient_split(dataset, tmp_path):
    dm = TextSegDataModule(_cfg(dataset, tmp_path / "runs"), tmp_path / "runs" / "ts")
    owner = {}
    for split, recs in dm.records.items():
        for r in recs:
            pid = r.case_id[1:]
            owner.setdefault(int(pid) // 2, set()).add(split)
    assert all(len(s) == 1 for s in owner.values())  # a patient's two images share a split
    batch = next(iter(dm.loader("test")))
    b = len(batch["case_id"])
    assert batch["image"].shape == (b, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["mask"].shape == (b, 1, 16, 16) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["box"].shape == (b, 4) and batch["orig_size"][0].tolist() == [40, 60]
    i = int(batch["case_id"][0][1:])
    assert batch["text"][0] == f"{['bright', 'dark'][i % 2]} mass, {['smooth', 'irregular', 'lobulated'][i % 3]} margins"
    # tight mask box (inclusive pixel extents) scaled by 32/60 in x and 32/40 in y
    y, x = 5 + i % 10, 8 + 2 * (i % 7)
    expected = torch.tensor([x * 32 / 60, y * 32 / 40, (x + 11) * 32 / 60, (y + 7) * 32 / 40])
    assert torch.allclose(batch["box"][0], expected, atol=1e-4)


def test_split_by_image_refused_with_patient_ids(dataset, tmp_path):
    with pytest.raises(ConfigError, match="split by image refused"):
        TextSegDataModule(_cfg(dataset, tmp_path / "runs", split_by="image"))
    no_pid = _write(tmp_path / "nopid", patients=False)
    dm = TextSegDataModule(_cfg(no_pid, tmp_path / "runs", split_by="image"))
    assert sum(len(r) for r in dm.records.values()) == 16


@pytest.mark.parametrize("params,match", [({"bogus": 1}, "data.params.bogus: unknown key"),
                                          ({"intensity": "pet"}, "data.params.intensity: .*'minmax'"),
                                          ({"box_jitter": 1.5}, "data.params.box_jitter"),
                                          ({"image_size": 8}, "data.params.image_size"),
                                          ({"window": [40]}, "data.params.window"),
                                          ({"test_counterfactual": "oops"}, "data.params.test_counterfactual: .*FIELD=shuffle")])
def test_bad_params_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_params(params)
    assert "\n" not in e.value.one_line()


def test_bad_params_are_refused_by_the_data_module(dataset, tmp_path):
    with pytest.raises(ConfigError, match="data.params.intensity"):
        TextSegDataModule(_cfg(dataset, tmp_path / "runs", intensity="pet"))


def test_defaults_of_the_data_params():
    p = check_params({})
    assert (p.image_size, p.mask_size, p.intensity, p.box_source, p.box_jitter, p.split_by) == (
        1024, 256, "minmax", "mask", 0.1, "patient")
    assert p.cache_in_memory and not p.flip and not p.two_and_half_d


def _dataset(root, train=False, **params) -> TextSegDataset:
    from medfuse.data.layouts import load_cases
    from medfuse.families.text_seg.data import records_from_cases

    recs = records_from_cases(load_cases(root / "manifest.csv").cases, "us")
    return TextSegDataset(recs, check_params({"image_size": 32, "mask_size": 16, "text_template": TEMPLATE, **params}),
                          train=train)


def test_box_jitter_only_expands_only_in_training_and_is_seeded(dataset):
    ds = _dataset(dataset, train=True, box_jitter=0.3)
    tight = _dataset(dataset)[0]["box"]
    a, b, c = ds[(0, 11)]["box"], ds[(0, 11)]["box"], ds[(0, 12)]["box"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:2] <= tight[:2]).all() and (a[2:] >= tight[2:]).all()
    assert torch.equal(_dataset(dataset, box_jitter=0.3)[0]["box"], tight)


def test_flip_keeps_box_and_mask_consistent(dataset):
    ds = _dataset(dataset, train=True, flip=True, box_jitter=0.0, mask_size=32)
    base = _dataset(dataset, mask_size=32)[3]
    flipped = next(ds[(3, s)] for s in range(50) if not torch.equal(ds[(3, s)]["image"], base["image"]))
    assert torch.equal(flipped["image"], base["image"].flip(-1)) and torch.equal(flipped["mask"], base["mask"].flip(-1))
    ys, xs = torch.nonzero(flipped["mask"][0], as_tuple=True)
    x0, _, x1, _ = flipped["box"].tolist()
    assert x0 <= xs.min().item() + 1 and x1 >= xs.max().item() - 1


def test_box_from_csv_and_parsing_errors(tmp_path):
    root = _write(tmp_path / "d")
    ds = _dataset(root, box_source="csv")
    i = 0
    y, x = 5, 8
    assert torch.allclose(ds[i]["box"], torch.tensor([(x - 2) * 32 / 60, (y - 1) * 32 / 40, (x + 13) * 32 / 60,
                                                      (y + 9) * 32 / 40]), atol=1e-4)
    bad = _write(tmp_path / "bad", extra_cols={"box": ["1 2 3"] * 16})
    with pytest.raises(DataError, match="not 4 numbers"):
        _dataset(bad, box_source="csv")
    cols = _write(tmp_path / "cols", extra_cols={"box": [""] * 16, "box_x0": ["1"] * 16, "box_y0": ["2"] * 16,
                                                  "box_x1": ["30"] * 16, "box_y1": ["20"] * 16})
    assert torch.allclose(_dataset(cols, box_source="csv")[0]["box"],
                          torch.tensor([32 / 60, 2 * 32 / 40, 30 * 32 / 60, 20 * 32 / 40]))
    assert box_from_mask(np.zeros((4, 4), bool)) is None


def test_template_needs_its_fields(tmp_path):
    root = _write(tmp_path / "d", extra_cols={"margin": [""] * 16})
    with pytest.raises(DataError, match="no value for 'margin'"):
        _dataset(root)
    free = _dataset(root, text_template=None)
    assert free[0]["text"] == "free text 0"


def test_counterfactual_shuffle_value_and_text(dataset):
    ds = _dataset(dataset)
    recs = ds.records
    shuffled = apply_counterfactual(recs, TEMPLATE, "shade=shuffle", seed=0)
    assert set(shuffled) == {r.case_id for r in recs}
    # every record takes another record's shade (a cycle): with 2 values some keep theirs by chance
    assert 0 < sum(shuffled[r.case_id] != ds.texts[r.case_id] for r in recs) < len(recs)
    assert all(t.endswith(f"{r.fields['margin']} margins") for r, t in zip(recs, shuffled.values(), strict=True))
    forced = apply_counterfactual(recs, TEMPLATE, "margin=spiculated")
    assert all(t.endswith("spiculated margins") for t in forced.values())
    whole = apply_counterfactual(recs, TEMPLATE, "text=shuffle", seed=1)
    assert sorted(whole.values()) == sorted(ds.texts.values())
    free = apply_counterfactual(recs, None, "text=shuffle", seed=1)
    assert all(free[r.case_id] != f"free text {r.case_id[1:]}" for r in recs)  # distinct texts: all change
    with pytest.raises(ConfigError, match="not a text field"):
        apply_counterfactual(recs, TEMPLATE, "birads=shuffle")


def test_counterfactual_loader_changes_only_the_text(dataset, tmp_path):
    dm = TextSegDataModule(_cfg(dataset, tmp_path / "runs"))
    a = next(iter(dm.loader("test")))
    b = next(iter(dm.loader("test", "margin=granular")))
    assert torch.equal(a["image"], b["image"]) and a["case_id"] == b["case_id"]
    assert all(t.endswith("granular margins") for t in b["text"])
    dm2 = TextSegDataModule(_cfg(dataset, tmp_path / "runs", test_counterfactual="margin=granular"))
    assert all(t.endswith("granular margins") for t in next(iter(dm2.loader("test")))["text"])
    assert not any(t.endswith("granular margins") for t in next(iter(dm2.loader("val")))["text"])


def test_nifti_slice_and_two_and_half_d(tmp_path):
    from medfuse.data.io import write_nifti

    vol = np.stack([np.full((6, 8), 10.0 * k, np.float32) for k in range(5)])  # (D, H, W)
    path = tmp_path / "v.nii.gz"
    write_nifti(vol[None], path, affine=np.eye(4))
    assert read_plane(str(path), 2, False, "c").tolist() == vol[2:3].tolist()
    rgb = read_plane(str(path), 0, True, "c")
    assert rgb.shape == (3, 6, 8) and rgb[:, 0, 0].tolist() == [0.0, 0.0, 10.0]  # clamped at the first slice
    with pytest.raises(DataError, match="slice column"):
        read_plane(str(path), None, False, "c")
    with pytest.raises(DataError, match="outside"):
        read_plane(str(path), 9, False, "c")


def test_single_dicom_file_is_one_plane_in_hu(tmp_path):
    import SimpleITK as sitk

    arr = (np.arange(48, dtype=np.int16).reshape(6, 8) * 10 - 200)
    img = sitk.GetImageFromArray(arr)
    path = tmp_path / "x.dcm"
    sitk.WriteImage(img, str(path))
    plane = read_plane(str(path), None, False, "c")
    assert plane.shape == (1, 6, 8)
    assert np.allclose(plane[0], arr)


def test_mask_on_another_grid_is_a_data_error(tmp_path):
    root = _write(tmp_path / "d")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "img" / "c0_m.png")
    with pytest.raises(DataError, match="image grid"):
        _dataset(root)[0]


def test_record_without_box_or_text(tmp_path):
    rec = Record("x", str(_write(tmp_path / "d") / "img" / "c0.png"), None, {"text": ""})
    with pytest.raises(DataError, match="has no text"):
        TextSegDataset([rec], check_params({"image_size": 32}), need_mask=False)
    rec.fields["text"] = "a mass"
    with pytest.raises(DataError, match="no box prompt"):
        TextSegDataset([rec], check_params({"image_size": 32}), need_mask=False)[0]
