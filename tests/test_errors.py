"""One-line user errors, also when re-raised from a DataLoader worker."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medfuse.errors import DataError


def test_one_line_format():
    e = DataError("a/b.nii.gz", "file not found.", "check the path")
    assert e.one_line() == "a/b.nii.gz: file not found. Fix: check the path"


class _Bad(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DataError("x/case1.nii.gz", "cannot read NIfTI", "re-export the file")


def test_worker_reraise_keeps_one_line():
    loader = DataLoader(_Bad(), num_workers=1, batch_size=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert e.value.one_line() == "x/case1.nii.gz: cannot read NIfTI. Fix: re-export the file"
    assert torch.utils.data.get_worker_info() is None
