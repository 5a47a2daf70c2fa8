"""``data.dicom`` reaches DataLoader workers started with ``spawn`` (macOS and Windows default).

The options used to live only in a ContextVar of the main process: a forked worker inherited it,
a spawned one started at the defaults, so a series with a missing slice that the config asked to
resample was refused in the worker (and a cached entry would have been keyed on other options).
"""

from __future__ import annotations

import contextvars
import csv
import json
import pickle
from pathlib import Path

import pytest
import torch
from test_dicom import write_series  # tests/data is on sys.path (pytest prepend mode)
from torch.utils.data import DataLoader

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.data import cache
from medfuse.data.datamodule import CaseDataModule, collate
from medfuse.data.dicom import current_options, use_dicom_options


def dicom_cls_manifest(root: Path, write, modality: str, n: int = 4) -> Path:
    """A classification manifest of ``n`` one-modality cases, each a DICOM series folder made by
    ``write(folder)``; labels alternate 0/1."""
    rows = []
    for i in range(n):
        write(root / f"c{i}")
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i}", f"image_{modality}": f"c{i}", "label": i % 2})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "dataset.json").write_text(json.dumps({"modalities": [modality], "class_names": ["c0", "c1"]}))
    return root / "manifest.csv"


def _gap_dataset(root: Path, n: int = 4) -> Path:
    """``n`` one-modality cases, each a DICOM series (128 x 128, 4 slices) whose 6 mm slice is missing."""
    return dicom_cls_manifest(root, lambda folder: write_series(folder, [0.0, 3.0, 9.0, 12.0]), "ct", n)


def _data_module(tmp_path: Path, cached: bool) -> CaseDataModule:
    """A classification data module over :func:`_gap_dataset` with ``data.dicom.on_gap: resample``;
    the options it sets while loading stay inside this function."""
    over = {"data__dicom": {"on_gap": "resample"}, "data__num_workers": 1,
            "data__cache_dir": str(tmp_path / "cache") if cached else None}
    cfg = validate(tiny_cls_config(_gap_dataset(tmp_path / "data"), tmp_path, name="r", **over))
    with use_dicom_options(None):
        dm = CaseDataModule(cfg, tmp_path / "r")
        dm.dataset("val")
    assert current_options().on_gap == "error"  # this process no longer holds data.dicom
    return dm


def test_spawned_worker_keys_and_reads_dicom_with_the_configs_options(tmp_path):
    """One real spawned worker (the slow part: a fresh interpreter imports torch and MONAI)."""
    dm = _data_module(tmp_path, cached=True)
    ds, loader = dm.dataset("val"), dm.loader("val")
    spawned = DataLoader(ds, batch_size=1, sampler=loader.sampler, num_workers=1, collate_fn=collate,
                         multiprocessing_context="spawn")
    (batch,) = list(spawned)
    assert batch["image"].shape == (1, 1, 5, 128, 128)  # 0..12 mm at 3 mm: the resampled grid
    with use_dicom_options(dm.cfg.data.dicom):  # the worker keyed its entry on data.dicom, as this process does
        key = cache.file_state_hash(ds.base.data[0]).decode() + ds.base.transform_hash
    assert [p.name for p in (tmp_path / "cache").glob("*.pt")] == [f"{key}.pt"]
    torch.testing.assert_close(batch["image"][0], ds[0]["image"])  # as read in this process


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "disk_cache"])
def test_dataset_carries_dicom_options_into_a_fresh_context(tmp_path, cached):
    """What a spawned worker gets, without starting one: the pickled dataset, read where every
    ContextVar is at its default (an empty ``contextvars.Context``)."""
    ds = pickle.loads(pickle.dumps(_data_module(tmp_path, cached).dataset("val")))
    out = contextvars.Context().run(lambda: ds[(0, 7)])
    assert out["image"].shape == (1, 5, 128, 128)
