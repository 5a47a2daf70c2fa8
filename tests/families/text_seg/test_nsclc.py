"""NSCLC-Radiogenomics: a TCIA-style replica (CT series from pydicom's real CT_small.dcm, highdicom SEGs
without per-frame segment identification as early 3D Slicer wrote them, the clinical CSV with a
stray space in "Histology "), data check with planted faults, tumour-slice records and one CPU epoch."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

hd = pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from medfuse.data.checks import check_dataset  # noqa: E402
from medfuse.data.layouts import load_cases  # noqa: E402

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "text_seg_nsclc.yaml"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
CSV_NAME = "NSCLCR01Radiogenomic_DATA_LABELS_2018-05-22_1500-shifted.csv"


def write_ct(folder: Path, n: int, step: float = 3.0, skip: int | None = None, truncate: int | None = None,
             seed: int = 0) -> list[Path]:
    """Copies of CT_small.dcm stacked along its normal: one CT series (z = k * step)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(str(CT_SMALL))
    iop = np.asarray([float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    uid, rng, paths = generate_uid(), np.random.default_rng(seed), []
    for k in range(n):
        if k == skip:
            continue
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.InstanceNumber = uid, "CT chest", k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step * normal]
        noise = rng.integers(-20, 20, base.pixel_array.shape)
        ds.PixelData = (base.pixel_array.astype(np.int32) + noise).astype(base.pixel_array.dtype).tobytes()
        p = folder / f"1-{k + 1:02d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(p)
    if truncate is not None:
        data = paths[truncate].read_bytes()
        paths[truncate].write_bytes(data[: len(data) - 4000])
    return paths


def write_slicer_seg(ct: list[Path], labels: np.ndarray, out: Path, early_slicer: bool = True) -> Path:
    """A highdicom SEG of ``labels`` (D, H, W: 0 = background, k = segment k); ``early_slicer`` drops the
    per-frame SegmentIdentificationSequence as NSCLC-Radiogenomics' 3D Slicer SEGs lack it."""
    sources = [pydicom.dcmread(str(p)) for p in ct]
    n = int(labels.max())
    segs = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=f"tumour {k}", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for k in range(1, n + 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack([labels == k for k in range(1, n + 1)], -1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segs,
        series_instance_uid=hd.UID(), series_number=1000, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="3D Slicer", manufacturer_model_name="test", software_versions="0", device_serial_number="1")
    if early_slicer and n == 1:
        for item in [*seg.PerFrameFunctionalGroupsSequence, *seg.SharedFunctionalGroupsSequence]:
            if "SegmentIdentificationSequence" in item:
                del item.SegmentIdentificationSequence
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


PATIENTS = [("R01-001", "Adenocarcinoma", "T1a"), ("R01-002", "Squamous cell carcinoma", "T2a"),
            ("R01-003", "Adenocarcinoma", "T2b"), ("AMC-001", "Squamous cell carcinoma", "T3"),
            ("AMC-002", "Adenocarcinoma", "T1b"), ("R01-004", "NSCLC NOS (not otherwise specified)", "T4"),
            ("R01-005", "Adenocarcinoma", "Tis")]


def make_nsclc(root: Path, n_slices: int = 6, gap_patient: str | None = None, trunc_patient: str | None = None,
               two_segments: str | None = None) -> Path:
    """``root/<patient>/<study>/<series>/1-NN.dcm`` per patient (R01-005 has no SEG) and the clinical CSV."""
    for i, (pid, _, _) in enumerate(PATIENTS):
        study = root / "NSCLC Radiogenomics" / pid / "06-07-1990-NA-CT CHEST-12345"
        ct = write_ct(study / f"3.000000-CT-{i}", n_slices, skip=2 if pid == gap_patient else None,
                      truncate=1 if pid == trunc_patient else None, seed=i)
        if pid == "R01-005":
            continue  # no tumour segmentation: left out
        labels = np.zeros((len(ct), 128, 128), np.uint8)
        labels[1:4, 40 + 4 * i:70 + 4 * i, 50:85] = 1
        if pid == two_segments:
            labels[2, 60:70, 60:70] = 2
        seg_ct = [p for p in ct if p.stat().st_size > 10000]
        write_slicer_seg(seg_ct if len(seg_ct) == len(ct) else ct, labels, study /
                         f"1000.000000-3D Slicer segmentation result-{i}" / "1-1.dcm")
    with (root / CSV_NAME).open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["Case ID", "Patient affiliation", "Age at Histological Diagnosis", "Gender", "Histology ",
                    "Pathological T stage", "Pathological N stage", "Pathological M stage"])
        for pid, hist, t in PATIENTS:
            w.writerow([pid, "Stanford" if pid.startswith("R01") else "VA", "68", "Male", hist, t, "N0", "M0"])
    return root


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_nsclc(tmp_path_factory.mktemp("nsclc"))


def test_layout_pairs_each_seg_with_its_ct_and_reads_the_csv(replica):
    table = load_cases(replica)
    assert table.layout == "nsclc" and table.modalities == ["ct"] and table.mask_required
    assert [c.case_id for c in table.cases] == [p for p, _, _ in PATIENTS if p != "R01-005"]
    c = table.cases[1]
    assert c.patient_id == "R01-002" and c.extra["histology"] == "Squamous cell carcinoma"
    assert c.extra["t_stage"] == "T2a" and c.extra["n_stage"] == "N0"
    assert "3.000000-CT-1" in c.images["ct"] and c.mask.endswith("1-1.dcm")
    assert any("1 without a SEG" in n for n in table.notes)
    assert check_dataset(replica) == []


def test_tumour_slices_become_records_on_the_ct_grid(replica):
    from medfuse.families.text_seg.data import tumour_slice_records
    from medfuse.families.text_seg.pixels import read_mask, read_plane

    table = load_cases(replica)
    recs = tumour_slice_records(table.cases[:2], "ct")
    assert [r.case_id for r in recs] == [f"{p}_z{k:03d}" for p in ("R01-001", "R01-002") for k in (1, 2, 3)]
    plane = read_plane(recs[0].image, recs[0].slice_index, True, recs[0].case_id)
    assert plane.shape == (3, 128, 128) and plane.min() < -500  # 2.5D in HU
    mask = read_mask(recs[0], None, (128, 128))
    assert mask.sum() == 30 * 35 and mask[40:70, 50:85].all()
    from medfuse.data.seg import read_label

    assert read_label(recs[0].mask, recs[0].image).meta["reader"] == "pydicom"  # the early-Slicer fallback


def _spy_read_label(monkeypatch) -> list[tuple[str, str | None]]:
    from medfuse.data import seg as seg_module

    calls: list[tuple[str, str | None]] = []
    real = seg_module.read_label

    def spy(path, image=None):
        calls.append((str(path), None if image is None else str(image)))
        return real(path, image)

    monkeypatch.setattr(seg_module, "read_label", spy)  # every CT / SEG volume of text_seg goes through it
    return calls


def test_a_shuffled_first_epoch_reads_each_series_once(replica, monkeypatch):
    """Training's first (shuffled) epoch with cache_in_memory: the first slice of a patient loads all its
    slices while the CT is in memory (it used to read the CT and the SEG again for every slice: 12 reads)."""
    from medfuse.config import validate_params
    from medfuse.families.text_seg.data import TextSegDataset, tumour_slice_records
    from medfuse.families.text_seg.params import TextSegDataParams

    recs = tumour_slice_records(load_cases(replica).cases[:2], "ct")  # 2 patients x 3 slices
    params = validate_params(TextSegDataParams, {"image_size": 32, "mask_size": 32, "intensity": "ct",
                                                 "two_and_half_d": True, "text_template": "{histology}"},
                             "data.params")
    ds = TextSegDataset(recs, params, train=True)
    calls = _spy_read_label(monkeypatch)
    items = {recs[i].case_id: ds[(i, i)] for i in (4, 0, 3, 1, 5, 2)}
    assert len(items) == 6 and all(it["mask"].sum() > 0 for it in items.values())
    assert len(calls) <= 2 * 2, calls  # at most each patient's CT and its SEG on the CT, once
    again = TextSegDataset(recs, params.model_copy(update={"cache_in_memory": False}), train=True)
    for i in (4, 0, 3, 1, 5, 2):  # the same pixels, item by item, without the in-memory cache
        assert torch.equal(again[(i, i)]["image"], items[recs[i].case_id]["image"])
        assert torch.equal(again[(i, i)]["mask"], items[recs[i].case_id]["mask"])


def test_volume_cache_is_bounded_and_sees_edited_files(replica, monkeypatch):
    import os

    from medfuse.families.text_seg import pixels as ts_pixels

    monkeypatch.setattr(ts_pixels, "VOLUMES", ts_pixels.VolumeCache(max_items=2))
    calls = _spy_read_label(monkeypatch)
    cases = load_cases(replica).cases[:3]
    a = ts_pixels._volume(cases[0].images["ct"])
    assert not a.flags.writeable  # shared between records: read-only
    assert ts_pixels._volume(cases[0].images["ct"]) is a and len(calls) == 1
    ts_pixels._volume(cases[0].mask, cases[0].images["ct"])  # the SEG on the CT's grid: another entry
    assert ts_pixels._volume(cases[0].mask, cases[0].images["ct"]) is not a and len(calls) == 2
    ts_pixels._volume(cases[1].images["ct"])  # a third volume: the least recently used (the CT) goes
    assert len(ts_pixels.VOLUMES) == 2
    ts_pixels._volume(cases[0].images["ct"])
    assert len(calls) == 4
    f = sorted(Path(cases[0].images["ct"]).glob("*.dcm"))[0]  # an edited slice: the series is read again
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        ts_pixels._volume(cases[0].images["ct"])
        assert len(calls) == 5
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    big = ts_pixels.VolumeCache(max_bytes=10)  # a volume over the byte bound is not kept
    big.get("x", None, lambda: np.zeros(100, np.uint8))
    assert len(big) == 0


def test_planted_faults_are_caught(tmp_path):
    root = make_nsclc(tmp_path / "nsclc", gap_patient="R01-002", trunc_patient="AMC-001", two_segments="R01-003")
    problems = check_dataset(root)
    rules = {(p.case_id, p.rule) for p in problems}
    assert ("R01-002", "dicom") in rules and ("AMC-001", "dicom") in rules and ("R01-003", "label") in rules
    assert not any(p.case_id in ("R01-001", "AMC-002", "R01-004") for p in problems)
    line = next(p.line() for p in problems if p.case_id == "R01-002")
    assert "missing 1 slice" in line and "\n" not in line


def _count_opens(folders: list[Path]):
    """A stand-in for ``open`` counting the files opened under ``folders`` (pydicom, the DICOM marker
    checks and the layout all open files through it), and the counter."""
    import builtins
    import collections

    real, counts, roots = builtins.open, collections.Counter(), [str(f) + "/" for f in folders]

    def counting(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and any(str(file).startswith(r) for r in roots):
            counts[str(file)] += 1
        return real(file, *args, **kwargs)

    return counting, counts


@pytest.fixture(scope="module")
def evaluated(replica, tmp_path_factory):
    """One CPU epoch on the replica, then ``evaluate`` with the files opened under the test patients'
    folders counted: (run, report, test patient ids, path -> opens)."""
    import builtins

    from medfuse.config import load_config
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("nsclc_run")
    cfg = load_config(CONFIG, [
        f"data.root={replica}", f"output_dir={tmp / 'runs'}", "train.max_epochs=1", "data.batch_size=4",
        "data.num_workers=0", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "data.split.val=0.2", "data.split.test=0.2",
        "train.accelerator=cpu"])
    run = fit(cfg)
    splits = {r["case_id"]: r["split"] for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    test_patients = [p for p, s in splits.items() if s == "test"]
    counting, opens = _count_opens([replica / "NSCLC Radiogenomics" / p for p in test_patients])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", counting)
        report = evaluate(run, n_boot=50)
    return run, report, test_patients, opens


def test_config_trains_one_cpu_epoch(evaluated):
    run, report, test_patients, _ = evaluated
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    dice = [float(r["val/dice"]) for r in rows if r.get("val/dice") not in (None, "")]
    assert dice and 0.0 <= dice[-1] <= 1.0
    splits = {r["case_id"]: r["split"] for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    assert set(splits) == {p for p, _, _ in PATIENTS if p != "R01-005"}  # split by patient
    # evaluate scores slices, but the bootstrap resamples patients: n is the number of test patients
    dice = report["metrics"]["dice"]
    assert dice["n"] == len(test_patients) and dice["n_items"] > dice["n"]


def test_evaluate_reads_each_series_once(replica, evaluated):
    """Scoring, writing and plotting a patient's 3 tumour slices read its CT series and SEG once, not once
    per slice and step: 36 opens of the test patient's 7 files, within the bound of 41 (it used to be 294)."""
    import builtins

    from medfuse.data.seg import read_label

    run, report, test_patients, opens = evaluated
    assert report["n"] == 3 * len(test_patients) and sum(opens.values()) > 0
    # what reading each test series once costs: the SEG on its CT's grid, the CT itself, and one header
    # read of every file by the layout (which pairs each SEG with its CT)
    folders = [replica / "NSCLC Radiogenomics" / p for p in test_patients]
    counting, once = _count_opens(folders)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", counting)
        for folder in folders:
            study = next(folder.iterdir())
            seg, ct = next(study.glob("1000.*/1-1.dcm")), next(study.glob("3.000000-CT-*"))
            read_label(seg, ct)
            read_label(ct)
    n_files = sum(1 for f in folders for p in f.rglob("*.dcm"))
    bound = sum(once.values()) + n_files
    assert sum(opens.values()) <= bound, (sum(opens.values()), bound)


def _predict_manifest(path: Path, rows: list[list[str]]) -> str:
    """A predict manifest: rows of (case_id, image_ct, slice, box, histology, t_stage)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_ct", "slice", "box", "histology", "t_stage"])
        w.writerows(rows)
    return str(path)


def test_predict_refuses_a_2d_image_for_a_ct_run_and_names_an_empty_prompts_line(evaluated, replica, tmp_path):
    """A plain 8-bit PNG given to a run trained on CT series (2.5D, HU window) was windowed as HU
    (a nearly constant image) without a word; an empty prompt named neither the manifest nor its line.
    A CT series with a slice still predicts, from the run and from its package."""
    from PIL import Image

    from medfuse.engine.package import export
    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    run = evaluated[0]
    series = str(next((replica / "NSCLC Radiogenomics" / "R01-001").glob("*/3.000000-CT-*")))
    png = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(png)
    good = ["ok", series, "2", "40 40 80 70", "Adenocarcinoma", "T1a"]
    pkg = export(run, tmp_path / "nsclc.zip")
    for source in (run, pkg):
        manifest = _predict_manifest(tmp_path / "png.csv", [good, ["flat", str(png), "", "40 40 80 70",
                                                                   "Adenocarcinoma", "T1a"]])
        with pytest.raises(DataError) as e:
            predict(source, [manifest], tmp_path / f"png_{Path(source).name}")
        assert e.value.where == str(png) and "case flat is a 2D image" in e.value.problem
        assert "slices of 3D ct volumes" in e.value.problem and "slice column" in e.value.fix
    manifest = _predict_manifest(tmp_path / "empty.csv", [good, ["empty", series, "2", "40 40 80 70", "", "T1a"]])
    with pytest.raises(DataError) as e:
        predict(run, [manifest], tmp_path / "empty")
    assert e.value.where == f"{manifest} (line 3)" and "case empty has no value for 'histology'" in e.value.problem
    out = predict(pkg, [_predict_manifest(tmp_path / "good.csv", [good])], tmp_path / "good")
    assert (out / "ok.png").exists()
