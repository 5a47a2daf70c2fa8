"""BUS-BRA: a format replica (PIL PNGs, bus_data.csv with a BOM, 5-fold-cv.csv), data check and one CPU epoch."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medfuse.data.checks import check_dataset
from medfuse.data.layouts import load_cases

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "text_seg_busbra.yaml"


def make_busbra(root: Path, n_patients: int = 8, size: int = 64, seed: int = 0) -> Path:
    """BUS-BRA's tree: Images/bus_XXXX-s.png, Masks/mask_XXXX-s.png (0/255), bus_data.csv (BOM), 5-fold-cv.csv."""
    rng = np.random.default_rng(seed)
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rows, folds = [], []
    for p in range(n_patients):
        for side in ("l", "r") if p % 2 else ("s",):
            iid = f"bus_{p + 1:04d}-{side}"
            img = rng.integers(0, 120, size=(size, size), dtype=np.uint8)
            x, y, w, h = (int(v) for v in rng.integers(8, 24, size=4))
            img[y:y + h, x:x + w] = 220
            mask = np.zeros((size, size), np.uint8)
            mask[y:y + h, x:x + w] = 255
            Image.fromarray(img).save(root / "Images" / f"{iid}.png")
            Image.fromarray(mask).save(root / "Masks" / f"mask_{iid[4:]}.png")
            malignant = p % 3 == 0
            rows.append({"ID": iid, "Case": str(p + 1), "Histology": "Carcinoma" if malignant else "Fibroadenoma",
                         "Pathology": "malignant" if malignant else "benign", "BIRADS": "5" if malignant else "3",
                         "Device": "GE", "Side": {"l": "left", "r": "right", "s": "single"}[side],
                         "BBOX": f"[{x}, {y}, {w}, {h}]"})
            folds.append({"ID": iid, "kFold": str(p % 5 + 1), "Pathology": rows[-1]["Pathology"]})
    with (root / "bus_data.csv").open("w", newline="", encoding="utf-8-sig") as f:  # BOM, as the release
        writer = csv.DictWriter(f, fieldnames=[" ID", *list(rows[0])[1:]])  # a stray space in a header
        writer.writeheader()
        writer.writerows({(" ID" if k == "ID" else k): v for k, v in r.items()} for r in rows)
    with (root / "5-fold-cv.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(folds[0]))
        writer.writeheader()
        writer.writerows(folds)
    return root


def test_busbra_layout_is_detected_with_patients_text_fields_boxes_and_folds(tmp_path):
    root = make_busbra(tmp_path / "BUSBRA")
    table = load_cases(root)
    assert table.layout == "busbra" and table.modalities == ["us"] and table.mask_required
    c = next(c for c in table.cases if c.case_id == "bus_0002-l")
    assert c.patient_id == "2" and c.mask.endswith("Masks/mask_0002-l.png")
    assert c.extra["birads"] == "3" and c.extra["pathology"] == "benign" and c.extra["fold"] == "2"
    assert c.extra["box_x1"] - c.extra["box_x0"] + 1 > 0
    assert len({c.patient_id for c in table.cases}) == 8 and len(table.cases) == 12
    assert check_dataset(root) == []


def test_busbra_planted_faults_are_caught(tmp_path):
    root = make_busbra(tmp_path / "BUSBRA")
    (root / "Masks" / "mask_0001-s.png").unlink()
    (root / "Images" / "bus_0003-s.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "Masks" / "mask_0005-s.png")
    rules = {(p.case_id, p.rule) for p in check_dataset(root)}
    assert ("bus_0001-s", "missing") in rules and ("bus_0003-s", "unreadable") in rules
    assert ("bus_0005-s", "label") in rules


def test_busbra_config_trains_one_cpu_epoch(tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    root = make_busbra(tmp_path / "BUSBRA", n_patients=10)
    cfg = load_config(CONFIG, [
        f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "train.max_epochs=1", "data.batch_size=2",
        "data.num_workers=0", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "data.split.val=0.2", "data.split.test=0.2",
        "train.accelerator=cpu"])
    run = fit(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    dice = [float(r["val/dice"]) for r in rows if r.get("val/dice") not in (None, "")]
    assert dice and 0.0 <= dice[-1] <= 1.0
