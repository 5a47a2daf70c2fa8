"""Small-ET post-processing (``eval.postprocess.min_et_voxels``): the relabelling itself and its config key."""

from __future__ import annotations

import pytest
import torch

from medfuse.config import validate
from medfuse.errors import ConfigError
from medfuse.families.incomplete_seg.evaluate import suppress_small_et
from medfuse.families.incomplete_seg.model import IncompleteSegNet


def _q(et_voxels: list[int]) -> torch.Tensor:
    """(B, 3, 6, 6, 6) nested WT > TC > ET with case b's ET holding ``et_voxels[b]`` voxels."""
    q = torch.zeros(len(et_voxels), 3, 6, 6, 6)
    q[:, 0, 1:5, 1:5, 1:5] = 0.9
    q[:, 1, 2:4, 2:4, 2:4] = 0.8
    for b, n in enumerate(et_voxels):
        q[b, 2].view(-1)[[i for i in range(216) if q[b, 1].view(-1)[i] > 0.5][:n]] = 0.7
    return q


def test_small_et_becomes_necrosis_large_et_stays():
    q = _q([3, 8])
    out = suppress_small_et(q, 5)
    assert int((out[0, 2] > 0.5).sum()) == 0 and int((out[1, 2] > 0.5).sum()) == 8  # per case
    torch.testing.assert_close(out[:, :2], q[:, :2])  # WT and TC unchanged: the ET voxels stay tumour core
    labels = IncompleteSegNet.labels_from_regions(out).argmax(1)  # canonical 0..3
    assert int((labels[0] == 3).sum()) == 0 and int((labels[0] == 2).sum()) == 8  # TC without ET (NCR)
    assert int((labels[1] == 3).sum()) == 8
    assert int((q[0, 2] > 0.5).sum()) == 3  # the input is not modified


def test_threshold_zero_is_off_and_counts_only_the_case_itself():
    q = _q([3])
    assert suppress_small_et(q, 0) is q
    assert int((suppress_small_et(q, 3)[0, 2] > 0.5).sum()) == 3  # 3 voxels are not fewer than 3
    padded = torch.zeros(1, 3, 8, 8, 8)
    padded[:, :, :6, :6, :6] = q
    padded[0, 2, 7, 7, 7] = 0.9  # in the batch padding of a smaller case: not counted
    shapes = torch.tensor([[6, 6, 6]])
    assert int((suppress_small_et(padded, 4, shapes)[0, 2] > 0.5).sum()) == 0
    assert int((suppress_small_et(padded, 4)[0, 2] > 0.5).sum()) == 4


def test_config_key():
    cfg = validate({"eval": {"postprocess": {"min_et_voxels": 200}}})
    assert cfg.eval.postprocess.min_et_voxels == 200
    assert validate({}).eval.postprocess.min_et_voxels == 0  # off by default
    with pytest.raises(ConfigError, match="eval.postprocess.min_et_voxels"):
        validate({"eval": {"postprocess": {"min_et_voxels": -1}}})
    with pytest.raises(ConfigError, match="eval.postprocess"):
        validate({"eval": {"postprocess": {"min_et": 5}}})
