"""CellMap: a Zarr v2 replica written with the real zarr library (OME-NGFF multiscales in nm), the
ROI reader (never the whole raw array), data check with planted faults, and one CPU epoch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from medfuse.data.checks import check_dataset  # noqa: E402
from medfuse.data.containers import choose_level, multiscale_levels, open_node, read_cellmap_crop  # noqa: E402
from medfuse.data.layouts import load_cases  # noqa: E402
from medfuse.errors import DataError  # noqa: E402

CONFIG = Path(__file__).parents[3] / "src" / "medfuse" / "configs" / "context_seg_cellmap.yaml"
RAW_NM = 8.0  # raw s0 voxel size; s1 16, s2 32, s3 64 (averaging: each level shifts by half a source voxel)
LABEL_NM = 4.0  # crops annotated at 4 nm, finer than the raw


def _group(path: Path):
    return zarr.open_group(str(path), mode="a", **({"zarr_format": 2} if zarr.__version__[0] >= "3" else {}))


def _array(group, name: str, shape, dtype, chunks, fill=0):
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill)  # zarr 2


def _multiscales(group, scales: list[float], translations: list[np.ndarray]) -> None:
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "", "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": f"s{i}", "coordinateTransformations": [
            {"type": "scale", "scale": [s] * 3}, {"type": "translation", "translation": [float(v) for v in t]}]}
            for i, (s, t) in enumerate(zip(scales, translations, strict=True))],
    }]


def write_raw(container: Path, shape0: tuple[int, int, int], levels: int = 4, write=None, chunks=16) -> Path:
    """The EM multiscales group; ``write(level, array)`` fills each level (None: leave it empty)."""
    em = _group(container / "recon-1" / "em" / "fibsem-uint8")
    scales = [RAW_NM * 2 ** i for i in range(levels)]
    t0 = np.zeros(3)
    translations = [t0 + (s - RAW_NM) / 2 for s in scales]  # averaging-downscaled: half a source voxel per level
    for i in range(levels):
        arr = _array(em, f"s{i}", tuple(max(1, n >> i) for n in shape0), "uint8", (chunks,) * 3)
        if write is not None:
            write(i, arr)
    _multiscales(em, scales, translations)
    return container / "recon-1" / "em" / "fibsem-uint8"


def write_crop(container: Path, name: str, lo_vox: int, size: int, classes: dict[str, np.ndarray]) -> Path:
    """A crop whose box starts at raw s0 voxel ``lo_vox`` (per axis); one 4 nm array per class."""
    crop = container / "recon-1" / "labels" / "groundtruth" / name
    edge = -RAW_NM / 2 + lo_vox * RAW_NM  # world corner of the box
    for cls, arr in classes.items():
        g = _group(crop / cls)
        a = _array(g, "s0", arr.shape, arr.dtype, (16, 16, 16))
        a[...] = arr
        _multiscales(g, [LABEL_NM], [np.full(3, edge + LABEL_NM / 2)])
    return crop


def _texture(shape, rng) -> np.ndarray:
    return rng.integers(90, 110, size=shape).astype(np.uint8)


def make_cellmap(root: Path, datasets: int = 3, crops: int = 2, size: int = 32, seed: int = 0) -> Path:
    """``root/<ds>/<ds>.zarr`` per dataset: a 64^3 raw at 8 nm (4 levels) and crops of ``size``^3 at 4 nm
    with 'mito' (dark balls, instance ids) and 'er' (bright sheets, 0/1)."""
    rng = np.random.default_rng(seed)
    for d in range(datasets):
        ds = f"jrc_test-{d + 1}"
        container = root / ds / f"{ds}.zarr"
        _group(container)
        raw0 = _texture((64, 64, 64), rng)
        lab_mito = np.zeros((128, 128, 128), np.uint16)  # on the 4 nm grid of the whole raw
        lab_er = np.zeros((128, 128, 128), np.uint8)
        zz, yy, xx = np.meshgrid(*[np.arange(128)] * 3, indexing="ij")
        for k in range(6):
            c = rng.integers(16, 112, 3)
            ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 10 ** 2
            lab_mito[ball] = k + 1
        lab_er[((np.abs(yy - 30 - 2 * d) < 3) | (np.abs(yy - 80 - 2 * d) < 3)) & (lab_mito == 0)] = 1  # one per crop
        raw_fine = np.repeat(np.repeat(np.repeat(raw0, 2, 0), 2, 1), 2, 2).astype(np.int16)
        raw_fine[lab_mito > 0] -= 60
        raw_fine[lab_er > 0] += 80
        raw0 = raw_fine.reshape(64, 2, 64, 2, 64, 2).mean((1, 3, 5)).astype(np.uint8)

        def fill(level, arr, raw0=raw0):
            f = 2 ** level
            arr[...] = raw0.reshape(64 // f, f, 64 // f, f, 64 // f, f).mean((1, 3, 5)).astype(np.uint8)

        write_raw(container, (64, 64, 64), write=fill)
        for c in range(crops):
            lo = 8 + 24 * c  # raw voxel where the crop starts (both crops lie inside the raw)
            sl = (slice(2 * lo, 2 * lo + size),) * 3
            write_crop(container, f"crop{c + 1}", lo, size, {"mito": lab_mito[sl].copy(), "er": lab_er[sl].copy()})
    return root


@pytest.fixture
def replica(tmp_path):
    return make_cellmap(tmp_path / "cellmap")


def test_layout_is_detected_with_one_case_per_crop_and_the_dataset_as_patient(replica):
    table = load_cases(replica)
    assert table.layout == "cellmap" and table.modalities == ["raw"] and len(table) == 6
    c = table.cases[0]
    assert c.case_id == "jrc_test-1_crop1" and c.patient_id == "jrc_test-1"
    assert c.images["raw"].endswith("jrc_test-1.zarr/recon-1/em/fibsem-uint8")
    assert c.extra["classes"] == "er;mito" and c.mask.endswith("groundtruth/crop1")
    assert check_dataset(replica) == []


def test_levels_and_crop_mapping_follow_the_translations(replica):
    raw = replica / "jrc_test-1" / "jrc_test-1.zarr" / "recon-1" / "em" / "fibsem-uint8"
    levels = multiscale_levels(open_node(raw), raw)
    assert [lv.path for lv in levels] == ["s0", "s1", "s2", "s3"]
    np.testing.assert_allclose(levels[1].translation, [4, 4, 4])  # half an s0 voxel
    assert choose_level(levels, 20).path == "s1" and choose_level(levels, 2).path == "s0"
    crop = raw.parents[1] / "labels" / "groundtruth" / "crop2"
    out = read_cellmap_crop(raw, crop, ["mito", "er"], raw_resolution=8, context_resolution=32, context_extent=4)
    assert out.raw.meta["voxels"] == [[32, 32, 32], [48, 48, 48]]  # (edge - raw edge) / 8 nm
    s0 = np.asarray(open_node(raw)["s0"][32:48, 32:48, 32:48])
    np.testing.assert_array_equal(out.raw.array[0], s0)
    assert out.label.shape == (1, 16, 16, 16) and set(np.unique(out.label.array)) == {0, 1, 2}
    np.testing.assert_allclose(out.raw.affine, out.label.affine)  # label grid = raw grid at 8 nm
    np.testing.assert_allclose(out.context.spacing, [32e-6] * 3)
    assert out.context.shape == (1, 16, 16, 16)  # 4x the crop box at 4x coarser voxels
    # dark mito in the raw where the label says mito: the crop lands on the right raw voxels
    assert out.raw.array[0][out.label.array[0] == 1].mean() < out.raw.array[0][out.label.array[0] == 0].mean() - 20
    fine = read_cellmap_crop(raw, crop, ["mito", "er"], raw_resolution=8, label_resolution=4)
    assert fine.label.shape == (1, 32, 32, 32)  # label_scale 2: the 4 nm annotation as stored
    ann = np.asarray(open_node(crop / "mito")["s0"][...]) > 0
    np.testing.assert_array_equal(fine.label.array[0] == 1, ann & (fine.label.array[0] != 2))


def test_only_the_region_is_read_from_a_raw_volume_too_large_to_load(tmp_path):
    container = tmp_path / "big" / "big.zarr"
    _group(container)
    n = 2 ** 17  # 2^51 voxels at s0 (2 PiB): reading the whole array would fail
    write_raw(container, (n, n, n), levels=4, chunks=64)
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[8:20, 8:20, 8:20] = 1
    write_crop(container, "crop7", 5000, 32, {"er": lab})
    em = container / "recon-1" / "em" / "fibsem-uint8"
    _group(em)["s0"][4992:5056, 4992:5056, 4992:5056] = 7  # one chunk holds the crop
    out = read_cellmap_crop(em, container / "recon-1" / "labels" / "groundtruth" / "crop7", ["er"],
                            raw_resolution=8, context_resolution=64)
    assert out.raw.shape == (1, 16, 16, 16) and np.all(out.raw.array == 7)
    assert out.label.array.sum() == 6 ** 3 and out.context.shape == (1, 8, 8, 8)
    assert check_dataset(tmp_path / "big") == []  # the check reads headers and crops only


def test_planted_faults_are_caught_one_line_each(replica):
    gt = "recon-1/labels/groundtruth"
    shutil.rmtree(replica / "jrc_test-1" / "jrc_test-1.zarr" / gt / "crop1" / "er" / "s0")  # a class array lost
    _group(replica / "jrc_test-2" / "jrc_test-2.zarr" / gt / "crop1" / "er")["s0"][0, 0, 0] = 3  # semantic, not 0/1
    g = _group(replica / "jrc_test-3" / "jrc_test-3.zarr" / gt / "crop2" / "mito")
    ms = g.attrs["multiscales"]
    ms[0]["datasets"][0]["coordinateTransformations"][1]["translation"] = [9000.0, 0.0, 0.0]  # outside the raw
    g.attrs["multiscales"] = ms
    problems = check_dataset(replica)
    rules = {(p.case_id, p.rule) for p in problems}
    assert rules == {("jrc_test-1_crop1", "unreadable"), ("jrc_test-2_crop1", "label"),
                     ("jrc_test-3_crop2", "geometry")}
    assert all("\n" not in p.line() and p.path in p.line() for p in problems)


@pytest.mark.skipif(zarr.__version__[0] < "3", reason="zarr 2 reads N5")
def test_n5_under_zarr_3_is_one_line_with_the_install_hint(tmp_path):
    (tmp_path / "jrc_x.n5" / "em").mkdir(parents=True)
    with pytest.raises(DataError, match="zarr 3 dropped N5") as err:
        open_node(tmp_path / "jrc_x.n5" / "em")
    assert "zarr>=2.16,<3" in err.value.one_line()


def test_data_check_cli_exit_2_on_a_fault(replica):
    from typer.testing import CliRunner

    from medfuse.cli import app

    res = CliRunner().invoke(app, ["data", "check", str(replica)])
    assert res.exit_code == 0 and "layout cellmap" in res.output
    shutil.rmtree(replica / "jrc_test-1" / "jrc_test-1.zarr" / "recon-1" / "labels" / "groundtruth" / "crop2"
                  / "mito" / "s0")
    res = CliRunner().invoke(app, ["data", "check", str(replica)])
    assert res.exit_code == 2 and "jrc_test-1_crop2" in res.output


@pytest.fixture(scope="module")
def cm_run(tmp_path_factory):
    """One tiny CPU epoch of the CellMap config (4 datasets, one crop each; a few seconds), shared."""
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("cm_run")
    root = make_cellmap(tmp / "cellmap", datasets=4, crops=1)
    cfg = load_config(CONFIG, [f"data.root={root}", f"output_dir={tmp / 'runs'}", *TINY_CELLMAP,
                               "data.split.val=0.25", "data.split.test=0.25"])
    return root, fit(cfg)


TINY_CELLMAP = [
    "train.max_epochs=1", "data.batch_size=2", "data.num_workers=0", "data.params.classes=[mito, er]",
    "data.params.encoder_params={out_channels: 8, hidden: [8, 8]}", "data.params.raw_input_size=32",
    "data.params.context_input_size=32", "data.params.patch_size=[8,8,8]", "data.params.samples_per_case=1",
    "data.params.tri_planar=false", "model.params.feature_channels=8", "model.params.base=4", "model.params.levels=2",
    "model.params.reduction=1", "eval.roi_size=[8,8,8]", "train.accelerator=cpu", "eval.n_boot=10", "eval.overlays=0"]
"""Overrides of the CellMap config for a tiny CPU run (one epoch, small encoder and network)."""


def test_config_trains_one_cpu_epoch(cm_run):
    _, run = cm_run
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    assert rows and any(r.get("val/loss") not in (None, "") for r in rows)
    splits = {r["case_id"]: r for r in csv.DictReader((run / "splits.csv").open(encoding="utf-8"))}
    assert len(splits) == 4 and json.dumps(sorted({r["split"] for r in splits.values()})) == '["test", "train", "val"]'


def _cli(*argv: str) -> int:
    from medfuse.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def test_export_and_predict_from_run_and_package_agree_on_the_raw_grid(cm_run, tmp_path, capsys):
    """A CellMap run exports (the training image is a Zarr multiscales group, not a DICOM folder) and
    ``predict RUN RAW CONTEXT`` on two arrays of the container works from the run directory (its data
    module is a CellMap one, the inputs are plain files) and from the package, with the same label map
    on the raw array's grid."""
    import zipfile

    import nibabel as nib

    from medfuse.data.containers import read_zarr

    root, run = cm_run
    pkg = tmp_path / "cm.zip"
    assert _cli("export", str(run), "--out", str(pkg)) == 0
    with zipfile.ZipFile(pkg) as zf:
        assert json.loads(zf.read("preprocessing.json"))["reference_shape"] == [1, 64, 64, 64]  # the EM s0
        assert json.loads(zf.read("predictor.json"))["label_scale"] == [1.0, 1.0, 1.0]
        card = {line.split(":")[0]: line for line in zf.read("model_card.md").decode().splitlines()}
    # the card says what predict takes (RAW CONTEXT, the training raw voxel size in nm) and gives
    assert card["- inputs"].startswith("- inputs: RAW CONTEXT (`medfuse predict model.zip RAW CONTEXT`)")
    assert "training raw voxel size (8, 8, 8) nm" in card["- inputs"] and "at 64 nm" in card["- inputs"]
    assert "intensity percentile" not in card["- preprocessing"] and "encoder `tiny`" in card["- preprocessing"]
    assert "mm" in card["- outputs"] and "(x, y, z)" in card["- outputs"]
    em = root / "jrc_test-4" / "jrc_test-4.zarr" / "recon-1" / "em" / "fibsem-uint8"
    raw, ctx = str(em / "s0"), str(em / "s3")  # 8 nm (the training raw's), 64^3 and 64 nm, 8^3: the same field of view
    assert _cli("predict", str(run), raw, ctx, "--out", str(tmp_path / "own")) == 0
    assert _cli("predict", str(pkg), raw, ctx, "--out", str(tmp_path / "pk")) == 0
    name = "jrc_test-4_recon-1_em_fibsem-uint8.nii.gz"  # the data set and group, not the scale level "s0"
    own, pk = tmp_path / "own" / name, tmp_path / "pk" / name
    img, src = nib.load(str(own)), read_zarr(raw)
    assert img.shape == (64, 64, 64) == src.shape[1:]
    np.testing.assert_allclose(img.affine, src.affine, rtol=1e-6, atol=0)  # 8 nm voxels, in mm
    for source in (run, pkg):  # the 16 nm level of a run trained on 8 nm voxels: refused, one line
        assert _cli("predict", str(source), str(em / "s1"), ctx, "--out", str(tmp_path / "s1")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {em / 's1'}: has raw voxels of (1.6e-05, 1.6e-05, 1.6e-05)")
        assert "trained on (8e-06, 8e-06, 8e-06)" in err[0]
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}
    assert own.read_bytes() == pk.read_bytes()


def test_a_cellmap_run_never_names_none_as_a_file(cm_run):
    """Prediction cases have no crop folder: a CellMap data module reads their files; a training case
    without one is refused naming the case (before: 'None: annotates no class')."""
    from medfuse.data.layouts import Case
    from medfuse.engine.evaluate import load_trained

    root, run = cm_run
    _, dm, _ = load_trained(run)
    assert dm.cellmap
    em = root / "jrc_test-1" / "jrc_test-1.zarr" / "recon-1" / "em" / "fibsem-uint8"
    case = Case(case_id="x", patient_id="x", images={"raw": str(em / "s0"), "context": str(em / "s3")})
    feats = dm.compute(case, require_label=False)
    assert tuple(feats["raw_shape"].tolist()) == (64, 64, 64) and feats["raw"].shape[1:] == (64, 64, 64)
    with pytest.raises(DataError) as err:
        dm.compute(case)
    line = err.value.one_line()
    assert line.startswith("case x:") and "None" not in line


def test_zarr_shape_is_read_from_metadata_and_read_image_does_not_blame_dicom(tmp_path):
    from medfuse.data.inputs import image_shape
    from medfuse.data.io import read_image

    container = tmp_path / "big" / "big.zarr"
    _group(container)
    n = 2 ** 17  # 2^51 voxels at s0: reading the array would fail
    em = write_raw(container, (n, n, n), levels=2, chunks=64)
    assert image_shape(em) == (1, n, n, n)  # the multiscales group: its first level, header only
    assert image_shape(em / "s1") == (1, n // 2, n // 2, n // 2)
    with pytest.raises(DataError) as err:
        read_image(em)
    line = err.value.one_line()
    assert "Zarr/N5" in line and "DICOM series" not in line and str(em) in line and "\n" not in line


def test_data_check_config_reports_classes_no_crop_annotates(replica, capsys):
    """``data check --config`` refuses what train refuses: the shipped config's classes [mito, er, nuc,
    ves] against crops that annotate mito and er only (one line naming data.params.classes)."""
    code = _cli("data", "check", str(replica), "--config", str(CONFIG))
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 2
    assert out[0].startswith("data.params.classes: [config] ['nuc', 'ves'] annotated by no crop of")
    assert "the crops annotate er, mito" in out[0] and "Fix: choose classes the crops annotate" in out[0]
    assert _cli("data", "check", str(replica), "--config", str(CONFIG), "data.params.classes=[mito, er]") == 0
    assert _cli("data", "check", str(replica), "--config", str(CONFIG), "data.params.classes=[mitos]") == 2
    assert "['mitos'] annotated by no crop" in capsys.readouterr().out


def test_a_refused_class_choice_is_one_line_without_a_note(replica, caplog):
    """Classes each annotated by some crop, but never together: one error, no warning before it."""
    import dataclasses

    from medfuse.families.context_seg.data import cellmap_table
    from medfuse.families.context_seg.params import ContextSegDataParams

    table = load_cases(replica)
    cases = [dataclasses.replace(c, extra={**c.extra, "classes": "mito" if i % 2 else "er"})
             for i, c in enumerate(table.cases)]
    table = dataclasses.replace(table, cases=cases)
    with caplog.at_level("WARNING"), pytest.raises(DataError, match=r"no crop annotates all of \['mito', 'er'\]"):
        cellmap_table(table, ContextSegDataParams(classes=["mito", "er"]))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _raw_box(em: Path, lo, size, out: Path) -> Path:
    """The s0 voxels ``lo .. lo + size`` (z, y, x) of ``em`` as a one-level OME-Zarr group ``out``
    (container and groups created) with the box's own translation; returns ``out / "s0"``."""
    lo, size = np.asarray(lo), np.asarray(size)
    box = np.asarray(open_node(em)["s0"][tuple(slice(a, a + n) for a, n in zip(lo, size, strict=True))])
    container = next(q for q in [out, *out.parents] if q.suffix == ".zarr")
    for group in [container, *reversed([q for q in out.parents if container in q.parents]), out]:
        g = _group(group)
    _array(g, "s0", box.shape, "uint8", (16, 16, 16))[...] = box
    _multiscales(g, [RAW_NM], [lo * RAW_NM])  # s0 voxel centres of the box, nm (z, y, x)
    return out / "s0"


def test_predictions_are_named_after_the_data_set_and_case_id_wins(cm_run, tmp_path):
    """The s0 arrays of two data sets go to one --out as two files (before: both were 's0', the second
    refused); ``--case-id`` still names the case."""
    root, run = cm_run
    out = tmp_path / "out"
    for ds in ("jrc_test-1", "jrc_test-2"):  # a small box of each data set, stored as CellMap stores EM
        em = root / ds / f"{ds}.zarr" / "recon-1" / "em" / "fibsem-uint8"
        raw = _raw_box(em, (24, 24, 24), (16, 16, 16), tmp_path / f"{ds}.zarr" / "recon-1" / "em" / "fibsem-uint8")
        assert _cli("predict", str(run), str(raw), str(em / "s3"), "--out", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["jrc_test-1_recon-1_em_fibsem-uint8.nii.gz",
                                                             "jrc_test-2_recon-1_em_fibsem-uint8.nii.gz"]
    assert _cli("predict", str(run), str(raw), str(em / "s3"), "--out", str(out), "--case-id", "mine") == 0
    assert (out / "mine.nii.gz").is_file()


def test_a_zarr_prediction_is_nifti_in_mm_with_the_axes_reversed(cm_run, tmp_path):
    """What the docs and the model card say: a (z, y, x) = (24, 20, 16) raw box at 8 nm with an OME
    translation comes back as NIfTI of shape (x, y, z) = (16, 20, 24), affine diag(8e-06 mm) with the
    translation in mm as its origin, header unit mm."""
    import nibabel as nib

    root, run = cm_run
    em = root / "jrc_test-3" / "jrc_test-3.zarr" / "recon-1" / "em" / "fibsem-uint8"
    lo = np.array([8, 12, 16])
    raw = _raw_box(em, lo, (24, 20, 16), tmp_path / "pred.zarr" / "box")
    out = tmp_path / "out"
    assert _cli("predict", str(run), str(raw), str(em / "s3"), "--out", str(out)) == 0
    img = nib.load(str(out / "pred_box.nii.gz"))
    assert img.shape == (16, 20, 24)
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([8e-6] * 3), rtol=1e-6)
    np.testing.assert_allclose(img.affine[:3, 3], (lo * RAW_NM * 1e-6)[::-1], rtol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"


def test_em_hd95_is_reported_in_nm_and_named(cm_run, tmp_path, monkeypatch):
    """HD95 on 8 nm voxels reads in nm under keys that say so, in report.json, report.html and
    metrics_per_case.csv: a prediction one voxel off the truth has HD95 8-14 nm (before: ~1e-05, 'hd95')."""
    import torch
    import torch.nn.functional as F

    from medfuse.engine.evaluate import evaluate
    from medfuse.families.context_seg.evaluate import ContextSegEvaluator

    def one_voxel_off(self, batch):  # the truth moved by one voxel along D, H and W
        mask = torch.roll(batch["mask"][:, 0].long(), (1, 1, 1), dims=(-3, -2, -1))  # (B, D, H, W)
        return {"logits": F.one_hot(mask, 3).permute(0, 4, 1, 2, 3).float() * 10}  # (B, K, D, H, W)

    monkeypatch.setattr(ContextSegEvaluator, "infer", one_voxel_off)
    _, run = cm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rep = evaluate(copy, split="test")
    assert rep["context_seg"]["hd95_unit"] == "nm" and set(rep["case_metrics"]) == {"dice", "iou", "hd95_nm"}
    assert all("hd95_nm" in rep["per_class"][c] and "hd95" not in rep["per_class"][c] for c in ("mito", "er"))
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert any("in nm" in n for n in rep["notes"]) and "HD95 in nm on the label grid" in page
    assert "HD95 in mm" not in page  # the per-case table's caption said mm whatever the unit
    assert 4.0 <= rep["case_metrics"]["hd95_nm"]["value"] <= 16.0  # one 8 nm voxel along each axis: 8 to 8 * sqrt(3) nm
    rows = list(csv.DictReader((copy / "metrics_per_case.csv").open(encoding="utf-8")))
    assert {"hd95_nm_mito", "hd95_nm_er"} <= set(rows[0]) and not {"hd95_mito", "hd95_er"} & set(rows[0])
    values = [float(r[k]) for r in rows for k in ("hd95_nm_mito", "hd95_nm_er") if r[k] != "nan"]
    assert values and all(4.0 <= v <= 16.0 for v in values)


def _header_commands() -> tuple[str, list[list[str]]]:
    """The config header's comment (one line) and its CPU ``medfuse train`` commands (overrides only)."""
    import shlex

    header = [line for line in CONFIG.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    commands: list[list[str]] = []
    current: list[str] | None = None
    for line in header:
        body = line[1:].strip()
        if body.startswith("medfuse train context_seg_cellmap.yaml"):
            current = shlex.split(body)[3:]
            commands.append(current)
        elif current is not None and line.startswith("#     "):
            current += shlex.split(body)
        else:
            current = None
    prose = " ".join(line[1:].strip() for line in header)  # one line: sentences run across comment lines
    return prose, [c for c in commands if "train.accelerator=cpu" in c]


def test_the_header_labels_its_plumbing_check_and_gives_a_cpu_run_that_learns():
    """The 1-epoch header run (raw_input_size 32 on 24^3 crops: 4x4 feature maps) learns nothing; the
    header says so and gives a second CPU command, with the encoder's maps at the raw resolution and a
    measured score. Both are valid configs, and the first is the overrides this module trains with."""
    import re

    from medfuse.config import load_config, validate_params
    from medfuse.families.context_seg.params import ContextSegDataParams, ContextSegParams

    header, commands = _header_commands()
    assert len(commands) == 2
    plumbing, learning = ([a.replace("REPLICA", "/data/cellmap") for a in c] for c in commands)
    assert "plumbing check only" in header and re.search(r"learns nothing \(measured: mean IoU 0\.\d+", header)
    assert re.search(r"run that learns.*mean IoU 0\.[3-9]\d", header)
    assert set(plumbing) - {"data.root=/data/cellmap"} <= set(TINY_CELLMAP)
    cfgs = [load_config(CONFIG, c) for c in (plumbing, learning)]
    data = [validate_params(ContextSegDataParams, c.data.params, "data.params") for c in cfgs]
    for c in cfgs:
        validate_params(ContextSegParams, c.model.params, "model.params")
    assert data[0].raw_input_size == 32 and cfgs[0].train.max_epochs == 1
    assert data[1].raw_input_size == 8 * 24 and data[1].patch_size == (16, 16, 16)  # stride 8: one feature per voxel
    assert cfgs[1].train.max_epochs > 1 and tuple(cfgs[1].eval.roi_size) == (16, 16, 16)
