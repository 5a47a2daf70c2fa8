"""ct_encoder data: CT-RATE layout, CoT parsing, masks per volume, HU conversion applied exactly once."""

from __future__ import annotations

import csv
import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from medfuse.config import validate
from medfuse.errors import ConfigError, DataError
from medfuse.families.ct_encoder.cot import RegionVocab, cot_steps, region_sentences
from medfuse.families.ct_encoder.data import CTEncoderDataModule, predict_cases, read_ctrate
from medfuse.families.ct_encoder.demo import make_ct_encoder_demo
from medfuse.families.ct_encoder.params import CTEncoderDataParams
from medfuse.families.ct_encoder.transforms import case_item, ct_transforms

SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctrate")
    make_ct_encoder_demo(root, n_patients=8, seed=1, shape=SHAPE)
    return root


def _cfg(root, tmp_path, **params):
    return validate({
        "name": "ct", "family": "ct_encoder", "task": "contrastive", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "batch_size": 2, "split": {"val": 0.25, "test": 0.25},
                 "transforms": {"spatial_size": list(SHAPE), "intensity": {"ct": {"kind": "none"}}},
                 "params": {"hu": "metadata", **params}},
        "model": {"name": "ct_encoder", "params": {"num_regions": 9}},
    })


def _copy(root, dst):
    import shutil

    shutil.copytree(root, dst)
    return dst


def test_reads_ctrate_layout_with_cot_labels_and_masks(demo_root):
    table, vocab, abn = read_ctrate(demo_root, CTEncoderDataParams(hu="metadata"))
    assert len(table.cases) == 8 and table.modalities == ["ct"]
    c = table.cases[0]
    assert c.case_id == "train_1_a_1" and c.patient_id == "train_1"
    assert c.images["ct"].endswith("train/train_1/train_1_a/train_1_a_1.nii.gz") and c.mask.endswith("masks/train_1_a_1.nii.gz")
    assert c.extra["hu"] == [1.0, -1024.0]
    assert abn[0] == "Right upper lobe nodule" and len(c.extra["labels"]) == len(abn) == 8
    rows = {r["VolumeName"]: r for r in csv.DictReader((demo_root / "reports.csv").open(encoding="utf-8"))}
    assert c.text == rows["train_1_a_1.nii.gz"]["Impressions_EN"]
    # one sentence per region, matched by name
    assert [r for r, _ in c.extra["region_text"]] == list(range(1, 10))
    assert all(vocab.names[r].split()[0] in t.lower() for r, t in c.extra["region_text"])
    # every CoT step resolves its mask_region; the last one is the "lungs" group
    steps = c.extra["steps"]
    assert steps and all(ids for _, ids in steps) and steps[-1][1] == [1, 2, 3, 4, 5]


def test_region_vocab_matching():
    vocab = RegionVocab({1: "right upper lobe", 2: "right lower lobe", 3: "liver"}, {"right lung": [1, 2]})
    assert vocab.mentions("Nodule in the right lower lobe; liver normal.") == [2, 3]
    assert vocab.mentions("right lung effusion") == [1, 2]
    assert vocab.mentions("right lung effusion", groups=False) == []
    assert vocab.resolve("Right Lung") == [1, 2] and vocab.resolve("lobe") == [1, 2] and vocab.resolve(None) == []
    assert region_sentences("Right upper lobe: nodule. Right upper lobe and liver: ok. Liver: cyst.", vocab) == \
        [[1, "Right upper lobe: nodule."], [3, "Liver: cyst."]]
    rec = {"answer": "The right upper lobe has a nodule. No effusion."}
    assert cot_steps(rec, vocab) == [["The right upper lobe has a nodule.", [1]], ["No effusion.", []]]
    rec = {"cot_reasoning": [{"step": 2, "text": "b", "mask_region": "liver"},
                             {"step": 1, "text": "a", "anatomical_entities": ["right upper lobe"]}]}
    assert cot_steps(rec, vocab) == [["a", [1]], ["b", [3]]]


def test_hu_conversion_is_applied_once(demo_root, tmp_path):
    dm = CTEncoderDataModule(_cfg(demo_root, tmp_path), tmp_path / "run")
    item = dm.dataset("train")[0]
    cid = item["case_id"]
    stored = nib.load(str(next((demo_root / "train").rglob(f"{cid}.nii.gz")))).get_fdata()  # raw, (x, y, z)
    hu = item["image"][0].numpy()  # (D, H, W) after "none" intensity
    np.testing.assert_allclose(hu, stored.transpose(2, 1, 0) - 1024.0, atol=1e-3)
    assert item["mask"].shape == (1, *SHAPE) and int(item["mask"].max()) <= 9
    assert isinstance(item["text"], str) and item["region_text"] and item["steps"]
    # hu=none reads the stored values as they are (what CT-RATE v2 files need; the demo volumes are stored
    # values, which the air check refuses under hu=none, so it is switched off here)
    dm2 = CTEncoderDataModule(_cfg(demo_root, tmp_path, hu="none", hu_check=False), None)
    np.testing.assert_allclose(dm2.dataset("train")[0]["image"][0].numpy() - 1024.0,
                               dm.dataset("train")[0]["image"][0].numpy(), atol=1e-3)


def test_double_rescale_is_refused(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path / "v2")
    for f in (root / "train").rglob("*.nii.gz"):  # convert to HU (CT-RATE v2) but keep the v1 metadata
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) - 1024).astype(np.int16), img.affine), str(f))
    dm = CTEncoderDataModule(_cfg(root, tmp_path), None)
    with pytest.raises(DataError, match="far below air"):
        dm.dataset("train")[0]
    # a header that rescales to HU itself, plus the CSV's slope/intercept: refused before any shift
    root = _copy(demo_root, tmp_path / "header")
    f = next((root / "train").rglob("*.nii.gz"))
    _set_header_scaling(f, 1.0, -1024.0)
    assert (nib.load(str(f)).dataobj.slope, nib.load(str(f)).dataobj.inter) == (1.0, -1024.0)
    cfg = _cfg(root, tmp_path)
    dm = CTEncoderDataModule(cfg, None)
    case = next(c for c in dm.table.cases if c.images["ct"] == str(f))
    with pytest.raises(DataError, match="header already rescales"):
        ct_transforms(cfg, train=False)(case_item(case))


def _set_header_scaling(path, slope, inter):
    """Write scl_slope/scl_inter into a .nii.gz (nibabel resets them when saving an in-memory array)."""
    import gzip
    import struct

    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:120] = struct.pack("<ff", slope, inter)  # NIfTI-1 header offsets of scl_slope, scl_inter
    path.write_bytes(gzip.compress(bytes(raw)))


def test_patients_stay_in_one_split_and_reconstructions(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path / "recon")
    rows = list(csv.DictReader((root / "reports.csv").open(encoding="utf-8")))
    src = next((root / "train").rglob("train_2_a_1.nii.gz"))
    for name in ("train_2_a_2", "train_2_b_1"):  # another reconstruction and another scan of patient 2
        (src.parent / f"{name}.nii.gz").write_bytes(src.read_bytes())
        (root / "masks" / f"{name}.nii.gz").write_bytes((root / "masks" / "train_2_a_1.nii.gz").read_bytes())
        rows.append({**rows[1], "VolumeName": f"{name}.nii.gz",
                     "Impressions_EN": rows[1]["Impressions_EN"] + (" b" if "b" in name else "")})
    with (root / "reports.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = list(csv.DictReader((root / "metadata.csv").open(encoding="utf-8")))
    meta += [{**meta[1], "VolumeName": n} for n in ("train_2_a_2.nii.gz", "train_2_b_1.nii.gz")]
    with (root / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta[0]))
        w.writeheader()
        w.writerows(meta)
    dm = CTEncoderDataModule(_cfg(root, tmp_path), tmp_path / "run")
    ids = {c.case_id: c for c in dm.table.cases}
    assert "train_2_a_2" not in ids and "train_2_b_1" in ids  # first reconstruction per scan only
    assert ids["train_2_b_1"].split == ids["train_2_a_1"].split
    dm_all = CTEncoderDataModule(_cfg(root, tmp_path, reconstructions="all"), None)
    assert "train_2_a_2" in {c.case_id for c in dm_all.table.cases}
    # the saved split is reused
    again = CTEncoderDataModule(_cfg(root, tmp_path), tmp_path / "run")
    assert {c.case_id: c.split for c in again.table.cases} == {k: c.split for k, c in ids.items()}


def test_user_errors(demo_root, tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"^data\.params\.masks_dir: unknown key"):
        CTEncoderDataModule(_cfg(demo_root, tmp_path, masks_dir="x"), None)
    with pytest.raises(ConfigError, match=r"^data\.params\.hu: "):
        CTEncoderDataModule(_cfg(demo_root, tmp_path, hu="twice"), None)
    with pytest.raises(ConfigError, match=r"^data\.params\.hu_slope: "):
        CTEncoderDataModule(_cfg(demo_root, tmp_path, hu="fixed", hu_slope="steep"), None)
    cfg = _cfg(demo_root, tmp_path).model_copy(deep=True)
    cfg.model.params["num_regions"] = 5
    with pytest.raises(ConfigError, match="num_regions"):
        CTEncoderDataModule(cfg, None)
    raw = _cfg(demo_root, tmp_path).model_dump()
    raw["data"]["transforms"]["spatial_size"] = None
    with pytest.raises(ConfigError, match="spatial_size"):
        CTEncoderDataModule(validate(raw), None)
    root = _copy(demo_root, tmp_path / "nomask")
    (root / "masks" / "train_3_a_1.nii.gz").unlink()
    with pytest.raises(DataError, match="no region mask"):
        CTEncoderDataModule(_cfg(root, tmp_path), None)
    with pytest.raises(DataError, match="reports CSV not found"):
        CTEncoderDataModule(_cfg(demo_root, tmp_path, reports="nope.csv"), None)
    root = _copy(demo_root, tmp_path / "partial")
    next((root / "train").rglob("train_4_a_1.nii.gz")).unlink()
    with warnings.catch_warnings(record=True) as w, caplog.at_level("WARNING", logger="medfuse"):
        warnings.simplefilter("always")
        dm = CTEncoderDataModule(_cfg(root, tmp_path), None)
    # one clean log line (it was a Python warning, printed with a source line of data.py)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(dm.table.cases) == 7 and len(skipped) == 1 and "\n" not in skipped[0]
    assert not any("skipped" in str(x.message) for x in w)


def test_cot_jsonl_and_region_names_from_params(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path / "jsonl")
    records = json.loads((root / "cot.json").read_text(encoding="utf-8"))
    (root / "cot.json").unlink()
    (root / "steps.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "regions.json").unlink()
    names = json.loads((demo_root / "regions.json").read_text(encoding="utf-8"))
    dm = CTEncoderDataModule(_cfg(root, tmp_path, cot="steps.jsonl", region_names=list(names["region_names"].values()),
                                  region_groups=names["region_groups"]), None)
    assert all(c.extra["steps"] for c in dm.table.cases)
    with pytest.raises(ConfigError, match="region names"):
        CTEncoderDataModule(_cfg(root, tmp_path), None)


def test_data_params_are_the_familys_and_predict_inputs(demo_root, tmp_path):
    from medfuse.engine.build import build_datamodule, data_params

    cfg = _cfg(demo_root, tmp_path)
    assert data_params(cfg) == CTEncoderDataParams(hu="metadata")
    dm = build_datamodule(cfg, None)  # the family's data module through the registry
    assert isinstance(dm, CTEncoderDataModule) and dm.params.hu == "metadata"
    # medfuse predict's inputs: a folder, or a VOLUME MASK pair (not with per-volume metadata)
    assert len(predict_cases([str(demo_root)], dm.params)) == 8
    vol, mask = str(next((demo_root / "train").rglob("train_1_a_1.nii.gz"))), str(demo_root / "masks" / "train_1_a_1.nii.gz")
    with pytest.raises(DataError, match="metadata"):
        predict_cases([vol, mask], dm.params)
    (case,) = predict_cases([vol, mask], CTEncoderDataParams(hu="fixed", hu_intercept=-1024.0))
    assert case.case_id == "train_1_a_1" and case.mask == mask and case.extra["hu"] == [1.0, -1024.0]
    with pytest.raises(DataError, match="VOLUME MASK"):
        predict_cases([vol], dm.params)
