"""Predicting case after case into one folder loses nothing: predictions.csv keeps the other cases'
rows, and a case id the folder already holds from other files (two patients' scans with one file
name) is refused instead of replacing the first patient's outputs."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import tiny_cls_config
from medfuse.config import validate
from medfuse.engine.outputs import write_rows
from medfuse.errors import DataError


@pytest.fixture(scope="module")
def cls_run(cls_dataset, tmp_path_factory):
    from medfuse.engine.trainer import fit

    return fit(validate(tiny_cls_config(cls_dataset, tmp_path_factory.mktemp("runs"), train__max_epochs=1)))


def _patient(root, src, name):
    """A patient folder holding the two modality files under generic names (as scanners export them)."""
    root.mkdir(parents=True)
    return [str(shutil.copy(src.parent / "images" / f"{name}_{m}.nii.gz", root / f"scan_{m}.nii.gz")) for m in "ab"]


def _rows(out):
    return {r["case_id"]: r for r in csv.DictReader((out / "predictions.csv").open(encoding="utf-8"))}


def test_case_after_case_keeps_every_row_and_refuses_a_second_patient_under_one_id(cls_run, cls_dataset, tmp_path):
    from medfuse.engine.predict import predict

    out = tmp_path / "preds"
    first = _patient(tmp_path / "p1", cls_dataset, "case000")
    second = _patient(tmp_path / "p2", cls_dataset, "case001")
    predict(cls_run, first, out)
    assert list(_rows(out)) == ["scan_a"]
    before = (out / "predictions.csv").read_text(encoding="utf-8")
    with pytest.raises(DataError) as err:  # the same case id "scan_a" from p2's files
        predict(cls_run, second, out)
    line = err.value.one_line()
    assert "case scan_a was predicted into this folder from" in line and "p1" in line and "p2" in line
    assert "--case-id" in line and (out / "predictions.csv").read_text(encoding="utf-8") == before  # nothing replaced
    predict(cls_run, first, out)  # the same files again: its row is replaced, not doubled
    assert len(list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))) == 1
    predict(cls_run, [str(cls_dataset)], out)  # a whole manifest into the same folder
    rows = _rows(out)
    assert "scan_a" in rows and len(rows) == 1 + 24


def test_a_refused_prediction_records_nothing_so_the_mended_rerun_goes_through(cls_run, cls_dataset, tmp_path):
    from medfuse.engine.predict import predict

    out = tmp_path / "preds"
    bad = _patient(tmp_path / "p1", cls_dataset, "case000")
    data = bytes(open(bad[1], "rb").read())
    open(bad[1], "wb").write(data[: len(data) // 2])  # a truncated file: its header reads, its voxels do not
    with pytest.raises(DataError, match="scan_b"):
        predict(cls_run, bad, out)
    assert not (out / "inputs.csv").exists() and not (out / "predictions.csv").exists()
    mended = _patient(tmp_path / "p1_again", cls_dataset, "case000")  # the same case id from other files
    predict(cls_run, mended, out)
    assert list(_rows(out)) == ["scan_a"]
    assert "p1_again" in (out / "inputs.csv").read_text(encoding="utf-8")


def test_write_rows_merges_by_case_and_refuses_other_columns(tmp_path):
    path = tmp_path / "predictions.csv"
    write_rows(path, ["case_id", "pred"], [["a", 1], ["b", 0]])
    write_rows(path, ["case_id", "pred"], [["b", 1], ["c", 0]])
    assert [r for r in csv.reader(path.open(encoding="utf-8"))] == [["case_id", "pred"], ["a", "1"], ["b", "1"], ["c", "0"]]
    with pytest.raises(DataError, match="holds other columns"):
        write_rows(path, ["case_id", "dice"], [["a", 0.5]])


def test_embeddings_merge_by_case_and_refuse_another_width(tmp_path):
    import numpy as np

    from medfuse.engine.outputs import write_embeddings

    path = tmp_path / "embeddings.npz"
    write_embeddings(path, ["a", "b"], np.eye(2, 3, dtype=np.float32))
    write_embeddings(path, ["b", "c"], np.full((2, 3), 0.5, np.float32))  # b again: its new row
    with np.load(path, allow_pickle=False) as z:
        assert z["case_id"].tolist() == ["a", "b", "c"]
        assert np.array_equal(z["image_emb"], np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], np.float32))
    with pytest.raises(DataError, match="holds embeddings of shape"):
        write_embeddings(path, ["d"], np.zeros((1, 4), np.float32))


def test_ct_encoder_reports_keep_the_rows_of_earlier_runs(tmp_path):
    from medfuse.families.ct_encoder.predict import CTEncoderPredictor

    for reports in ([("v1", "first report")], [("v2", "second, report")], [("v1", "again")]):
        p = CTEncoderPredictor(None, None, None)
        p.reports = list(reports)
        p.finish(tmp_path)
    rows = list(csv.reader((tmp_path / "reports.csv").open(encoding="utf-8")))
    assert rows == [["case_id", "report"], ["v2", "second, report"], ["v1", "again"]]


def test_an_input_named_like_the_folders_tables_is_refused(cls_run, cls_dataset, tmp_path):
    from medfuse.engine.predict import predict

    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "inputs.csv"
    shutil.copy(cls_dataset, manifest)
    text = manifest.read_text(encoding="utf-8")
    with pytest.raises(DataError, match="is an input of this prediction"):
        predict(cls_run, [str(manifest)], out)
    assert manifest.read_text(encoding="utf-8") == text


def test_case_id_names_the_one_case_and_resolves_the_clash(cls_run, cls_dataset, tmp_path):
    from medfuse.engine.predict import predict
    from medfuse.errors import ConfigError

    out = tmp_path / "preds"
    predict(cls_run, _patient(tmp_path / "p1", cls_dataset, "case000"), out, case_id="patient1")
    predict(cls_run, _patient(tmp_path / "p2", cls_dataset, "case001"), out, case_id="patient2")
    assert sorted(_rows(out)) == ["patient1", "patient2"]
    with pytest.raises(ConfigError, match="names one case, but the inputs hold 24"):
        predict(cls_run, [str(cls_dataset)], out, case_id="x")
    with pytest.raises(DataError, match="--case-id"):
        predict(cls_run, _patient(tmp_path / "p3", cls_dataset, "case002"), out, case_id="../x")


def test_a_manifest_whose_columns_differ_in_case_from_the_runs_modalities(cls_run, cls_dataset, tmp_path):
    """The run knows modalities a and b; a manifest with image_A / image_B columns is read as them
    (it used to say "case has no a / b image" although the columns were there)."""
    from medfuse.engine.predict import predict

    text = cls_dataset.read_text(encoding="utf-8").replace("image_a", "image_A").replace("image_b", "image_B")
    manifest = cls_dataset.parent / "upper.csv"
    manifest.write_text(text)
    out = predict(cls_run, [str(manifest)], tmp_path / "preds")
    assert len(_rows(out)) == 24


def test_cli_case_id(cls_run, cls_dataset, tmp_path, capsys):
    from medfuse.cli import main

    files = _patient(tmp_path / "p9", cls_dataset, "case003")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(cls_run), *files, "--out", str(tmp_path / "o"), "--case-id", "patient9"])
    assert e.value.code in (0, None), capsys.readouterr().err
    assert list(_rows(tmp_path / "o")) == ["patient9"]


def test_a_file_whose_name_is_no_case_id_is_predicted_under_case_id(cls_run, cls_dataset, tmp_path):
    """Scanner exports name files and series folders with spaces ('T2 AX 3mm.nii.gz'): without
    --case-id the refusal now says to give one, and with it the case is predicted under that id (it
    was refused either way: the file's own name was checked before --case-id was applied)."""
    from medfuse.engine.predict import predict

    root = tmp_path / "export"
    root.mkdir()
    files = [str(shutil.copy(cls_dataset.parent / "images" / f"case000_{m}.nii.gz", root / f"T2 AX {m}.nii.gz"))
             for m in "ab"]
    with pytest.raises(DataError) as err:
        predict(cls_run, files, tmp_path / "out")
    line = err.value.one_line()
    assert line.startswith(files[0]) and "Fix: name the case with --case-id NAME" in line
    out = predict(cls_run, files, tmp_path / "out", case_id="patient7")
    assert list(_rows(out)) == ["patient7"]
