"""The ct_encoder phantom: deterministic, CT-RATE layout, and a finding's lobe is in the mask only."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medfuse.families.ct_encoder.demo import (
    ABNORMALITIES,
    HU,
    REGIONS,
    make_ct_encoder_demo,
    sample_case,
    write_reports,
)

SHAPE = (32, 48, 48)


@pytest.fixture(scope="module")
def cases():
    return [sample_case(np.random.default_rng([7, i]), SHAPE) for i in range(60)]


def test_generator_is_deterministic_and_writes_ctrate_layout(tmp_path):
    a = make_ct_encoder_demo(tmp_path / "a", n_patients=3, seed=3, shape=(8, 32, 32))
    b = make_ct_encoder_demo(tmp_path / "b", n_patients=3, seed=3, shape=(8, 32, 32))
    assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8")
    root = a.parent
    for rel in ("train/train_1/train_1_a/train_1_a_1.nii.gz", "masks/train_3_a_1.nii.gz", "metadata.csv",
                "labels.csv", "cot.json", "regions.json"):
        assert (root / rel).is_file(), rel
    va = np.asarray(nib.load(str(root / "train/train_2/train_2_a/train_2_a_1.nii.gz")).dataobj)
    vb = np.asarray(nib.load(str(tmp_path / "b/train/train_2/train_2_a/train_2_a_1.nii.gz")).dataobj)
    np.testing.assert_array_equal(va, vb)
    assert va.dtype == np.int16 and va.shape == (32, 32, 8) and va.min() >= 0  # raw stored values (HU + 1024)
    meta = list(csv.DictReader((root / "metadata.csv").open(encoding="utf-8")))
    assert meta[0]["RescaleIntercept"] == "-1024"
    regions = json.loads((root / "regions.json").read_text(encoding="utf-8"))
    assert list(regions["region_names"].values()) == REGIONS
    labels = list(csv.DictReader((root / "labels.csv").open(encoding="utf-8")))
    assert list(labels[0])[1:] == ABNORMALITIES
    reports = list(csv.DictReader(a.open(encoding="utf-8")))
    assert len({r["Impressions_EN"] for r in reports}) == 3  # unique reports: retrieval pairs are well defined


def test_findings_lie_in_their_region_and_reports_name_it(cases):
    seen = 0
    for c in cases:
        for f in c["findings"]:
            z, y, x = np.round(f["pos"]).astype(int)
            assert c["mask"][z, y, x] == f["region"]
            seen += 1
        rep = write_reports(c)
        for f in c["findings"]:
            assert f"{f['size_mm']} mm" in rep["impression"] and REGIONS[f["region"] - 1] in rep["impression"]
        assert all(s["mask_region"] for s in rep["cot"])
    assert seen >= 60


def test_lobe_is_independent_of_position_and_invisible(cases):
    # the same lung: which lobe a nodule is in must not follow from where it is
    right = [(f["pos"], f["region"]) for c in cases for f in c["findings"] if f["region"] in (1, 2, 3)]
    z = np.array([p[0] for p, _ in right])
    lower = np.array([r == 3 for _, r in right], dtype=float)
    assert len(right) >= 25 and 0.15 < lower.mean() < 0.6
    assert abs(np.corrcoef(z, lower)[0, 1]) < 0.3
    # no intensity step at the fissures: lobes of one lung share their HU distribution
    diffs = []
    for c in cases[:20]:
        hu, m = c["hu"], c["mask"]
        lesion = np.zeros_like(m, dtype=bool)
        for f in c["findings"]:
            zz, yy, xx = np.ogrid[: m.shape[0], : m.shape[1], : m.shape[2]]
            lesion |= (zz - f["pos"][0]) ** 2 + (yy - f["pos"][1]) ** 2 + (xx - f["pos"][2]) ** 2 <= (f["r"] + 1) ** 2
        a = hu[(m == 4) & ~lesion & (hu < -500)]
        b = hu[(m == 5) & ~lesion & (hu < -500)]
        if len(a) > 50 and len(b) > 50:
            diffs.append(abs(a.mean() - b.mean()))
    assert diffs and np.median(diffs) < 10  # noise std is ~60 HU; lung vs nodule differs by ~880 HU
    assert HU["nodule"] - HU["lung"] > 500


def test_visible_findings_change_the_image(cases):
    c = next(c for c in cases if c["findings"])
    f = c["findings"][0]
    z, y, x = np.round(f["pos"]).astype(int)
    expected = HU["nodule"] if f["kind"] == "nodule" else HU["lesion"]
    assert abs(float(c["hu"][z, y, x]) - expected) < 120
