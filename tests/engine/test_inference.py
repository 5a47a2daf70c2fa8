"""Whole-volume inference helpers: padding to the network's divisor, mirroring TTA, the way back
onto the input grid, variable-size collation, nnU-Net-style predict inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.engine.inference import check_roi, infer_padded, mirror_tta, size_divisor, to_input_grid
from medfuse.errors import ConfigError


def test_infer_padded_pads_to_divisor_and_crops_back():
    seen = {}

    def fn(x):
        seen["shape"] = tuple(x.shape[2:])
        return x * 2

    x = torch.randn(1, 1, 9, 10, 7)
    y = infer_padded(fn, x, 4)
    assert seen["shape"] == (12, 12, 8)
    assert y.shape == x.shape and torch.equal(y, x * 2)


def test_mirror_tta_of_equivariant_fn_is_identity_and_counts_8():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    x = torch.randn(1, 2, 5, 6, 7)
    assert torch.allclose(mirror_tta(fn, x), x + 1)
    assert len(calls) == 8


def test_check_roi_names_key():
    with pytest.raises(ConfigError, match="eval.roi_size"):
        check_roi((30, 32, 32), 8)
    check_roi((32, 32, 32), 8)


def test_size_divisor_from_params():
    assert size_divisor({"strides": (2, 2)}) == 4
    assert size_divisor({"strides": ((2, 2, 1), 2)}) == 4
    assert size_divisor({}) == 16


def _lps(shape, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return affine @ flip


def test_to_input_grid_exact_for_reorientation():
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [-10, 5, 7]
    ijk = (7, 9, 5)
    lps = _lps(ijk, aff)
    data = torch.randn(2, *ijk)
    stored = MetaTensor(data.flip(1, 2), affine=torch.as_tensor(lps))  # the same image stored LPS
    ras = Orientation("RAS")(stored)
    x = ras.as_tensor().permute(0, 3, 2, 1)  # (K, D, H, W) processed
    back = to_input_grid(x, ras.affine.numpy(), lps, tuple(reversed(ijk)))
    assert torch.equal(back, stored.as_tensor().permute(0, 3, 2, 1))


def test_to_input_grid_resamples_changed_spacing():
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    proc = np.diag([1.0, 1.0, 1.0, 1.0])
    x = torch.ones(1, 10, 6, 6)  # (K, D, H, W) at 1 mm
    y = to_input_grid(x, proc, aff, (5, 6, 6))
    assert y.shape == (1, 5, 6, 6)
    assert torch.allclose(y[:, :4], torch.ones(1, 4, 6, 6), atol=1e-5)


def test_collate_pads_different_sizes_and_records_shapes():
    from medfuse.data.datamodule import collate

    a = {"image": torch.ones(1, 5, 6, 7), "mask": torch.ones(1, 5, 6, 7).long(), "case_id": "a"}
    b = {"image": torch.ones(1, 7, 6, 5), "mask": torch.ones(1, 7, 6, 5).long(), "case_id": "b"}
    out = collate([a, b])
    assert out["image"].shape == (2, 1, 7, 6, 7) and out["mask"].shape == (2, 1, 7, 6, 7)
    assert out["spatial_shape"].tolist() == [[5, 6, 7], [7, 6, 5]]
    assert float(out["image"][0, 0, 5:].abs().sum()) == 0.0


def test_nnunet_style_inputs(tmp_path):
    from medfuse.data.inputs import case_id_of, image_cases, is_image_folder
    from medfuse.errors import DataError

    for n in ("c1_0000.nii.gz", "c1_0001.nii.gz", "c2_0000.nii.gz"):
        (tmp_path / n).write_bytes(b"")
    assert case_id_of("x/BraTS_001_0000.nii.gz") == "BraTS_001" and case_id_of("a.nii") == "a"
    assert is_image_folder(tmp_path)
    cases = image_cases(sorted(tmp_path.iterdir()), ["t1", "t2"])
    assert [c.case_id for c in cases] == ["c1", "c2"] and set(cases[0].images) == {"t1", "t2"}
    assert set(cases[1].images) == {"t1"}
    with pytest.raises(DataError, match="channel 0001"):
        image_cases(sorted(tmp_path.iterdir()), ["t1"])
