"""Shared fixtures: tiny on-disk datasets in the manifest layout."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Idle OpenMP threads sleep instead of spinning (as `make test` sets): on a loaded 2-core machine a
# bare `pytest` otherwise runs torch several times slower. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def write_manifest(root: Path, rows: list[dict], sidecar: dict) -> Path:
    """``root/manifest.csv`` from ``rows`` (the first row's keys are the columns) and the
    ``root/dataset.json`` sidecar; returns the manifest."""
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "dataset.json").write_text(json.dumps(sidecar))
    return root / "manifest.csv"


def write_cls_dataset(root: Path, n_patients: int = 24, shape=(6, 16, 16), seed: int = 0, classes: int = 2) -> Path:
    """A separable 2-modality classification set: class k brightens a blob in modality 'b'."""
    from medfuse.data.io import write_nifti

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_patients):
        y = i % classes
        cid = f"case{i:03d}"
        a = rng.normal(100, 10, shape).astype(np.float32)
        b = rng.normal(50, 10, shape).astype(np.float32)
        d, h, w = shape
        b[:, h // 4: h // 2, w // 4: w // 2] += 40.0 * y
        for mod, arr in (("a", a), ("b", b)):
            write_nifti(arr[None], root / "images" / f"{cid}_{mod}.nii.gz", affine=AFFINE)
        rows.append({"case_id": cid, "patient_id": f"p{i:03d}", "image_a": f"images/{cid}_a.nii.gz",
                     "image_b": f"images/{cid}_b.nii.gz", "label": y})
    return write_manifest(root, rows, {"modalities": ["a", "b"], "class_names": [f"c{k}" for k in range(classes)]})


def write_seg_dataset(root: Path, n_cases: int = 16, shape=(8, 16, 16), seed: int = 0) -> Path:
    """A one-modality ('mr') segmentation set: a bright box per case at a random place, labels 0/1
    declared as background/lesion; returns the folder (manifest.csv + dataset.json)."""
    from medfuse.data.io import write_nifti

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cases):
        img = rng.normal(0, 0.3, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        z, y, x = rng.integers(1, 4), rng.integers(2, 9), rng.integers(2, 9)
        mask[z: z + 4, y: y + 6, x: x + 6] = 1
        img[mask > 0] += 2.0
        write_nifti(img[None], root / "images" / f"c{i}.nii.gz", affine=AFFINE)
        write_nifti(mask[None], root / "images" / f"c{i}_seg.nii.gz", affine=AFFINE)
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i}", "image_mr": f"images/c{i}.nii.gz",
                     "mask": f"images/c{i}_seg.nii.gz"})
    write_manifest(root, rows, {"modalities": ["mr"], "mask_labels": {"background": 0, "lesion": 1}})
    return root


@pytest.fixture(scope="session")
def cls_dataset(tmp_path_factory) -> Path:
    return write_cls_dataset(tmp_path_factory.mktemp("cls"))


def tiny_cls_config(root: Path, out: Path, name: str = "t", **over) -> dict:
    cfg = {
        "name": name, "task": "classification", "output_dir": str(out),
        "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.25, "test": 0.25, "seed": 0},
                 "transforms": {"orientation": "RAS", "intensity": {"*": {"kind": "zscore"}},
                                "augment": {"flip_prob": 0.5, "noise_prob": 0.5, "noise_std": 0.05}}},
        "model": {"name": "baseline_cnn3d", "params": {"widths": [4, 8], "dropout": 0.2}},
        "train": {"max_epochs": 4, "lr": 0.01, "monitor": "val/balanced_accuracy", "mode": "max",
                  "progress_bar": False, "log_every_n_steps": 1},
        "eval": {"n_boot": 50},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        cfg[sec][key] = v
    return cfg


class ForwardCounter:
    """Counts forward passes of the model that ``medfuse.engine.evaluate.load_trained`` returns.

    A pass is a call of ``model(...)`` or of ``model.forward_intermediates(...)`` made from outside
    the model's own forward (a forward that delegates to forward_intermediates counts once).
    """

    def __init__(self):
        self.calls = 0
        self.batches: list[int] = []  # batch size of each pass
        self._inside = 0

    def _count(self, args):
        self.calls += 1
        x = args[0] if args else None
        self.batches.append(int(x.shape[0]) if hasattr(x, "shape") else -1)

    def attach(self, model):
        def pre(module, args):
            if not self._inside:
                self._count(args)
            self._inside += 1

        def post(module, args, out):
            self._inside -= 1

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        inner = getattr(model, "forward_intermediates", None)
        if inner is not None:
            def wrapped(*args, **kwargs):
                if not self._inside:
                    self._count(args)
                self._inside += 1
                try:
                    return inner(*args, **kwargs)
                finally:
                    self._inside -= 1

            model.forward_intermediates = wrapped


@pytest.fixture
def count_forwards(monkeypatch):
    """A :class:`ForwardCounter` attached to every model loaded by evaluate/predict in the test."""
    import medfuse.engine.evaluate as ev

    counter = ForwardCounter()
    original = ev.load_trained

    def patched(*args, **kwargs):
        cfg, dm, task = original(*args, **kwargs)
        counter.attach(task.model)
        return cfg, dm, task

    monkeypatch.setattr(ev, "load_trained", patched)
    return counter


import medfuse.families  # noqa: E402,F401  (registers the families, as the CLI does)
