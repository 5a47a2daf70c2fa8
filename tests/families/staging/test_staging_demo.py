"""Tests of the staging demo generator (medfuse.families.staging.demo)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medfuse.errors import ConfigError
from medfuse.families.staging.demo import (
    CLASS_NAMES,
    LAYERS,
    STAGE_LAYER,
    make_staging_demo,
    render_scan,
    sample_patient,
    staging_affine,
)
from medfuse.registry import FAMILIES

SHAPE = (12, 48, 48)  # small grid keeps the file-writing tests fast
N_PATIENTS = 40


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("staging")
    manifest = make_staging_demo(out, n_patients=N_PATIENTS, seed=3, shape=SHAPE)
    rows = list(csv.DictReader(open(manifest, newline="", encoding="utf-8")))
    return out, manifest, rows


def _patient_scans(stage: int, seed: int, n_mimics: int = 1):
    rng = np.random.default_rng(seed)
    patient = sample_patient(stage, rng, SHAPE, n_mimics=n_mimics)
    return patient, render_scan(patient, rng, SHAPE, return_debug=True)


def test_registered_and_unknown_family(tmp_path):
    assert FAMILIES.get("staging").make_demo is make_staging_demo
    with pytest.raises(ConfigError, match="staging"):
        FAMILIES.get("no_such_family")


def test_manifest_columns_and_files(demo):
    out, manifest, rows = demo
    assert manifest == out / "manifest.csv"
    with open(manifest, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["case_id", "patient_id", "image_t2w", "image_dwi", "label"]
    assert len({r["case_id"] for r in rows}) == len(rows)
    for r in rows:
        for key in ("image_t2w", "image_dwi"):
            assert not r[key].startswith("/")
            assert (out / r[key]).is_file()


@pytest.mark.parametrize("modality", ["t2w", "dwi"])
def test_nifti_readable_with_affine_and_shape(demo, modality):
    out, _, rows = demo
    img = nib.load(str(out / rows[0][f"image_{modality}"]))
    np.testing.assert_allclose(img.affine, staging_affine(SHAPE), atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 3.0), atol=1e-6)
    data = np.asarray(img.dataobj)
    assert data.shape == SHAPE[::-1]  # stored (x, y, z) = (W, H, D)
    assert np.isfinite(data).all() and data.std() > 0


def test_dataset_json(demo):
    out, _, _ = demo
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["modalities"] == ["t2w", "dwi"]
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["task"] == "classification"
    assert meta["generator"] == "staging"
    assert meta["seed"] == 3
    assert meta["description"]


def test_labels_balanced_over_patients(demo):
    _, _, rows = demo
    per_patient = {r["patient_id"]: int(r["label"]) for r in rows}
    counts = np.bincount(list(per_patient.values()), minlength=4)
    assert len(per_patient) == N_PATIENTS
    assert counts.max() - counts.min() <= 1


def test_repeat_scans_share_patient_and_label(demo):
    _, _, rows = demo
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    repeats = [scans for scans in by_patient.values() if len(scans) > 1]
    assert 1 <= len(repeats) <= 0.2 * N_PATIENTS
    assert all(len({s["label"] for s in scans}) == 1 for scans in repeats)


def test_repeat_scan_files_differ(demo):
    out, _, rows = demo
    pid = next(r["patient_id"] for r in rows if r["case_id"].endswith("_s1"))
    a, b = (np.asarray(nib.load(str(out / r["image_t2w"])).dataobj) for r in rows if r["patient_id"] == pid)
    assert not np.array_equal(a, b)


def test_rescan_same_anatomy_fresh_noise():
    patient = sample_patient(2, np.random.default_rng(0), SHAPE)
    a = render_scan(patient, np.random.default_rng(1), SHAPE, return_debug=True)
    b = render_scan(patient, np.random.default_rng(2), SHAPE, return_debug=True)
    shifted = render_scan(
        patient, np.random.default_rng(2), SHAPE, offset=(0.5, 1.0, -1.0), return_debug=True
    )
    np.testing.assert_array_equal(a["tumour"], b["tumour"])
    np.testing.assert_array_equal(a["layers"], b["layers"])
    assert not np.array_equal(a["t2w"], b["t2w"]) and not np.array_equal(a["dwi"], b["dwi"])
    assert not np.array_equal(a["layers"], shifted["layers"])
    assert abs(shifted["tumour"].sum() - a["tumour"].sum()) < 0.2 * a["tumour"].sum()  # moved, not resized


def test_deterministic_for_fixed_seed(tmp_path):
    kw = dict(n_patients=4, shape=(4, 32, 32))
    m1 = make_staging_demo(tmp_path / "a", seed=7, **kw)
    m2 = make_staging_demo(tmp_path / "b", seed=7, **kw)
    m3 = make_staging_demo(tmp_path / "c", seed=8, **kw)
    r1, r2, r3 = (list(csv.DictReader(open(m, newline="", encoding="utf-8"))) for m in (m1, m2, m3))
    assert r1 == r2
    for x, y in zip(r1, r2, strict=True):
        for key in ("image_t2w", "image_dwi"):
            np.testing.assert_array_equal(
                np.asarray(nib.load(str(m1.parent / x[key])).dataobj),
                np.asarray(nib.load(str(m2.parent / y[key])).dataobj),
            )
    v1 = np.asarray(nib.load(str(m1.parent / r1[0]["image_t2w"])).dataobj)
    v3 = np.asarray(nib.load(str(m3.parent / r3[0]["image_t2w"])).dataobj)
    assert not np.array_equal(v1, v3)


def test_quick_shrinks(tmp_path):
    manifest = make_staging_demo(tmp_path, n_patients=240, quick=True, shape=(4, 16, 16))
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    assert len({r["patient_id"] for r in rows}) == 60


@pytest.mark.parametrize("stage", range(4))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tumour_reaches_the_stage_layer(stage, seed):
    """The stage is defined by the deepest layer the tumour occupies (T1 submucosa .. T4 outside)."""
    patient, dbg = _patient_scans(stage, seed)
    assert patient.stage == stage
    deepest = dbg["layers"][dbg["tumour"] > 0.5].max()
    assert LAYERS[deepest] == LAYERS[STAGE_LAYER[stage]]


def test_tumour_depth_monotone_in_stage():
    """Measured radial extent (outer radius of the tumour, relative to the fascia) grows with the stage."""
    rel_depth = []
    for stage in range(4):
        vals = []
        for seed in range(6):
            patient, dbg = _patient_scans(stage, 100 + seed)
            vals.append(dbg["radius"][dbg["tumour"] > 0.5].max() / patient.radii[-1])
        rel_depth.append(np.mean(vals))
    assert np.all(np.diff(rel_depth) > 0), rel_depth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dwi_contrast_exceeds_t2w_and_mimic_is_dark_on_dwi(seed):
    _, dbg = _patient_scans(seed % 4, seed)
    tumour, mimic = dbg["core"] > 0.9, dbg["mimic"] > 0.9  # the DWI-bright core of the tumour
    body = (dbg["tumour"] < 0.05) & (dbg["mimic"] < 0.05) & (dbg["layers"] > 0)

    def contrast(vol):
        return abs(vol[tumour].mean() - vol[body].mean()) / vol[body].std()

    assert contrast(dbg["dwi"]) > 2 * contrast(dbg["t2w"])
    assert dbg["dwi"][tumour].mean() > 3 * dbg["dwi"][mimic].mean()
    # On T2W the mimic and the tumour have the same intermediate signal.
    assert abs(dbg["t2w"][tumour].mean() - dbg["t2w"][mimic].mean()) < 0.15


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dwi_core_lies_inside_the_tumour(seed):
    patient, dbg = _patient_scans(seed % 4, seed)
    assert patient.tumour.core_depth <= patient.tumour.depth + 1e-6
    assert np.all(dbg["core"] <= dbg["tumour"] + 1e-6)
    assert (dbg["core"] > 0.5).sum() > 0


@pytest.mark.parametrize("n_mimics", [0, 2])
def test_n_mimics(n_mimics):
    patient, dbg = _patient_scans(1, 5, n_mimics=n_mimics)
    assert len(patient.mimics) == n_mimics
    assert (dbg["mimic"].max() > 0.5) == (n_mimics > 0)


@pytest.mark.parametrize("kw", [{"n_patients": 0}, {"shape": (4, 8, 8)}, {"shape": (16, 64)}])
def test_bad_arguments_rejected(tmp_path, kw):
    with pytest.raises(ValueError):
        make_staging_demo(tmp_path, **kw)


def test_bad_stage_rejected():
    with pytest.raises(ValueError, match="stage"):
        sample_patient(4, np.random.default_rng(0))
