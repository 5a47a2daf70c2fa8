"""A training run killed (SIGKILL) during epoch 2 resumes to the same end as an uninterrupted one,
with the same weights and a ``metrics.csv`` holding every epoch exactly once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import torch

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.engine.checkpoint import safe_torch_load
from medfuse.engine.trainer import fit, resume_run

KILLER = r"""
import json, os, signal, sys
import lightning as L
from medfuse.config import validate
from medfuse.api import fit

class Kill(L.Callback):
    # kill -9 in the middle of epoch 2 (0-based), once epochs 0 and 1 have been checkpointed.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGKILL)

fit(validate(json.loads(sys.argv[1])), callbacks=[Kill()])
"""


def _rows(run_dir, key):
    with (run_dir / "metrics.csv").open(encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def _last_val_row(run_dir):
    return _rows(run_dir, "val/loss")[-1]


def test_killed_run_resumes_to_same_result(cls_dataset, tmp_path):
    root = cls_dataset.parent
    full_cfg = validate(tiny_cls_config(root, tmp_path, name="full"))
    fit(full_cfg)

    killed_cfg = tiny_cls_config(root, tmp_path, name="killed")
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(killed_cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = tmp_path / "killed"
    last = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1  # two epochs done, the third cut short
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert [int(r["epoch"]) for r in _rows(run_dir, "val/loss")] == [0, 1]
    assert (run_dir / ".medfuse.lock").is_file()  # left by the killed process; resume takes it over

    resume_run(run_dir)

    a = safe_torch_load(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == full_cfg.train.max_epochs - 1
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    ra, rb = _last_val_row(tmp_path / "full"), _last_val_row(run_dir)
    for key in ("val/loss", "val/balanced_accuracy", "val/accuracy"):
        assert abs(float(ra[key]) - float(rb[key])) < 1e-6, key
    # metrics.csv keeps the epochs before the kill and holds every epoch once, as the full run's does
    for key in ("val/loss", "train/loss"):
        full, resumed = _rows(tmp_path / "full", key), _rows(run_dir, key)
        epochs = list(range(full_cfg.train.max_epochs))
        assert [int(r["epoch"]) for r in resumed] == [int(r["epoch"]) for r in full] == epochs, key
        for a_row, b_row in zip(full, resumed, strict=True):
            assert abs(float(a_row[key]) - float(b_row[key])) < 1e-6, (key, a_row["epoch"])
    assert not (run_dir / ".medfuse.lock").exists()
    # each session recorded where it ran: the killed one, then the resume
    sessions = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
    assert [e["resumed"] for e in sessions] == [False, True]
    assert all(torch.__version__.startswith(e["versions"]["torch"]) for e in sessions)
    # best.ckpt was chosen on validation in both runs at the same epoch
    assert safe_torch_load(tmp_path / "full" / "checkpoints" / "best.ckpt")["epoch"] == \
        safe_torch_load(run_dir / "checkpoints" / "best.ckpt")["epoch"]
