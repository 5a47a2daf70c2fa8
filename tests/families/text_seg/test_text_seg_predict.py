"""text_seg prediction: masks and predictions.csv from ``model.zip`` equal the run's own, without the run
folder or the training manifest; ``predict`` writes the file ``evaluate`` writes for a case (name and
pixels); an output never replaces an input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit
    from medfuse.families.text_seg import FAMILY
    from medfuse.families.text_seg.demo import make_text_seg_demo

    tmp = tmp_path_factory.mktemp("ts_pkg")
    data = tmp / "data"
    make_text_seg_demo(data, n_patients=10, seed=1, size=64)
    cfg = load_config(FAMILY.demo_config, [
        f"data.root={data}", f"output_dir={tmp / 'runs'}", "name=ts", "train.max_epochs=1",
        "data.batch_size=8", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "eval.n_boot=10",
        "data.split.val=0.25", "data.split.test=0.3", "train.accelerator=cpu"])
    return tmp, data, fit(cfg)


def test_package_gives_the_runs_masks(run, tmp_path, monkeypatch):
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    tmp, data, run_dir = run
    rows = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))[:3]
    (tmp_path / "img").mkdir()
    infer = tmp_path / "infer.csv"
    keep = ["case_id", "image_us", "box", *[k for k in rows[0] if k in ("size", "echogenicity", "margin", "position")]]
    with infer.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keep)
        w.writeheader()
        for r in rows:
            img = shutil.copy(data / r["image_us"], tmp_path / "img")
            w.writerow({k: (img if k == "image_us" else r[k]) for k in keep})
    own = predict(run_dir, [str(infer)], tmp_path / "own")
    pkg = export(run_dir, tmp_path / "ts.zip")
    away = tmp_path / "away"
    shutil.move(str(tmp), away)  # the run and the training data
    try:
        monkeypatch.chdir(tmp_path)
        out = tmp_path / predict(str(pkg), [str(infer)], "pk")
    finally:
        shutil.move(str(away), tmp)
    masks = sorted(p.name for p in own.glob("*.png"))
    assert masks == sorted(f"{r['case_id']}.png" for r in rows) == sorted(p.name for p in out.glob("*.png"))
    for name in masks:
        assert (own / name).read_bytes() == (out / name).read_bytes()
    assert (own / "predictions.csv").read_text(encoding="utf-8") == (out / "predictions.csv").read_text(encoding="utf-8")


FIELDS = ("size", "echogenicity", "margin", "position")


def _manifest(path, data, rows, image=None) -> str:
    """An inference CSV of demo rows (case_id, image_us, box, text fields); ``image``: case -> image path."""
    keep = ["case_id", "image_us", "box", *[k for k in rows[0] if k in FIELDS]]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keep)
        w.writeheader()
        for r in rows:
            img = (image or {}).get(r["case_id"]) or data / r["image_us"]
            w.writerow({k: (str(img) if k == "image_us" else r[k]) for k in keep})
    return str(path)


def test_predict_writes_what_evaluate_writes(run, tmp_path):
    """The same case, box and text: ``predict`` writes ``<case_id>.png`` with ``evaluate``'s pixels
    (predict used to write ``<case_id>_mask.png``)."""
    import numpy as np
    from PIL import Image

    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict

    _, data, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    evaluate(copy, split="test", n_boot=10)
    evaluated = copy / "predictions" / "test"
    order = [r["case_id"] for r in csv.DictReader((evaluated / "per_case.csv").open(encoding="utf-8"))]  # the loader's batches
    by_id = {r["case_id"]: r for r in csv.DictReader((data / "manifest.csv").open(encoding="utf-8"))}
    out = predict(copy, [_manifest(tmp_path / "test.csv", data, [by_id[c] for c in order])], tmp_path / "pred")
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{c}.png" for c in order) == sorted(p.name for p in evaluated.glob("*.png"))
    for name in names:
        a, b = np.array(Image.open(out / name)), np.array(Image.open(evaluated / name))
        assert a.shape == b.shape and np.array_equal(a, b), name
    assert any(np.array(Image.open(out / n)).any() for n in names)  # not all empty


def test_predict_never_replaces_an_input(run, tmp_path):
    """Masks are named by case id, so an output folder holding the inputs (the demo's ``images/<case>.png``)
    would overwrite them: refused before anything is written, naming the file."""
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, data, run_dir = run
    rows = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))[:2]
    folder = tmp_path / "images"
    folder.mkdir()
    images = {r["case_id"]: shutil.copy(data / r["image_us"], folder / f"{r['case_id']}.png") for r in rows}
    before = {c: p.read_bytes() for c, p in images.items()}
    manifest = _manifest(tmp_path / "infer.csv", data, rows, image=images)
    with pytest.raises(DataError, match="would replace it") as e:
        predict(run_dir, [manifest], folder)
    assert str(images[rows[0]["case_id"]]) in str(e.value)
    assert {c: p.read_bytes() for c, p in images.items()} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in images.values())
    # the manifest itself, as predictions.csv in the output folder (its images elsewhere)
    other = tmp_path / "other"
    other.mkdir()
    inside = Path(_manifest(other / "predictions.csv", data, rows))
    text = inside.read_text(encoding="utf-8")
    with pytest.raises(DataError, match="is the manifest"):
        predict(run_dir, [str(inside)], other)
    assert inside.read_text(encoding="utf-8") == text and [p.name for p in other.iterdir()] == ["predictions.csv"]
    out = predict(run_dir, [manifest], tmp_path / "elsewhere")
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{c}.png" for c in images), "predictions.csv",
                                                            "inputs.csv"])


def test_predict_refuses_a_volume_slice_for_a_2d_run(run, tmp_path):
    """The run was trained on 2D PNGs (as BUS-BRA): a slice of a NIfTI volume is another kind of input."""
    import numpy as np
    from PIL import Image

    from medfuse.data.io import write_nifti
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, data, run_dir = run
    row = dict(list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))[0])
    plane = np.asarray(Image.open(data / row["image_us"]), np.float32)
    vol = tmp_path / "vol.nii.gz"
    write_nifti(np.stack([plane] * 3)[None], vol)
    manifest = tmp_path / "vol.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "image_us", "slice", "box", *FIELDS])
        w.writeheader()
        w.writerow({"case_id": "v", "image_us": str(vol), "slice": 1, "box": row["box"],
                    **{k: row[k] for k in FIELDS}})
    with pytest.raises(DataError) as e:
        predict(run_dir, [str(manifest)], tmp_path / "out")
    assert e.value.where == str(vol) and "case v is a volume of slices" in e.value.problem
    assert "trained on 2D images" in e.value.problem


def _box_blind(monkeypatch) -> None:
    """A model that ignores its box prompt: every mask logit +5 (the audit's NSCLC model gave the same
    mask at the tumour for a box in the far corner)."""
    import torch

    from medfuse.families.text_seg.sam_prompt import PromptableSegmenter

    def decode(self, embedding, boxes):
        b, _, h, w = embedding.shape
        return torch.full((b, 1, 4 * h, 4 * w), 5.0) + 0 * embedding.mean()

    monkeypatch.setattr(PromptableSegmenter, "decode", decode)


def test_a_far_box_gives_no_mask_at_the_target(run, tmp_path, monkeypatch):
    """The box prompt says where the target is (MedSAM; seed 002): evaluate and predict set the pixels
    outside the box, grown by model.params.box_margin (0.1, the training jitter), to background.
    Before, a box in the far corner still gave the mask at the target."""
    import numpy as np
    from PIL import Image

    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict

    _, data, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _box_blind(monkeypatch)
    row = next(iter(csv.DictReader((data / "manifest.csv").open(encoding="utf-8"))))
    mask = np.array(Image.open(data / row["mask"])) > 0
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    tight = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    far_x0 = 0 if xs.mean() > w / 2 else w - 12
    far_y0 = 0 if ys.mean() > h / 2 else h - 12
    far = (far_x0, far_y0, far_x0 + 11, far_y0 + 11)  # 12 x 12 px in the corner away from the target
    rows = [{**row, "case_id": "tight", "box": " ".join(map(str, tight))},
            {**row, "case_id": "far", "box": " ".join(map(str, far))}]
    out = predict(copy, [_manifest(tmp_path / "m.csv", data, rows)], tmp_path / "pred")
    pred = {c: np.array(Image.open(out / f"{c}.png")) > 0 for c in ("tight", "far")}
    assert not (pred["far"] & mask).any()  # the far box no longer yields a mask at the target
    ys_f, xs_f = np.nonzero(pred["far"])
    assert pred["far"].any() and xs_f.min() >= far[0] - 3 and xs_f.max() <= far[2] + 3
    assert ys_f.min() >= far[1] - 3 and ys_f.max() <= far[3] + 3  # the 12 px box grown by 10 % and a cell
    assert pred["tight"][mask].all() and not pred["tight"][: max(tight[1] - 4, 0)].any()
    # evaluate scores the same restricted output
    evaluate(copy, split="test", n_boot=10)
    tests = {r["case_id"]: r for r in csv.DictReader((copy / "predictions" / "test" / "per_case.csv").open(encoding="utf-8"))}
    by_id = {r["case_id"]: r for r in csv.DictReader((data / "manifest.csv").open(encoding="utf-8"))}
    for cid in tests:
        box = [int(v) for v in by_id[cid]["box"].split()]
        p = np.array(Image.open(copy / "predictions" / "test" / f"{cid}.png")) > 0
        grow = [0.1 * (box[2] - box[0]) + 2, 0.1 * (box[3] - box[1]) + 2]
        ys_p, xs_p = np.nonzero(p)
        assert xs_p.min() >= box[0] - grow[0] and xs_p.max() <= box[2] + grow[0]
        assert ys_p.min() >= box[1] - grow[1] and ys_p.max() <= box[3] + grow[1]


def test_box_margin_null_leaves_the_output_unrestricted(run, tmp_path, monkeypatch):
    import numpy as np
    import yaml
    from PIL import Image

    from medfuse.engine.predict import predict

    _, data, run_dir = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text(encoding="utf-8"))
    cfg["model"]["params"]["box_margin"] = None
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    _box_blind(monkeypatch)
    row = {**next(iter(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))), "case_id": "far", "box": "0 0 11 11"}
    out = predict(copy, [_manifest(tmp_path / "m.csv", data, [row])], tmp_path / "pred")
    assert (np.array(Image.open(out / "far.png")) > 0).all()
