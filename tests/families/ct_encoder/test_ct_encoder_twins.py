"""Reconstructions of one scan share their report and look alike: identical reports count as matches
of each other in report retrieval, and a patient's own other volumes are not in its volume-to-volume
gallery (they were trivial positives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.families.ct_encoder.evaluate import volume_to_volume_queries, volume_to_volume_ranks
from medfuse.metrics.retrieval import retrieval_report, same_text_positives


def test_identical_reports_are_matches_of_each_other():
    texts = ["left lung nodule.", "left  lung nodule.", "cardiomegaly.", "normal chest."]
    pos = same_text_positives(texts)
    assert pos is not None and pos[0, 1] and pos[1, 0] and pos.sum() == 6
    assert same_text_positives(["a", "b"]) is None
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    sim = (emb @ emb.t()).numpy()  # the twins tie exactly
    plain = retrieval_report(sim, ks=(1,), n_boot=20)
    fair = retrieval_report(sim, ks=(1,), n_boot=20, positives=pos)
    assert plain["image_to_text/R@1"]["value"] == pytest.approx(0.5)  # each twin ranked behind the other
    assert fair["image_to_text/R@1"]["value"] == fair["text_to_image/R@1"]["value"] == 1.0
    with pytest.raises(ValueError, match="every pair"):
        retrieval_report(sim, positives=np.zeros((4, 4), bool))


def test_a_patients_other_volumes_are_left_out_of_its_gallery():
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    img = torch.nn.functional.normalize(torch.tensor([
        [1.0, 0.0, 0.0],   # p1, scan a
        [1.0, 0.0, 0.0],   # p1, scan b: a near copy
        [0.2, 1.0, 0.0],   # p2, same findings, far
        [0.9, 0.1, 0.4],   # p3, other findings, close to p1
        [0.0, 0.2, 1.0],   # p4, other findings
    ]), dim=-1)
    patients = ["p1", "p1", "p2", "p3", "p4"]
    assert volume_to_volume_ranks(img, y).tolist()[:2] == [0, 0]  # without patients: the twin, trivially
    ranks = volume_to_volume_ranks(img, y, patients)
    q = volume_to_volume_queries(y, patients)
    assert q.tolist() == [True, True, True, True, True] and len(ranks) == 5
    assert ranks[0] == ranks[1] == 1  # p2's volume, behind p3's (p1's own twin is not in the gallery)
    only_own = volume_to_volume_queries(np.array([[1, 0], [1, 0], [0, 1]], dtype=float), ["p1", "p1", "p2"])
    assert only_own.tolist() == [False, False, False]  # a finding set only the patient's own scans share
