"""The environment record of a training session and of a seeds table (engine/environment.py)."""

from __future__ import annotations

import json

import torch

from medfuse.engine import demo
from medfuse.engine.environment import ENV_FILE, environment, record_training, summary_line


def test_environment_reports_the_threads_that_set_the_summation_order():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = environment()
        torch.set_num_threads(2)
        two = environment()
    finally:
        torch.set_num_threads(before)
    assert (one["torch_threads"], two["torch_threads"]) == (1, 2)
    assert one["versions"]["medfuse"] and one["versions"]["torch"]
    assert one["cpu"] and one["cpu_count"] >= 1 and one["world_size"] == 1
    assert "1 torch threads" in summary_line(one) and "2 torch threads" in summary_line(two)


def test_record_training_appends_and_keeps_a_broken_file(tmp_path):
    record_training(tmp_path, resumed=False)
    record_training(tmp_path, resumed=True, world_size=4)
    entries = json.loads((tmp_path / ENV_FILE).read_text(encoding="utf-8"))
    assert [(e["resumed"], e["world_size"]) for e in entries] == [(False, 1), (True, 4)]
    (tmp_path / ENV_FILE).write_text("{not json", encoding="utf-8")
    record_training(tmp_path, resumed=True)
    assert (tmp_path / (ENV_FILE + ".bad")).read_text(encoding="utf-8") == "{not json"
    assert len(json.loads((tmp_path / ENV_FILE).read_text(encoding="utf-8"))) == 1


def test_seeds_table_names_the_machine():
    env = environment()
    summary = {"family": "x", "metric": "m", "seeds": [0], "varies": "train.seed", "fixed": "phantom",
               "command": "medfuse demo x --seeds 0", "environment": env,
               "variants": [{"name": "a", "per_seed": {"0": {"value": 0.5, "low": 0.4, "high": 0.6, "n": 3}},
                             "mean": 0.5, "sd": None, "diff_to_first_mean": None, "diff_to_first_sd": None}]}
    md = demo.seeds_markdown(summary)
    assert f"Measured on: {summary_line(env)}" in md
    assert "Measured on" not in demo.seeds_markdown({**summary, "environment": None})
