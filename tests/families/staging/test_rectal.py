"""staging_rectal.yaml: a manifest replica of paired T2W + DWI (DWI on its own coarser grid), T-stage names
as labels; data check (with planted faults) and one CPU epoch with the tiny encoder in place of MedSAM2."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medfuse.data.checks import check_dataset
from medfuse.data.io import write_nifti

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "staging_rectal.yaml"
T2W_AFFINE = np.diag([0.7, 0.7, 3.0, 1.0])
DWI_AFFINE = np.diag([1.4, 1.4, 6.0, 1.0])


def make_rectal(root: Path, n_patients: int = 12, seed: int = 0) -> Path:
    """manifest.csv + images/<case>_{t2w,dwi}.nii.gz; the tumour's depth into the wall grows with the stage."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_patients):
        stage = i % 4
        t2w = rng.normal(100, 10, (8, 32, 32)).astype(np.float32)
        dwi = rng.normal(50, 5, (4, 16, 16)).astype(np.float32)
        t2w[2:6, 12:12 + 3 * (stage + 1), 12:20] += 80
        dwi[1:3, 6:6 + 2 * (stage + 1) // 2 + 1, 6:10] += 120
        for name, arr, aff in (("t2w", t2w, T2W_AFFINE), ("dwi", dwi, DWI_AFFINE)):
            write_nifti(arr[None], root / "images" / f"rec{i:03d}_{name}.nii.gz", affine=aff)
        rows.append({"case_id": f"rec{i:03d}", "patient_id": f"pat{i // 2 if i >= 8 else i}",
                     "image_t2w": f"images/rec{i:03d}_t2w.nii.gz", "image_dwi": f"images/rec{i:03d}_dwi.nii.gz",
                     "label": f"T{stage + 1}", "split": ""})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "dataset.yaml").write_text("resample_modalities: true  # DWI keeps its own grid\n")
    return root / "manifest.csv"


def test_check_passes_then_catches_planted_faults(tmp_path):
    manifest = make_rectal(tmp_path / "rectal")
    assert check_dataset(manifest) == []
    (tmp_path / "rectal" / "dataset.yaml").unlink()  # undeclared: every DWI grid is reported
    problems = check_dataset(manifest)
    assert len(problems) == 12 and {p.rule for p in problems} == {"grid"}
    (tmp_path / "rectal" / "dataset.yaml").write_text("resample_modalities: true\n")
    (tmp_path / "rectal" / "images" / "rec003_dwi.nii.gz").unlink()
    arr = np.full((1, 8, 32, 32), np.nan, np.float32)
    write_nifti(arr, tmp_path / "rectal" / "images" / "rec004_t2w.nii.gz", affine=T2W_AFFINE)
    rules = {(p.case_id, p.rule) for p in check_dataset(manifest)}
    assert ("rec003", "missing") in rules and ("rec004", "nonfinite") in rules


def test_config_trains_one_cpu_epoch_with_the_tiny_encoder(tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    manifest = make_rectal(tmp_path / "rectal")
    cfg = load_config(CONFIG, [
        f"data.root={manifest}", f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_epochs=1", "data.batch_size=4", "data.num_workers=0", "model.params.encoder=tiny",
        "model.params.encoder_params={out_channels: 16, hidden: [8, 16]}", "model.params.freeze_encoder=false",
        "model.params.encoder_preprocess=false", "model.params.dim=16", "model.params.token_pool=2",
        "model.params.slice_batch_size=64", "train.accelerator=cpu", "data.split.val=0.25", "data.split.test=0.25"])
    assert cfg.model.params["encoder"] == "tiny"
    run = fit(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    assert any(r.get("val/balanced_accuracy") not in (None, "") for r in rows)
    splits = {r["case_id"]: (r["patient_id"], r["split"]) for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    assert splits["rec008"][1] == splits["rec009"][1]  # one patient, one split


def test_shipped_config_names_medsam2_and_its_local_weights():
    from medfuse.config import load_config

    cfg = load_config(CONFIG)
    assert cfg.model.params["encoder"] == "medsam2" and cfg.model.params["freeze_encoder"] is True
    assert cfg.model.params["encoder_params"]["weights"].endswith(".pt")
    assert cfg.data.modalities == ["t2w", "dwi"] and cfg.data.class_names == ["T1", "T2", "T3", "T4"]
