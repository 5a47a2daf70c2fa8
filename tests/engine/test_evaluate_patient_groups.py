"""The generic evaluators hand the split's patients to the bootstrap when a patient has several
cases: classification (the baseline CNN, and staging through it) and image-text retrieval."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


def _dm(case_ids, patients, labels=None):
    cases = [SimpleNamespace(case_id=c, patient_id=p, label=None if labels is None else int(y))
             for c, p, y in zip(case_ids, patients, labels if labels is not None else [0] * len(case_ids), strict=True)]
    return SimpleNamespace(cases={"test": cases}, table=SimpleNamespace(class_names=["a", "b"]))


def _cfg():
    return SimpleNamespace(train=SimpleNamespace(seed=0))


def test_retrieval_evaluator_resamples_patients(tmp_path):
    """20 of 30 pairs belong to one patient and are retrieved first; the others are not."""
    from medfuse.engine.evaluate import RetrievalEvaluator
    from medfuse.metrics import retrieval_report

    n = 30
    ids = [f"c{i}" for i in range(n)]
    patients = ["big"] * 20 + [f"p{i}" for i in range(10)]
    ev = RetrievalEvaluator(None, _dm(ids, patients), _cfg(), tmp_path, "test", 300)
    img = torch.eye(n)
    txt = torch.eye(n)
    txt[20:] = torch.roll(torch.eye(n)[20:], 1, dims=0)  # the last ten texts point at another image
    ev.update({"case_id": ids}, {"image_emb": img, "text_emb": txt})
    rep = ev.compute()
    r1 = rep["metrics"]["image_to_text/R@1"]
    assert r1["n"] == 11 and r1["n_items"] == 30 and r1["value"] == np.float64(20 / 30)
    assert rep["n"] == 30 and rep["n_patients"] == 11
    per_pair = retrieval_report(ev.similarity(), n_boot=300)["image_to_text/R@1"]
    assert per_pair["value"] == r1["value"] and per_pair["n"] == 30
    assert r1["high"] - r1["low"] > 2 * (per_pair["high"] - per_pair["low"])  # 11 patients, not 30 pairs


def test_classification_evaluator_without_repeats_is_unchanged(tmp_path):
    from medfuse.engine.evaluate import ClassificationEvaluator
    from medfuse.metrics import classification_report

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20)
    logits = torch.from_numpy(rng.normal(size=(20, 2))).float()
    ids = [f"c{i}" for i in range(20)]
    ev = ClassificationEvaluator(None, _dm(ids, [f"p{i}" for i in range(20)], y), _cfg(), tmp_path, "test", 200)
    ev.update({"case_id": ids}, {"logits": logits})
    rep = ev.compute()
    ref = classification_report(y, logits.softmax(-1).numpy(), ["a", "b"], n_boot=200, seed=0)
    assert "n_patients" not in rep
    assert rep["metrics"] == {k: v for k, v in ref.items() if k in rep["metrics"]}
    ev2 = ClassificationEvaluator(None, _dm(ids, ["x", "x"] + [f"p{i}" for i in range(18)], y), _cfg(),
                                  tmp_path, "test", 200)
    ev2.update({"case_id": ids}, {"logits": logits})
    rep2 = ev2.compute()
    assert rep2["metrics"]["accuracy"]["n"] == 19 and rep2["n_patients"] == 19
