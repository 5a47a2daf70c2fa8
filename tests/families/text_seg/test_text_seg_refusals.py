"""text_seg refusals found by an audit, each one line before anything is written: a frozen image side
that no weights reach (it would train on random weights), a damaged NSCLC SEG header (it was left
out as a patient "without a SEG"), and text template fields that no column fills or a case leaves
empty (found late, naming a slice record)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

pytest.importorskip("highdicom")

from test_busbra import CONFIG as BUSBRA_CONFIG  # noqa: E402  (tests/families/text_seg is on sys.path)
from test_busbra import make_busbra  # noqa: E402
from test_nsclc import CONFIG as NSCLC_CONFIG  # noqa: E402
from test_nsclc import CSV_NAME, make_nsclc  # noqa: E402
from test_nsclc_honesty import TINY, one_error_line, run_cli  # noqa: E402

from medfuse.config import load_config, validate_params  # noqa: E402
from medfuse.errors import ConfigError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return make_nsclc(tmp_path_factory.mktemp("nsclc_refusals"))


def _copy(replica: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(replica, root)
    return root


def _nsclc_cfg(root: Path, runs: Path, *extra: str):
    return load_config(NSCLC_CONFIG, [f"data.root={root}", f"output_dir={runs}", "name=nsclc", *TINY, *extra])


def _edit_csv(path: Path, edit) -> None:
    """Rewrite a CSV (kept with a BOM, as the releases ship it) after ``edit(rows)`` changed its rows."""
    rows = list(csv.reader(path.open(newline="", encoding="utf-8-sig")))
    edit(rows)
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows(rows)


# ---------------------------------------------------------------------------------------------------
# 1. a frozen image side without weights


@pytest.mark.parametrize("encoder", ["tiny", "medsam"])
def test_frozen_image_side_without_weights_is_refused_before_anything_is_written(replica, tmp_path, capsys,
                                                                                  encoder):
    runs = tmp_path / "runs"
    argv = ["train", NSCLC_CONFIG, f"data.root={replica}", f"output_dir={runs}", "name=nsclc", *TINY,
            "model.params.freeze_image_side=true", f"model.params.image_encoder={encoder}"]
    code, err = run_cli(argv, capsys)
    line = one_error_line(code, err, "model.params.image_weights", f"image_encoder={encoder} is frozen",
                          "would stay random", "freeze_image_side=false")
    assert encoder == "tiny" or "medsam_vit_b.pth" in line
    assert not (runs / "nsclc" / "config.yaml").exists() and not (runs / "nsclc" / "splits.csv").exists()


def test_weights_that_reach_a_frozen_image_side_are_not_refused(replica, tmp_path):
    """``model.weights`` (the whole model) or a checkpoint of the run (``--resume``, a later stage) give
    the frozen image side its weights; only a fresh run without any is refused."""
    from medfuse.families.text_seg.data import TextSegDataModule
    from medfuse.families.text_seg.params import TextSegParams, check_image_side_weights

    frozen = ["model.params.freeze_image_side=true"]
    run_dir = tmp_path / "runs" / "nsclc"
    run_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match="model.params.image_weights"):
        TextSegDataModule(_nsclc_cfg(replica, tmp_path / "runs", *frozen), run_dir).setup("fit")
    whole = tmp_path / "whole_model.safetensors"
    TextSegDataModule(_nsclc_cfg(replica, tmp_path / "runs", *frozen, f"model.weights={whole}"), run_dir).setup("fit")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # a run that trained before (resume)
    TextSegDataModule(_nsclc_cfg(replica, tmp_path / "runs", *frozen), run_dir).setup("fit")
    medsam = validate_params(TextSegParams, {"image_weights": "/w/medsam_vit_b.pth"}, "model.params")
    check_image_side_weights(medsam, None, False)  # MedSAM frozen with its weights: the seed's set-up


@pytest.mark.parametrize("config", [NSCLC_CONFIG, BUSBRA_CONFIG], ids=["nsclc", "busbra"])
def test_shipped_tiny_configs_train_their_image_side(config):
    """The shipped dataset configs use the tiny image side, which has no weights: it trains (frozen, it
    stayed random: test Dice 0.03 vs 0.68 in the audit); the header says how MedSAM runs freeze it."""
    import medfuse.families  # noqa: F401 - registers the families
    from medfuse.families.text_seg.params import TextSegParams

    cfg = load_config(config)
    params = validate_params(TextSegParams, cfg.model.params, "model.params")
    assert params.image_encoder == "tiny" and not params.freeze_image_side
    from medfuse.families.text_seg.params import check_image_side_weights

    check_image_side_weights(params, cfg.model.weights, False)
    header = config.read_text(encoding="utf-8").split("\nname:")[0]
    assert "model.params.image_weights=" in header and "model.params.freeze_image_side=true" in header


def test_evaluate_keeps_working_for_a_run_whose_config_freezes_the_image_side(tmp_path):
    """A run trained before the check with a frozen tiny side (its checkpoint holds the image side):
    evaluate and predict load its trained weights and are not refused."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit
    from medfuse.families.text_seg import FAMILY
    from medfuse.families.text_seg.demo import make_text_seg_demo

    data = tmp_path / "data"
    make_text_seg_demo(data, n_patients=8, seed=1, size=64)
    run = fit(load_config(FAMILY.demo_config, [
        f"data.root={data}", f"output_dir={tmp_path / 'runs'}", "name=old", "train.max_epochs=1", "data.batch_size=8",
        "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "data.split.val=0.25", "data.split.test=0.3",
        "train.accelerator=cpu"]))
    saved = (run / "config.yaml").read_text(encoding="utf-8")
    assert "freeze_image_side: false" in saved
    (run / "config.yaml").write_text(saved.replace("freeze_image_side: false", "freeze_image_side: true"))
    report = evaluate(run, n_boot=10)
    assert report["metrics"]["dice"]["n"] > 0


# ---------------------------------------------------------------------------------------------------
# 2. a damaged NSCLC SEG is refused by name, not left out as "without a SEG"


@pytest.mark.parametrize("keep", [100, 300, 700, 2000], ids=lambda n: f"first_{n}_bytes")
def test_truncated_seg_header_is_refused_by_name(replica, tmp_path, capsys, keep):
    from medfuse.data.checks import check_dataset
    from medfuse.data.layouts import load_cases

    root = _copy(replica, tmp_path)
    seg = next((root / "NSCLC Radiogenomics" / "R01-002").glob("*/1000.*/1-1.dcm"))
    seg.write_bytes(seg.read_bytes()[:keep])
    with pytest.raises(DataError) as e:
        load_cases(root)
    assert e.value.where == str(seg) and ("cut short" in e.value.problem or "cannot read DICOM" in e.value.problem)
    problems = check_dataset(root)
    assert len(problems) == 1 and problems[0].path == str(seg)
    code, err = run_cli(["train", NSCLC_CONFIG, f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *TINY],
                        capsys)
    one_error_line(code, err, str(seg))


def test_patient_without_a_seg_is_still_a_note(replica):
    from medfuse.data.layouts import load_cases

    table = load_cases(replica)
    assert "R01-005" not in {c.patient_id for c in table.cases}
    assert any("1 without a SEG" in n for n in table.notes)


def test_seg_whose_ct_series_is_absent_is_named_not_counted_as_without_a_seg(replica, tmp_path, capsys, caplog):
    """A partial download (the SEG of R01-002 and AMC-001 but not their CT series): they were counted among
    the patients "without a SEG". Left out, as patients without a folder are, with a note naming them in
    data check and in train's log."""
    import logging

    from medfuse.data.checks import run_check
    from medfuse.data.layouts import load_cases
    from medfuse.families.text_seg.data import TextSegDataModule

    root = _copy(replica, tmp_path)
    for pid in ("R01-002", "AMC-001"):
        shutil.rmtree(next((root / "NSCLC Radiogenomics" / pid).glob("*/3.000000-CT-*")))
    table = load_cases(root)
    assert {c.patient_id for c in table.cases} == {"R01-001", "R01-003", "AMC-002", "R01-004"}
    note = next(n for n in table.notes if n.startswith("NSCLC:"))
    assert "1 without a SEG and 2 with a SEG but not the CT series it references (R01-002, AMC-001;" in note
    assert note.endswith("are left out")
    assert run_check(root) == 0 and note in capsys.readouterr().out
    with caplog.at_level(logging.WARNING):
        TextSegDataModule(_nsclc_cfg(root, tmp_path / "runs"))
    assert note in caplog.text  # train's log says it too


def test_no_patient_with_its_ct_names_the_patients_whose_ct_is_absent(replica, tmp_path):
    from medfuse.data.layouts import load_cases

    root = _copy(replica, tmp_path)
    for ct in (root / "NSCLC Radiogenomics").glob("*/*/3.000000-CT-*"):
        shutil.rmtree(ct)
    with pytest.raises(DataError) as e:
        load_cases(root)
    assert "6 with a SEG but not the CT series it references (R01-001, R01-002, R01-003, AMC-001, AMC-002 and 1 " \
           "more;" in e.value.problem


# ---------------------------------------------------------------------------------------------------
# 3. text template fields are checked against the table up front


def _spy_reads(monkeypatch) -> list[str]:
    from medfuse.data import seg as seg_module

    read: list[str] = []
    real = seg_module.read_label
    monkeypatch.setattr(seg_module, "read_label", lambda path, image=None: read.append(str(path)) or real(path, image))
    return read


def test_template_typo_names_the_key_the_field_and_the_columns(replica, tmp_path, monkeypatch):
    from medfuse.families.text_seg.data import TextSegDataModule

    read = _spy_reads(monkeypatch)
    run_dir = tmp_path / "runs" / "nsclc"
    run_dir.mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        TextSegDataModule(_nsclc_cfg(replica, tmp_path / "runs", 'data.params.text_template="{histolgy} tumour"'),
                          run_dir)
    line = str(e.value)
    assert line.startswith("data.params.text_template: field 'histolgy' is not a column of " + CSV_NAME)
    assert "did you mean 'histology'?" in line and "columns: case_id," in line and "t_stage" in line
    assert not read and not (run_dir / "splits.csv").exists()  # before any SEG is read or the split is saved


def test_renamed_clinical_column_is_not_taken_for_empty_cells(replica, tmp_path, capsys):
    root = _copy(replica, tmp_path)
    _edit_csv(root / CSV_NAME, lambda rows: rows[0].__setitem__(rows[0].index("Histology "), "Histologic type"))
    code, err = run_cli(["train", NSCLC_CONFIG, f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *TINY],
                        capsys)
    line = one_error_line(code, err, "data.params.text_template: field 'histology' is not a column of",
                          "histologic_type")
    assert "_z0" not in line


def test_empty_clinical_cell_names_the_csv_line_and_the_patient(replica, tmp_path):
    from medfuse.families.text_seg.data import TextSegDataModule

    root = _copy(replica, tmp_path)
    _edit_csv(root / CSV_NAME, lambda rows: rows[3].__setitem__(rows[0].index("Histology "), ""))  # R01-003
    with pytest.raises(DataError) as e:
        TextSegDataModule(_nsclc_cfg(root, tmp_path / "runs"))
    assert e.value.where == f"{root / CSV_NAME} (line 4)"
    assert e.value.problem.startswith("case R01-003 has no value for 'histology'") and "_z0" not in str(e.value)


def test_busbra_renamed_and_empty_columns(tmp_path):
    from medfuse.families.text_seg.data import TextSegDataModule

    root = make_busbra(tmp_path / "BUSBRA")
    source = root / "bus_data.csv"
    over = [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "data.num_workers=0"]
    _edit_csv(source, lambda rows: rows[3].__setitem__(rows[0].index("Histology"), ""))
    with pytest.raises(DataError) as e:
        TextSegDataModule(load_config(BUSBRA_CONFIG, over))
    assert e.value.where == f"{source} (line 4)"  # the third image: patient 2's right view
    assert e.value.problem.startswith("case bus_0002-r has no value for 'histology'")
    _edit_csv(source, lambda rows: rows[0].__setitem__(rows[0].index("Histology"), "Histologic type"))
    with pytest.raises(ConfigError, match=r"field 'histology' is empty in every row of bus_data.csv \(columns: "):
        TextSegDataModule(load_config(BUSBRA_CONFIG, over))
