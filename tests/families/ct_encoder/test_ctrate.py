"""CT-RATE: a replica of the release's tree (v2 volumes in HU, v1 stored values + metadata), region
masks, CT-RATE-Thinking JSON lines as CoT; data check with planted faults; one CPU epoch per config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfuse.data.checks import check_dataset
from medfuse.data.layouts import load_cases

CONFIGS = Path(__file__).parents[3] / "src" / "medfuse" / "configs"
SHAPE = (8, 32, 32)  # (D, H, W)
AFFINE = np.diag([0.75, 0.75, 1.5, 1.0])
REGIONS = {"1": "right lung", "2": "left lung", "3": "heart", "4": "liver"}
LABELS = ["Lung nodule", "Cardiomegaly"]


def _nifti(arr: np.ndarray, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), affine), str(path))  # (D,H,W) -> (i,j,k)


def make_ctrate(root: Path, n_patients: int = 10, v1: bool = False, seed: int = 0) -> Path:
    """``root`` = CT-RATE's dataset/ folder: train/train_N/train_N_a/train_N_a_{1,2}.nii.gz, reports, metadata,
    labels, masks/, regions.json, vqa.jsonl and report.jsonl (CT-RATE-Thinking style)."""
    rng = np.random.default_rng(seed)
    reports, meta, labels, vqa, rep = [], [], [], [], []
    for i in range(1, n_patients + 1):
        side = ("right", "left")[i % 2]
        heart = i % 3 == 0
        hu = np.full(SHAPE, -1024, np.int16)
        region = np.zeros(SHAPE, np.uint8)
        region[1:7, 4:28, 2:15], region[1:7, 4:28, 17:30] = 1, 2  # right lung (low x), left lung
        hu[region > 0] = -850
        region[3:6, 12:20, 12:20] = 3
        hu[region == 3] = 40
        region[6:8, 20:30, 4:14] = 4
        hu[region == 4] = 60
        z, y = rng.integers(2, 6), rng.integers(8, 24)
        hu[z, y:y + 3, (5 if side == "right" else 21):(8 if side == "right" else 24)] = 30  # the nodule
        hu += rng.integers(-15, 15, SHAPE).astype(np.int16)
        stored = (hu + 1024).astype(np.int16) if v1 else hu
        for rec in (1, 2):  # two reconstructions of one scan: the first is kept
            name = f"train_{i}_a_{rec}"
            _nifti(stored, root / "train" / f"train_{i}" / f"train_{i}_a" / f"{name}.nii.gz")
            _nifti(region, root / "masks" / f"{name}.nii.gz")
            findings = f"A nodule in the {side} lung. " + ("The heart is enlarged." if heart else "Normal heart size.")
            reports.append({"VolumeName": f"{name}.nii.gz", "ClinicalInformation_EN": "", "Technique_EN": "",
                            "Findings_EN": findings, "Impressions_EN": f"{side.title()} lung nodule"
                            + (" and cardiomegaly." if heart else ".")})
            meta.append({"VolumeName": f"{name}.nii.gz", "RescaleSlope": "1", "RescaleIntercept": "-1024",
                         "XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5"})
            labels.append({"VolumeName": f"{name}.nii.gz", LABELS[0]: "1", LABELS[1]: str(int(heart))})
        # CT-RATE-Thinking records as its generator writes them (u2Tokenizer DATA_SYNTHESIS_SPEC.md): the
        # image path under CT-RATE/dataset/, the source report in every record, a raw LLM trace, and
        # a refined thinking in some VQA pairs; report.jsonl holds the report-level narrative.
        image = f"CT-RATE/dataset/train/train_{i}/train_{i}_a/train_{i}_a_1.nii.gz"
        source = f"A nodule in the {side} lung. " + ("The heart is enlarged." if heart else "Normal heart size.")
        vqa.append({"image": image, "report": source, "question": "Where is the nodule?",
                    "system_thinking": "The report says the nodule is there, so I answer from the report.",
                    "thinking": f"The report places a nodule in the {side} lung.",
                    "refined_thinking": f"The image places a nodule in the {side} lung.",
                    "answer": f"In the {side} lung."})
        vqa.append({"image": image, "report": source, "question": "Is the heart enlarged?",
                    "thinking": "The cardiac silhouette is " + ("wide." if heart else "of normal width."),
                    "answer": "Yes." if heart else "No."})
        rep.append({"image": image, "report": source, "question": "Describe the findings of this scan.",
                    "thinking_before": "Where is the nodule? The image places a nodule ...",
                    "thinking_after": f"First the lungs: a nodule sits in the {side} lung. Then the heart."})
    for sub, name, rows in (("radiology_text_reports", "train_reports.csv", reports),
                            ("metadata", "train_metadata.csv", meta),
                            ("multi_abnormality_labels", "train_predicted_labels.csv", labels)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        with (root / sub / name).open("w", newline="", encoding="utf-8-sig") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (root / "regions.json").write_text(json.dumps({"region_names": REGIONS,
                                                   "region_groups": {"lungs": [1, 2]}}))
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in vqa) + "\n")
    (root / "report.jsonl").write_text("\n".join(json.dumps(r) for r in rep) + "\n")
    return root


TINY = ["train.max_epochs=1", "data.batch_size=4", "data.num_workers=0", "data.transforms.spacing=null",
        "data.transforms.spatial_size=[8,32,32]", "model.params.preset=tiny", "model.params.num_regions=4",
        "model.params.patch_size=[2,8,8]", "model.params.img_size=[8,32,32]", "model.params.mask_hidden=4",
        "model.params.embed_dim=16", "data.split.val=0.2", "data.split.test=0.2", "train.accelerator=cpu"]


def test_layout_and_check_pass_on_the_replica(tmp_path):
    root = make_ctrate(tmp_path / "dataset")
    table = load_cases(root)
    assert table.layout == "ctrate" and len(table) == 20 and table.patient_ids_given
    c = next(c for c in table.cases if c.case_id == "train_3_a_1")
    assert c.patient_id == "train_3" and c.mask.endswith("masks/train_3_a_1.nii.gz") and c.text.startswith("Left")
    assert check_dataset(root, max_cases=4) == []


def test_planted_faults_are_caught(tmp_path):
    root = make_ctrate(tmp_path / "dataset", n_patients=4)
    vol = root / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz"
    arr = nib.load(str(vol)).get_fdata().transpose(2, 1, 0)
    _nifti((arr - 1024).astype(np.int16), vol)  # a v2 volume rescaled a second time
    (root / "train" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    _nifti(np.zeros(SHAPE, np.uint8), root / "masks" / "train_3_a_1.nii.gz", affine=np.diag([1.0, 1.0, 1.5, 1.0]))
    rules = {(p.case_id, p.rule) for p in check_dataset(root)}
    assert {("train_1_a_1", "hu"), ("train_2_a_1", "unreadable"), ("train_3_a_1", "grid")} <= rules
    assert not any(cid.startswith("train_4") for cid, _ in rules)


def _steps(root, cot):
    from medfuse.families.ct_encoder.data import read_ctrate
    from medfuse.families.ct_encoder.params import CTEncoderDataParams

    p = CTEncoderDataParams(reports="radiology_text_reports/train_reports.csv", metadata=None, labels=None, cot=cot)
    table, _, _ = read_ctrate(root, p)
    return {c.case_id: c.extra["steps"] for c in table.cases}


def test_thinking_vqa_pairs_become_cot_steps_without_the_source_report(tmp_path):
    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    steps = _steps(root, "vqa.jsonl")["train_1_a_1"]
    texts = [t for t, _ in steps]
    assert texts == ["The image places a nodule in the left lung.", "In the left lung.",
                     "The cardiac silhouette is of normal width.", "No."]  # refined thinking, answers, in order
    assert dict(steps)["In the left lung."] == [2]
    # never the source report each record carries (the generator's own target), nor the raw LLM trace
    assert not any("Normal heart size" in t or "report" in t.lower() for t in texts)


def test_a_report_level_narrative_replaces_the_vqa_traces_it_restates(tmp_path):
    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    for cot in (["vqa.jsonl", "report.jsonl"], ["report.jsonl", "vqa.jsonl"]):
        steps = _steps(root, cot)["train_1_a_1"]
        assert [t for t, _ in steps] == ["First the lungs: a nodule sits in the left lung.", "Then the heart."]
        assert dict(steps)["First the lungs: a nodule sits in the left lung."] == [1, 2]


def test_a_scans_cot_serves_the_reconstruction_that_is_kept(tmp_path):
    """CT-RATE reconstructions share one report, so CoT records of train_N_a_2 serve train_N_a_1."""
    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    text = (root / "vqa.jsonl").read_text(encoding="utf-8").replace("_a_1.nii.gz", "_a_2.nii.gz")
    (root / "vqa.jsonl").write_text(text)
    steps = _steps(root, "vqa.jsonl")
    assert set(steps) == {"train_1_a_1", "train_2_a_1", "train_3_a_1"}  # reconstructions: first
    assert [t for t, _ in steps["train_1_a_1"]][:2] == ["The image places a nodule in the left lung.",
                                                         "In the left lung."]


def test_cot_files_that_match_no_volume_are_refused_and_partial_or_regionless_ones_warned(tmp_path):
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    (root / "other.jsonl").write_text(json.dumps({"image": "CT-RATE/dataset/valid/valid_9/valid_9_a/valid_9_a_1.nii.gz",
                                                  "thinking": "x", "answer": "y"}) + "\n")
    with pytest.raises(DataError, match=r"other.jsonl.*none of its 1 volumes \(e.g. valid_9_a_1\) is a volume"):
        _steps(root, "other.jsonl")
    (root / "none.jsonl").write_text(json.dumps({"question": "no volume named"}) + "\n")
    with pytest.raises(DataError, match="none.jsonl.*holds no record that names a volume"):
        _steps(root, "none.jsonl")
    lines = (root / "vqa.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "part.jsonl").write_text("\n".join(ln for ln in lines if "train_3_" not in ln) + "\n")
    with pytest.warns(UserWarning, match="chain-of-thought for 2 of 3 volumes"):
        assert _steps(root, "part.jsonl")["train_3_a_1"] == []
    zh = [{"image": json.loads(ln)["image"], "thinking": "左肺可见结节。", "answer": "左肺。"} for ln in lines]
    (root / "vqa_chinese.jsonl").write_text("\n".join(map(json.dumps, zh)) + "\n")
    with pytest.warns(UserWarning, match="no chain-of-thought step names a region"):
        assert _steps(root, "vqa_chinese.jsonl")["train_1_a_1"][0][1] == []


def test_thinking_text_reads_think_tags_and_conversations():
    from medfuse.families.ct_encoder.cot import thinking_text

    assert thinking_text({"response": "<think>Lungs first.</think> A left nodule."}) == "Lungs first. A left nodule."
    llava = {"conversations": [{"from": "human", "value": "<image> Findings?"},
                               {"from": "gpt", "value": "The heart is normal."}]}
    assert thinking_text(llava) == "The heart is normal."
    assert thinking_text({"report": "Source text.", "thinking_before": "x", "system_thinking": "y"}) == ""


@pytest.mark.parametrize("config, v1", [("ct_encoder_ctrate.yaml", False), ("ct_encoder_ctrate_v1.yaml", True)])
def test_config_trains_one_cpu_epoch(tmp_path, config, v1):
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    root = make_ctrate(tmp_path / "dataset", v1=v1)
    cfg = load_config(CONFIGS / config, [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *TINY])
    run = fit(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    assert any(r.get("val/mean_recall") not in (None, "") for r in rows)
    splits = list(csv.DictReader((run / "splits.csv").open(encoding="utf-8")))
    assert len(splits) == 10  # first reconstruction per scan, split by patient


def test_v2_volumes_under_the_v1_config_are_refused(tmp_path):
    from medfuse.config import load_config
    from medfuse.engine.build import build_datamodule
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=5, v1=False)
    cfg = load_config(CONFIGS / "ct_encoder_ctrate_v1.yaml", [f"data.root={root}", *TINY])
    dm = build_datamodule(cfg)
    with pytest.raises(DataError, match="far below air"):
        dm.dataset("train")[0]


def test_a_broken_cot_line_is_named_by_its_number(tmp_path):
    from medfuse.errors import DataError
    from medfuse.families.ct_encoder.cot import read_cot

    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "train_1_a_1.nii.gz", "thinking": "ok"}) + "\n\n{broken\n")
    with pytest.raises(DataError, match=r"vqa.jsonl \(line 3\).*not valid JSON"):
        read_cot(path)


def test_a_missing_first_reconstruction_keeps_the_next_one(tmp_path, caplog):
    """reconstructions: first keeps the first reconstruction ON DISK (a partial download used to lose
    the whole patient when its _1 volume was missing)."""
    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    (root / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz").unlink()
    with caplog.at_level("WARNING", logger="medfuse"):
        steps = _steps(root, None)
    assert any("not under" in r.getMessage() for r in caplog.records)
    assert set(steps) == {"train_1_a_2", "train_2_a_1", "train_3_a_1"}


@pytest.mark.parametrize("slope", ["abc", "nan", "0"])
def test_a_bad_rescale_row_is_refused_naming_the_metadata_csv(tmp_path, slope):
    from medfuse.errors import DataError
    from medfuse.families.ct_encoder.data import read_ctrate
    from medfuse.families.ct_encoder.params import CTEncoderDataParams

    root = make_ctrate(tmp_path / "dataset", n_patients=3, v1=True)
    meta = root / "metadata" / "train_metadata.csv"
    rows = list(csv.DictReader(meta.open(encoding="utf-8-sig")))
    rows[0]["RescaleSlope"] = slope
    with meta.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    p = CTEncoderDataParams(reports="radiology_text_reports/train_reports.csv",
                            metadata="metadata/train_metadata.csv", labels=None, cot=None, hu="metadata")
    with pytest.raises(DataError, match=rf"train_metadata.csv.*train_1_a_1 are '{slope}'.*not finite numbers"):
        read_ctrate(root, p)


def test_a_region_mask_value_beyond_the_vocabulary_is_one_line_naming_the_mask(tmp_path):
    """The masks hold 1..4 but regions.json names 3: it crashed inside region attention with a
    traceback ('region mask values must be in 0..3')."""
    from medfuse.config import load_config
    from medfuse.engine.build import build_datamodule
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    (root / "regions.json").write_text(json.dumps({"region_names": dict(list(REGIONS.items())[:3])}))
    cfg = load_config(CONFIGS / "ct_encoder_ctrate.yaml", [f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
                                                          *TINY, "model.params.num_regions=3", "data.split.val=0.34",
                                                          "data.split.test=0.0"])
    dm = build_datamodule(cfg, tmp_path / "run")
    dm.setup("fit")
    with pytest.raises(DataError, match=r"masks/train_\d_a_1\.nii\.gz: \[label\] .*values \{4\}"):
        next(iter(dm.train_dataloader()))


def test_region_ids_that_no_mask_value_can_match_are_refused(tmp_path):
    """regions.json numbering 11..14 while the masks hold 1..4 trained without a region level, silently."""
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    (root / "regions.json").write_text(json.dumps({"region_names": {str(10 + int(k)): v for k, v in REGIONS.items()}}))
    with pytest.raises(DataError, match=r"regions.json.*numbers the regions \[11, 12, 13, 14\].*1\.\.4"):
        _steps(root, None)


def test_data_check_leaves_the_fill_outside_the_scan_circle_out_of_the_hu_rule(tmp_path):
    """A v2 volume padded with -3024 outside the scan circle is in HU; one rescaled twice is still caught."""
    root = make_ctrate(tmp_path / "dataset", n_patients=2)
    yy, xx = np.mgrid[:SHAPE[1], :SHAPE[2]]
    outside = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 > 15.5**2  # ~21% of each slice, as on a GE scanner
    for i, shift in ((1, 0), (2, -1024)):
        vol = root / "train" / f"train_{i}" / f"train_{i}_a" / f"train_{i}_a_1.nii.gz"
        arr = nib.load(str(vol)).get_fdata().transpose(2, 1, 0) + shift
        arr[:, outside] = -3024
        _nifti(arr.astype(np.int16), vol)
    rules = {(p.case_id, p.rule) for p in check_dataset(root)}
    assert ("train_2_a_1", "hu") in rules
    assert ("train_1_a_1", "hu") not in rules


def _rename_report_columns(root: Path, renames: dict[str, str]) -> Path:
    path = root / "radiology_text_reports" / "train_reports.csv"
    text = path.read_text(encoding="utf-8-sig")
    header, rest = text.split("\n", 1)
    for old, new in renames.items():
        header = header.replace(old, new)
    path.write_text(header + "\n" + rest, encoding="utf-8")
    return path


def test_a_renamed_findings_column_is_one_line_naming_the_columns_at_train_and_check(tmp_path):
    """Findings_EN/Impressions_EN renamed: train said '(line 2): volume ... has neither findings nor
    impression. Fix: fill ...' (the rows are full) and data check 'matches no dataset layout'."""
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=2)
    path = _rename_report_columns(root, {"Findings_EN": "Findings", "Impressions_EN": "Impressions"})
    want = (r"train_reports\.csv: has no Findings_EN/Impressions_EN columns \(found: VolumeName, "
            r"ClinicalInformation_EN, Technique_EN, Findings, Impressions\)\. Fix: rename Findings -> Findings_EN, "
            r"Impressions -> Impressions_EN")
    with pytest.raises(DataError, match=want) as e:
        _steps(root, None)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "line 2" not in str(e.value)
    with pytest.raises(DataError, match=want):
        load_cases(root)
    problems = check_dataset(root)
    assert [(p.rule, str(p.path)) for p in problems] == [("layout", str(path))]
    assert "no Findings_EN/Impressions_EN columns" in problems[0].message and "layout" not in problems[0].message
    assert problems[0].fix.startswith("rename Findings -> Findings_EN")


def test_reports_without_an_impression_column_still_read(tmp_path):
    """Impressions_EN is optional (the findings stand in); only a missing findings column is refused."""
    root = make_ctrate(tmp_path / "dataset", n_patients=2)
    _rename_report_columns(root, {"Impressions_EN": "Other"})
    assert set(_steps(root, None)) == {"train_1_a_1", "train_2_a_1"}
    assert load_cases(root).layout == "ctrate"


def test_data_check_declares_the_region_values_of_regions_json_as_train_does(tmp_path):
    """A mask value 7 when regions.json declares 1..4: train refused it ('[label] ... outside the
    declared labels {0, 1, 2, 3, 4}'), data check passed it (the layout declared no mask values)."""
    from medfuse.config import load_config
    from medfuse.engine.build import build_datamodule
    from medfuse.errors import DataError

    root = make_ctrate(tmp_path / "dataset", n_patients=3)
    for m in (root / "masks").glob("*.nii.gz"):
        im = nib.load(str(m))
        a = np.asarray(im.dataobj).copy()
        a[a == 4] = 7
        nib.save(nib.Nifti1Image(a, im.affine), str(m))
    found = {p.case_id: p for p in check_dataset(root) if p.rule == "label"}
    assert set(found) == {f"train_{i}_a_{r}" for i in (1, 2, 3) for r in (1, 2)}
    assert load_cases(root).mask_labels == {"no region": 0, "right lung": 1, "left lung": 2, "heart": 3, "liver": 4}
    cfg = load_config(CONFIGS / "ct_encoder_ctrate.yaml", [f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
                                                          *TINY, "data.split.val=0.34", "data.split.test=0.0"])
    dm = build_datamodule(cfg, tmp_path / "run")
    dm.setup("fit")
    with pytest.raises(DataError) as e:
        next(iter(dm.train_dataloader()))
    cid = str(e.value).split("mask of case '")[1].split("'")[0]
    assert f"[label] {found[cid].message}" in str(e.value)  # the same line, the same rule
    (root / "regions.json").unlink()
    assert load_cases(root).mask_labels is None  # nothing declared: nothing refused


def test_a_tiny_validation_split_warns_and_the_report_leaves_trivial_recall_out(tmp_path, caplog):
    """12 patients with val 0.1 / test 0.1: one val and one test patient. val/mean_recall was 1.0 every
    epoch (best.ckpt chosen on a constant) and the report showed image_to_text/R@1 1.000 n=1."""
    import logging

    from medfuse.config import load_config
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit

    root = make_ctrate(tmp_path / "dataset", n_patients=12)
    cfg = load_config(CONFIGS / "ct_encoder_ctrate.yaml", [f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
                                                          *TINY, "data.split.val=0.1", "data.split.test=0.1"])
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        run = fit(cfg)
    lines = [r.getMessage() for r in caplog.records if "validation split holds" in r.getMessage()]
    assert len(lines) == 1 and "train.monitor=val/mean_recall" in lines[0] and "1 patient" in lines[0]
    # validation leaves out the same k as the report; the monitor stays (as the constant it is)
    left = [r.getMessage() for r in caplog.records if "validation i2t/t2i R@k" in r.getMessage()]
    assert len(left) == 1 and "k = 1, 5, 10" in left[0] and "(1 pair)" in left[0]
    assert "train.monitor=val/mean_recall reads only such k" in left[0]
    with (run / "metrics.csv").open(encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert "val/mean_recall" in header and not any("R@" in h for h in header)
    assert (run / "checkpoints" / "best.ckpt").is_file()
    rep = evaluate(run, n_boot=10)
    assert rep["n"] == 1 and not any("R@" in k for k in rep["metrics"])
    assert any("R@k left out for k = 1, 5, 10, 50, 100" in n and "split size (1 pair)" in n for n in rep["notes"])
    # one case: every value (nn_copy/ce_f1 among them) comes without an interval (bootstrap_ci's rule)
    def no_interval(v):
        return all(v[b] is None or not np.isfinite(v[b]) for b in ("low", "high"))

    assert rep["metrics"]["nn_copy/ce_f1"]["n"] == 1
    assert all(v["n"] == 1 and no_interval(v) for v in rep["metrics"].values())


def test_a_validation_split_of_several_patients_does_not_warn(tmp_path, caplog):
    import logging

    from medfuse.config import load_config
    from medfuse.engine.build import build_datamodule

    root = make_ctrate(tmp_path / "dataset", n_patients=6)
    cfg = load_config(CONFIGS / "ct_encoder_ctrate.yaml", [f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
                                                          *TINY, "data.split.val=0.34", "data.split.test=0.0"])
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        build_datamodule(cfg, tmp_path / "run").setup("fit")
    assert not any("validation split holds" in r.getMessage() for r in caplog.records)
