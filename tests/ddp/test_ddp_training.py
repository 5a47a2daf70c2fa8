"""Two-rank CPU training (gloo, ``torchrun``) that gives the single-process answer (issue 15).

One ``torchrun`` launch trains a tiny classification run and a tiny segmentation run on 2 ranks,
then a third run whose ranks are killed (SIGKILL) in epoch 2; a second launch resumes it with
``torchrun -m medfuse train --resume``. Both validation splits hold an odd number of cases, so a
padded distributed sampler (which repeats a case to even the ranks) would show in the metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_helpers import WORKER, torchrun

from conftest import tiny_cls_config, write_cls_dataset, write_seg_dataset
from medfuse.engine.checkpoint import safe_torch_load

pytestmark = pytest.mark.ddp

TWO_RANKS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def _cls_cfg(root: Path, out: Path, name: str) -> dict:
    cfg = tiny_cls_config(root, out, name=name)
    cfg["data"]["eval_batch_size"] = 2  # 5 validation cases: rank 0 runs 2 batches, rank 1 one
    cfg["train"].update(TWO_RANKS, max_epochs=3)
    return cfg


def _seg_cfg(root: Path, out: Path) -> dict:
    return {
        "name": "seg", "task": "segmentation", "output_dir": str(out),
        "data": {"root": str(root), "batch_size": 2, "eval_batch_size": 2, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
        "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2]}},
        "train": {"max_epochs": 2, "lr": 0.01, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                  "scheduler": "none", **TWO_RANKS},
        "eval": {"n_boot": 20},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp_runs")
    cls_root = write_cls_dataset(base / "cls", n_patients=20).parent
    seg_root = write_seg_dataset(base / "seg", n_cases=18)
    out = base / "runs"
    proc = torchrun(str(WORKER), json.dumps([_cls_cfg(cls_root, out, "cls"), _seg_cfg(seg_root, out)]),
                    json.dumps(_cls_cfg(cls_root, out, "killed")))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, "the third run should have been killed"
    assert (out / "seg" / "checkpoints" / "done").is_file(), log[-3000:]
    return {"cls": out / "cls", "seg": out / "seg", "killed": out / "killed", "log": log}


def _rows(run_dir: Path, key: str) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def _single_process_validation(run_dir: Path) -> tuple[dict[str, float], int]:
    """The best checkpoint validated in this (one) process over the whole validation split, and the
    number of validation cases."""
    from medfuse.engine.evaluate import load_trained

    _, dm, task = load_trained(run_dir, "best")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (res,) = trainer.validate(task, dataloaders=dm.val_dataloader(), verbose=False)
    return {k: float(v) for k, v in res.items()}, len(dm.cases["val"])


def test_no_sync_dist_warning(runs):
    assert "sync_dist" not in runs["log"]
    assert "Initializing distributed: GLOBAL_RANK: 1" in runs["log"]  # two ranks really ran


@pytest.mark.parametrize(("run", "metrics"), [("cls", ("val/balanced_accuracy", "val/accuracy", "val/roc_auc",
                                                       "val/loss")),
                                              ("seg", ("val/dice", "val/dice_1", "val/loss"))])
def test_two_rank_validation_equals_single_process(runs, run, metrics):
    run_dir = runs[run]
    best = safe_torch_load(run_dir / "checkpoints" / "best.ckpt")
    logged = next(r for r in _rows(run_dir, "val/loss") if int(r["epoch"]) == best["epoch"])
    single, n_val = _single_process_validation(run_dir)
    assert n_val % 2 == 1  # padding to an even split would repeat a case
    for key in metrics:
        assert abs(float(logged[key]) - single[key]) < 1e-5, (key, logged[key], single[key])
    monitor = "val/balanced_accuracy" if run == "cls" else "val/dice"
    score = next(v["best_model_score"] for k, v in best["callbacks"].items() if monitor in k and "best_model_score" in v)
    assert abs(float(score) - single[monitor]) < 1e-5  # checkpoint selection saw the global value


def test_classification_matches_medfuse_evaluate_on_val(runs):
    from medfuse.api import evaluate

    best = safe_torch_load(runs["cls"] / "checkpoints" / "best.ckpt")
    logged = next(r for r in _rows(runs["cls"], "val/loss") if int(r["epoch"]) == best["epoch"])
    rep = evaluate(runs["cls"], split="val", n_boot=10)
    assert rep["n"] == 5
    assert abs(rep["metrics"]["balanced_accuracy"]["value"] - float(logged["val/balanced_accuracy"])) < 1e-6


def test_killed_two_rank_run_resumes_exactly(runs):
    full, run_dir = runs["cls"], runs["killed"]
    assert safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert (run_dir / ".medfuse.lock").is_file()  # left by the killed rank 0
    proc = torchrun("-m", "medfuse", "train", "--resume", str(run_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a = safe_torch_load(full / "checkpoints" / "last.ckpt")
    b = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    for key in ("val/loss", "val/balanced_accuracy", "train/loss"):
        ra, rb = _rows(full, key), _rows(run_dir, key)
        assert [int(r["epoch"]) for r in ra] == [int(r["epoch"]) for r in rb] == [0, 1, 2], key
        for x, y in zip(ra, rb, strict=True):
            assert abs(float(x[key]) - float(y[key])) < 1e-6, (key, x["epoch"])
    assert not (run_dir / ".medfuse.lock").exists()
