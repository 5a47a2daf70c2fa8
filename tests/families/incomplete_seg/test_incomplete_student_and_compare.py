"""incomplete_seg: the optional ground-truth term of stage 3's students, and the paired comparison of
two runs over the modality combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.config import StageConfig
from medfuse.errors import RunDirError
from medfuse.families.incomplete_seg.compare import (
    compare_runs,
    comparison_markdown,
    demo_comparison,
    load_combination_dice,
    paired_differences,
    save_combination_dice,
)
from medfuse.families.incomplete_seg.task import IncompleteSegTask, stage_kind

MODS = ["flair", "t1", "t1ce", "t2"]
TINY = dict(widths=(4, 8), aspp_dilations=(1, 2), ssim_window=3, channels_last=False)
ADAPT = {"seg": 1.0, "consistency": 1.0, "feature": 0.2}


def _task(losses: dict[str, float], **kw) -> IncompleteSegTask:
    torch.manual_seed(0)
    cfg = {"name": "unit", "model": {"name": "incomplete_seg", "params": {**TINY, "combos_per_step": 3, **kw}}}
    auto = {"in_channels": 4, "num_classes": 4, "modalities": MODS}
    return IncompleteSegTask(cfg, auto=auto, stage=StageConfig(name="adapt", losses=losses).model_dump())


def _batch(b=2, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, s, s, s, dtype=torch.long)
    mask[:, :, 2:6, 2:6, 2:6] = 1
    mask[:, :, 3:5, 3:5, 3:5] = 2
    return {"image": torch.rand(b, 4, s, s, s, generator=g), "mask": mask, "present": torch.ones(b, 4),
            "case_id": [f"c{i}" for i in range(b)]}


def test_student_seg_is_an_adapt_loss_and_adds_the_students_ground_truth_term():
    assert stage_kind({"seg": 1.0, "student_seg": 1.0}) == "adapt"
    base, with_gt = _task(ADAPT), _task({**ADAPT, "student_seg": 2.0})
    for t in (base, with_gt):
        t.on_stage(StageConfig(name="adapt", losses=t.stage_cfg.losses))
        t.train()
    batch = _batch()
    out0 = base.forward_batch(batch)
    out1 = with_gt.forward_batch(batch)
    l0, l1 = base.compute_loss(batch, out0), with_gt.compute_loss(batch, out1)
    assert "student_seg" not in l0 and "student_seg" in l1
    # the same network and students: the loss grows by exactly 2 x the students' mean seg loss
    k = (out1["logits"].shape[0] - 2) // 2
    per = with_gt.seg_loss_per_case(out1["logits"][2:], batch["mask"].repeat(k, 1, 1, 1, 1))
    w = out1["student_weight"]
    expected = (per * w).sum() / w.sum()
    torch.testing.assert_close(l1["student_seg"], expected.detach())
    torch.testing.assert_close(l1["loss"] - l0["loss"], 2.0 * expected, rtol=1e-4, atol=1e-5)
    l1["loss"].backward()  # the adapters and decoder learn from it; the frozen encoder does not
    assert all(p.grad is None for p in with_gt.model.encoder.parameters())


def test_per_case_seg_loss_averages_to_the_batch_loss():
    task = _task(ADAPT)
    batch = _batch(b=3)
    logits = torch.randn(3, 3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(task.seg_loss_per_case(logits, batch["mask"]).mean(),
                               task.seg_loss_of(logits, batch["mask"]), rtol=1e-5, atol=1e-6)


COMBOS = ["flair", "t1", "flair+t1"]


def test_paired_differences_ci_and_direction():
    rng = np.random.default_rng(0)
    n = 30
    a = rng.uniform(0.5, 0.7, (n, 3, 2))
    b = a.copy()
    b[:, 1] -= 0.3  # b collapses on the second combination only
    b[:, 0] += rng.normal(0, 0.01, (n, 2))  # and is a tie on the first
    out = paired_differences(a, b, COMBOS, n_boot=200)
    rows = {r["combination"]: r for r in out["rows"]}
    assert rows["t1"]["difference"]["value"] == pytest.approx(0.3) and rows["t1"]["difference"]["low"] > 0.29
    assert rows["flair"]["difference"]["low"] < 0 < rows["flair"]["difference"]["high"]
    assert out["a_better"] == ["t1"] and out["b_better"] == []
    assert out["incomplete"]["difference"]["value"] == pytest.approx(0.15, abs=0.01)  # mean over flair, t1
    assert out["all"]["difference"]["n"] == n
    md = comparison_markdown(out, "3 stages", "dropout")
    assert "| t1 |" in md and "difference (3 stages - dropout)" in md
    with pytest.raises(ValueError):
        paired_differences(a, b[:, :2], COMBOS)


def test_nan_cases_are_left_out_pairwise():
    a = np.full((4, 3, 1), 0.6)
    b = np.full((4, 3, 1), 0.4)
    b[0, 0, 0] = np.nan  # not scored for one model: that case leaves this combination's comparison
    out = paired_differences(a, b, COMBOS, n_boot=50)
    assert out["rows"][0]["difference"]["n"] == 3 and out["rows"][1]["difference"]["n"] == 4


def test_save_load_and_compare_runs(tmp_path):
    rng = np.random.default_rng(1)
    d = rng.uniform(0, 1, (5, 3, 2))
    d[2, 1, 0] = np.nan
    for run, shift in (("a", 0.1), ("b", 0.0)):
        save_combination_dice(tmp_path / run / "predictions" / "test" / "combinations_dice.csv",
                              [f"c{i}" for i in range(5)], COMBOS, ["WT", "TC"], d + shift)
    cases, combos, regions, back = load_combination_dice(tmp_path / "a" / "predictions" / "test" / "combinations_dice.csv")
    assert (cases, combos, regions) == ([f"c{i}" for i in range(5)], COMBOS, ["WT", "TC"])
    np.testing.assert_allclose(back, d + 0.1, atol=1e-6)
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=50)
    assert cmp["n"] == 5 and all(r["difference"]["value"] == pytest.approx(0.1) for r in cmp["rows"])
    demo = demo_comparison([{"name": "A", "run": tmp_path / "a"}, {"name": "B", "run": tmp_path / "b"}], n_boot=50)
    assert list(demo) == ["B"] and "difference (A - B)" in demo["B"]["markdown"]
    with pytest.raises(RunDirError, match="evaluate the run again"):
        compare_runs(tmp_path / "a", tmp_path / "missing")
    with pytest.raises(ValueError):
        save_combination_dice(tmp_path / "x.csv", ["c0"], COMBOS, ["WT"], d)
