"""NSCLC-Radiogenomics contracts of text_seg: ``train`` never reads a test patient's SEG or CT (the test
split is read only by ``evaluate``), and a corrupt SEG is one line naming it (exit 2), not a traceback."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("highdicom")

from test_nsclc import CONFIG, make_nsclc  # noqa: E402  (tests/families/text_seg is on sys.path)

from medfuse.cli import main  # noqa: E402
from medfuse.config import load_config  # noqa: E402
from medfuse.errors import DataError  # noqa: E402

TINY = ["train.max_epochs=1", "data.batch_size=4", "data.num_workers=0", "data.params.image_size=64",
        "data.params.mask_size=64", "model.params.image_size=64", "model.params.tiny_dim=32",
        "model.params.token_dim=16", "train.accelerator=cpu"]


def _overrides(root: Path, runs: Path) -> list[str]:
    return [f"data.root={root}", f"output_dir={runs}", "name=nsclc", *TINY]


def _splits(root: Path, runs: Path) -> dict[str, list[str]]:
    """split -> patient ids, as the data module will split them (nothing but headers is read)."""
    from medfuse.data.datamodule import resolve_splits

    _, cases = resolve_splits(load_config(CONFIG, _overrides(root, runs)), None)
    return {s: [c.case_id for c in cs] for s, cs in cases.items()}


def _patient_files(root: Path, pid: str) -> tuple[Path, list[Path]]:
    """(the patient's SEG, its CT slices)."""
    study = next((root / "NSCLC Radiogenomics" / pid).iterdir())
    seg = next(study.glob("1000.*/1-1.dcm"))
    return seg, sorted(next(study.glob("3.000000-CT-*")).glob("*.dcm"))


def truncate_seg_pixels(seg: Path) -> None:
    """Keep the SEG's header, cut its PixelData to a third (pydicom: "2048 vs 6144 bytes")."""
    ds = pydicom.dcmread(str(seg))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(str(seg))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def one_error_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return make_nsclc(tmp_path_factory.mktemp("nsclc_honesty"))


@pytest.fixture(scope="module")
def test_corrupted(replica, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the replica whose test patients' SEG pixels and CT slices are damaged (their headers,
    which the layout reads to pair each SEG with its CT, stay intact)."""
    root = tmp_path_factory.mktemp("nsclc_bad_test") / "data"
    shutil.copytree(replica, root)
    test_ids = _splits(root, root.parent / "runs")["test"]
    assert test_ids
    for pid in test_ids:
        seg, ct = _patient_files(root, pid)
        truncate_seg_pixels(seg)
        for f in ct:  # cut into the pixel data: read_dicom refuses the slice
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
    return root, test_ids


def test_data_module_reads_no_test_case_until_evaluate_asks(test_corrupted, tmp_path, monkeypatch):
    from medfuse.data import seg as seg_module
    from medfuse.families.text_seg.data import TextSegDataModule

    root, test_ids = test_corrupted
    read: list[str] = []
    real = seg_module.read_label

    def spy(path, image=None):
        read.append(str(path))
        return real(path, image)

    monkeypatch.setattr(seg_module, "read_label", spy)  # every SEG / CT volume of text_seg goes through it
    dm = TextSegDataModule(load_config(CONFIG, _overrides(root, tmp_path / "runs")))
    for split in ("train", "val"):
        assert len(dm.dataset(split)[0]["image"]) == 3  # the training splits load (2.5D)
    assert "test" in dm.records and len(dm.records) == 3  # the split is known...
    assert read and sorted(dm.records.built()) == ["train", "val"]  # ...but not read
    assert not [p for p in read if any(f"/{pid}/" in p for pid in test_ids)], read
    with pytest.raises(DataError) as e:  # asked for (evaluate), the damaged test patient is refused
        dm.records["test"]
    assert any(f"/{pid}/" in str(e.value) for pid in test_ids)


def test_train_ignores_a_damaged_test_split_and_evaluate_names_it(test_corrupted, tmp_path, capsys):
    root, test_ids = test_corrupted
    runs = tmp_path / "runs"
    code, err = run_cli(["train", CONFIG, *_overrides(root, runs)], capsys)
    assert code in (0, None), err
    run = runs / "nsclc"
    splits = {r["case_id"]: r["split"] for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    assert sorted(p for p, s in splits.items() if s == "test") == sorted(test_ids)  # the saved split is kept
    assert (run / "checkpoints" / "best.ckpt").exists()
    code, err = run_cli(["evaluate", run], capsys)
    one_error_line(code, err, f"/{test_ids[0]}/")


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_seg_is_one_line_naming_it(replica, tmp_path, capsys, split):
    root = tmp_path / "data"
    shutil.copytree(replica, root)
    pid = _splits(root, tmp_path / "runs")[split][0]
    seg, _ = _patient_files(root, pid)
    truncate_seg_pixels(seg)
    code, err = run_cli(["train", CONFIG, *_overrides(root, tmp_path / "runs")], capsys)
    one_error_line(code, err, str(seg), "pixel data", "2048 vs 6144 bytes")
    # `medfuse data check` files the same SEG under `unreadable`, as before
    from medfuse.data.checks import check_dataset

    problems = [p for p in check_dataset(root) if p.case_id == pid]
    assert [p.rule for p in problems] == ["unreadable"] and str(seg) in problems[0].line()


def test_evaluate_and_predict_read_no_training_patient_and_fit_reads_them_first(replica, tmp_path, capsys):
    """Only fit builds the training splits (in setup, before anything is written); a data module that
    only scores the test split never opens a training patient's SEG or CT."""
    from medfuse.families.text_seg.data import TextSegDataModule

    root = tmp_path / "data"
    shutil.copytree(replica, root)
    train_ids = _splits(root, tmp_path / "runs")["train"]
    seg, _ = _patient_files(root, train_ids[0])
    truncate_seg_pixels(seg)  # a damaged training patient
    dm = TextSegDataModule(load_config(CONFIG, _overrides(root, tmp_path / "runs")))
    assert dm.records["test"] and dm.records.built() == ["test"]  # scoring the test split reads only it
    with pytest.raises(DataError, match=train_ids[0]):  # training reads it first, and refuses it
        dm.setup("fit")
    code, err = run_cli(["train", CONFIG, *_overrides(root, tmp_path / "runs")], capsys)
    one_error_line(code, err, train_ids[0])
    assert not (tmp_path / "runs" / "nsclc" / "config.yaml").exists()  # refused before anything is written
