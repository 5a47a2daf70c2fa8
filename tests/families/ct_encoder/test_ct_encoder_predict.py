"""ct_encoder through a model package: embeddings and generated reports from ``model.zip`` equal the
run's own (the scratch report tokenizer and the tied GPT-2 weights travel in the safetensors)."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from medfuse.config import validate
from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

SMALL = dict(num_regions=9, patch_size=(2, 8, 8), img_size=(8, 32, 32), fpn_levels=3, mask_hidden=4, embed_dim=16)
GEN = dict(gen_decoder="scratch", gen_width=32, gen_depth=1, gen_heads=2, gen_queries=4, gen_vocab_size=128,
           gen_max_length=24)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from medfuse.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("ct_pkg")
    root = tmp / "data"
    make_ct_encoder_demo(root, n_patients=8, seed=0, shape=(8, 32, 32))
    cfg = validate({
        "name": "ct", "output_dir": str(tmp / "runs"),
        "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"spatial_size": [8, 32, 32],
                                "intensity": {"ct": {"kind": "ct_window", "level": -300, "width": 1400}}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {**SMALL, **GEN}},
        "train": {"max_epochs": 1, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": 10},
    })
    return tmp, root, fit(cfg)


def test_package_gives_the_runs_embeddings_and_reports(run, tmp_path, monkeypatch):
    from medfuse.engine.package import export
    from medfuse.engine.predict import predict

    tmp, root, run_dir = run
    own = predict(run_dir, [str(root)], tmp_path / "own")
    pkg = export(run_dir, tmp_path / "ct.zip")
    inputs = tmp_path / "inputs"
    shutil.copytree(root, inputs)
    away = tmp_path / "away"
    shutil.move(str(tmp), away)  # the run and the training data
    try:
        monkeypatch.chdir(tmp_path)
        out = tmp_path / predict(str(pkg), [str(inputs)], "pk")
    finally:
        shutil.move(str(away), tmp)
    files = sorted(p.name for p in own.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in out.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(own / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert (own / "reports.csv").read_text(encoding="utf-8") == (out / "reports.csv").read_text(encoding="utf-8")


def _flatten_one_volume(root, case="train_3_a_1"):
    """Replace ``case``'s volume and mask by their middle slice: a 2D image among 3D volumes."""
    import nibabel as nib
    import numpy as np

    vol = next(p for p in (root / "train").rglob(f"{case}.nii.gz"))
    for path in (vol, root / "masks" / f"{case}.nii.gz"):
        im = nib.load(str(path))
        a = np.asarray(im.dataobj)
        nib.save(nib.Nifti1Image(a[:, :, a.shape[2] // 2], im.affine), str(path))
    return vol


def test_predict_refuses_a_2d_image_for_a_run_trained_on_3d_volumes(run, tmp_path):
    """It was predicted (exit 0): the slice padded to the training size gave an embedding."""
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    _, root, run_dir = run
    inputs = tmp_path / "inputs"
    shutil.copytree(root, inputs)
    vol = _flatten_one_volume(inputs)
    with pytest.raises(DataError, match=r"\[dims\].*2D image \(one slice\).*3D volume") as e:
        predict(run_dir, [str(inputs)], tmp_path / "out")
    assert str(vol) in str(e.value) and not list((tmp_path / "out").glob("*.safetensors"))
    # --skip-refused: the 2D case is listed in refused.csv, the others are predicted
    out = predict(run_dir, [str(inputs)], tmp_path / "skip", skip_refused=True)
    refused = (out / "refused.csv").read_text(encoding="utf-8")
    assert "train_3_a_1" in refused and "dims" in refused
    names = {p.stem for p in out.glob("*.safetensors")}
    assert names and "train_3_a_1" not in names


def test_empty_generated_reports_are_noted_at_predict_and_evaluate(run, tmp_path, monkeypatch, caplog):
    """An undertrained generator wrote empty reports (``vol.txt`` an empty line) without a word."""
    import logging

    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.families.ct_encoder.task import CTEncoderTask

    _, root, run_dir = run
    monkeypatch.setattr(CTEncoderTask, "generate", lambda self, out, num_beams=None: [""] * len(out["image_emb"]))
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        out = predict(run_dir, [str(root)], tmp_path / "o")
    n = len(list(out.glob("*.txt")))
    lines = [r.getMessage() for r in caplog.records if "generated reports are empty" in r.getMessage()]
    assert n and len(lines) == 1 and f"{n} of {n} generated reports are empty" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        rep = evaluate(run_dir, split="val", n_boot=10)
    note = f"{rep['n']} of {rep['n']} generated reports are empty"
    assert note in rep["notes"] and any(note in r.getMessage() for r in caplog.records)
