"""incomplete_seg data: the brain phantom (determinism, BraTS layout, which modality shows which
sub-region), region label mapping (BraTS classic / 2023+ / MSD / nnU-Net regions), canonical
masks in the data module, and the modality subsets ``medfuse predict`` reads from file names."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medfuse.config import validate
from medfuse.data.layouts import CaseTable, load_cases
from medfuse.errors import ConfigError, DataError
from medfuse.families.incomplete_seg.data import (
    REGION_PRESETS,
    canonical_labels,
    canonical_to_raw,
    modality_of,
    resolve_predict_inputs,
    resolve_regions,
)
from medfuse.families.incomplete_seg.demo import LABELS, MODALITIES, make_incomplete_seg_demo, render_case

SHAPE = (16, 20, 20)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_incomplete_seg_demo(tmp_path_factory.mktemp("inc") / "data", n_patients=8, shape=SHAPE)


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)


def test_writes_brats_case_folders_that_load_with_classic_labels(phantom):
    table = load_cases(phantom)
    assert table.layout == "brats" and table.modalities == list(MODALITIES) and len(table) == 8
    assert table.mask_labels["enhancing_tumor"] == 4
    seg = _read(phantom / "Phantom_0000" / "Phantom_0000_seg.nii.gz")
    assert seg.shape == SHAPE and set(np.unique(seg)) <= {0, 1, 2, 4}
    assert resolve_regions("auto", table) == REGION_PRESETS["brats"]


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path, phantom):
    other = make_incomplete_seg_demo(tmp_path / "again", n_patients=2, shape=SHAPE, seed=0)
    for key in ("t1ce", "seg"):
        a = _read(phantom / "Phantom_0001" / f"Phantom_0001_{key}.nii.gz")
        np.testing.assert_array_equal(a, _read(other / "Phantom_0001" / f"Phantom_0001_{key}.nii.gz"))
    third = make_incomplete_seg_demo(tmp_path / "seed1", n_patients=2, shape=SHAPE, seed=1)
    assert not np.array_equal(_read(third / "Phantom_0001" / "Phantom_0001_seg.nii.gz"),
                              _read(phantom / "Phantom_0001" / "Phantom_0001_seg.nii.gz"))
    with pytest.raises(ValueError):
        make_incomplete_seg_demo(tmp_path / "bad", n_patients=1, shape=(8, 32, 32))


def _region_means(n=12):
    """Per modality, mean intensity (scaled by the brain's 99th percentile) of ED, ET, NCR and normal brain."""
    acc = {m: {k: [] for k in ("ed", "et", "ncr", "normal")} for m in MODALITIES}
    for i in range(n):
        v = render_case(np.random.default_rng([7, i]), (32, 32, 32))
        seg = v["seg"]
        core = {"ed": seg == LABELS["edema"], "et": seg == LABELS["enhancing_tumor"],
                "ncr": seg == LABELS["necrotic_core"]}
        # normal tissue next to the oedema (dilated ring), where the oedema replaces the same tissue
        from scipy import ndimage

        wt = seg > 0
        core["normal"] = ndimage.binary_dilation(wt, iterations=2) & ~wt & (v["flair"] > 0)
        for m in MODALITIES:
            x = v[m] / np.percentile(v[m][v[m] > 0], 99)
            for k, where in core.items():
                if where.sum() > 5:
                    acc[m][k].append(float(x[where].mean()))
    return {m: {k: float(np.mean(vals)) for k, vals in d.items()} for m, d in acc.items()}


def test_each_sub_region_shows_only_in_its_modalities():
    r = _region_means()
    # oedema: bright in FLAIR and T2, invisible in T1ce
    assert r["flair"]["ed"] > r["flair"]["normal"] + 0.2
    assert r["t2"]["ed"] > r["t2"]["normal"] + 0.2
    assert abs(r["t1ce"]["ed"] - r["t1ce"]["normal"]) < 0.1
    # enhancing rim: bright only in T1ce; elsewhere it looks like the core or the oedema
    assert r["t1ce"]["et"] > r["t1ce"]["normal"] + 0.1 and r["t1ce"]["et"] > r["t1ce"]["ncr"] + 0.4
    assert abs(r["flair"]["et"] - r["flair"]["ncr"]) < 0.1
    assert abs(r["t2"]["et"] - r["t2"]["ed"]) < 0.1
    # necrotic core: dark in T1ce (and T1)
    assert r["t1ce"]["ncr"] < r["t1ce"]["normal"] - 0.3 and r["t1"]["ncr"] < r["t1"]["normal"] - 0.3


def _table(labels, layout="manifest", source=None):
    return CaseTable(root=None, layout=layout, modalities=["a"], cases=[], mask_labels=labels, source=source)


def test_region_presets_and_auto_detection():
    brats23 = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}
    assert resolve_regions("auto", _table(brats23)) == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    msd = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert resolve_regions("auto", _table(msd, "msd")) == REGION_PRESETS["msd"]
    assert resolve_regions("brats2023", _table(None))["ET"] == [3]
    assert resolve_regions({"outer": [1, 2], "inner": [2]}, _table(None)) == {"outer": [1, 2], "inner": [2]}
    with pytest.raises(ConfigError, match="not strictly inside"):
        resolve_regions({"a": [1], "b": [2]}, _table(None))
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_regions("brats2030", _table(None))
    with pytest.raises(ConfigError, match="cannot infer"):
        resolve_regions("auto", _table({"background": 0, "liver": 1}))


def test_nnunet_region_based_labels(tmp_path):
    ds = tmp_path / "Dataset001_BrainTumour"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "enhancing tumor": [3], "whole tumor": [1, 2, 3], "tumor core": [2, 3]},
        "numTraining": 0, "regions_class_order": [1, 2, 3]}))
    table = load_cases(ds)
    assert resolve_regions("auto", table) == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def test_canonical_labels_and_back():
    raw = torch.tensor([[0, 2, 1, 4, 4]])
    regions = REGION_PRESETS["brats"]
    canon = canonical_labels(raw, regions)
    assert canon.tolist() == [[0, 1, 2, 3, 3]]
    back = canonical_to_raw(regions)
    assert [back[int(c)] for c in canon[0]] == raw[0].tolist()
    with pytest.raises(DataError, match="label value"):
        canonical_labels(torch.tensor([0, 3]), regions)
    assert canonical_to_raw({"WT": [1, 2, 3], "ET": [3]}) is None  # WT not ET merges 1 and 2


def test_data_module_gives_canonical_masks(phantom, tmp_path):
    from medfuse.engine.build import build_datamodule
    from medfuse.families.incomplete_seg.data import IncompleteSegDataModule

    cfg = validate({"name": "d", "family": "incomplete_seg", "task": "segmentation", "output_dir": str(tmp_path),
                    "model": {"name": "incomplete_seg"},
                    "data": {"root": str(phantom), "layout": "brats", "batch_size": 2,
                             "split": {"val": 0.25, "test": 0.25}, "params": {"regions": "auto"}}})
    dm = build_datamodule(cfg, tmp_path)
    assert isinstance(dm, IncompleteSegDataModule)
    assert dm.region_names == ["WT", "TC", "ET"] and len(dm.table.mask_labels) == 4
    item = dm.dataset("train")[0]
    raw = torch.from_numpy(_read(phantom / item["case_id"] / f"{item['case_id']}_seg.nii.gz").astype(np.int64))
    expected = sum(torch.isin(raw, torch.tensor(v)).long() for v in REGION_PRESETS["brats"].values())
    assert torch.equal(item["mask"][0], expected)
    batch = next(iter(dm.train_dataloader()))
    assert int(batch["mask"].max()) <= 3 and batch["present"].shape == (2, 4)
    bad = validate({**cfg.model_dump(), "data": {**cfg.data.model_dump(), "params": {"region": "auto"}}})
    with pytest.raises(ConfigError, match="data.params.region"):
        build_datamodule(bad, tmp_path / "bad")
    with pytest.raises(ConfigError, match="data.params.region"):  # the data module checks on its own too
        IncompleteSegDataModule(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before any data was read or split


def test_predict_inputs_read_the_subset_from_the_files(phantom, tmp_path):
    mods = list(MODALITIES)
    case = tmp_path / "case9"
    case.mkdir()
    for name in ("case9_flair.nii.gz", "case9-t1c.nii.gz", "case9_seg.nii.gz", "notes.txt"):
        (case / name).write_bytes(b"x")
    cid, files = resolve_predict_inputs([str(case)], None, mods)
    assert cid == "case9" and sorted(files) == ["flair", "t1ce"]
    src = phantom / "Phantom_0000"
    cid, files = resolve_predict_inputs([str(src / "Phantom_0000_t2.nii.gz")], None, mods)
    assert cid == "Phantom_0000" and list(files) == ["t2"]
    cid, files = resolve_predict_inputs([str(src / "Phantom_0000_t1.nii.gz")], ["t1"], mods)
    assert list(files) == ["t1"]  # --modalities agreeing with the name
    with pytest.raises(DataError, match="name says 't1' but --modalities gives it as 't1ce'"):
        resolve_predict_inputs([str(src / "Phantom_0000_t1.nii.gz")], ["t1ce"], mods)  # contradicting it
    assert modality_of("x_T1CE.nii.gz", mods) == "t1ce" and modality_of("x_t1.nii.gz", mods) == "t1"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty modality set"):
        resolve_predict_inputs([str(empty)], None, mods)
    with pytest.raises(DataError, match="empty modality set"):
        resolve_predict_inputs([], None, mods)
    with pytest.raises(DataError, match="does not say which modality"):
        resolve_predict_inputs([str(case / "notes.txt")], None, mods)
    with pytest.raises(DataError, match="given twice"):
        resolve_predict_inputs([str(src / "Phantom_0000_t1.nii.gz")] * 2, None, mods)
    with pytest.raises(DataError, match="not a modality"):
        resolve_predict_inputs([str(src / "Phantom_0000_t1.nii.gz")], ["dwi"], mods)
