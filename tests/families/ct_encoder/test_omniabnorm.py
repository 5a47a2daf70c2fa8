"""OmniAbnorm-CT: a replica of its records (JPEG centre + context slices, one JPEG mask per finding, a
JSON dict keyed by sample id), thin slabs for the encoder, data check with planted faults, one CPU epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medfuse.data.checks import check_dataset
from medfuse.data.layouts import load_cases

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "ct_encoder_omniabnorm.yaml"
SIDE = 32


def make_omniabnorm(root: Path, n_scans: int = 8, slices_per_scan: int = 2, seed: int = 0) -> Path:
    """``root/records.json`` + ``root/images/<scan>/<slice>/{-1,0,1}.jpeg`` + ``root/masks/<scan>/<slice>/<id>.jpeg``."""
    rng = np.random.default_rng(seed)
    records = {}
    for s in range(n_scans):
        for k in range(slices_per_scan):
            sid = f"scan{s:02d}_slice{k}"
            img_dir, mask_dir = root / "images" / f"scan{s:02d}" / f"{k}", root / "masks" / f"scan{s:02d}" / f"{k}"
            img_dir.mkdir(parents=True)
            base = rng.integers(40, 90, (SIDE, SIDE)).astype(np.uint8)
            abn = []
            if (s + k) % 3:  # two of three slices hold findings; 1 or 2 groups
                for g in range(1 + (s % 2)):
                    y, x = rng.integers(2, SIDE - 10, 2)
                    m = np.zeros((SIDE, SIDE), np.uint8)
                    m[y:y + 8, x:x + 8] = 255
                    base[m > 0] = 200 if g == 0 else 20
                    fid = f"{sid}_f{g}"
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(m).save(mask_dir / f"{fid}.jpeg", quality=95)
                    label = ("liver lesion", "pleural effusion")[g]
                    abn.append({"id": fid, "group_id": g, "label": label, "category": "abnormal",
                                "description": f"A {('bright', 'dark')[g]} {label} in slice {k}."})
            for off in (-1, 0, 1):
                Image.fromarray(np.clip(base.astype(int) + 3 * off, 0, 255).astype(np.uint8)).save(
                    img_dir / f"{off}.jpeg", quality=95)
            records[sid] = {"image": f"images/scan{s:02d}/{k}", "context": [-1, 1],
                            "mask": f"masks/scan{s:02d}/{k}", **({"abnormality": abn} if abn else {})}
    (root / "records.json").write_text(json.dumps(records))
    return root


def test_layout_reads_records_as_slabs_with_the_scan_as_patient(tmp_path):
    from medfuse.data.io import read_image

    root = make_omniabnorm(tmp_path / "omni")
    table = load_cases(root)
    assert table.layout == "omniabnorm" and len(table) == 16
    c = next(c for c in table.cases if c.case_id == "scan01_slice0")
    assert c.patient_id == "scan01" and c.text == "A bright liver lesion in slice 0. A dark pleural effusion in slice 0."
    slab = read_image(c.images["ct"])
    assert slab.shape == (1, 3, SIDE, SIDE) and slab.meta["offsets"] == [-1, 0, 1] and slab.meta["centre"] == 1
    assert check_dataset(root) == []


def test_findings_become_regions_steps_and_lesions(tmp_path):
    from medfuse.data.layouts.omniabnorm import omni_region_map
    from medfuse.families.ct_encoder.data import read_omniabnorm
    from medfuse.families.ct_encoder.params import CTEncoderDataParams

    root = make_omniabnorm(tmp_path / "omni")
    table, vocab, _ = read_omniabnorm(root, CTEncoderDataParams(source="omniabnorm", max_findings=8))
    c = next(c for c in table.cases if c.case_id == "scan01_slice0")
    assert c.extra["steps"] == [["A bright liver lesion in slice 0.", [1]], ["A dark pleural effusion in slice 0.", [2]]]
    assert c.extra["region_text"][1] == [2, "A dark pleural effusion in slice 0."] and c.extra["step_lesions"] == [1, 2]
    omni = c.extra["omni"]
    m = omni_region_map(omni["mask"], omni["groups"], (SIDE, SIDE), c.case_id)
    assert set(np.unique(m)) == {0, 1, 2} and (m == 1).sum() >= 40  # JPEG masks thresholded at 128
    assert len(vocab.names) == 8


def test_planted_faults_are_caught(tmp_path):
    root = make_omniabnorm(tmp_path / "omni", n_scans=4)
    (root / "images" / "scan00" / "1" / "-1.jpeg").unlink()  # a context slice lost
    next((root / "masks" / "scan01" / "0").glob("*.jpeg")).unlink()  # a finding mask lost
    (root / "images" / "scan02" / "0" / "0.jpeg").write_bytes(b"\xff\xd8 truncated")  # a corrupt centre slice
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(next((root / "masks" / "scan03" / "1").glob("*.jpeg")))
    rules = {(p.case_id, p.rule) for p in check_dataset(root)}
    assert rules == {("scan00_slice1", "missing"), ("scan01_slice0", "missing"), ("scan02_slice0", "unreadable"),
                     ("scan03_slice1", "grid")}


def test_config_trains_one_cpu_epoch(tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    root = make_omniabnorm(tmp_path / "omni", n_scans=10)
    cfg = load_config(CONFIG, [
        f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "train.max_epochs=1", "data.batch_size=4",
        "data.num_workers=0", "data.transforms.spacing=null", "data.transforms.spatial_size=[3,32,32]",
        "model.params.preset=tiny", "model.params.img_size=[3,32,32]", "model.params.patch_size=[1,8,8]",
        "model.params.mask_hidden=4", "model.params.embed_dim=16", "data.split.val=0.2", "data.split.test=0.2",
        "train.accelerator=cpu"])
    run = fit(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    assert any(r.get("val/mean_recall") not in (None, "") for r in rows)
    splits = {r["case_id"]: (r["patient_id"], r["split"]) for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    by_patient = {}
    for pid, split in splits.values():
        by_patient.setdefault(pid, set()).add(split)
    assert len(splits) == 20 and all(len(s) == 1 for s in by_patient.values())
