"""Acceptance test of ``medfuse data check``: every planted fault is reported on its own line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medfuse.data.checks import Problem, check_dataset, format_problems, run_check
from medfuse.data.io import write_nifti

SPACING_1MM = np.eye(4)
# Planted fault -> (rule, case whose file is named, file named in the line). "" = the manifest.
FAULTS = {
    "missing": ("missing", "c_missing", "c_missing_t2.nii.gz"),
    "corrupt": ("unreadable", "c_corrupt", "c_corrupt_t1.nii.gz"),
    "grid": ("grid", "c_grid", "c_grid_t2.nii.gz"),
    "nan": ("nonfinite", "c_nan", "c_nan_t1.nii.gz"),
    "mask-value": ("label", "c_label", "c_label_seg.nii.gz"),
    "leak": ("leak", "p_leak", "manifest.csv"),
    "empty-mask": ("empty-mask", "c_empty", "c_empty_seg.nii.gz"),
    "duplicate-id": ("duplicate-id", "c_dup", "manifest.csv"),
}


def _image(path: Path, seed: int, affine=SPACING_1MM, shape=(1, 8, 8, 8)) -> str:
    rng = np.random.default_rng(seed)
    write_nifti(rng.normal(size=shape).astype(np.float32), path, affine=affine)
    return path.name


def _mask(path: Path, values=(0, 1, 2)) -> str:
    arr = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    for k, v in enumerate(values):
        arr[0, k, :2, :2] = v
    write_nifti(arr, path)
    return path.name


def build_dataset(root: Path, faulty: bool) -> Path:
    """Ten cases over nine patients; with ``faulty`` each fault of FAULTS sits in its own case."""
    root.mkdir(parents=True, exist_ok=True)
    names = [
        "c_ok",
        "c_missing",
        "c_corrupt",
        "c_grid",
        "c_nan",
        "c_label",
        "c_leak_a",
        "c_leak_b",
        "c_empty",
        "c_dup",
    ]
    rows = []
    for i, name in enumerate(names):
        row = {"case_id": name, "patient_id": f"p_{name}", "split": "train", "label": "benign"}
        row["image_t1"] = _image(root / f"{name}_t1.nii.gz", seed=i)
        row["image_t2"] = _image(root / f"{name}_t2.nii.gz", seed=100 + i)
        row["mask"] = _mask(root / f"{name}_seg.nii.gz")
        rows.append(row)
    # Two cases of one patient (the leak pair), and a second case whose id is the duplicate.
    rows[6]["patient_id"] = rows[7]["patient_id"] = "p_leak"
    rows.append({**rows[-1], "patient_id": "p_dup2", "image_t1": rows[0]["image_t1"]})
    rows[-1]["case_id"] = "c_dup2"
    if faulty:
        (root / "c_missing_t2.nii.gz").unlink()
        (root / "c_corrupt_t1.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
        _image(root / "c_grid_t2.nii.gz", seed=3, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
        arr = np.random.default_rng(4).normal(size=(1, 8, 8, 8)).astype(np.float32)
        arr[0, 0, 0, :5] = np.nan
        write_nifti(arr, root / "c_nan_t1.nii.gz")
        _mask(root / "c_label_seg.nii.gz", values=(0, 1, 7))
        rows[7]["split"] = "test"
        _mask(root / "c_empty_seg.nii.gz", values=())
        rows[-1]["case_id"] = "c_dup"
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sidecar = {"mask_labels": {"background": 0, "a": 1, "b": 2}, "class_names": ["benign", "malignant"]}
    (root / "dataset.json").write_text(json.dumps({**sidecar, "mask_required": True}))
    return root


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[Path, list[Problem]]:
    root = build_dataset(tmp_path_factory.mktemp("faulty"), faulty=True)
    return root, check_dataset(root)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("clean"), faulty=False)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_reported_once_naming_file_and_rule(faulty, fault):
    root, problems = faulty
    rule, case, filename = FAULTS[fault]
    hits = [p for p in problems if p.rule == rule]
    assert len(hits) == 1, format_problems(problems)
    line = hits[0].line()
    assert "\n" not in line
    assert line.startswith(f"{root / filename}: [{rule}] ")
    assert f"'{case}'" in line and "Fix: " in line


def test_faults_are_the_only_problems(faulty):
    _, problems = faulty
    assert sorted(p.rule for p in problems) == sorted(rule for rule, _, _ in FAULTS.values())


def test_fault_details(faulty):
    _, problems = faulty
    by_rule = {p.rule: p.message for p in problems}
    assert "spacing" in by_rule["grid"] and "(2, 1, 1)" in by_rule["grid"] and "(1, 1, 1)" in by_rule["grid"]
    assert "5 of 512 voxels" in by_rule["nonfinite"] and "5 NaN" in by_rule["nonfinite"]
    assert "{7}" in by_rule["label"] and "4 voxels" in by_rule["label"]
    assert "c_leak_a" in by_rule["leak"] and "c_leak_b" in by_rule["leak"]


def test_clean_dataset(clean, capsys):
    assert check_dataset(clean) == []
    assert run_check(clean) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["OK: 11 cases, 2 modalities, layout manifest"]


def test_run_check_faulty_exit_code_and_lines(faulty, capsys):
    root, problems = faulty
    assert run_check(root) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[:-1] == [p.line() for p in problems]
    assert out[-1] == f"{len(FAULTS)} problems in 11 cases"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"affine": np.diag([1.0, 1.0, 1.0005, 1.0])}, None),  # within grid_atol
        ({"affine": np.diag([1.5, 1.0, 1.0, 1.0])}, "spacing"),
        ({"shape": (1, 8, 8, 6)}, "shape"),
        ({"affine": np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])}, "affine"),
    ],
)
def test_grid_rule_variants(tmp_path, change, expected):
    _image(tmp_path / "a_t1.nii.gz", seed=0)
    _image(tmp_path / "a_t2.nii.gz", seed=1, **change)
    (tmp_path / "manifest.csv").write_text("case_id,image_t1,image_t2\na,a_t1.nii.gz,a_t2.nii.gz\n")
    problems = check_dataset(tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert [p.rule for p in problems] == ["grid"] and expected in problems[0].message
        assert problems[0].path == str(tmp_path / "a_t2.nii.gz")


def test_class_label_outside_declared(tmp_path):
    _image(tmp_path / "a.nii.gz", seed=0)
    (tmp_path / "manifest.csv").write_text(
        "case_id,image_ct,label\na,a.nii.gz,benign\nb,a.nii.gz,cancer\nc,a.nii.gz,1\n"
    )
    (tmp_path / "dataset.yaml").write_text("class_names: [benign, malignant]\n")
    problems = check_dataset(tmp_path)
    assert [(p.rule, p.case_id) for p in problems] == [("label", "b")]


def test_msd_channels_rule(tmp_path):
    spec = {
        "modality": {"0": "FLAIR", "1": "T1"},
        "labels": {"0": "bg", "1": "x"},
        "training": [{"image": "a.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    _image(tmp_path / "a.nii.gz", seed=0)  # one channel where two are declared
    problems = check_dataset(tmp_path)
    assert [p.rule for p in problems] == ["channels"] and "channel 1" in problems[0].message


def test_unrecognised_path(tmp_path, capsys):
    assert run_check(tmp_path) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(f"{tmp_path}: [layout] ")


def test_max_cases_limits_file_reads(faulty):
    root, _ = faulty
    problems = check_dataset(root, max_cases=1)  # c_ok only; table-wide rules still run
    assert sorted(p.rule for p in problems) == ["duplicate-id", "leak"]


def test_clean_msd_4d(tmp_path):
    spec = {"modality": {"0": "FLAIR", "1": "T1"}, "labels": {"0": "bg", "1": "x"},
            "training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    _image(tmp_path / "a.nii.gz", seed=0, shape=(2, 8, 8, 8))
    _mask(tmp_path / "a_seg.nii.gz", values=(0, 1))
    assert check_dataset(tmp_path) == []


def test_brats_missing_seg_and_modality(tmp_path):
    for cid, keys in (("B_001", ("flair", "t1", "t1ce", "t2", "seg")), ("B_002", ("flair", "t1", "t2"))):
        for k in keys:
            (_mask if k == "seg" else _image)(
                tmp_path / cid / f"{cid}_{k}.nii.gz", **({} if k == "seg" else {"seed": 0})
            )
    problems = check_dataset(tmp_path)
    assert sorted((p.rule, Path(p.path).name) for p in problems) == [
        ("missing", "B_002_seg.nii.gz"),
        ("missing", "B_002_t1ce.nii.gz"),
    ]


def test_brats_4d_modality_file_reported_as_channels(tmp_path):
    """A 2-volume FLAIR is what train/evaluate/predict refuse; data check reports it too, with a fix
    that fits a layout without a manifest."""
    cid = "B_001"
    for k in ("flair", "t1", "t1ce", "t2", "seg"):
        path = tmp_path / cid / f"{cid}_{k}.nii.gz"
        if k == "seg":
            _mask(path)
        else:
            _image(path, seed=0, shape=(2, 8, 8, 8) if k == "flair" else (1, 8, 8, 8))
    problems = check_dataset(tmp_path)
    assert [(p.rule, Path(p.path).name) for p in problems] == [("channels", f"{cid}_flair.nii.gz")]
    assert "has 2 channels" in problems[0].message and "one 3D volume per modality" in problems[0].fix


def test_brats_folder_whose_files_name_another_case_is_not_skipped_silently(tmp_path):
    for cid, name in (("B_001", "B_001"), ("B_002", "B_999")):  # B_002 was renamed, its files were not
        for k in ("flair", "t1", "t1ce", "t2"):
            _image(tmp_path / cid / f"{name}_{k}.nii.gz", seed=0)
    with pytest.warns(UserWarning, match=r"1 folder\(s\) .* not named after the folder \(e.g. B_002/B_999_flair"):
        problems = check_dataset(tmp_path)
    assert problems == []


def test_case_id_problems_show_the_id_readably_and_on_one_line():
    import os

    from medfuse.data.paths import case_id_problem

    assert case_id_problem("rec 001 ü") == "case id 'rec 001 ü' has characters outside A-Z a-z 0-9 . _ -"
    assert "'caf\\udce9'" in case_id_problem(os.fsdecode(b"caf\xe9"))  # an undecodable byte, escaped
    shown = case_id_problem("a\x1bb\nc")
    assert "\n" not in shown and "\x1b" not in shown and "'a\\x1bb\\nc'" in shown
    assert case_id_problem("case_001-a.2") is None


def test_a_2d_case_among_3d_cases_is_reported_and_the_reverse(tmp_path):
    """One case of 2D images among 3D volumes (a volume cut to one slice) would be padded and trained on."""
    for name in ("a", "b", "c"):
        _image(tmp_path / f"{name}.nii.gz", seed=0)
    _image(tmp_path / "flat.nii.gz", seed=1, shape=(1, 1, 8, 8))
    (tmp_path / "manifest.csv").write_text("case_id,image_ct\na,a.nii.gz\nb,b.nii.gz\nc,c.nii.gz\nd,flat.nii.gz\n")
    problems = check_dataset(tmp_path)
    assert [(p.rule, p.case_id, p.path) for p in problems] == [("dims", "d", str(tmp_path / "flat.nii.gz"))]
    assert problems[0].message == ("image 'ct' of case 'd' is a 2D image (one slice) but 3 of the dataset's 4 "
                                   "cases are 3D volumes")
    # mostly 2D (a slice dataset): the one 3D volume is the odd case
    (tmp_path / "manifest.csv").write_text("case_id,image_ct\na,a.nii.gz\nd,flat.nii.gz\ne,flat.nii.gz\n")
    problems = check_dataset(tmp_path)
    assert [(p.rule, p.case_id) for p in problems] == [("dims", "a")]
    assert "is a 3D volume (8 slices) but 2 of the dataset's 3 cases are 2D images" in problems[0].message
