"""context_seg data: formats, label grids, context alignment, tri-planar features, patches, cache, errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfuse.config import load_config
from medfuse.data.io import write_nifti
from medfuse.engine.build import build_datamodule
from medfuse.errors import ConfigError, DataError
from medfuse.families.context_seg.data import ContextSegDataModule, read_volume
from medfuse.families.context_seg.features import FeatureBuilder, resample_to_grid
from medfuse.families.context_seg.model import ContextSegModel
from medfuse.families.context_seg.params import ContextSegDataParams

ENC = {"out_channels": 4, "hidden": [4, 4]}


def _write(path: Path, arr: np.ndarray, spacing: float = 1.0, origin: float = 0.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(str(path), arr)
    else:
        aff = np.diag([spacing, spacing, spacing, 1.0])
        aff[:3, 3] = origin
        write_nifti(arr[None], path, affine=aff)
    return str(path)


def make_set(root: Path, n: int = 6, raw: int = 16, ctx: int = 16, ctx_spacing: float = 2.0, label: int = 16,
             ext: str = ".nii.gz", derived: bool = False, label_values: int = 3, seed: int = 0) -> Path:
    """Cases with a bright cube (label 1) and a dark cube (label 2) in the raw volume."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = rng.normal(1.0, 0.05, (raw,) * 3).astype(np.float32)
        lab = np.zeros((raw,) * 3, np.uint8)
        a, b = raw // 4, raw // 2
        r[a:b, a:b, a:b] += 1.0
        lab[a:b, a:b, a:b] = 1
        r[b:b + a, b:b + a, b:b + a] -= 0.5
        lab[b:b + a, b:b + a, b:b + a] = min(2, label_values - 1)
        if label != raw:  # labels on a coarser/finer grid: nearest resampling of the raw-grid labels
            lab = F.interpolate(torch.as_tensor(lab)[None, None].float(), size=(label,) * 3)[0, 0].numpy().astype(np.uint8)
        row = {"case_id": f"c{i}", "patient_id": f"p{i // 2}",
               "image_raw": _write(root / f"c{i}_raw{ext}", r),
               "mask": _write(root / f"c{i}_lab{ext}", lab)}
        if not derived:
            c = rng.normal(1.0, 0.05, (ctx,) * 3).astype(np.float32)
            c[ctx // 2 - 1: ctx // 2 + 1] += 1.0  # marks the centre
            origin = (raw - 1) / 2 - (ctx - 1) / 2 * ctx_spacing  # centred on the raw crop (raw voxels of 1 mm)
            row["image_context"] = _write(root / f"c{i}_ctx{ext}", c, ctx_spacing, origin)
        rows.append(row)
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    labels = {"background": 0, "bright": 1, "dark": 2}
    (root / "dataset.json").write_text(json.dumps({"mask_labels": dict(list(labels.items())[:label_values])}))
    return root / "manifest.csv"


def cfg_for(root: Path, tmp: Path, params: dict | None = None, **over):
    raw = {"name": "t", "family": "context_seg", "task": "segmentation", "output_dir": str(tmp),
           "data": {"root": str(root), "batch_size": 2, "split": {"val": 0.34, "test": 0.0, "seed": 0},
                    "params": {"encoder_params": ENC, "raw_input_size": 64, "patch_size": [8, 8, 8],
                               "samples_per_case": 2, **(params or {})}},
           "model": {"name": "context_seg", "params": {"feature_channels": 4, "base": 4, "levels": 2}},
           "train": {"max_epochs": 1, "seg_loss": "dice_focal", "monitor": "val/dice", "mode": "max",
                     "progress_bar": False, "log_every_n_steps": 1},
           "eval": {"n_boot": 20, "roi_size": [8, 8, 8], "overlays": 1}}
    for k, v in over.items():
        sec, key = k.split("__")
        raw[sec][key] = v
    return load_config(base=raw)


def test_resample_identity_resize_and_centred_fraction():
    x = torch.randn(3, 5, 6, 7)
    torch.testing.assert_close(resample_to_grid(x, (10, 12, 14)),
                               F.interpolate(x[None], size=(10, 12, 14), mode="trilinear", align_corners=False)[0])
    ramp = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 4, 4)  # value = index along D
    out = resample_to_grid(ramp, (4, 4, 4), fraction=(0.25, 1, 1))  # the central quarter: indices 6..10
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([6.0, 7.0, 8.0, 9.0]))


@pytest.mark.parametrize("label", [16, 8])
def test_paired_features_land_on_the_label_grid(tmp_path, label):
    root = tmp_path / "d"
    make_set(root, label=label)
    dm = build_datamodule(cfg_for(root, tmp_path), tmp_path / "run")
    ds = dm.dataset("val")
    item = ds[0]
    assert item["image"].shape == (8, label, label, label)  # 4 raw + 4 context channels
    assert item["mask"].shape == (1, label, label, label)
    assert set(np.unique(item["mask"])) <= {0, 1, 2}
    src = ds.cases[0][1]
    from safetensors.torch import load_file

    t = load_file(str(src))
    np.testing.assert_allclose(t["label_scale"].numpy(), [label / 16] * 3)
    assert not torch.equal(t["raw"], t["context"])
    # label-grid affine maps label voxel centres onto the raw grid (raw spacing 1)
    np.testing.assert_allclose(np.diag(t["affine"].numpy())[:3], [16 / label] * 3)


def test_dinov3_encoder_from_a_local_folder(tmp_path):
    """The family runs on transformers' DINOv3ViTModel (random tiny weights): C = hidden size."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_register_tokens=4, image_size=64, patch_size=16)
    DINOv3ViTModel(cfg).save_pretrained(tmp_path / "dino")
    root = tmp_path / "d"
    make_set(root, n=3)
    params = {"encoder": "dinov3", "encoder_params": {"weights": str(tmp_path / "dino"), "stats": "sat493m"}}
    dm = build_datamodule(cfg_for(root, tmp_path, params, model__params={"feature_channels": 32}), None)
    t = dm.compute(dm.cases["train"][0])
    assert t["raw"].shape == (32, 16, 16, 16) and t["context"].shape == (32, 16, 16, 16)
    assert dm.builder.extractor.encoder.mean == (0.430, 0.411, 0.296)  # SAT-493M statistics
    assert torch.isfinite(t["raw"].float()).all() and not torch.equal(t["raw"], t["context"])


@pytest.mark.parametrize("spacing, scale, fraction", [(2.0, "auto", 0.5), (1.0, 4, 0.25), (1.0, "auto", 1.0)])
def test_context_covers_the_centred_raw_field(tmp_path, monkeypatch, spacing, scale, fraction):
    """Raw 16^3 inside a 16^3 context of ``scale``-times larger voxels: the raw field is its central part."""
    root = tmp_path / "d"
    make_set(root, ctx_spacing=spacing)
    calls = []
    real = FeatureBuilder.stream

    def spy(self, volume, out_shape, frac, input_size, tri_planar=False, centre=(0.0, 0.0, 0.0)):
        assert tuple(float(c) for c in centre) == (0.0, 0.0, 0.0)
        calls.append((volume.shape, tuple(out_shape), tuple(float(f) for f in frac), input_size, tri_planar))
        return real(self, volume, out_shape, frac, input_size, tri_planar, centre=centre)

    monkeypatch.setattr(FeatureBuilder, "stream", spy)
    dm = build_datamodule(cfg_for(root, tmp_path, {"context_scale": scale, "context_input_size": 32,
                                                   "tri_planar": "context"}), None)
    dm.compute(dm.cases["train"][0])
    assert calls == [((16, 16, 16), (16, 16, 16), (1.0, 1.0, 1.0), 64, False),
                     ((16, 16, 16), (16, 16, 16), (fraction,) * 3, 32, True)]


def test_resample_centre_shifts_the_sampled_part():
    ramp = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 4, 4)  # value = index along D
    out = resample_to_grid(ramp, (4, 4, 4), fraction=(0.25, 1, 1), centre=(-0.5, 0, 0))  # indices 2..6
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_context_is_placed_by_the_affines_and_refused_when_off(tmp_path):
    """The context's position comes from the two files' affines: a context with extra slices on one
    side (the raw crop off its centre) gives the features of the centred context; a context moved
    away from the raw crop, or rotated against it, is refused naming the context file."""
    root = tmp_path / "d"
    make_set(root, n=3)  # raw 16^3 at 1 mm, context 16^3 at 2 mm centred on it
    dm = build_datamodule(cfg_for(root, tmp_path), None)
    case = dm.cases["train"][0]
    centred = dm.compute(case)
    ctx_path = case.images["context"]
    vol = read_volume(ctx_path)
    arr, aff = vol.array[0], vol.affine
    padded = np.concatenate([arr, np.full((8, 16, 16), 1.0, np.float32)])  # 8 more slices above: raw now off-centre
    write_nifti(padded[None], ctx_path, affine=aff)
    off = dm.compute(case)
    torch.testing.assert_close(off["context"].float(), centred["context"].float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(off["raw"], centred["raw"])
    far = aff.copy()
    far[:3, 3] += [0.0, 0.0, 1000.0]  # 1 m away along D
    write_nifti(arr[None], ctx_path, affine=far)
    with pytest.raises(DataError, match="c0_ctx.nii.gz: does not contain the raw crop's field of view"):
        dm.compute(case)
    shifted = aff.copy()
    shifted[:3, 3] += [0.0, 0.0, 10.0]  # 5 context voxels along D: the raw field (8 wide) sticks out by 1
    write_nifti(arr[None], ctx_path, affine=shifted)
    with pytest.raises(DataError, match="does not contain the raw crop's field of view"):
        dm.compute(case)
    flipped = aff @ np.diag([-1.0, 1.0, 1.0, 1.0])
    write_nifti(arr[None], ctx_path, affine=flipped)
    with pytest.raises(DataError, match="rotated or flipped"):
        dm.compute(case)


def test_tri_planar_is_the_mean_of_three_plane_passes():
    vol = np.random.default_rng(0).random((12, 16, 20)).astype(np.float32) + 0.5
    one = FeatureBuilder(ContextSegDataParams(encoder_params=ENC))
    out = one.stream(vol, (6, 8, 10), (1, 1, 1), None, tri_planar=True)
    ref = []
    for axis in range(3):
        order = [axis] + [a for a in range(3) if a != axis]
        f = one.extractor(torch.as_tensor(vol).permute(*order)[None, None])[0].movedim(1, 0)  # (C, S, a, b)
        f = f.permute(0, *(1 + order.index(t) for t in range(3)))
        ref.append(resample_to_grid(f, (6, 8, 10)))
    torch.testing.assert_close(out, sum(ref) / 3)
    assert not torch.allclose(out, ref[0])


def test_derived_context_is_the_block_averaged_file(tmp_path):
    root = tmp_path / "d"
    make_set(root, raw=16, derived=True)
    cfg = cfg_for(root, tmp_path, {"context_mode": "derived", "context_scale": 4, "context_fov": 2,
                                   "context_input_size": 32},
                  data__modalities=["raw"])
    dm = build_datamodule(cfg, None)
    t = dm.compute(dm.cases["train"][0])
    assert t["raw"].shape == (4, 8, 8, 8) and t["label"].shape == (1, 8, 8, 8)  # the central half of the file
    raw_full = read_volume(dm.cases["train"][0].images["raw"]).array[0]
    ctx = torch.as_tensor(raw_full).view(4, 4, 4, 4, 4, 4).mean((1, 3, 5))
    want = dm.builder.stream(ctx.numpy(), (8, 8, 8), (0.5, 0.5, 0.5), 32).half()
    torch.testing.assert_close(t["context"], want)
    lab_full = read_volume(dm.cases["train"][0].mask).array[0]
    assert torch.equal(t["label"][0], torch.as_tensor(lab_full[4:12, 4:12, 4:12]))
    with pytest.raises(ConfigError, match="context_scale"):
        build_datamodule(cfg_for(root, tmp_path, {"context_mode": "derived"}, data__modalities=["raw"]), None)


def test_tiff_stacks(tmp_path):
    root = tmp_path / "d"
    make_set(root, ext=".tif")
    dm = build_datamodule(cfg_for(root, tmp_path, {"context_scale": 2}), None)
    item = dm.dataset("val")[0]
    assert item["image"].shape == (8, 16, 16, 16)
    assert int(item["mask"].max()) == 2


def test_zarr_reader_ome_and_grid(tmp_path):
    zarr = pytest.importorskip("zarr")
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="w").require_group("em")
    make = getattr(g, "create_array", None) or g.create_dataset
    make("s0", shape=arr.shape, dtype=arr.dtype)
    g["s0"][...] = arr
    g.attrs["multiscales"] = [{"axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                               "datasets": [{"path": "s0", "coordinateTransformations": [
                                   {"type": "scale", "scale": [8.0, 4.0, 4.0]}]}]}]
    for path in (tmp_path / "c.zarr" / "em" / "s0", tmp_path / "c.zarr" / "em"):
        v = read_volume(str(path))
        assert np.array_equal(v.array[0], arr)
        np.testing.assert_allclose(v.spacing, (8e-6, 4e-6, 4e-6))
    # an OME translation places voxel 0 (z, y, x) = (64, 32, 16) nm: the affine's origin, in mm, (x, y, z)
    g.attrs["multiscales"] = [{**g.attrs["multiscales"][0], "datasets": [{"path": "s0", "coordinateTransformations": [
        {"type": "scale", "scale": [8.0, 4.0, 4.0]}, {"type": "translation", "translation": [64.0, 32.0, 16.0]}]}]}]
    for path in (tmp_path / "c.zarr" / "em" / "s0", tmp_path / "c.zarr" / "em"):
        np.testing.assert_allclose(read_volume(str(path)).affine[:3, 3], (16e-6, 32e-6, 64e-6))


def test_n5_reader(tmp_path):
    zarr = pytest.importorskip("zarr")
    arr = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    if int(zarr.__version__.split(".")[0]) >= 3:  # zarr 3 has no N5 store: a clear error instead
        (tmp_path / "c.n5").mkdir()
        with pytest.raises(DataError, match="zarr>=2.16,<3"):
            read_volume(str(tmp_path / "c.n5" / "raw"))
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        root = zarr.group(store=zarr.N5FSStore(str(tmp_path / "c.n5")))
    ds = root.create_dataset("em/raw", shape=arr.shape, dtype=arr.dtype, chunks=(2, 2, 2))
    ds[...] = arr
    ds.attrs["pixelResolution"] = {"dimensions": [4.0, 4.0, 8.0], "unit": "nm"}  # N5 order: x, y, z
    v = read_volume(str(tmp_path / "c.n5" / "em" / "raw"))
    assert np.array_equal(v.array[0], arr)
    np.testing.assert_allclose(v.spacing, (8e-6, 4e-6, 4e-6))


def test_zarr_missing_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "c.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"pip install 'medfuse\[zarr\]'"):
        read_volume(str(tmp_path / "c.zarr" / "raw"))


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_patches_follow_the_foreground_ratio_and_seed(tmp_path, ratio):
    root = tmp_path / "d"
    make_set(root)
    dm = build_datamodule(cfg_for(root, tmp_path, {"foreground_ratio": ratio, "flip": False}), None)
    ds = dm.dataset("train")
    centre = []
    for i in range(len(ds)):
        item = ds[(i, 1000 + i)]
        assert item["image"].shape == (8, 8, 8, 8) and item["mask"].shape == (1, 8, 8, 8)
        centre.append(int(item["mask"][0, 4, 4, 4] > 0))
        again = ds[(i, 1000 + i)]
        assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
    assert np.mean(centre) == ratio


def test_features_are_cached_on_disk(tmp_path, monkeypatch):
    root = tmp_path / "d"
    make_set(root)
    cfg = cfg_for(root, tmp_path, data__cache_dir=str(tmp_path / "cache"))
    first = build_datamodule(cfg, None).dataset("val")[0]
    assert list((tmp_path / "cache" / "context_seg").rglob("*.safetensors"))

    def boom(*a, **k):
        raise AssertionError("the encoder ran although the features are cached")

    monkeypatch.setattr(FeatureBuilder, "stream", boom)
    second = build_datamodule(cfg, None).dataset("val")[0]
    assert torch.equal(first["image"], second["image"])


def test_data_errors(tmp_path):
    root = tmp_path / "d"
    make_set(root, label_values=2)  # dark cube is labelled 1; only background/bright declared
    make_set(tmp_path / "bad", label=16)
    with pytest.raises(ConfigError, match="data.params.patch"):
        build_datamodule(cfg_for(root, tmp_path, {"patch": 3}), None)
    with pytest.raises(ConfigError, match="data.params.context"):
        build_datamodule(cfg_for(root, tmp_path, {"context": "ctx"}), None)
    with pytest.raises(ConfigError, match="feature_channels=4"):
        build_datamodule(cfg_for(root, tmp_path, model__params={"feature_channels": 9}), None).dataset("val")
    with pytest.raises(DataError, match="does not contain the raw crop's field of view"):
        build_datamodule(cfg_for(root, tmp_path, {"context_scale": 0.5}), None).dataset("val")
    # a label volume that is not the raw grid scaled by one factor
    case = build_datamodule(cfg_for(tmp_path / "bad", tmp_path), None).cases["train"][0]
    write_nifti(np.zeros((1, 8, 16, 16), np.uint8), case.mask)
    with pytest.raises(DataError, match="one factor"):
        build_datamodule(cfg_for(tmp_path / "bad", tmp_path), None).compute(case)
    write_nifti(np.full((1, 16, 16, 16), 7, np.uint8), case.mask)
    with pytest.raises(DataError, match="outside 0..2"):
        build_datamodule(cfg_for(tmp_path / "bad", tmp_path), None).compute(case)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (1 epoch) on 8 cases: 4 train, 2 val, 2 test."""
    from medfuse.engine.trainer import fit

    tmp = tmp_path_factory.mktemp("ctx_run")
    root = tmp / "d"
    make_set(root, n=8)
    cfg = cfg_for(root, tmp, data__split={"val": 0.25, "test": 0.25, "seed": 0})
    return cfg, fit(cfg), tmp


def test_train_evaluate_predict_end_to_end(trained):
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict

    cfg, run, tmp = trained
    rep = evaluate(run, split="test")
    assert {"mean_iou", "mean_f1", "f1[bright]", "f1[dark]"} <= set(rep["metrics"])
    for entry in rep["metrics"].values():
        # the 2 test crops are one patient's (make_set: 2 cases per patient): the bootstrap draws patients
        assert {"value", "low", "high", "n"} <= set(entry) and entry["n_items"] == rep["n"] == 2 and entry["n"] == 1
    assert set(rep["per_class"]["dark"]) >= {"precision", "recall", "f1", "iou", "dice", "hd95"}
    assert set(rep["case_metrics"]) == {"dice", "iou", "hd95"} and rep["class_names"] == ["bright", "dark"]
    # mm-scale voxels keep the platform's HD95 keys (in mm), and the report names the unit
    assert rep["context_seg"]["hd95_unit"] == "mm" and any("HD95 (hd95 " in n and " in mm" in n for n in rep["notes"])
    assert {"hd95_bright", "hd95_dark"} <= set((run / "metrics_per_case.csv").read_text(encoding="utf-8").splitlines()[0].split(","))
    assert rep["context_seg"]["fusion"] == "attention"
    assert (run / "report.html").is_file()
    assert len(list((run / "predictions" / "test").glob("*.nii.gz"))) == 2  # the generic evaluator's files
    figures = rep["context_seg"]["plots"]  # eval.overlays = 1: one case, its overlay and attention map
    assert len(figures) == 2 and all((run / f).is_file() for f in figures.values())
    assert any(k.startswith("attention ") for k in figures)
    case = build_datamodule(cfg, run).cases["test"][0]
    out = predict(run, [case.images["raw"], case.images["context"]], tmp / "pred")
    pred = read_volume(str(next(out.glob("*.nii.gz"))))
    assert pred.array.shape == (1, 16, 16, 16)
    np.testing.assert_allclose(pred.affine, read_volume(str(run / "predictions" / "test" / f"{case.case_id}.nii.gz")).affine)
    with pytest.raises(DataError, match="1 inputs for context_mode 'paired'"):
        predict(run, [case.images["raw"]], tmp / "p2")


def test_evaluate_writes_predictions_on_the_raw_files_grid(tmp_path):
    """Derived context: the label grid is the central half of the raw file. ``evaluate`` scores there
    but writes each prediction on the whole raw file's grid (shape and affine), background outside
    the predicted centre, and the file is the one ``medfuse predict`` writes for that case."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    root = tmp_path / "d"
    make_set(root, n=6, derived=True)
    cfg = cfg_for(root, tmp_path, {"context_mode": "derived", "context_scale": 4, "context_fov": 2,
                                   "context_input_size": 32},
                  data__modalities=["raw"], data__split={"val": 0.34, "test": 0.34, "seed": 0})
    run = fit(cfg)
    rep = evaluate(run, split="test", n_boot=10)
    assert rep["n"] == 2
    cases = build_datamodule(cfg, run).cases["test"]
    for case in cases:
        src = read_volume(case.images["raw"])
        mine = read_volume(str(run / "predictions" / "test" / f"{case.case_id}.nii.gz"))
        assert mine.array.shape == (1, 16, 16, 16)  # the raw file, not the 8^3 label grid
        np.testing.assert_allclose(mine.affine, src.affine, atol=1e-6)
        inner = np.zeros((16, 16, 16), bool)
        inner[4:12, 4:12, 4:12] = True
        assert not mine.array[0][~inner].any()  # nothing predicted outside the label grid's field of view
        out = predict(run, [case.images["raw"]], tmp_path / f"pred_{case.case_id}")
        theirs = read_volume(str(out / Path(case.images["raw"]).name))  # named by the file: c<i>_raw
        np.testing.assert_array_equal(mine.array, theirs.array)
        np.testing.assert_allclose(mine.affine, theirs.affine)


@pytest.mark.parametrize("roi", [None, [8, 8, 8]])
def test_context_seg_evaluate_once(trained, monkeypatch, roi):
    """``evaluate`` infers every test batch once: the generic and the family metrics share the pass
    (the first batch with the attention gates, the others without)."""
    import medfuse.engine.evaluate as ev

    _, run, _ = trained
    real = ev.load_trained
    passes: list[int] = []
    seen: dict[str, int] = {}

    def counting(run_dir, which="best", overrides=None):
        over = [*(overrides or []), f"eval.roi_size={json.dumps(roi)}", "data.eval_batch_size=1"]
        cfg, dm, task = real(run_dir, which, over)
        assert isinstance(task.model, ContextSegModel)
        # every pass of the network, whichever entry point (forward, forward_intermediates), runs input_conv once
        task.model.input_conv.register_forward_pre_hook(lambda *a: passes.append(1))
        seen["batches"] = len(dm.loader("test"))
        if roi is not None:  # one inference of the split, done directly: the windows it takes
            with torch.no_grad():
                for batch in dm.loader("test"):
                    task.infer(ev.to_device(batch, task.device))
            seen["windows"] = len(passes)
            passes.clear()
        return cfg, dm, task

    monkeypatch.setattr(ev, "load_trained", counting)
    rep = ev.evaluate(run, split="test", n_boot=10)
    assert seen["batches"] == 2 == rep["n"]
    assert seen.get("windows", 2) >= 2
    assert len(passes) == (seen["batches"] if roi is None else seen["windows"])
    assert any(k.startswith("attention ") for k in rep["context_seg"]["plots"])


def test_data_params_errors_name_the_key(tmp_path):
    root = tmp_path / "d"
    make_set(root, n=3)
    for params, key, msg in [({"no_such_key": 1}, "no_such_key", "unknown key"),
                             ({"samples_per_case": "many"}, "samples_per_case", "integer"),
                             ({"tri_planar": "xz"}, "tri_planar", "tri_planar"),
                             ({"patch_size": [8, 0, 8]}, "patch_size", "greater than or equal to 1")]:
        with pytest.raises(ConfigError, match=f"data.params.{key}") as e:
            build_datamodule(cfg_for(root, tmp_path, params), None)
        assert "\n" not in e.value.one_line() and msg in e.value.one_line()
        with pytest.raises(ConfigError, match=f"data.params.{key}"):  # also when the module is built directly
            ContextSegDataModule(cfg_for(root, tmp_path, params), None)


@pytest.mark.parametrize(("lengths_mm", "unit", "text"), [
    ((8e-6, 8e-6, 8e-6), "nm", "(8, 8, 8) nm"),  # FIB-SEM voxels from OME-Zarr (nm -> mm)
    ((4e-5, 4e-6, 4e-6), "nm", "(40, 4, 4) nm"),
    ((1.0, 0.5, 0.5), "mm", "(1, 0.5, 0.5) mm"),  # CT / MR
    ((1e-3, 1e-4, 1e-4), "mm", "(0.001, 0.0001, 0.0001) mm"),  # one axis at 1 um: not all under it
])
def test_lengths_are_shown_in_nm_only_when_all_are_under_a_micrometre(lengths_mm, unit, text):
    from medfuse.families.context_seg.units import format_lengths, length_unit

    assert length_unit(lengths_mm)[0] == unit and format_lengths(lengths_mm) == text
