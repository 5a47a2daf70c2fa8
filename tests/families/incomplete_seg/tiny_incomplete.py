"""Shared pieces of the incomplete_seg tests: a tiny one-epoch run config, and a stand-in for the
model's region output for tests that need known label maps."""

from __future__ import annotations

import torch

TINY = {"widths": [4, 8], "aspp_dilations": [1, 2], "ssim_window": 3, "channels_last": False}


def tiny_config(root, out, n_boot: int = 10) -> dict:
    """A one-epoch CPU run of the tiny network on a BraTS-named replica at ``root``, into ``out``."""
    return {
        "name": "inc", "output_dir": str(out),
        "data": {"root": str(root), "layout": "brats", "batch_size": 2, "eval_batch_size": 1,
                 "split": {"val": 0.25, "test": 0.25, "seed": 0},
                 "transforms": {"intensity": {"*": {"kind": "percentile", "nonzero": True}}}},
        "model": {"name": "incomplete_seg", "params": {**TINY, "val_combos_per_case": 2}},
        "train": {"max_epochs": 1, "monitor": "val/loss", "mode": "min", "progress_bar": False,
                  "accelerator": "cpu"},
        "eval": {"n_boot": n_boot, "overlays": 0},
    }


def fix_regions(monkeypatch, wt: tuple, tc: tuple, et: tuple) -> None:
    """Make ``IncompleteSegTask.predict_regions`` return fixed regions whatever the weights: WT, TC and
    ET probabilities (B, 3, *S) of 0.9, 0.8 and 0.7 inside the index tuples ``wt``, ``tc``, ``et``
    (each indexing the spatial axes (D, H, W)), 0 elsewhere."""
    from medfuse.families.incomplete_seg.task import IncompleteSegTask

    def fake(self, batch, present=None):
        b, _, *s = batch["image"].shape
        q = torch.zeros(b, 3, *s, device=batch["image"].device)
        for r, (where, p) in enumerate(((wt, 0.9), (tc, 0.8), (et, 0.7))):
            q[(slice(None), r, *where)] = p
        return q

    monkeypatch.setattr(IncompleteSegTask, "predict_regions", fake)
