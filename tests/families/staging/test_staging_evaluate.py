"""Staging end to end on a small phantom: train, evaluate once (gate maps from the same pass), predict."""

from __future__ import annotations

import math

import pytest

from medfuse.config import load_config
from medfuse.engine.evaluate import evaluate
from medfuse.engine.predict import predict
from medfuse.engine.trainer import fit
from medfuse.registry import CONFIG_DIR


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("staging_run")
    cfg = load_config(CONFIG_DIR / "staging_demo.yaml", [
        f"data.root={out / 'data'}", "data.cache_dir=null", f"output_dir={out}", "name=s",
        "data.demo_params={n_patients: 24, shape: [8, 32, 32]}", "train.max_epochs=1", "eval.n_boot=20",
        "data.batch_size=4", "model.params.token_pool=2"])
    return fit(cfg)


def test_evaluate_infers_test_split_once_with_gate_maps(run, count_forwards):
    rep = evaluate(run, split="test")
    n = rep["n"]
    assert count_forwards.calls == math.ceil(n / 4)  # eval batch = data.batch_size = 4
    assert rep["family"] == "staging" and rep["task"] == "classification"
    maps = rep["gate_maps"]
    assert 1 <= len(maps) <= 3
    for m in maps.values():
        assert (run / m["png"]).is_file() and 0.0 < m["mean_gate"] < 1.0
        assert m["min_gate"] <= m["mean_gate"] <= m["max_gate"] and m["sd_gate"] >= 0
    spread = rep["gate_spread"]  # every test case's gate, from the same single pass
    assert spread["n_cases"] == n and spread["n_tokens"] == n * 8 * 2 * 2  # D = 8, token_pool = 2
    assert spread["p05"] <= spread["mean"] <= spread["p95"] and spread["mean_channel_sd"] >= 0
    assert spread["t2w_favoured"]["fraction"] + spread["dwi_favoured"]["fraction"] <= 1.0


def test_predict_writes_probabilities(run, tmp_path):
    import csv

    data = run.parent / "data"
    out = predict(run, [str(data / "manifest.csv")], tmp_path / "pred")
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    cases = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in cases] and set(rows[0]) == {"case_id", "pred", "p_T1-2", "p_T3-4"}
