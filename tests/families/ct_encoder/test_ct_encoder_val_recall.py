"""Per-epoch validation Recall@k follows the evaluation's rule: a k at or above the split's pair
count is 1.0 for any model, so it is left out of the logged keys and of ``val/mean_recall`` (it used
to average R@5 = 1.0 into the monitor of a 5-pair split, so best.ckpt was chosen partly on
constants); the monitored key still exists when all its k are left out (checkpointing needs it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medfuse.families.ct_encoder.task import CTEncoderTask

SMALL = dict(num_regions=4, patch_size=(2, 8, 8), img_size=(8, 32, 32), fpn_levels=3, mask_hidden=4, embed_dim=16)


def _task(monitor: str = "val/mean_recall") -> CTEncoderTask:
    return CTEncoderTask({"model": {"name": "ct_encoder", "params": dict(SMALL)}, "train": {"monitor": monitor}})


def _merged(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    return {"image_emb": img / np.linalg.norm(img, axis=1, keepdims=True),
            "text_emb": txt / np.linalg.norm(txt, axis=1, keepdims=True)}


def _left_out_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "validation i2t/t2i R@k" in r.getMessage()]


def test_recall_at_or_above_the_split_size_is_left_out_of_the_monitor(caplog):
    task, merged = _task(), _merged(5)
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        res = task.epoch_metrics(merged)
        again = task.epoch_metrics(merged)
    assert sorted(res) == ["i2t_R@1", "mean_recall", "t2i_R@1"] and again == res
    assert res["mean_recall"] == pytest.approx((res["i2t_R@1"] + res["t2i_R@1"]) / 2)
    lines = _left_out_lines(caplog)
    assert len(lines) == 1 and "k = 5, 10" in lines[0] and "(5 pairs)" in lines[0]  # logged once


def test_a_large_split_keeps_every_k_and_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        res = _task().epoch_metrics(_merged(11))
    assert sorted(res) == sorted(["mean_recall", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))])
    assert not _left_out_lines(caplog)


@pytest.mark.parametrize("monitor, n", [("val/mean_recall", 1), ("val/i2t_R@1", 1), ("val/t2i_R@5", 3),
                                        ("val/i2t_R@10", 10)])
def test_the_monitored_key_exists_when_all_its_k_are_left_out(monitor, n, caplog):
    """ModelCheckpoint stops training on a missing monitor key: the constant is logged, and said so."""
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        res = _task(monitor).epoch_metrics(_merged(n))
    assert res[monitor.removeprefix("val/")] == 1.0
    lines = _left_out_lines(caplog)
    assert len(lines) == 1 and f"train.monitor={monitor} reads only such k" in lines[0]


def test_a_monitor_on_kept_k_gets_no_constant(caplog):
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        res = _task("val/i2t_R@1").epoch_metrics(_merged(4))
    assert "i2t_R@5" not in res and "mean_recall" in res
    assert "reads only such k" not in _left_out_lines(caplog)[0]
