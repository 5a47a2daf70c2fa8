"""The context_seg demo phantom: files, label semantics, and 'only the context tells them apart'."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medfuse.data.io import read_image
from medfuse.families.context_seg import FAMILY
from medfuse.families.context_seg.demo import BAND, CLASS_NAMES, COMPARTMENTS, render_case, sample_scene
from medfuse.registry import FAMILIES


def make_demo(family, out, **kw):
    """The family's registered demo generator, as ``prepare_demo_data`` calls it."""
    return FAMILIES.get(family).make_demo(out, **kw)

CLASSES_IN = {"nucleus": {1, 4}, "cytoplasm": {2, 4}, "periphery": {2, 3}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx")
    manifest = make_demo("context_seg", out, quick=True, seed=1)
    rows = list(csv.DictReader(open(manifest, newline="", encoding="utf-8")))
    return out, rows


def test_registered_files_and_declarations(demo):
    out, rows = demo
    assert FAMILIES.get("context_seg").make_demo is FAMILY.make_demo is not None
    assert len(rows) >= 12 and len({r["case_id"] for r in rows}) == len(rows)
    assert len({r["patient_id"] for r in rows}) == 12 < len(rows)  # repeat crops share their patient
    assert {r["compartment"] for r in rows} == set(COMPARTMENTS)
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["modalities"] == ["raw", "context"]
    assert meta["mask_labels"] == {n: k for k, n in enumerate(CLASS_NAMES)}
    r = rows[0]
    raw, ctx, lab = (read_image(out / r[k]) for k in ("image_raw", "image_context", "mask"))
    assert raw.shape == (1, 32, 32, 32) and lab.shape == (1, 16, 16, 16)  # quick: labels at half resolution
    assert ctx.shape == (1, 32, 32, 32)  # 4x the field of view at 4x coarser voxels
    np.testing.assert_allclose([raw.spacing[0], ctx.spacing[0], lab.spacing[0]], [1.0, 4.0, 2.0])
    for v in (raw, ctx, lab):  # all grids centred on the crop
        centre = v.affine @ np.array([*(np.array(v.shape[1:][::-1]) - 1) / 2, 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-4)


def test_labels_follow_the_compartment(demo):
    out, rows = demo
    for r in rows:
        lab = read_image(out / r["mask"]).array
        present = set(np.unique(lab).tolist()) - {0}
        assert present and present <= CLASSES_IN[r["compartment"]], (r["case_id"], present)


@pytest.mark.parametrize("compartment", COMPARTMENTS)
def test_crop_never_contains_the_boundaries(compartment):
    rng = np.random.default_rng(3)
    size = 32
    for _ in range(5):
        s = sample_scene(compartment, rng, size, fov=4)
        g = np.stack(np.meshgrid(*[np.arange(size) + 0.5 - size / 2] * 3, indexing="ij"), -1).reshape(-1, 3)
        inside_nucleus = s.in_nucleus(g)
        edge = s.edge_distance(g)
        assert edge.min() > 0  # the cell edge is outside the crop
        assert inside_nucleus.all() if compartment == "nucleus" else not inside_nucleus.any()
        if compartment == "periphery":
            assert edge.max() < BAND
        else:
            assert edge.min() > BAND


def _robust(x: np.ndarray) -> np.ndarray:
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return (x - med) / (q3 - q1)


def test_local_patch_identical_only_context_differs():
    """Blobs in and out of the nucleus look the same in the raw crop once intensities are normalised;
    the context shows where the crop is."""
    contrast = {c: [] for c in COMPARTMENTS}
    raw_bg = {c: [] for c in COMPARTMENTS}
    ctx_centre = {c: [] for c in COMPARTMENTS}
    ctx_bright = {c: [] for c in COMPARTMENTS}
    for i in range(6):
        for comp in COMPARTMENTS:
            rng = np.random.default_rng([7, i, COMPARTMENTS.index(comp)])
            case = render_case(sample_scene(comp, rng, 32, 4), rng, 32, 4, 4, label_scale=1.0)
            raw, lab = _robust(case["raw"]), case["label"]
            blob = (lab == 1) | (lab == 2)
            if blob.any():
                contrast[comp].append(np.median(raw[blob]))
            raw_bg[comp].append(np.percentile(raw[lab == 0], [10, 50, 90]))
            ctx = _robust(case["context"])
            ctx_centre[comp].append(ctx[12:20, 12:20, 12:20].mean())  # the raw field inside the context
            ctx_bright[comp].append((ctx > 4).mean())  # extracellular space
    c = {k: np.mean(v) for k, v in contrast.items()}
    assert abs(c["nucleus"] - c["cytoplasm"]) < 0.1 * abs(c["cytoplasm"])  # blob contrast: identical
    np.testing.assert_allclose(np.mean(raw_bg["nucleus"], 0), np.mean(raw_bg["cytoplasm"], 0), atol=0.05)
    np.testing.assert_allclose(np.mean(raw_bg["periphery"], 0), np.mean(raw_bg["cytoplasm"], 0), atol=0.05)
    # the context: a dark nucleus around the raw field, or the bright outside of the cell nearby
    assert np.mean(ctx_centre["nucleus"]) < np.mean(ctx_centre["cytoplasm"]) - 0.5
    assert np.mean(ctx_bright["periphery"]) > np.mean(ctx_bright["cytoplasm"]) + 0.05


def test_same_seed_same_data(tmp_path):
    a = make_demo("context_seg", tmp_path / "a", quick=True, n_cells=2, seed=5)
    b = make_demo("context_seg", tmp_path / "b", quick=True, n_cells=2, seed=5)
    ra = list(csv.DictReader(open(a, encoding="utf-8")))
    rb = list(csv.DictReader(open(b, encoding="utf-8")))
    assert [r["compartment"] for r in ra] == [r["compartment"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("image_raw", "image_context", "mask"):
            assert np.array_equal(read_image(a.parent / x[key]).array, read_image(b.parent / y[key]).array)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="label_scale"):
        make_demo("context_seg", tmp_path, n_cells=1, size=32, label_scale=0.3)
    with pytest.raises(ValueError, match="compartment"):
        sample_scene("mitochondrion", np.random.default_rng(0), 32, 4)
