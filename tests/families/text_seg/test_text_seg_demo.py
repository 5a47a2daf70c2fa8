"""The text_seg phantom: several lesions in the box, the text names exactly one, patient structure."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from medfuse.families.text_seg.demo import (
    ATTRIBUTES,
    TEMPLATE,
    _lesion_mask,
    make_text_seg_demo,
    render_image,
    sample_layout,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tsdemo")
    make_text_seg_demo(out, n_patients=24, seed=3)
    with (out / "manifest.csv").open(encoding="utf-8") as f:
        return out, list(csv.DictReader(f))


@pytest.mark.parametrize("seed", range(40))
def test_target_is_named_uniquely_and_the_box_alone_is_ambiguous(seed):
    rng = np.random.default_rng(seed)
    lesions, target = sample_layout(rng)
    assert 2 <= len(lesions) <= 4
    described = lesions[target].attributes()
    matches = [i for i, les in enumerate(lesions) if les.attributes() == described]
    assert matches == [target]
    # the lesion beside the target shares its position word and differs in another attribute
    same_row = [les for i, les in enumerate(lesions) if i != target and les.position == described["position"]]
    assert len(same_row) == 1 and same_row[0].attributes() != described
    masks = [_lesion_mask(les, (128, 128)) > 0.5 for les in lesions]
    assert all(m.sum() > 50 for m in masks)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not (masks[i] & masks[j]).any()


def test_every_attribute_is_sometimes_the_only_difference():
    only = {k: 0 for k in ATTRIBUTES}
    for seed in range(120):
        lesions, t = sample_layout(np.random.default_rng(seed))
        for i, les in enumerate(lesions):
            diff = [k for k, v in les.attributes().items() if v != lesions[t].attributes()[k]]
            if i != t and len(diff) == 1:
                only[diff[0]] += 1
    assert all(v >= 15 for v in only.values()), only


def test_echogenicity_is_visible():
    rng = np.random.default_rng(0)
    lesions, target = sample_layout(rng)
    img, mask = render_image(rng, lesions, target)
    tissue = img[30:110][~np.any([_lesion_mask(les, img.shape)[30:110] > 0 for les in lesions], axis=0)].mean()
    for les in lesions:
        inside = img[_lesion_mask(les, img.shape) > 0.9].mean()
        assert (inside < 0.6 * tissue) if les.echogenicity == "hypoechoic" else (inside > 1.3 * tissue)
    assert mask.sum() == (_lesion_mask(lesions[target], img.shape) > 0.5).sum()


def test_files_manifest_text_and_boxes(demo):
    out, rows = demo
    assert {"case_id", "patient_id", "image_us", "mask", "box", "text", *ATTRIBUTES} <= set(rows[0])
    patients = {r["patient_id"] for r in rows}
    assert len(patients) == 24 and len(rows) > 24  # some patients have a second view
    for r in rows:
        img = np.array(Image.open(out / r["image_us"]))
        mask = np.array(Image.open(out / r["mask"])) > 0
        assert img.shape == mask.shape == (128, 128) and img.dtype == np.uint8
        assert r["text"] == TEMPLATE.format(**{k: r[k] for k in ATTRIBUTES})
        x0, y0, x1, y1 = (int(v) for v in r["box"].split())
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
        inside = (x1 - x0 + 1) * (y1 - y0 + 1)
        assert mask.sum() < 0.5 * inside  # the box holds more than the target
        assert int(r["n_lesions"]) >= 2


def test_same_seed_same_files(tmp_path, demo):
    out, rows = demo
    again = tmp_path / "again"
    make_text_seg_demo(again, n_patients=24, seed=3)
    first = rows[0]["image_us"]
    assert np.array_equal(np.array(Image.open(out / first)), np.array(Image.open(again / first)))
    assert (out / "manifest.csv").read_text(encoding="utf-8") == (again / "manifest.csv").read_text(encoding="utf-8")


def test_loads_as_a_text_seg_dataset_with_patient_splits(demo, tmp_path):
    from medfuse.config import validate
    from medfuse.families.text_seg.data import TextSegDataModule

    out, _ = demo
    cfg = validate({"family": "text_seg", "model": {"name": "text_seg"}, "output_dir": str(tmp_path),
                    "data": {"root": str(out), "split": {"val": 0.2, "test": 0.2, "stratify": False},
                             "params": {"image_size": 64, "mask_size": 64, "box_source": "csv",
                                        "text_template": TEMPLATE}}})
    dm = TextSegDataModule(cfg)
    split_of = {}
    for split, recs in dm.records.items():
        for r in recs:
            split_of.setdefault(r.case_id.split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    item = dm.dataset("val")[0]
    assert item["image"].shape == (3, 64, 64) and item["text"].endswith(("superficial", "deep"))


def test_quick_demo_learns(tmp_path):
    """`medfuse demo text_seg --quick` scored test Dice 0.000 in every row: 6 optimizer steps (40 patients,
    batch 16, 2 epochs) never leave the all-background start. With QUICK_OVERRIDES (64 px, batch 4, 6
    epochs: 60 cheaper steps, which the family's ``demo_quick`` adds to the engine's quick settings)
    the full model is clearly above an all-foreground or whole-box mask."""
    from medfuse.engine.demo import QUICK, quick_overrides, run_demo
    from medfuse.families.text_seg.demo import QUICK_OVERRIDES

    assert quick_overrides("text_seg", True) == [*QUICK, *QUICK_OVERRIDES] and quick_overrides("text_seg", False) == []
    report = run_demo("text_seg", tmp_path, quick=True, main_only=True, overrides=["eval.n_boot=10"])
    dice = report["ablation"][0]["dice"]
    assert dice["value"] > 0.25, dice  # all-foreground 0.04, the whole box 0.15 on these 12 test images
