"""text_seg reads in its own DataLoader workers: the ``data.dicom`` options in force when the dataset
is built travel with it, so a spawned worker (a fresh context) reads a gapped series as configured."""

from __future__ import annotations

import contextvars
import pickle
import sys
from pathlib import Path

import pytest

from medfuse.config import validate_params
from medfuse.data.dicom import use_dicom_options
from medfuse.errors import DataError
from medfuse.families.text_seg.data import Record, TextSegDataset
from medfuse.families.text_seg.params import TextSegDataParams
from medfuse.families.text_seg.pixels import VOLUMES

sys.path.insert(0, str(Path(__file__).parents[2] / "data"))
from test_dicom import write_series  # noqa: E402 - the DICOM series writer of tests/data


def test_dataset_reads_a_gapped_series_with_its_own_options_in_a_fresh_context(tmp_path):
    write_series(tmp_path / "ct", [0.0, 3.0, 9.0, 12.0])  # the 6 mm slice is missing
    rec = Record("p1_s2", str(tmp_path / "ct"), None, {"text": "a nodule"}, box=(10, 10, 40, 40), slice_index=2)
    params = validate_params(TextSegDataParams, {"image_size": 32, "cache_in_memory": False}, "data.params")
    VOLUMES.clear()
    with pytest.raises(DataError, match="missing 1 slice"):  # the defaults refuse the gap
        TextSegDataset([rec], params, need_mask=False)[0]
    with use_dicom_options({"on_gap": "resample"}):
        ds = TextSegDataset([rec], params, need_mask=False)
    VOLUMES.clear()
    worker = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    item = contextvars.Context().run(lambda: worker[0])  # a context at the defaults, as in a new process
    assert item["image"].shape == (3, 32, 32)
