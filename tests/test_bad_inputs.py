"""Hostile and careless inputs: every one gets exit code 2 (130 for Ctrl-C), exactly one error line
naming the file or key, no traceback, and nothing written outside the run or output directory.

Each test runs the real CLI (``medfuse.cli.main``) inside a sandbox folder (the working directory)
that holds the dataset copy, ``runs/`` and ``out/``; :class:`Sandbox` lists the files before and
after and fails on any new file outside the run directory or ``--out``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_cls_config, write_cls_dataset
from medfuse.cli import main
from medfuse.data.io import write_nifti

# ----------------------------------------------------------------------------------------- helpers


class Sandbox:
    """A working directory with ``data/`` (a dataset copy), ``runs/`` and ``out/``.

    Nested three folders deep inside the pytest tmp dir, so that ``../../../../x/pwn`` from an
    output folder still lands inside it, where :meth:`new_files_outside` sees it.
    """

    def __init__(self, base: Path, dataset: Path):
        self.top = base
        self.root = base / "a" / "b" / "c"
        self.data = self.root / "data"
        shutil.copytree(dataset, self.data)
        self.runs = self.root / "runs"
        self.out = self.root / "out"
        self.before = self.files()

    def files(self) -> set[Path]:
        return {p for p in self.top.rglob("*") if p.is_file()}

    def new_files_outside(self, *allowed: Path) -> list[Path]:
        allowed = tuple(a.resolve() for a in allowed)
        return sorted(p for p in self.files() - self.before
                      if not any(p.resolve().is_relative_to(a) for a in allowed))

    def config(self, name: str = "t", **over) -> Path:
        cfg = tiny_cls_config(self.data, self.runs, name=name, **over)
        cfg["train"]["max_epochs"] = 1
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.before.add(path)
        return path

    def rewrite_manifest(self, edit) -> Path:
        """Apply ``edit(rows)`` to the manifest rows and write it back."""
        path = self.data / "manifest.csv"
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        edit(rows)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error_line(code: int, err: str, *needles: str, expected: int = 2) -> str:
    """The single stderr line of a refused command, after checking the contract."""
    assert code == expected, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("interrupted: " if expected == 130 else "error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The tiny classification dataset (its own copy: tests edit sandbox copies of it)."""
    return write_cls_dataset(tmp_path_factory.mktemp("bad_inputs_data"), n_patients=16).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> tuple[Path, dict]:
    """A 2-epoch run on ``dataset``; tests copy it into their sandbox."""
    from medfuse.config import validate
    from medfuse.engine.trainer import fit

    base = tmp_path_factory.mktemp("bad_inputs_run")
    cfg = tiny_cls_config(dataset, base / "runs", name="trained")
    cfg["train"]["max_epochs"] = 2
    return fit(validate(cfg)), cfg


@pytest.fixture
def box(tmp_path, dataset, monkeypatch) -> Sandbox:
    sb = Sandbox(tmp_path, dataset)
    monkeypatch.chdir(sb.root)
    return sb


@pytest.fixture
def run(box, trained) -> Path:
    """A copy of the trained run inside the sandbox, reading the sandbox's dataset."""
    src, _ = trained
    dst = box.runs / "trained"
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["root"] = str(box.data)
    cfg["output_dir"] = str(box.runs)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    box.before = box.files()
    return dst


def _split_of(run: Path, split: str) -> list[str]:
    with (run / "splits.csv").open(encoding="utf-8") as f:
        return [r["case_id"] for r in csv.DictReader(f) if r["split"] == split]


def _huge_nifti(path: Path) -> Path:
    """A NIfTI header claiming 30000^3 float32 voxels over 1 KB of data."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_data_shape((30000, 30000, 30000))
    data = img.header.binaryblock + b"\0" * 4 + b"\0" * 1024
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# ------------------------------------------------------------------------- 1. path escape via case ids

BAD_IDS = {
    "relative": "../../../../x/pwn",
    "absolute": "/tmp/medfuse-pwn/x/pwn",
    "dotdot": "..",
    "space": "case 1",
}


@pytest.mark.parametrize("kind", list(BAD_IDS))
def test_bad_case_id_data_check(box, capsys, kind):
    manifest = box.rewrite_manifest(lambda rows: rows[0].update(case_id=BAD_IDS[kind]))
    code, out, err = run_cli(["data", "check", box.data], capsys)
    assert code == 2
    lines = [ln for ln in out.splitlines() if "[case-id]" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"{manifest} (line 2): [case-id]"), out
    assert "OK" not in out


@pytest.mark.parametrize("kind", list(BAD_IDS))
def test_bad_case_id_train(box, capsys, kind):
    manifest = box.rewrite_manifest(lambda rows: rows[0].update(case_id=BAD_IDS[kind]))
    code, _, err = run_cli(["train", box.config()], capsys)
    one_error_line(code, err, f"{manifest} (line 2)", "case id")
    assert box.new_files_outside(box.runs) == []


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_bad_case_id_evaluate(box, run, capsys, kind):
    victim = _split_of(run, "test")[0]
    box.rewrite_manifest(lambda rows: [r.update(case_id=BAD_IDS[kind]) for r in rows if r["case_id"] == victim])
    code, _, err = run_cli(["evaluate", run], capsys)
    one_error_line(code, err, "manifest.csv (line", "case id")
    assert box.new_files_outside(run) == []
    assert not Path(BAD_IDS["absolute"]).parent.exists()


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_bad_case_id_predict_manifest(box, run, capsys, kind):
    box.rewrite_manifest(lambda rows: rows[1].update(case_id=BAD_IDS[kind]))
    code, _, err = run_cli(["predict", run, box.data / "manifest.csv", "--out", box.out], capsys)
    one_error_line(code, err, "manifest.csv (line 3)", "case id")
    assert box.new_files_outside(box.out, run) == []


def test_non_utf8_case_id(box, run, capsys):
    path = box.data / "manifest.csv"
    path.write_bytes(path.read_bytes().replace(b"case000,", "caf\xe9,".encode("latin-1"), 1))
    for argv in (["train", box.config()], ["evaluate", run], ["predict", run, path, "--out", box.out]):
        code, _, err = run_cli(argv, capsys)
        one_error_line(code, err, str(path), "UTF-8")
    assert box.new_files_outside(box.out, run) == []


def test_non_utf8_file_name_predict(box, run, capsys):
    src = box.data / "images" / "case000_a.nii.gz"
    name = os.fsdecode(b"caf\xe9_a.nii.gz")
    bad = box.root / name
    shutil.copyfile(src, bad)
    box.before.add(bad)
    code, _, err = run_cli(["predict", run, bad, box.data / "images" / "case000_b.nii.gz", "--out", box.out], capsys)
    one_error_line(code, err, "caf\\udce9", "case id")
    assert box.new_files_outside(run) == [] and not list(box.out.glob("*caf*"))


def test_output_path_helper_refuses_escapes(tmp_path):
    from medfuse.data.paths import output_path
    from medfuse.errors import DataError

    assert output_path(tmp_path, "a_pred.nii.gz") == tmp_path / "a_pred.nii.gz"
    assert output_path(tmp_path, "plots", "x.png") == tmp_path / "plots" / "x.png"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    for parts in (("../x.png",), ("/etc/x.png",), ("..",), ("",), ("link", "x.png"), ("a/../../x",)):
        with pytest.raises(DataError, match="refusing to write"):
            output_path(tmp_path, *parts)


# ------------------------------------------------------------------------ 2. duplicate case ids


def test_duplicate_ids_train_evaluate_predict(box, run, capsys):
    manifest = box.rewrite_manifest(lambda rows: rows[1].update(case_id=rows[0]["case_id"]))
    code, out, _ = run_cli(["data", "check", box.data], capsys)
    assert code == 2 and "[duplicate-id]" in out
    for argv in (["train", box.config()], ["evaluate", run], ["predict", run, manifest, "--out", box.out]):
        code, _, err = run_cli(argv, capsys)
        one_error_line(code, err, str(manifest), "[duplicate-id]", "case000")
    assert box.new_files_outside(run, box.out) == []
    assert not (run / "report.json").exists()


# ----------------------------------------------------------------------------- 4. huge headers


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_huge_header_data_check_predict_evaluate(box, run, capsys, suffix):
    victim = _split_of(run, "test")[0]
    huge = _huge_nifti(box.data / "images" / f"{victim}_a{suffix}")
    box.rewrite_manifest(lambda rows: [r.update(image_a=f"images/{huge.name}") for r in rows
                                       if r["case_id"] == victim])
    box.before = box.files()
    code, out, _ = run_cli(["data", "check", box.data], capsys)
    assert code == 2 and f"{huge}: [unreadable]" in out and "30000 x 30000 x 30000" in out
    code, _, err = run_cli(["evaluate", run], capsys)
    one_error_line(code, err, str(huge), "30000 x 30000 x 30000")
    code, _, err = run_cli(["predict", run, huge, box.data / "images" / f"{victim}_b.nii.gz", "--out", box.out],
                           capsys)
    one_error_line(code, err, str(huge), "declares")
    assert box.new_files_outside(run, box.out) == []


# ------------------------------------------------------------------------------- 6. labels


def test_fractional_case_label_refused_by_train(box, capsys):
    manifest = box.rewrite_manifest(lambda rows: rows[3].update(label="0.5"))
    code, out, _ = run_cli(["data", "check", box.data], capsys)
    assert code == 2 and "[label]" in out and "0.5" in out
    code, _, err = run_cli(["train", box.config()], capsys)
    one_error_line(code, err, f"{manifest} (line 5)", "[label]", "0.5")
    assert box.new_files_outside(box.runs) == []


def test_undeclared_class_label_refused_by_train(box, capsys):
    manifest = box.rewrite_manifest(lambda rows: rows[2].update(label="7"))
    code, _, err = run_cli(["train", box.config()], capsys)
    one_error_line(code, err, f"{manifest} (line 4)", "[label]", "7")


def test_empty_case_label_refused_by_train(box, capsys):
    manifest = box.rewrite_manifest(lambda rows: rows[1].update(label=""))
    code, _, err = run_cli(["train", box.config()], capsys)
    one_error_line(code, err, f"{manifest} (line 3)", "[label]", "has no label")
    assert box.new_files_outside(box.runs) == []


def test_missing_label_column_refused_by_train(box, capsys):
    manifest = box.rewrite_manifest(lambda rows: [r.pop("label") for r in rows])
    code, _, err = run_cli(["train", box.config()], capsys)
    one_error_line(code, err, f"{manifest} (line 2)", "[label]", "has no label", "label column")


@pytest.fixture(params=["declared", "undeclared"])
def seg_box(tmp_path, monkeypatch, request) -> Sandbox:
    """A tiny segmentation dataset (labels 0, 1 declared, or nothing declared); case s1's mask holds a 7."""
    root = tmp_path / "seg_src"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        img = rng.normal(0, 1, (4, 8, 8)).astype(np.float32)
        mask = np.zeros((4, 8, 8), np.uint8)
        mask[1:3, 2:5, 2:5] = 7 if i == 1 else 1
        write_nifti(img[None], root / "images" / f"s{i}.nii.gz")
        write_nifti(mask[None], root / "images" / f"s{i}_seg.nii.gz")
        rows.append({"case_id": f"s{i}", "image_mr": f"images/s{i}.nii.gz", "mask": f"images/s{i}_seg.nii.gz",
                     "split": "train" if i < 6 else "val"})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    labels = {"mask_labels": {"bg": 0, "fg": 1}} if request.param == "declared" else {}
    (root / "dataset.json").write_text(json.dumps({"modalities": ["mr"], **labels}))
    sb = Sandbox(tmp_path / "sb", root)
    sb.declared = request.param == "declared"
    monkeypatch.chdir(sb.root)
    return sb


def test_undeclared_mask_value_refused_by_train(seg_box, capsys):
    cfg = {"name": "seg", "output_dir": str(seg_box.runs),
           "data": {"root": str(seg_box.data), "batch_size": 2, "transforms": {"intensity": {"*": {"kind": "zscore"}}}},
           "model": {"name": "baseline_unet3d", "params": {"channels": [4, 8], "strides": [2], "num_classes": 2}},
           "train": {"max_epochs": 1, "monitor": "val/dice", "mode": "max", "progress_bar": False,
                     "log_every_n_steps": 1}}
    path = seg_box.root / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seg_box.before.add(path)
    code, out, _ = run_cli(["data", "check", seg_box.data], capsys)
    if seg_box.declared:  # data check and train: one rule; without declared labels the model's classes bound it
        assert code == 2 and "s1_seg.nii.gz: [label]" in out
    code, _, err = run_cli(["train", path], capsys)
    one_error_line(code, err, str(seg_box.data / "images" / "s1_seg.nii.gz"), "case 's1'", "7")
    assert seg_box.new_files_outside(seg_box.runs) == []


# ----------------------------------------------------------------------- 7. 2D where 3D is expected


@pytest.mark.parametrize("which", ["both", "one"])
def test_2d_image_refused_by_predict(box, run, capsys, which):
    flat = box.root / "flat_a.nii.gz"
    write_nifti(np.ones((1, 1, 16, 16), np.float32), flat)
    other = box.root / "flat_b.nii.gz"
    write_nifti(np.ones((1, 1, 16, 16), np.float32), other) if which == "both" else None
    b = other if which == "both" else box.data / "images" / "case000_b.nii.gz"
    box.before |= {flat, other}
    code, _, err = run_cli(["predict", run, flat, b, "--out", box.out], capsys)
    one_error_line(code, err, str(flat), "[dims]", "2D")
    assert box.new_files_outside(run, box.out) == [] and not list(box.out.glob("*.csv"))


def test_2d_modality_next_to_3d_refused_by_data_check_and_train(box, run, capsys):
    victim = _split_of(run, "train")[0]  # the same seed splits the sandbox copy the same way
    flat = box.data / "images" / f"{victim}_b.nii.gz"
    write_nifti(np.ones((1, 1, 16, 16), np.float32), flat)
    code, out, _ = run_cli(["data", "check", box.data], capsys)
    assert code == 2 and f"{flat}: [dims]" in out
    code, _, err = run_cli(["train", box.config("flat")], capsys)
    one_error_line(code, err, str(flat), "[dims]", f"case '{victim}'")


# ------------------------------------------------------------------------------- 8. configs


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("train.lr=-0.1", "train.lr"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("data.split.val=1.5", "data.split.val"),
    ("data.split={val: 0.6, test: 0.5}", "data.split"),
    ("train.devices=0", "train.devices"),
    ("train.accelerator=tpu_v9", "train.accelerator"),
    ("train.monitor=val/nonsense", "train.monitor"),
    ("eval.n_boot=-5", "eval.n_boot"),
    ("data.transforms.augment.flip_prob=2", "data.transforms.augment.flip_prob"),
])
def test_config_bounds_refused_before_anything_is_written(box, capsys, override, key):
    code, _, err = run_cli(["train", box.config(), override], capsys)
    line = one_error_line(code, err, key)
    assert "Fix:" in line
    assert not box.runs.exists()
    assert box.new_files_outside() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("accel", ["gpu", "cuda"])
def test_gpu_without_gpu(box, capsys, accel):
    code, _, err = run_cli(["train", box.config(), f"train.accelerator={accel}"], capsys)
    one_error_line(code, err, "train.accelerator", "no")
    assert not box.runs.exists()


def test_monitor_lists_the_logged_metrics(box, capsys):
    code, _, err = run_cli(["train", box.config(), "train.monitor=val/dice"], capsys)
    one_error_line(code, err, "train.monitor", "val/balanced_accuracy", "val/loss")


def test_yaml_python_tag_is_refused_as_such(box, capsys):
    path = box.root / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    box.before.add(path)
    code, _, err = run_cli(["train", path], capsys)
    one_error_line(code, err, str(path), "python/object/apply", "refused")
    assert "invalid YAML" not in err and not (box.root / "pwned").exists()
    code, _, err = run_cli(["train", box.config(), "name=!!python/object/apply:os.system ['touch pwned']"], capsys)
    one_error_line(code, err, "name", "refused")


# --------------------------------------------------------------------------- checkpoints


def _bad_checkpoints(tmp: Path) -> dict[str, bytes]:
    from safetensors.torch import save

    def saved(obj) -> bytes:
        torch.save(obj, tmp / "x.pt")
        return (tmp / "x.pt").read_bytes()

    return {"empty": b"", "garbage": b"this is not a checkpoint\n" * 20,
            "plain state dict": saved({"w": torch.zeros(2, 2)}),
            "pickled list": saved([1, 2, 3]),
            "safetensors": save({"w": torch.zeros(2)}),
            "dict without state_dict": saved({"epoch": 3, "note": "hi"})}


CKPT_KINDS = ["empty", "garbage", "plain state dict", "pickled list", "safetensors", "dict without state_dict"]
CKPT_WORDS = {"empty": "empty", "garbage": "cannot read", "plain state dict": "plain state dict",
              "pickled list": "list", "safetensors": "safetensors", "dict without state_dict": "not a medfuse"}


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_bad_best_ckpt_evaluate_and_predict(box, run, capsys, tmp_path, kind):
    best = run / "checkpoints" / "best.ckpt"
    best.write_bytes(_bad_checkpoints(tmp_path)[kind])
    box.before = box.files()
    code, _, err = run_cli(["evaluate", run], capsys)
    one_error_line(code, err, str(best), CKPT_WORDS[kind])
    images = box.data / "images"
    code, _, err = run_cli(["predict", run, images / "case000_a.nii.gz", images / "case000_b.nii.gz",
                            "--out", box.out], capsys)
    one_error_line(code, err, str(best), CKPT_WORDS[kind])
    assert box.new_files_outside(run, box.out) == []


@pytest.mark.parametrize("kind", [*CKPT_KINDS, "another model"])
def test_bad_last_ckpt_on_resume_changes_nothing(box, run, capsys, tmp_path, kind):
    last = run / "checkpoints" / "last.ckpt"
    if kind == "another model":
        ckpt = torch.load(last, weights_only=True)
        sd = ckpt["state_dict"]
        name = next(k for k, v in sd.items() if v.ndim > 1)
        sd[name] = torch.zeros(3, *sd[name].shape[1:])
        sd["model.extra.weight"] = torch.zeros(1)
        del sd[next(k for k in sd if k != name and k.endswith("bias"))]
        torch.save(ckpt, last)
    else:
        last.write_bytes(_bad_checkpoints(tmp_path)[kind])
    (run / "checkpoints" / "done").unlink()  # the run stopped before its last epoch
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(["train", "--resume", run], capsys)
    line = one_error_line(code, err, str(last), CKPT_WORDS.get(kind, "another model"))
    if kind == "another model":
        assert "1 missing" in line and "1 unexpected" in line and "1 shape mismatch" in line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # metrics.csv, config.yaml, checkpoints: nothing deleted or rewritten


def test_pickle_named_safetensors_as_model_weights(box, capsys, tmp_path):
    w = box.root / "weights.safetensors"
    torch.save({"w": torch.zeros(2)}, w)
    box.before.add(w)
    code, _, err = run_cli(["train", box.config(), f"model.weights={w}"], capsys)
    one_error_line(code, err, str(w))
    assert box.new_files_outside(box.runs) == []


# --------------------------------------------------------------------------------- outputs


def test_out_is_an_existing_file(box, run, capsys):
    target = box.root / "taken.txt"
    target.write_text("keep me\n")
    box.before.add(target)
    images = box.data / "images"
    code, _, err = run_cli(["predict", run, images / "case000_a.nii.gz", images / "case000_b.nii.gz",
                            "--out", target], capsys)
    one_error_line(code, err, str(target), "is a file")
    assert target.read_text(encoding="utf-8") == "keep me\n"


def test_unwritable_out_folder(box, run, capsys, monkeypatch):
    import medfuse.data.paths as paths

    ro = box.root / "readonly"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root writes anywhere: make the write probe fail as a read-only folder would
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(ro))

        monkeypatch.setattr(paths.tempfile, "mkstemp", refuse)
    images = box.data / "images"
    try:
        code, _, err = run_cli(["predict", run, images / "case000_a.nii.gz", images / "case000_b.nii.gz",
                                "--out", ro], capsys)
    finally:
        ro.chmod(0o755)
    one_error_line(code, err, str(ro), "cannot write")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("content", [b"\xff\xfe garbage \x00\x01", b"who,what\n1,2\n",
                                     b"case_id,patient_id,split\ncase000,p000,holdout\n"])
def test_corrupt_splits_csv(box, run, capsys, content):
    splits = run / "splits.csv"
    splits.write_bytes(content)
    code, _, err = run_cli(["evaluate", run], capsys)
    one_error_line(code, err, str(splits))
    assert splits.read_bytes() == content


# ---------------------------------------------------------------------------------- 5. lock


def test_second_training_into_a_locked_run(box, capsys):
    config = box.config("locked")
    run_dir = box.runs / "locked"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".medfuse.lock").write_text(f"{holder.pid} {os.uname().nodename} train\n")
        code, _, err = run_cli(["train", config], capsys)
        one_error_line(code, err, str(run_dir), f"process {holder.pid}", "lock")
        assert sorted(p.name for p in run_dir.iterdir()) == [".medfuse.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(box, capsys):
    config = box.config("stale")
    run_dir = box.runs / "stale"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".medfuse.lock").write_text(f"{dead.pid} {os.uname().nodename} train\n")
    code, out, err = run_cli(["train", config], capsys)
    assert code == 0, err
    assert f"taking over the stale lock of process {dead.pid}" in err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / ".medfuse.lock").exists()


# ------------------------------------------------------------------------------ 7. Ctrl-C


def test_ctrl_c_reports_last_checkpoint_and_resumes(box, capsys, monkeypatch):
    import medfuse.engine.trainer as trainer_mod

    class CtrlC(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    original = trainer_mod.build_trainer

    def with_ctrl_c(cfg, run_dir, ckpt_dir, max_epochs, callbacks=None, stage=None):
        return original(cfg, run_dir, ckpt_dir, max_epochs, [*(callbacks or []), CtrlC()], stage=stage)

    config = box.config("ctrlc")
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["train"]["max_epochs"] = 2
    config.write_text(yaml.safe_dump(cfg))
    run_dir = box.runs / "ctrlc"
    monkeypatch.setattr(trainer_mod, "build_trainer", with_ctrl_c)
    code, _, err = run_cli(["train", config], capsys)
    last = run_dir / "checkpoints" / "last.ckpt"
    one_error_line(code, err, str(last), "after epoch 1", f"medfuse train --resume {run_dir}", expected=130)
    assert not (run_dir / ".medfuse.lock").exists()
    monkeypatch.setattr(trainer_mod, "build_trainer", original)
    code, _, err = run_cli(["train", "--resume", run_dir], capsys)
    assert code == 0, err
    with (run_dir / "metrics.csv").open(encoding="utf-8") as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val/loss")]
    assert epochs == [0, 1]
    assert box.new_files_outside(box.runs) == []
