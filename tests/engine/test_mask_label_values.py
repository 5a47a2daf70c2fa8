"""Declared mask label values on the generic segmentation path (baseline_unet3d).

Class k of a segmentation model is the k-th declared value in increasing order: labels declared
out of value order name the right classes; declared values that are not 0..K-1 ({0, 255},
{0, 1, 2, 4}) train as classes 0..K-1, are scored against the label files as stored and are
written back (evaluate, predict, an exported package) as the declared values on the input grid;
``data.num_classes`` above the declared labels evaluates with generic names for the extra classes.
"""

from __future__ import annotations

import csv
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from medfuse.config import validate
from medfuse.errors import ConfigError, DataError

LPS = np.array([[-1.5, 0, 0, 20.0], [0, -1.2, 0, 14.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])


def _case(rng, shape, values):
    """An image with one bright box per foreground value (boxes of different sizes) and its label map."""
    img = rng.normal(0, 0.3, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    boxes = [(slice(c[0] - 3, c[0] + 1), slice(c[1] - 3, c[1] + 2), slice(c[2] - 3, c[2] + 2)),
             (slice(c[0] + 1, c[0] + 3), slice(c[1] - 1, c[1] + 1), slice(c[2] - 1, c[2] + 2)),
             (slice(1, 3), slice(1, 3), slice(1, 3))]
    for box, v in zip(boxes, values, strict=False):
        lab[box] = v
        img[box] += 2.0
    return img, lab


def _config(root, out, name, **data):
    return validate({
        "name": name, "output_dir": str(out),
        "data": {"root": str(root), "batch_size": 2, "num_workers": 0, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}, **data},
        "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2]}},
        "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 20, "overlays": 0},
    })


def _dice(pred, lab, v):
    p, t = pred == v, lab == v
    den = p.sum() + t.sum()
    return float("nan") if den == 0 else 2.0 * float((p & t).sum()) / float(den)


def _per_case_rows(run):
    with (run / "metrics_per_case.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(("labels", "num_classes", "want"), [
    (None, None, None),
    ({"background": 0, "a": 1, "b": 2}, None, None),
    ({"background": 0, "b": 2, "a": 1}, None, None),  # declaration order does not matter
    ({"background": 0, "lesion": 255}, None, [0, 255]),
    ({"four": 4, "background": 0, "one": 1, "two": 2}, None, [0, 1, 2, 4]),
    ({"background": 0, "a": 1, "b": 3}, 4, None),  # data.num_classes above every value: the values are the classes
    ({"background": 0, "lesion": 255}, 3, [0, 255, 256]),
])
def test_label_class_values(labels, num_classes, want):
    from medfuse.data.transforms import label_class_values

    assert label_class_values(labels, num_classes) == want


@pytest.mark.parametrize(("labels", "num_classes", "key"), [
    ({"a": 1, "b": 3}, None, "mask_labels"),  # no background 0
    ({"background": 0, "one": 1, "two": 2, "four": 4}, 2, "data.num_classes"),
])
def test_label_class_values_refusals(labels, num_classes, key):
    from medfuse.data.transforms import label_class_values

    with pytest.raises(ConfigError, match=key):
        label_class_values(labels, num_classes)


def test_values_to_classes_round_trip_and_undeclared_value():
    from medfuse.data.transforms import classes_to_values, values_to_classes

    mask = np.array([[0, 255], [255, 0]], np.uint8)
    idx = values_to_classes(mask, [0, 255])
    assert idx.tolist() == [[0, 1], [1, 0]]
    assert classes_to_values(idx, [0, 255]).tolist() == mask.tolist()
    assert values_to_classes(mask, None) is mask
    with pytest.raises(DataError, match=r"lab\.nii\.gz.*\{7\}"):
        values_to_classes(np.array([0, 7]), [0, 255], "lab.nii.gz")


def test_class_names_follow_values_not_declaration_order():
    from medfuse.engine.segmentation_evaluator import label_class_names

    labels = {"background": 0, "tumor": 2, "edema": 1}
    assert label_class_names(labels, None, 3) == ["background", "edema", "tumor"]
    assert label_class_names(labels, None, 4) == ["background", "edema", "tumor", "3"]
    assert label_class_names({"background": 0, "lesion": 255}, [0, 255], 2) == ["background", "lesion"]
    assert label_class_names({"background": 0, "3": 1}, None, 4) == ["background", "3", "2", "class_3"]
    assert label_class_names(None, None, 2) == ["0", "1"]


# --------------------------------------------------- (a) nnU-Net labels declared out of value order


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """A tiny nnU-Net v2 set whose dataset.json declares {background: 0, tumor: 2, edema: 1}; the
    tumour box (value 2) is much smaller than the edema box (value 1), so their Dice differ."""
    root = tmp_path_factory.mktemp("swapped")
    ds = root / "Dataset907_Swap"
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(8):
        img, lab = _case(rng, (12 + i % 2, 11, 10 + i % 2), (1, 2))
        aff = LPS if i % 3 == 0 else np.diag([1.2, 1.1, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), ds / "imagesTr" / f"s_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), ds / "labelsTr" / f"s_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"},
                                                 "labels": {"background": 0, "tumor": 2, "edema": 1},
                                                 "numTraining": 8, "file_ending": ".nii.gz"}))
    return ds


def test_per_class_metrics_are_named_by_value(swapped, tmp_path):
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    run = fit(_config(swapped, tmp_path, "swap"))
    rep = evaluate(run, n_boot=20)
    rows = _per_case_rows(run)
    assert rows and {"dice_edema", "dice_tumor"} <= set(rows[0])
    by_value: dict[int, list[float]] = {1: [], 2: []}
    for r in rows:
        pred = np.asarray(nib.load(run / "predictions" / "test" / f"{r['case_id']}.nii.gz").dataobj)
        lab = np.asarray(nib.load(swapped / "labelsTr" / f"{r['case_id']}.nii.gz").dataobj)
        assert pred.shape == lab.shape
        for v, name in ((1, "edema"), (2, "tumor")):
            d = _dice(pred, lab, v)
            by_value[v].append(d)
            assert float(r[f"dice_{name}"]) == pytest.approx(d, abs=1e-5), (r["case_id"], name)
    assert by_value[1] != by_value[2]  # the check can tell the two classes apart
    for v, name in ((1, "edema"), (2, "tumor")):
        assert rep["per_class"][name]["dice"]["value"] == pytest.approx(np.nanmean(by_value[v]), abs=1e-5)


def test_num_classes_above_the_declared_labels_evaluates(swapped, tmp_path):
    """data.num_classes=4 with three declared labels: evaluate names the extra class by its value."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    run = fit(_config(swapped, tmp_path, "k4", num_classes=4))
    rep = evaluate(run, n_boot=20)
    assert list(rep["per_class"]) == ["edema", "tumor", "3"]
    assert rep["metrics"]["dice"]["n"] == 2
    assert set(_per_case_rows(run)[0]) >= {"dice_edema", "dice_tumor", "dice_3"}


# ------------------------------------------------------------ (b) declared values that are not 0..K-1


def _manifest(root, values, declared):
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(2)
    rows = ["case_id,patient_id,image_ct,mask"]
    for i in range(8):
        img, lab = _case(rng, (11 + i % 2, 10, 9 + i % 2), values)
        aff = LPS if i % 2 else np.diag([1.0, 1.0, 1.5, 1.0])
        nib.save(nib.Nifti1Image(img, aff), root / "img" / f"p{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "img" / f"p{i}_seg.nii.gz")
        rows.append(f"p{i},pat{i},img/p{i}.nii.gz,img/p{i}_seg.nii.gz")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "dataset.json").write_text(json.dumps({"modalities": ["ct"], "mask_labels": declared}))
    return root


@pytest.mark.parametrize(("values", "declared"), [
    ((255,), {"background": 0, "lesion": 255}),
    ((2, 4, 1), {"background": 0, "four": 4, "one": 1, "two": 2}),
], ids=["0-255", "0-1-2-4"])
def test_declared_values_train_and_are_written_back(values, declared, tmp_path):
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    data = _manifest(tmp_path / "data", values, declared)
    order = sorted(declared.values())  # class k = the k-th declared value
    run = fit(_config(data, tmp_path / "runs", "vals"))
    rep = evaluate(run, n_boot=20)
    names = sorted(declared, key=declared.get)[1:]
    assert list(rep["per_class"]) == names
    # evaluate: declared values on the input grid, scored against the label file as stored
    rows = _per_case_rows(run)
    assert len(rows) == 2
    seen: set[int] = set()
    for r in rows:
        out = nib.load(run / "predictions" / "test" / f"{r['case_id']}.nii.gz")
        img = nib.load(data / "img" / f"{r['case_id']}.nii.gz")
        lab = np.asarray(nib.load(data / "img" / f"{r['case_id']}_seg.nii.gz").dataobj)
        pred = np.asarray(out.dataobj)
        assert out.shape == img.shape and np.allclose(out.affine, img.affine, atol=1e-5)
        seen |= set(np.unique(pred).tolist())
        assert out.get_data_dtype() == np.uint8
        for name in names:
            assert float(r[f"dice_{name}"]) == pytest.approx(_dice(pred, lab, declared[name]), abs=1e-5, nan_ok=True)
    assert seen <= set(order) and order[-1] in seen  # the declared values, not the class indices
    # predict from the run and from an exported package: declared values = values[argmax of the probabilities]
    inputs = [str(data / "img" / "p1.nii.gz")]
    pkg = export(run, tmp_path / "model.zip")
    assert json.loads(zipfile.ZipFile(pkg).read("labels.json"))["mask_labels"] == declared
    for src, out_dir in ((run, tmp_path / "own"), (pkg, tmp_path / "pkg")):
        predict(src, inputs, out_dir, overrides=["eval.save_probabilities=true"])
        out = nib.load(out_dir / "p1.nii.gz")
        img = nib.load(inputs[0])
        pred = np.asarray(out.dataobj)
        probs = np.asarray(nib.load(out_dir / "p1_probs.nii.gz").dataobj)  # (X, Y, Z, K)
        assert out.shape == img.shape and np.allclose(out.affine, img.affine, atol=1e-5)
        assert probs.shape[-1] == len(order)
        np.testing.assert_array_equal(pred, np.asarray(order)[probs.argmax(-1)])
        assert set(np.unique(pred).tolist()) <= set(order)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "own" / "p1.nii.gz").dataobj),
                                  np.asarray(nib.load(tmp_path / "pkg" / "p1.nii.gz").dataobj))


def test_num_classes_below_the_declared_values_is_refused(tmp_path):
    from medfuse.engine.trainer import fit

    data = _manifest(tmp_path / "data", (2, 4, 1), {"background": 0, "one": 1, "two": 2, "four": 4})
    with pytest.raises(ConfigError, match=r"data\.num_classes.*4 values"):
        fit(_config(data, tmp_path / "runs", "few", num_classes=2))


def test_mapped_masks_get_their_own_cache_key():
    """Cached items of a mapped chain hold class indices: its fingerprint differs, and a chain
    without a mapping keeps the fingerprint it had (existing caches stay valid)."""
    from medfuse.config import TransformsConfig
    from medfuse.data.transforms import build_transforms

    plain = build_transforms(TransformsConfig(), ["ct"], train=False, has_mask=True, mask_values=[0, 255])
    mapped = build_transforms(TransformsConfig(), ["ct"], train=False, has_mask=True, mask_values=[0, 255],
                              mask_classes=[0, 255])
    assert "mask_classes" not in plain.fingerprint and plain.fingerprint != mapped.fingerprint
