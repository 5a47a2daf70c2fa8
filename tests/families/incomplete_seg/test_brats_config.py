"""The shipped BraTS config (three UniMRSeg stages) trains one CPU epoch per stage on a tiny
BraTS-named replica with the tiny overrides its header lists, and evaluates."""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "incomplete_seg_brats.yaml"
TINY_BRATS = [
    "data.num_workers=0", "data.cache_dir=null", "data.transforms.spatial_size=[16,16,16]",
    "model.params.widths=[4,8]", "model.params.aspp_dilations=[1,2]", "model.params.ssim_window=3",
    "model.params.channels_last=false", "model.params.val_roi_size=[16,16,16]", "model.params.val_combos_per_case=1",
    "eval.roi_size=[16,16,16]", "eval.n_boot=10", "train.warmup_epochs=0", "train.accelerator=cpu",
    "train.stages=[{name: reconstruct, max_epochs: 1, losses: {recon: 1.0}}, "
    "{name: contrast, max_epochs: 1, losses: {seg: 1.0, ntxent: 1.0}}, "
    "{name: adapt, max_epochs: 1, frozen: ['encoder.*'], losses: {seg: 1.0, consistency: 1.0, feature: 0.2}}]"]


def test_the_shipped_brats_config_trains_its_three_stages_and_evaluates(tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    root = make_incomplete_seg_demo(tmp_path / "BraTS", n_patients=8, shape=(16, 16, 16))
    run = fit(load_config(CONFIG, [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *TINY_BRATS]))
    for stage in ("reconstruct", "contrast", "adapt"):
        assert (run / "checkpoints" / stage / "done").exists(), stage
    rep = evaluate(run)
    assert rep["n"] >= 1 and "dice_all_combinations" in rep["metrics"]
