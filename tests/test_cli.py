"""CLI wiring: user mistakes exit 2 with one line; listing commands work."""

from __future__ import annotations

import pytest
import yaml

from medfuse.cli import main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize(
    "argv_fn, needle",
    [
        (lambda t: ["train", str(t / "missing.yaml")], "missing.yaml"),
        (lambda t: ["train", str(t / "ok.yaml"), "train.max_epoch=3"], "train.max_epoch"),
        (lambda t: ["train", str(t / "ok.yaml"), "model.name=nonexistent"], "model.name"),
        (lambda t: ["evaluate", str(t / "not_a_run")], "not_a_run"),
        (lambda t: ["demo", "no_such_family"], "no_such_family"),
        (lambda t: ["train", str(t / "ok.yaml"), "model.params.widthz=[4]"], "model.params.widthz"),
        (lambda t: ["train", str(t / "ok.yaml"), "model.params.dropout=lots"], "model.params.dropout"),
        (lambda t: ["train", str(t / "ok.yaml"), "data.params.x=1"], "data.params.x"),
        (lambda t: ["train", str(t / "ok.yaml"), "family=staging"], "family"),
        (lambda t: ["train", str(t / "ok.yaml"), "task=segmentation"], "task"),
        (lambda t: ["models", "no_such_model"], "no_such_model"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv_fn, needle, cls_dataset):
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"name": "x", "output_dir": str(tmp_path / "runs"),
                                                      "data": {"root": str(cls_dataset.parent)}}))
    code, out, err = run_cli(argv_fn(tmp_path), capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]


def test_models_lists_registries(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    assert "baseline_cnn3d" in out and "tiny" in out and "staging" in out


def test_models_name_prints_every_parameter(capsys):
    from medfuse.families.staging.params import StagingParams

    code, out, _ = run_cli(["models", "staging"], capsys)
    assert code == 0
    for key in StagingParams.model_fields:
        assert key in out, key
    assert "bgamf_init_scale" in out and "'bgamf'" in out and "modality fusion" in out


def test_info(capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0
    assert "torch" in out and "monai" in out


def test_data_check_reports_and_exits_2(tmp_path, capsys):
    code, out, err = run_cli(["data", "check", str(tmp_path / "nothing_here")], capsys)
    assert code == 2
    assert "nothing_here" in out + err


def test_data_check_clean_exits_0(cls_dataset, capsys):
    code, out, _ = run_cli(["data", "check", str(cls_dataset.parent)], capsys)
    assert code == 0
    assert "OK" in out


def test_medfuse_warnings_print_as_one_line_without_source(tmp_path):
    """A medfuse warning is a note to the user: one ``warning: ...`` line, not Python's
    ``file:line: UserWarning`` plus the source line that raised it (which reads like a traceback)."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    for cid, name in (("B_001", "B_001"), ("B_002", "B_999")):  # B_002 was renamed, its files were not
        for k in ("flair", "t1", "t1ce", "t2"):
            (tmp_path / cid).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype("float32"), np.eye(4)),
                     tmp_path / cid / f"{name}_{k}.nii.gz")
    out = subprocess.run([sys.executable, "-m", "medfuse", "data", "check", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if "not named after the folder" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: 1 folder(s) under "), out.stderr
    assert "UserWarning" not in out.stderr and "warnings.warn(" not in out.stderr, out.stderr


def test_other_libraries_warnings_keep_pythons_format():
    from medfuse.cli import _format_warning

    text = _format_warning("deprecated", DeprecationWarning, "/usr/lib/python3/somewhere/lib.py", 12)
    assert text.startswith("/usr/lib/python3/somewhere/lib.py:12: DeprecationWarning: deprecated")
