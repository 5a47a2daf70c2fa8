"""Plain ``train.strategy=ddp`` trains a family whose steps leave parameters without a gradient.

ct_encoder with chain-of-thought steps for one training case only: in the step that holds it, one
rank has its steps and the other none, so the step level runs on both ranks with the second one
scoring zero rows; the anchor loss runs on the first rank only. Before the fix that rank's step
head was off the graph: Lightning's plain DDP refused the step ("parameters that were not used in
producing the loss"), and with unused-parameter detection the ranks' collectives went out of order
(gloo: "Received data size doesn't match").
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from ddp_helpers import WORKER, torchrun

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.engine.trainer import FIND_UNUSED, ddp_strategy

pytestmark = pytest.mark.ddp


def _ct_config(root: Path, out: Path, **train) -> dict:
    return {
        "name": "ct_sparse_cot", "family": "ct_encoder", "output_dir": str(out),
        "data": {"root": str(root), "modalities": ["ct"], "batch_size": 2, "num_workers": 0,
                 "split": {"val": 0.2, "test": 0.2, "seed": 0, "stratify": False},
                 "transforms": {"orientation": "RAS", "spatial_size": [16, 24, 24],
                                "intensity": {"ct": {"kind": "ct_window", "level": -300, "width": 1400}}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {
            "num_regions": 9, "preset": "tiny", "patch_size": [4, 8, 8], "img_size": [16, 24, 24], "fpn_levels": 2,
            "mask_hidden": 8, "fpn_dim": 16, "embed_dim": 32,
            "loss_weights": {"global": 1.0, "region": 0.5, "step": 0.5, "anchor": 0.5}}},
        "train": {"max_epochs": 2, "lr": 0.001, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False,
                  "log_every_n_steps": 1, **train},
        "eval": {"n_boot": 20},
    }


@pytest.mark.parametrize("model, strategy, devices, expected", [
    ("ct_encoder", "ddp", 2, FIND_UNUSED),
    ("ct_encoder", "auto", 2, FIND_UNUSED),
    ("ct_encoder", "auto", 1, "auto"),  # one process: no DDP to configure
    ("ct_encoder", "ddp_spawn", 2, "ddp_spawn"),  # any other strategy is the user's choice
    ("baseline_cnn3d", "ddp", 2, "ddp"),  # every parameter gets a gradient in every step
])
def test_ddp_strategy_finds_unused_parameters_only_where_a_task_needs_it(tmp_path, model, strategy, devices,
                                                                           expected, monkeypatch):
    for var in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    cfg = _ct_config(tmp_path, tmp_path / "runs", accelerator="cpu", devices=devices, strategy=strategy)
    if model != "ct_encoder":
        cfg = tiny_cls_config(tmp_path, tmp_path / "runs")
        cfg["train"].update(accelerator="cpu", devices=devices, strategy=strategy)
    assert ddp_strategy(validate(cfg)) == expected


def test_ddp_strategy_counts_a_launchers_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # torchrun with train.devices left at auto
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = _ct_config(tmp_path, tmp_path / "runs", accelerator="cpu")
    assert ddp_strategy(validate(cfg)) == FIND_UNUSED


def _incomplete_seg_config(out: Path) -> dict:
    """The demo config on the quick phantom, one epoch per stage, two ranks with plain ``ddp``."""
    from medfuse.config import config_to_dict, load_config
    from medfuse.engine.build import demo_family

    cfg = config_to_dict(load_config(demo_family("incomplete_seg").demo_config, [
        f"data.root={out.parent / 'incomplete_seg_data'}", "data.demo_params.quick=true", f"output_dir={out}",
        "name=incomplete_seg_stages", "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp",
        "train.progress_bar=false", "eval.n_boot=20"]))
    for stage in cfg["train"]["stages"]:
        stage["max_epochs"] = 1
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One ``torchrun`` launch: ct_encoder with CoT steps in one training case, then incomplete_seg's
    three stages (stages 1-2 leave the adapters out of the loss, stage 3 the reconstruction head)."""
    from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

    base = tmp_path_factory.mktemp("ddp_unused")
    root = base / "ct_data"
    make_ct_encoder_demo(root, n_patients=24, quick=True, shape=(16, 24, 24))
    cot = json.loads((root / "cot.json").read_text(encoding="utf-8"))
    keep = [c for c in cot if c["volumename"] == "train_1_a_1.nii.gz"]  # a training case (split seed 0)
    assert len(keep) == 1 and len(keep[0]["cot_reasoning"]) >= 2
    (root / "cot.json").write_text(json.dumps(keep))
    out = base / "runs"
    configs = [_ct_config(root, out, accelerator="cpu", devices=2, strategy="ddp"), _incomplete_seg_config(out)]
    proc = torchrun(str(WORKER), json.dumps(configs))
    log = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, log
    return {"ct": out / "ct_sparse_cot", "inc": out / "incomplete_seg_stages", "log": log}


def test_plain_ddp_trains_ct_encoder_with_cot_on_one_rank_only(runs):
    run = runs["ct"]
    assert (run / "checkpoints" / "done").is_file(), runs["log"]
    with (run / "splits.csv").open(encoding="utf-8") as f:
        assert {"case_id": "train_1_a_1", "patient_id": "train_1", "split": "train"} in list(csv.DictReader(f))
    with (run / "metrics.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    # the step level (gathered over the ranks) and the anchor (this rank's steps only) ran in both
    # epochs, on the step where one rank held the CoT case
    for term in ("train/step", "train/anchor"):
        values = [float(r[term]) for r in rows if r.get(term)]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (term, values)


def test_plain_ddp_trains_every_incomplete_seg_stage(runs):
    ck = runs["inc"] / "checkpoints"
    for stage in ("reconstruct", "contrast", "adapt"):
        assert (ck / stage / "done").is_file(), (stage, runs["log"])
    with (runs["inc"] / "metrics.csv").open(encoding="utf-8") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
