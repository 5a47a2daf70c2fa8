"""One model, one prediction: ``medfuse evaluate`` writes and scores the label maps that ``medfuse
predict`` writes (the same region -> label rule, the data set's own label values), on tiny BraTS
2021 (ET = 4) and BraTS 2023 (ET = 3) replicas."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from tiny_incomplete import tiny_config

# canonical label (number of regions holding a voxel) -> the value each BraTS release writes
RAW = {"2021": {0: 0, 1: 2, 2: 1, 3: 4}, "2023": {0: 0, 1: 2, 2: 1, 3: 3}}
_2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
COMPLETE = "flair+t1+t1ce+t2"


def _to_brats2023(src, dst):
    """The classic-named phantom (``<case>_flair``, ET = 4) as BraTS 2023 case folders (``<case>-t2f``, ET = 3)."""
    dst.mkdir()
    for case in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / case.name).mkdir()
        for old, new in _2023_NAMES.items():
            img = nib.load(str(case / f"{case.name}_{old}.nii.gz"))
            arr = np.asarray(img.dataobj)
            if old == "seg":
                arr = np.where(arr == 4, 3, arr).astype(np.uint8)
            nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(dst / case.name / f"{case.name}-{new}.nii.gz"))
    return dst


@pytest.fixture(scope="module", params=["2021", "2023"])
def run(request, tmp_path_factory):
    from medfuse.config import validate
    from medfuse.engine.trainer import fit
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    tmp = tmp_path_factory.mktemp(f"inc_eval_{request.param}")
    root = make_incomplete_seg_demo(tmp / "classic", n_patients=8, shape=(16, 16, 16))
    if request.param == "2023":
        root = _to_brats2023(root, tmp / "brats2023")
    cfg = validate(tiny_config(root, tmp / "runs", n_boot=5))
    return root, fit(cfg), request.param


def _label(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _dice(a, b):
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _with_fixed_head(run_dir, dst, q):
    """A copy of the run whose network outputs the nested region probabilities ``q`` at every voxel:
    the segmentation head's weights are zeroed and its biases set so that the product of the first
    r sigmoids is ``q[r - 1]``."""
    from medfuse.engine.checkpoint import safe_torch_load

    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("predictions", "report.*", "plots", "*.lock"))
    cfg = yaml.safe_load((dst / "config.yaml").read_text(encoding="utf-8"))
    cfg["name"] = dst.name
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    cond = torch.tensor([q[0], *[b / a for a, b in zip(q, q[1:], strict=False)]], dtype=torch.float64)
    bias = torch.logit(cond).float()
    for ckpt in dst.rglob("*.ckpt"):
        state = safe_torch_load(ckpt)
        state["state_dict"]["model.seg_head.weight"].zero_()
        state["state_dict"]["model.seg_head.bias"][:] = bias
        torch.save(state, ckpt)
    return dst


def _predict_case(run_dir, root, case_id, out):
    from medfuse.engine.predict import predict

    return _label(predict(run_dir, [str(root / case_id)], out) / f"{case_id}.nii.gz")


def test_evaluate_writes_and_scores_what_predict_writes(run, tmp_path):
    """q = (0.6, 0.3, 0.1) everywhere: WT only (one region over 0.5). Evaluate's file is predict's
    file, its WT Dice is the complete combination's WT Dice, and ``full_input`` scores the same map."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.families.incomplete_seg.compare import COMBINATIONS_FILE, load_combination_dice

    root, run_dir, year = run
    fixed = _with_fixed_head(run_dir, tmp_path / "fixed", (0.6, 0.3, 0.1))
    report = evaluate(fixed, n_boot=5)
    out = fixed / "predictions" / "test"
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == report["n"] >= 2
    cases, combos, regions, dice = load_combination_dice(out / COMBINATIONS_FILE)
    assert regions[0] == "WT" and combos[-1] == COMPLETE
    full = report["full_input"]["per_case"]
    ed_col = full["columns"].index("dice_WT not TC")
    full_rows = {r[0]: r for r in full["rows"]}
    wt = []
    for f in files:
        cid = f.name[: -len(".nii.gz")]
        evaluated = _label(f)
        np.testing.assert_array_equal(evaluated, _predict_case(fixed, root, cid, tmp_path / "pred" / cid))
        assert set(np.unique(evaluated).tolist()) == {RAW[year][1]}  # WT not TC (oedema) everywhere
        ref = _label(next((root / cid).glob("*seg.nii.gz")))
        wt.append(_dice(evaluated > 0, ref > 0))
        assert dice[cases.index(cid), -1, 0] == pytest.approx(wt[-1], abs=1e-6)  # combination table
        ed = RAW[year][1]
        assert full_rows[cid][ed_col] == pytest.approx(_dice(evaluated == ed, ref == ed), abs=1e-6)  # full_input
    complete = report["modality_combinations"]["rows"][-1]
    assert complete[0] == COMPLETE and complete[2]["value"] == pytest.approx(float(np.mean(wt)), abs=1e-6)
    assert report["full_input"]["per_class"]["WT not TC"]["dice"]["value"] > 0


@pytest.fixture
def nested_boxes(monkeypatch):
    """The task predicts fixed nested boxes WT > TC > ET (whatever the weights), so every label shows."""
    from tiny_incomplete import fix_regions

    fix_regions(monkeypatch, wt=(slice(2, 14),) * 3, tc=(slice(4, 12),) * 3, et=(slice(6, 10),) * 3)


def test_evaluate_writes_the_data_sets_label_values(run, nested_boxes, tmp_path):
    """BraTS 2021 files hold 0/1/2/4, BraTS 2023 files 0/1/2/3, exactly as predict writes them."""
    from medfuse.engine.evaluate import evaluate

    root, run_dir, year = run
    evaluate(run_dir, n_boot=5)
    files = sorted((run_dir / "predictions" / "test").glob("*.nii.gz"))
    assert files
    raw = RAW[year]
    for f in files:
        cid = f.name[: -len(".nii.gz")]
        evaluated = _label(f)
        assert set(np.unique(evaluated).tolist()) == set(raw.values())
        counts = {k: int((evaluated == raw[k]).sum()) for k in raw}  # voxels per canonical label
        assert counts == {0: 16 ** 3 - 12 ** 3, 1: 12 ** 3 - 8 ** 3, 2: 8 ** 3 - 4 ** 3, 3: 4 ** 3}
        np.testing.assert_array_equal(evaluated, _predict_case(run_dir, root, cid, tmp_path / cid))


@pytest.mark.parametrize("preset, values", [("brats", [0, 2, 1, 4]), ("brats2023", [0, 2, 1, 3]), ("msd", [0, 1, 2, 3])])
def test_region_rule_and_label_values(preset, values):
    """The rule counts regions over 0.5 (not the label argmax), and canonical labels map to the preset's values."""
    from medfuse.families.incomplete_seg.data import raw_label_values, region_labels
    from medfuse.families.incomplete_seg.model import IncompleteSegNet
    from medfuse.families.incomplete_seg.params import REGION_PRESETS

    q = torch.tensor([[0.6, 0.3, 0.1], [0.9, 0.8, 0.7], [0.4, 0.2, 0.1], [0.9, 0.6, 0.5]]).T[None]  # (1, R, 4)
    assert region_labels(q).tolist() == [[1, 3, 0, 2]]  # q == 0.5 is not over it
    assert IncompleteSegNet.labels_from_regions(q).argmax(1).tolist()[0][0] == 0  # what evaluate used to write
    assert raw_label_values(np.arange(4), REGION_PRESETS[preset]).tolist() == values
    merged = {"WT": [1, 2, 3], "ET": [3]}  # WT not ET is 1 or 2: no single value, canonical labels stay
    assert raw_label_values(np.arange(3), merged).tolist() == [0, 1, 2]
