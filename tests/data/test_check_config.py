"""``medfuse data check PATH --config CONFIG.yaml [OVERRIDES]``: the dataset checked as the run reads it.

Without a config, data check cannot know ``data.dicom`` (a DWI series holding several b-values is
refused), nor the run's classes, modalities, label map or task; with one, it reads DICOM with the
config's ``data.dicom`` and loads the table with train's own ``load_table``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_dicom import write_series
from test_dicom_bvalue import write_dwi

from medfuse.cli import main
from medfuse.data.check_config import check_as_run
from medfuse.data.checks import check_dataset, run_check
from medfuse.data.dicom import DicomOptions, current_options, use_dicom_options
from medfuse.data.io import read_image, write_nifti
from medfuse.errors import DataError

ZS = [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out.strip().splitlines(), out.err.strip().splitlines()


def _manifest(root: Path, rows: list[dict], resample: bool = True) -> Path:
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if resample:
        (root / "dataset.yaml").write_text("resample_modalities: true\n")
    return root / "manifest.csv"


def _config(path: Path, root: Path | None = None, **data) -> Path:
    """A staging (T2W + DWI, T1..T4) config; ``data`` replaces keys of its data section."""
    section = {"layout": "manifest", "modalities": ["t2w", "dwi"], "class_names": ["T1", "T2", "T3", "T4"],
               "dicom": {"b_value": "highest"}}
    if root is not None:
        section["root"] = str(root)
    section.update(data)
    path.write_text(yaml.safe_dump({"name": "r", "family": "staging", "task": "classification",
                                    "output_dir": str(path.parent / "runs"), "data": section,
                                    "model": {"name": "staging"}}), encoding="utf-8")
    return path


@pytest.fixture
def rectal(tmp_path) -> Path:
    """One case: a T2W DICOM series and a DWI series holding b=0 and b=800 (positions repeated)."""
    root = tmp_path / "rectal"
    write_series(root / "c0" / "t2w", ZS)
    write_dwi(root / "c0" / "dwi", [0, 800])
    return _manifest(root, [{"case_id": "c0", "patient_id": "p0", "image_t2w": "c0/t2w",
                             "image_dwi": "c0/dwi", "label": "T3"}])


def _nifti_set(root: Path, rows: list[dict]) -> Path:
    """NIfTI cases on one grid; ``rows`` give case_id, label and which of t2w/dwi exist."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, r in enumerate(rows):
        row = {"case_id": r["case_id"], "patient_id": f"p{i}", "image_t2w": "", "image_dwi": "", "label": r["label"]}
        for m in r.get("mods", ("t2w", "dwi")):
            write_nifti(np.full((1, 4, 6, 6), i + 1.0, np.float32), root / f"{r['case_id']}_{m}.nii.gz")
            row[f"image_{m}"] = f"{r['case_id']}_{m}.nii.gz"
        out.append(row)
    return _manifest(root, out, resample=False)


# ------------------------------------------------------------------------------- data.dicom


def test_multi_b_value_dwi_is_clean_with_the_config(rectal, tmp_path, capsys):
    code, out, _ = run_cli(["data", "check", str(rectal)], capsys)
    assert code == 2
    dwi = str(rectal.parent / "c0" / "dwi")
    assert out[0].startswith(f"{dwi}: [dicom] image 'dwi' of case 'c0' cannot be read: ")
    assert "b=0 (6 slices), b=800 (6 slices)" in out[0]
    assert out[0].endswith('. Fix: set data.dicom.b_value to one of them (or "highest"); `medfuse data check` '
                           "takes it from --config <your config> or an override data.dicom.b_value=VALUE")
    assert out[1:] == ["1 problem in 1 case"]

    cfg = _config(tmp_path / "rectal.yaml")
    code, out, _ = run_cli(["data", "check", str(rectal), "--config", str(cfg)], capsys)
    assert code == 0, out
    assert out == ["OK: 1 case, 2 modalities, layout manifest (with rectal.yaml: task classification; "
                   "data.modalities [t2w, dwi]; data.class_names [T1, T2, T3, T4]; data.dicom b_value=highest)"]
    assert current_options() == DicomOptions()  # the config's data.dicom goes no further than the check


def test_multi_b_value_dwi_is_clean_with_an_override(rectal, tmp_path, capsys):
    code, out, _ = run_cli(["data", "check", str(rectal), "data.dicom.b_value=highest"], capsys)
    assert code == 0, out
    assert out == ["OK: 1 case, 2 modalities, layout manifest (with data.dicom.b_value=highest)"]

    cfg = _config(tmp_path / "rectal.yaml", dicom={})  # the config leaves b_value unset: refused ...
    code, out, _ = run_cli(["data", "check", str(rectal), "--config", str(cfg)], capsys)
    assert code == 2 and "[dicom]" in out[0] and "--config" not in out[0]
    assert out[-1] == ("1 problem in 1 case (with rectal.yaml: task classification; data.modalities [t2w, dwi]; "
                       "data.class_names [T1, T2, T3, T4]; data.dicom defaults)")
    # ... and an override on top of the config reads it
    code, out, _ = run_cli(["data", "check", str(rectal), "--config", str(cfg), "data.dicom.b_value=800"], capsys)
    assert code == 0, out
    assert out[-1].endswith("(with rectal.yaml + data.dicom.b_value=800: task classification; data.modalities "
                            "[t2w, dwi]; data.class_names [T1, T2, T3, T4]; data.dicom b_value=800.0)")


def test_path_defaults_to_the_configs_data_root(rectal, tmp_path, capsys):
    cfg = _config(tmp_path / "rectal.yaml", root=rectal, dicom={})
    code, out, _ = run_cli(["data", "check", "--config", str(cfg), "data.dicom.b_value=highest"], capsys)
    assert code == 0, out
    assert out[-1].startswith("OK: 1 case, 2 modalities, layout manifest (with rectal.yaml + data.dicom.b_value=")


def test_overrides_without_a_config_are_data_dicom_only(rectal, capsys):
    code, out, err = run_cli(["data", "check", str(rectal), "data.modalities=[t2w]"], capsys)
    assert code == 2 and len(err) == 1
    assert "data.modalities=[t2w]" in err[0] and "--config" in err[0]
    code, out, err = run_cli(["data", "check", str(rectal), "data.dicom.b_value=-5"], capsys)
    assert code == 2 and len(err) == 1 and "data.dicom.b_value" in err[0]  # validated as in a config


# ------------------------------------------------------------------------- the table, as train


def test_label_outside_the_configs_classes_is_reported_as_train_refuses_it(tmp_path, capsys):
    from medfuse.config import load_config
    from medfuse.data.datamodule import load_table

    manifest = _nifti_set(tmp_path / "d", [{"case_id": "c0", "label": "T2"}, {"case_id": "c1", "label": "T5"}])
    assert run_check(manifest) == 0  # no classes declared by the dataset: nothing to hold "T5" against
    capsys.readouterr()
    cfg = _config(tmp_path / "staging.yaml")
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(cfg)], capsys)
    assert code == 2
    line = (f"{manifest} (line 3): [label] case 'c1' has label 'T5', not one of the declared classes "
            "['T1', 'T2', 'T3', 'T4'] (or their 0-based index 0..3). Fix: use a declared class name or a whole "
            "class index 0..K-1, or add the class to class_names")
    assert out == [line, "1 problem in 2 cases (with staging.yaml: task classification; data.modalities "
                   "[t2w, dwi]; data.class_names [T1, T2, T3, T4]; data.dicom b_value=highest)"]
    with use_dicom_options(None), pytest.raises(DataError) as e:  # train stops at the same line
        load_table(load_config(cfg, [f"data.root={manifest}"]))  # (it sets data.dicom: kept inside the with)
    assert str(e.value) == line


def test_case_without_a_config_modality_and_without_a_label(tmp_path, capsys):
    manifest = _nifti_set(tmp_path / "d", [{"case_id": "c0", "label": "T1"},
                                           {"case_id": "c1", "label": "T2", "mods": ("dwi",)},
                                           {"case_id": "c2", "label": ""}])
    assert run_check(manifest) == 0
    capsys.readouterr()
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(_config(tmp_path / "s.yaml"))], capsys)
    assert code == 2
    assert out[0] == (f"{manifest} (line 4): [label] case 'c2' has no label, and a classification run needs one "
                      "for every case. Fix: fill the case's label (the manifest's label column) or drop the case")
    assert out[1] == (f"{manifest} (line 3): [missing] case 'c1' has no 't2w' image of the run's modalities "
                      "(t2w, dwi). Fix: give the case every modality (t2w, dwi), or drop it (incomplete_seg trains "
                      "on cases with missing modalities)")
    assert out[2].startswith("2 problems in 3 cases (with s.yaml: task classification;")


def test_a_modality_the_dataset_lacks_and_a_bad_label_map(tmp_path, capsys):
    manifest = _nifti_set(tmp_path / "d", [{"case_id": "c0", "label": 1}, {"case_id": "c1", "label": 7}])
    cfg = _config(tmp_path / "s.yaml", modalities=["t2w", "adc"])
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(cfg)], capsys)
    assert code == 2
    assert out[0].startswith(f"{manifest}: [layout] has no image column image_adc for modality 'adc'")
    cfg = _config(tmp_path / "s.yaml", class_names=["T1-2", "T3-4"], label_map={0: 0, 1: 0, 2: 1, 3: 1})
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(cfg)], capsys)
    assert code == 2
    assert out[0] == ("data.label_map: [config] case c1 has label 7, which the map lacks. "
                      "Fix: add it to data.label_map (keys now: [0, 1, 2, 3])")
    assert out[1].startswith("1 problem in 0 cases (with s.yaml: ")


def test_check_dataset_takes_a_resolved_config(rectal, tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.build import resolve

    cfg = resolve(load_config(_config(tmp_path / "c.yaml")))
    assert [p.rule for p in check_dataset(rectal)] == ["dicom"]
    assert check_as_run(cfg, rectal) == []


# ------------------------------------------------------------------------------ read_image


def test_missing_file_hint_names_the_working_directory_only_for_relative_paths(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "gone.nii.gz")
    assert "relative paths start at" not in str(e.value) and "check the path" in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_image("sub/gone.nii.gz")
    assert f"relative paths start at {tmp_path}" in str(e.value)


def test_missing_container_hint_names_the_working_directory_only_for_relative_paths(tmp_path, monkeypatch):
    from medfuse.data.containers import open_node

    with pytest.raises(DataError) as e:
        open_node(tmp_path / "gone.zarr" / "raw")
    assert "relative paths start at" not in str(e.value) and "check the path" in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        open_node("gone.zarr/raw")
    assert f"relative paths start at {tmp_path}" in str(e.value)


def test_a_mask_value_outside_data_num_classes_is_reported_as_train_refuses_it(tmp_path, capsys):
    """A dataset declaring no labels: a segmentation config's data.num_classes declares them (0..K-1)."""
    root = tmp_path / "seg"
    root.mkdir()
    rows = []
    for i, top in enumerate([1, 2, 3]):
        write_nifti(np.full((1, 4, 6, 6), 1.0, np.float32), root / f"c{i}_img.nii.gz")
        mask = np.zeros((1, 4, 6, 6), np.uint8)
        mask[0, 1:3, 2:4, 2:4] = top
        write_nifti(mask, root / f"c{i}_seg.nii.gz")
        rows.append({"case_id": f"c{i}", "image_ct": f"c{i}_img.nii.gz", "mask": f"c{i}_seg.nii.gz"})
    manifest = _manifest(root, rows, resample=False)
    assert run_check(manifest) == 0  # nothing declared: whole numbers pass
    capsys.readouterr()
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "s", "task": "segmentation", "output_dir": str(tmp_path / "runs"),
                                   "data": {"layout": "manifest", "num_classes": 3},
                                   "model": {"name": "baseline_unet3d"}}))
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(cfg)], capsys)
    assert code == 2
    assert out[0] == (f"{root / 'c2_seg.nii.gz'}: [label] mask of case 'c2' has values {{3}} in 8 voxels, outside "
                      "the declared labels {0, 1, 2}. Fix: remap the mask values to the declared labels, or declare "
                      "them (mask_labels, labels in dataset.json, or a segmentation run's data.num_classes)")
    assert out[1].startswith("1 problem in 3 cases (with seg.yaml:")


def test_every_bad_case_id_is_reported_not_only_the_first(tmp_path, capsys):
    manifest = _nifti_set(tmp_path / "d", [{"case_id": "c0", "label": "T1"}, {"case_id": "c1", "label": "T2"},
                                           {"case_id": "c2", "label": "T3"}])
    text = manifest.read_text(encoding="utf-8").replace("\nc0,", "\nc 0/x,").replace("\nc2,", "\n../c2,")
    manifest.write_text(text)
    code, out, _ = run_cli(["data", "check", str(manifest), "--config", str(_config(tmp_path / "s.yaml"))], capsys)
    assert code == 2
    assert [line.split(": [")[0] for line in out[:2]] == [f"{manifest} (line 2)", f"{manifest} (line 4)"]
    assert all("[case-id]" in line for line in out[:2])
    assert out[2].startswith("2 problems in 3 cases (with s.yaml:")


def test_check_as_run_reports_the_family_data_modules_table_problems(tmp_path):
    """A family data module's ``table_problems(cfg, table)`` (what it refuses before reading voxels)
    is part of ``data check --config``; a family without one adds nothing."""
    from medfuse.config import load_config
    from medfuse.data.check_config import family_table_problems
    from medfuse.data.checks import Problem
    from medfuse.engine.build import resolve

    manifest = _nifti_set(tmp_path / "d", [{"case_id": "c0", "label": "T1"}, {"case_id": "c1", "label": "T2"}])
    cfg = resolve(load_config(_config(tmp_path / "s.yaml"), [f"data.root={manifest}"]))
    assert family_table_problems(cfg) is None  # staging: the generic data module
    seen = []

    def hook(c, table):
        seen.append(len(table.cases))
        return [Problem("data.params.classes", "config", "['x'] annotated by no case", "choose others")]

    problems = check_as_run(cfg, manifest, table_problems=hook)
    assert seen == [2] and [p.rule for p in problems] == ["config"]
    assert problems[0].line() == "data.params.classes: [config] ['x'] annotated by no case. Fix: choose others"
