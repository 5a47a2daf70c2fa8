"""Layout detection and parsing: manifest (CSV/JSON), nnU-Net v2, MSD, BraTS (both namings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medfuse.data.io import write_nifti
from medfuse.data.layouts import CaseTable, load_cases, write_manifest
from medfuse.errors import DataError


def _vol(path: Path, channels: int = 1, value: float = 1.0) -> Path:
    write_nifti(np.full((channels, 8, 8, 8), value, dtype=np.float32), path)
    return path


def _make_manifest_dir(root: Path, fmt: str) -> Path:
    """Three cases, two patients, images in a sub-folder referenced by relative paths."""
    rows = []
    for i, (pid, label, split) in enumerate([("p1", "0", "train"), ("p1", "1", "train"), ("p2", "1", "")]):
        cid = f"c{i}"
        for m in ("t1", "t2"):
            _vol(root / "img" / f"{cid}_{m}.nii.gz")
        _vol(root / "seg" / f"{cid}.nii.gz", value=0)
        rows.append({
            "case_id": cid, "patient_id": pid, "image_t1": f"img/{cid}_t1.nii.gz",
            "image_t2": f"img/{cid}_t2.nii.gz", "mask": f"seg/{cid}.nii.gz", "label": label,
            "text": f"report {i}", "split": split, "site": f"s{i}",
        })  # fmt: skip
    if fmt == "csv":
        path = root / "manifest.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path = root / "manifest.json"
        for r in rows:
            r["label"] = int(r["label"])
        path.write_text(json.dumps({"cases": rows, "class_names": ["benign", "malignant"]}))
    return path


@pytest.mark.parametrize("fmt", ["csv", "json"])
@pytest.mark.parametrize("point_at", ["folder", "file"])
def test_manifest(tmp_path, fmt, point_at):
    path = _make_manifest_dir(tmp_path, fmt)
    table = load_cases(tmp_path if point_at == "folder" else path)
    assert table.layout == "manifest"
    assert table.modalities == ["t1", "t2"]
    assert [c.case_id for c in table.cases] == ["c0", "c1", "c2"]
    assert [c.patient_id for c in table.cases] == ["p1", "p1", "p2"]
    assert table.patient_ids_given
    c1 = table.cases[1]
    assert c1.images == {m: str(tmp_path / "img" / f"c1_{m}.nii.gz") for m in ("t1", "t2")}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in c1.images.values())
    assert c1.mask == str(tmp_path / "seg" / "c1.nii.gz")
    assert c1.label == 1 and c1.text == "report 1" and c1.split == "train"
    assert table.cases[2].split is None
    assert c1.extra == {"site": "s1"}
    assert table.class_names == (["benign", "malignant"] if fmt == "json" else None)


def test_manifest_sidecar_declares_modalities_and_labels(tmp_path):
    _vol(tmp_path / "a_ct.nii.gz")
    _vol(tmp_path / "a_pet.nii.gz")
    (tmp_path / "manifest.csv").write_text("case_id,CT,PET,mask\na,a_ct.nii.gz,a_pet.nii.gz,\n")
    (tmp_path / "dataset.yaml").write_text(
        "modalities: [PET, CT]\nmask_labels: {bg: 0, lesion: 1}\nmask_required: true\n"
    )
    table = load_cases(tmp_path)
    assert table.modalities == ["PET", "CT"]
    assert list(table.cases[0].images) == ["PET", "CT"]
    assert table.cases[0].images["CT"].endswith("a_ct.nii.gz")
    assert table.mask_labels == {"bg": 0, "lesion": 1} and table.mask_required
    assert not table.patient_ids_given and table.cases[0].patient_id == "a"


@pytest.mark.parametrize(
    "header, missing",
    [("patient_id,image_t1\np,a.nii.gz\n", "case_id"), ("case_id,mask\na,m.nii.gz\n", "image column")],
)
def test_manifest_missing_column(tmp_path, header, missing):
    (tmp_path / "manifest.csv").write_text(header)
    with pytest.raises(DataError) as e:
        load_cases(tmp_path)
    assert "manifest.csv" in e.value.where and missing in e.value.problem


def test_manifest_missing_declared_modality_column(tmp_path):
    (tmp_path / "manifest.csv").write_text("case_id,image_t1\na,a.nii.gz\n")
    (tmp_path / "dataset.yaml").write_text("modalities: [t1, flair]\n")
    with pytest.raises(DataError, match="image_flair") as e:
        load_cases(tmp_path)
    assert e.value.where.endswith("manifest.csv")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError) as e:
        load_cases(tmp_path)
    assert e.value.where == str(tmp_path)
    for looked_for in ("manifest.csv", "dataset.json", "nnU-Net", "MSD", "BraTS"):
        assert looked_for in e.value.problem


def test_nnunet(tmp_path):
    spec = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "whole": [1, 2], "core": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    for cid in ("pro_001", "pro_002"):
        for ch in (0, 1):
            _vol(tmp_path / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
        _vol(tmp_path / "labelsTr" / f"{cid}.nii.gz", value=0)
    for cid in ("pro_100", "pro_101"):
        for ch in (0, 1):
            _vol(tmp_path / "imagesTs" / f"{cid}_{ch:04d}.nii.gz")
    _vol(tmp_path / "labelsTs" / "pro_100.nii.gz", value=0)  # pro_101 has no label: it is for predict
    table = load_cases(tmp_path)
    assert table.layout == "nnunet" and table.modalities == ["T2", "ADC"]
    assert [c.case_id for c in table.cases] == ["pro_001", "pro_002", "pro_100"]
    assert [c.split for c in table.cases] == [None, None, "test"]
    c = table.cases[1]
    assert c.images == {
        "T2": str(tmp_path / "imagesTr" / "pro_002_0000.nii.gz"),
        "ADC": str(tmp_path / "imagesTr" / "pro_002_0001.nii.gz"),
    }
    assert c.mask == str(tmp_path / "labelsTr" / "pro_002.nii.gz")
    assert table.cases[2].mask == str(tmp_path / "labelsTs" / "pro_100.nii.gz")
    assert sorted(table.mask_labels.values()) == [0, 1, 2]
    assert not table.patient_ids_given and all(c.patient_id == c.case_id for c in table.cases)


def test_nnunet_file_ending_that_matches_nothing_or_not_everything(tmp_path):
    spec = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "x": 1}, "numTraining": 3, "file_ending": ".nii"}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    for cid in ("a", "b", "c"):
        _vol(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz")
        _vol(tmp_path / "labelsTr" / f"{cid}.nii.gz", value=0)
    with pytest.raises(DataError, match=r"file_ending.*'\.nii', but no imagesTr file .* holds \.nii\.gz files"):
        load_cases(tmp_path)  # it used to find 0 cases, and data check said OK
    spec["file_ending"] = ".nii.gz"
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    (tmp_path / "imagesTr" / "c_0000.nii.gz").rename(tmp_path / "imagesTr" / "c_0000.nii")
    with pytest.warns(UserWarning, match="numTraining is 3, but 2 imagesTr cases end in '.nii.gz'"):
        assert [c.case_id for c in load_cases(tmp_path).cases] == ["a", "b"]


def test_msd_4d(tmp_path):
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": f"./imagesTr/BRATS_00{i}.nii.gz", "label": f"./labelsTr/BRATS_00{i}.nii.gz"}
                     for i in (1, 2)],
        "test": ["./imagesTs/BRATS_484.nii.gz"],
    }  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    for i in (1, 2):
        _vol(tmp_path / "imagesTr" / f"BRATS_00{i}.nii.gz", channels=4)
        _vol(tmp_path / "labelsTr" / f"BRATS_00{i}.nii.gz", value=0)
    _vol(tmp_path / "imagesTs" / "BRATS_484.nii.gz", channels=4)
    table = load_cases(tmp_path / "dataset.json")
    assert table.layout == "msd" and table.modalities == ["FLAIR", "T1w", "t1gd", "T2w"]
    # the unlabelled test image is left out, as nnU-Net's imagesTs (evaluate cannot score it)
    assert [c.case_id for c in table.cases] == ["BRATS_001", "BRATS_002"]
    c = table.cases[0]
    assert set(c.images.values()) == {str(tmp_path / "imagesTr" / "BRATS_001.nii.gz")}
    assert c.channel_index == {"FLAIR": 0, "T1w": 1, "t1gd": 2, "T2w": 3}
    assert c.mask == str(tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    assert table.mask_labels == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}


def test_msd_modality_selection(tmp_path):
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "bg"},
        "training": [{"image": "x.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    table = load_cases(tmp_path, modalities=["t1w"])  # matched case-insensitively, named as asked
    assert table.modalities == ["t1w"] and table.cases[0].channel_index == {"t1w": 1}
    assert set(table.cases[0].images) == {"t1w"}
    with pytest.raises(DataError, match="no modality 'T2'"):
        load_cases(tmp_path, modalities=["T2"])


@pytest.mark.parametrize(
    "names, sep, labels",
    [
        ({"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}, "_", [0, 1, 2, 4]),
        ({"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}, "-", [0, 1, 2, 3]),
    ],
    ids=["classic", "2023"],
)
def test_brats(tmp_path, names, sep, labels):
    ids = (
        ["BraTS20_Training_001", "BraTS20_Training_002"]
        if sep == "_"
        else ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001"]
    )
    for cid in ids:
        for file_key in names.values():
            _vol(tmp_path / cid / f"{cid}{sep}{file_key}.nii.gz")
        _vol(tmp_path / cid / f"{cid}{sep}seg.nii.gz", value=0)
    (tmp_path / "name_mapping.csv").write_text("not a manifest\n")
    table = load_cases(tmp_path)
    assert table.layout == "brats" and table.modalities == ["flair", "t1", "t1ce", "t2"]
    assert [c.case_id for c in table.cases] == ids
    c = table.cases[1]
    assert c.images == {m: str(tmp_path / ids[1] / f"{ids[1]}{sep}{k}.nii.gz") for m, k in names.items()}
    assert c.mask == str(tmp_path / ids[1] / f"{ids[1]}{sep}seg.nii.gz")
    assert sorted(table.mask_labels.values()) == labels and table.mask_required
    # BraTS 2023 ids carry a timepoint: both cases belong to one patient.
    assert len({c.patient_id for c in table.cases}) == (1 if sep == "-" else 2)


def test_brats_missing_modality_keeps_expected_path(tmp_path):
    cid = "BraTS2021_00000"
    for k in ("flair", "t1", "t2", "seg"):
        _vol(tmp_path / cid / f"{cid}_{k}.nii.gz")
    table = load_cases(tmp_path, layout="brats")
    assert table.cases[0].images["t1ce"] == str(tmp_path / cid / f"{cid}_t1ce.nii.gz")
    assert not Path(table.cases[0].images["t1ce"]).exists()


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_write_manifest_round_trip(tmp_path, suffix):
    _make_manifest_dir(tmp_path / "src", "json")
    table = load_cases(tmp_path / "src")
    out = write_manifest(table, tmp_path / "src" / f"copy{suffix}")
    again: CaseTable = load_cases(out)
    assert again.modalities == table.modalities and again.class_names == table.class_names
    assert [(c.case_id, c.patient_id, c.images, c.mask, c.label, c.split, c.text) for c in again.cases] == [
        (c.case_id, c.patient_id, c.images, c.mask, c.label, c.split, c.text) for c in table.cases
    ]
    assert "img/c0_t1.nii.gz" in out.read_text(encoding="utf-8")  # paths inside the folder are written relative


def test_by_split(tmp_path):
    table = load_cases(_make_manifest_dir(tmp_path, "csv"))
    assert [c.case_id for c in table.by_split("train")] == ["c0", "c1"]
    assert [c.case_id for c in table.by_split(None)] == ["c2"]


def test_manifest_modality_selection_names_missing_column(tmp_path):
    table = load_cases(_make_manifest_dir(tmp_path, "csv"), modalities=["t2"])
    assert table.modalities == ["t2"] and list(table.cases[0].images) == ["t2"]
    with pytest.raises(DataError, match="image_flair") as e:
        load_cases(tmp_path, modalities=["flair"])
    assert e.value.where.endswith("manifest.csv")
