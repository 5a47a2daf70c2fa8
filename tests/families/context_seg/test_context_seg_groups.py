"""context_seg's pooled scores resample CellMap datasets, not crops: the crops of one dataset (one
cell, its patient id) are not independent."""

from __future__ import annotations

import numpy as np

from medfuse.families.context_seg.evaluate import pooled_ci


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 50, size=(n, 3, 3))  # (crops, K, [tp, fp, fn])


def test_pooled_ci_resamples_datasets_and_counts_them():
    rng = np.random.default_rng(0)
    base = _counts(rng, 4)
    c = np.repeat(base, 6, axis=0)  # 4 datasets, 6 near-identical crops each
    groups = [f"jrc_{i // 6}" for i in range(24)]
    flat = pooled_ci(c, "f1", [1, 2], 400, 0)
    grouped = pooled_ci(c, "f1", [1, 2], 400, 0, groups)
    assert flat["n"] == 24 and (grouped["n"], grouped["n_items"]) == (4, 24)
    assert grouped["value"] == flat["value"]
    assert grouped["high"] - grouped["low"] > 1.5 * (flat["high"] - flat["low"])  # crops are not independent


def test_one_crop_per_dataset_is_the_plain_bootstrap():
    c = _counts(np.random.default_rng(1), 9)
    flat = pooled_ci(c, "iou", [1, 2], 300, 3)
    grouped = pooled_ci(c, "iou", [1, 2], 300, 3, [f"d{i}" for i in range(9)])
    assert {k: flat[k] for k in ("value", "low", "high", "n")} == {k: grouped[k] for k in ("value", "low", "high", "n")}


def test_evaluate_on_cellmap_counts_datasets(tmp_path):
    """End to end: a test split of one dataset with two crops reports n = 1 dataset, 2 crops."""
    import json

    from test_cellmap import CONFIG, TINY_CELLMAP, make_cellmap  # tests/families/context_seg is on sys.path

    from medfuse.config import load_config
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    root = make_cellmap(tmp_path / "cellmap", datasets=3, crops=2)
    cfg = load_config(CONFIG, [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *TINY_CELLMAP,
                               "data.split.val=0.34", "data.split.test=0.34"])
    run = fit(cfg)
    evaluate(run)
    rep = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert (rep["metrics"]["mean_f1"]["n"], rep["metrics"]["mean_f1"]["n_items"]) == (1, 2)
