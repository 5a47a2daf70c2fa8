"""incomplete_seg family (UniMRSeg): every variant and stage runs forward and backward with the
expected parameters getting gradients; masking, combinations, frozen encoder, nested outputs,
sliding-window presence, learning, typed params, stage resume through the engine, and one
inference pass per validation batch and per (test batch, modality combination)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medfuse.config import StageConfig
from medfuse.errors import ConfigError
from medfuse.families.incomplete_seg import FAMILY
from medfuse.families.incomplete_seg.data import (
    combination_mask,
    hybrid_masking,
    modality_combinations,
    random_keep,
)
from medfuse.families.incomplete_seg.model import IncompleteSegNet
from medfuse.families.incomplete_seg.params import IncompleteSegParams, build_incomplete_seg
from medfuse.families.incomplete_seg.task import IncompleteSegTask, hard_dice, region_targets, stage_kind

MODS = ["flair", "t1", "t1ce", "t2"]
TINY = dict(widths=(4, 8), aspp_dilations=(1, 2), ssim_window=3, channels_last=False)
STAGES = {
    "segment": {"seg": 1.0},
    "reconstruct": {"recon": 1.0},
    "contrast": {"seg": 1.0, "ntxent": 1.0},
    "adapt": {"seg": 1.0, "consistency": 1.0, "feature": 0.2},
}
# parameters each stage kind must train (prefixes); the others get no gradient in that stage
USED = {
    "segment": ("encoder.", "decoder.", "seg_head."),
    "reconstruct": ("encoder.", "decoder.", "recon_head."),
    "contrast": ("encoder.", "decoder.", "seg_head."),
    "adapt": ("adapters.", "decoder.", "seg_head."),
}


def _batch(b=2, s=8, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, s, s, s, dtype=torch.long)
    mask[:, :, 2:6, 2:6, 2:6] = 1
    mask[:, :, 3:5, 3:5, 3:5] = 2
    mask[:, :, 4, 4, 4] = 3
    return {"image": torch.rand(b, m, s, s, s, generator=g), "mask": mask, "present": torch.ones(b, m),
            "case_id": [f"c{i}" for i in range(b)]}


def _task(stage: StageConfig | None = None, mods=MODS, num_classes=4, **kw) -> IncompleteSegTask:
    """The family's task for ``stage`` on a network built from ``TINY`` + ``kw`` (as the engine builds it)."""
    torch.manual_seed(0)
    cfg = {"name": "unit", "model": {"name": "incomplete_seg", "params": {**TINY, **kw}}}
    auto = {"in_channels": len(mods), "num_classes": num_classes, "modalities": list(mods)}
    return IncompleteSegTask(cfg, auto=auto, stage=stage.model_dump() if stage is not None else None)


def _net(**kw) -> IncompleteSegNet:
    torch.manual_seed(0)
    return build_incomplete_seg(IncompleteSegParams(modalities=MODS, in_channels=4, num_classes=4, **{**TINY, **kw}))


@pytest.mark.parametrize("kind", list(STAGES))
@pytest.mark.parametrize("output, fill", [("regions", "zero"), ("labels", "learned")])
def test_every_stage_and_variant_trains_the_right_parameters(kind, output, fill):
    stage = StageConfig(name=kind, losses=STAGES[kind])
    task = _task(stage, output=output, fill=fill, combos_per_step=3, modality_dropout=1.0)
    net = task.model
    task.train()
    batch = _batch()
    out = task.forward_batch(batch)
    losses = task.compute_loss(batch, out)
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad
    losses["loss"].backward()
    used = USED[kind] + (("fill_value",) if fill == "learned" and kind != "adapt" else ())
    for name, p in net.named_parameters():
        got = p.grad is not None and p.grad.abs().sum() > 0
        if name.startswith(used):
            assert p.requires_grad and got, f"{kind}: {name} got no gradient"
        elif kind == "adapt" and name.startswith(("encoder.", "fill_value")):
            assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"


def test_adapt_stage_keeps_the_frozen_encoder_unchanged():
    stage = StageConfig(name="adapt", losses=STAGES["adapt"], frozen=["encoder.*"])
    task = _task(stage, norm="batch")
    net = task.model
    task.train()
    assert not net.encoder.training and net.adapters.training  # no BN statistics updates either
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for seed in range(2):
        batch = _batch(seed=seed)
        task.compute_loss(batch, task.forward_batch(batch))["loss"].backward()
        assert all(p.grad is None for p in net.encoder.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.adapters.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_combinations_are_enumerated_once_each():
    combos = modality_combinations(4)
    assert len(combos) == len(set(combos)) == 15
    assert [len(c) for c in combos].count(1) == 4 and [len(c) for c in combos].count(2) == 6
    assert [len(c) for c in combos].count(3) == 4 and combos[-1] == (0, 1, 2, 3)
    expected = {c for k in range(1, 5) for c in itertools.combinations(range(4), k)}
    assert set(combos) == expected
    masks = combination_mask(combos, 4)
    assert masks.shape == (15, 4) and len({tuple(r.tolist()) for r in masks}) == 15


@pytest.mark.parametrize("k", [1, 2, 3, 14])
def test_adapt_round_robin_covers_all_incomplete_combinations(k):
    net = _net()
    net.train()
    steps = -(-14 // k)
    seen = [c for _ in range(steps) for c in net.adapt_combos(k)]
    assert set(seen) == set(modality_combinations(4)[:-1])
    if 14 % k == 0:
        assert len(seen) == len(set(seen)) == 14  # exactly once per round


def test_modality_dropout_never_empties_a_case_and_respects_presence():
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0]])
    for _ in range(200):
        keep = random_keep(present, p=1.0, generator=g)
        assert bool((keep.sum(1) >= 1).all())
        assert bool((keep <= present).all())
        assert bool((keep[:2].sum(1) < present[:2].sum(1)).all())  # a proper subset when possible


def test_shuffle_keeps_the_case_content():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 4, 6, 6, 6)
    present = torch.ones(3, 4)
    for _ in range(20):
        masked, chan_present, order = hybrid_masking(image, present, drop_p=0.7, shuffle=True, mask_ratio=0.0,
                                                     generator=g)
        for b in range(3):
            kept = order[b][order[b] >= 0]
            assert len(kept) >= 1 and len(set(kept.tolist())) == len(kept)
            assert bool((order[b][: len(kept)] >= 0).all()) and bool((order[b][len(kept):] < 0).all())  # packed
            for j, src in enumerate(order[b].tolist()):
                if src >= 0:
                    torch.testing.assert_close(masked[b, j], image[b, src])
                else:
                    assert float(masked[b, j].abs().max()) == 0.0
            assert chan_present[b].sum() == len(kept)


@pytest.mark.parametrize("granularity", ["voxel", "patch"])
def test_spatial_masking_ratio(granularity):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 4, 16, 16, 16) + 0.5  # no natural zeros
    masked, _, order = hybrid_masking(image, torch.ones(2, 4), drop_p=0.0, shuffle=False, mask_ratio=0.3,
                                      granularity=granularity, patch=4, generator=g)
    assert bool((order == torch.arange(4)).all())
    zero = float((masked == 0).float().mean())
    assert 0.2 < zero < 0.4


def test_region_outputs_nest_and_label_logits_are_a_distribution():
    net = _net().eval()
    x = torch.rand(2, 4, 8, 8, 8)
    with torch.no_grad():
        logits, _ = net.seg_logits(x)
        q = net.region_probs(logits)
        lab = net(x)
    assert q.shape == (2, 3, 8, 8, 8) and lab.shape == (2, 4, 8, 8, 8)
    assert bool((q[:, 0] >= q[:, 1]).all()) and bool((q[:, 1] >= q[:, 2]).all())
    torch.testing.assert_close(lab.exp().sum(1), torch.ones(2, 8, 8, 8), atol=1e-4, rtol=0)
    lab_net = _net(output="labels").eval()
    with torch.no_grad():
        q2 = lab_net.region_probs(lab_net.seg_logits(x)[0])
    assert bool((q2[:, 0] >= q2[:, 1] - 1e-6).all()) and bool((q2[:, 1] >= q2[:, 2] - 1e-6).all())


def test_zero_fill_ignores_absent_channels_and_learned_fill_uses_its_value():
    x = torch.rand(1, 4, 8, 8, 8)
    y = x.clone()
    y[:, 2] = torch.rand(8, 8, 8)  # different content in a channel that is absent
    present = torch.tensor([[1.0, 1, 0, 1]])
    for fill in ("zero", "learned"):
        net = _net(fill=fill).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x, present), net(y, present))
    net = _net(fill="learned").eval()
    with torch.no_grad():
        a = net(x, present)
        net.fill_value.data[2] = 3.0
        assert not torch.allclose(a, net(x, present))


def test_sliding_window_keeps_each_cases_modality_subset():
    net = _net().eval()
    x = torch.rand(2, 4, 8, 12, 12)
    pres = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 1]])
    with torch.no_grad():
        whole = net.predict_regions(x, pres, roi_size=(8, 12, 12))
        torch.testing.assert_close(whole, net.predict_regions(x, pres))
        sw = net.predict_regions(x, pres, roi_size=(8, 8, 8), overlap=0.5)
        for i in range(2):
            alone = net.predict_regions(x[i: i + 1], pres[i: i + 1], roi_size=(8, 8, 8), overlap=0.5)
            torch.testing.assert_close(sw[i: i + 1], alone)
    assert not torch.allclose(sw[0], net.predict_regions(x[:1], torch.ones(1, 4), roi_size=(8, 8, 8),
                                                         overlap=0.5)[0])


def test_validation_criterion_and_hard_dice():
    p = torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool)
    t = p.clone()
    t[0, 0, :2] = True
    p[0, 0, :1] = True
    torch.testing.assert_close(hard_dice(p, t), torch.tensor([[2 * 16 / (16 + 32), 1.0]]))
    batch = _batch()
    task = _task(StageConfig(name="s", losses={"seg": 1.0})).eval()
    out = task.validate_batch(batch)
    assert out["val_dice"].shape == (2 * 15, 3)  # every (case, combination) pair, per region
    v = float(task.compute_loss(batch, out)["loss"])
    assert 0.0 <= v <= 1.0
    task = _task(StageConfig(name="r", losses={"recon": 1.0})).eval()
    r1 = task.compute_loss(batch, task.validate_batch(batch))["loss"]
    r2 = task.compute_loss(batch, task.validate_batch(batch))["loss"]
    assert float(r1) > 0 and float(r1) == float(r2)  # seeded masking: comparable across epochs


def test_bad_config_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown loss"):
        stage_kind({"seg": 1.0, "dice": 1.0})
    for key, value in (("output", "softmax"), ("fill", "mean")):
        with pytest.raises(ConfigError, match=f"model.params.{key}"):  # through the config (typed params)
            _task(**{key: value})
        with pytest.raises(ConfigError, match=key):  # and the network on its own
            IncompleteSegNet(MODS, 4, 4, **{key: value})
    with pytest.raises(ConfigError, match="data.num_classes"):
        _task(num_classes=1)
    with pytest.raises(ConfigError, match="adapters"):
        _task(StageConfig(name="a", losses=STAGES["adapt"]), adapters=False)


@pytest.mark.parametrize("key, value", [("widht", 8), ("output", "softmax"), ("widths", "wide"),
                                        ("temperature", "hot"), ("val_roi_size", [16, 16])])
def test_unknown_or_ill_typed_model_params_name_the_key(key, value):
    from medfuse.config import validate
    from medfuse.engine.build import model_params

    cfg = validate({"model": {"name": "incomplete_seg", "params": {key: value}}})
    with pytest.raises(ConfigError) as e:
        model_params(cfg)
    msg = str(e.value)
    assert f"model.params.{key}" in msg and "\n" not in msg


@pytest.mark.parametrize("value, ok", [("auto", True), ("brats2023", True), ({"WT": [1, 2], "ET": [2]}, True),
                                       ("brats2030", False), ({"WT": ["x"]}, False), (3, False), ({}, False)])
def test_data_params_regions(value, ok):
    from medfuse.config import validate
    from medfuse.engine.build import data_params

    cfg = validate({"model": {"name": "incomplete_seg"}, "data": {"params": {"regions": value}}})
    if ok:
        assert data_params(cfg).regions == value
        return
    with pytest.raises(ConfigError) as e:
        data_params(cfg)
    msg = str(e.value)
    assert msg.startswith("data.params.regions:") and "\n" not in msg
    with pytest.raises(ConfigError, match="data.params.region:"):
        data_params(validate({"model": {"name": "incomplete_seg"}, "data": {"params": {"region": "auto"}}}))


def test_registry_models_build_from_defaults_and_every_parameter_trains():
    """Every model of the family builds from its default params; over the four stage kinds every
    parameter of the (tiny) network gets a gradient."""
    for entry in FAMILY.models:
        net = entry.build(entry.params())
        assert isinstance(net, torch.nn.Module) and sum(p.numel() for p in net.parameters()) > 0
        with torch.no_grad():
            out = net.eval()(torch.rand(1, 4, 16, 16, 16))
        assert out.shape == (1, 4, 16, 16, 16)
    trained: set[str] = set()
    for kind, losses in STAGES.items():
        task = _task(StageConfig(name=kind, losses=losses), fill="learned", combos_per_step=2, modality_dropout=0.5)
        task.train()
        batch = _batch()
        task.compute_loss(batch, task.forward_batch(batch))["loss"].backward()
        trained |= {n for n, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {n for n, _ in task.model.named_parameters()}


def test_tiny_model_learns_regions_from_one_modality_beyond_chance():
    """Region r is a cube visible only in channel r; with modality dropout training the net still
    finds the visible regions."""
    task = _task(StageConfig(name="s", losses={"seg": 1.0}), mods=["a", "b", "c"], num_classes=3, widths=(8, 16),
                 aspp_dilations=(1,), modality_dropout=0.3)
    net = task.model
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def make(b):
        img = 0.1 * torch.rand(b, 3, 8, 8, 8, generator=g)
        mask = torch.zeros(b, 1, 8, 8, 8, dtype=torch.long)
        for i in range(b):
            o = torch.randint(0, 3, (3,), generator=g).tolist()
            mask[i, :, o[0]: o[0] + 5, o[1]: o[1] + 5, o[2]: o[2] + 5] = 1
            mask[i, :, o[0] + 1: o[0] + 4, o[1] + 1: o[1] + 4, o[2] + 1: o[2] + 4] = 2
        img[:, 0] += (mask[:, 0] >= 1).float()
        img[:, 1] += (mask[:, 0] >= 2).float()
        return {"image": img, "mask": mask, "present": torch.ones(b, 3)}

    task.train()
    for _ in range(60):
        batch = make(4)
        task.compute_loss(batch, task.forward_batch(batch))["loss"].backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    test = make(8)
    with torch.no_grad():
        q = net.predict_regions(test["image"], torch.ones(8, 3))
        d = hard_dice(q > 0.5, region_targets(test["mask"], net.num_regions) > 0.5)
    assert float(d[:, 0].mean()) > 0.8 and float(d[:, 1].mean()) > 0.6  # chance: ~0.2 / ~0.05


# ------------------------------------------------------------------------------ through the engine


def _engine_cfg(root, out, name):
    from medfuse.config import validate

    adapt = {"name": "adapt", "max_epochs": 1, "frozen": ["encoder.*"], "losses": STAGES["adapt"]}
    return validate({
        "name": name, "family": "incomplete_seg", "task": "segmentation", "output_dir": str(out),
        "data": {"root": str(root), "layout": "brats", "batch_size": 2, "split": {"val": 0.2, "test": 0.2, "seed": 0},
                 "transforms": {"orientation": "RAS", "intensity": {"*": {"kind": "percentile", "nonzero": True}}}},
        "model": {"name": "incomplete_seg", "params": {**TINY, "widths": [4, 8], "combos_per_step": 7,
                                                       "val_combos_per_case": 3}},
        "train": {"lr": 0.01, "monitor": "val/loss", "mode": "min", "progress_bar": False, "log_every_n_steps": 1,
                  "stages": [{"name": "reconstruct", "max_epochs": 1, "losses": STAGES["reconstruct"]},
                             {"name": "contrast", "max_epochs": 2, "losses": STAGES["contrast"]}, adapt]},
        "eval": {"n_boot": 20, "roi_size": [16, 16, 8], "overlays": 0},
    })


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo

    return make_incomplete_seg_demo(tmp_path_factory.mktemp("inc_engine") / "data", n_patients=10,
                                    shape=(16, 16, 16))


def test_three_stages_resume_evaluate_and_predict_any_subset(phantom_root, tmp_path):
    import lightning as L

    from medfuse.engine.checkpoint import safe_torch_load
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit, resume_run
    from medfuse.errors import DataError

    full = fit(_engine_cfg(phantom_root, tmp_path, "full"))
    import csv

    with (full / "metrics.csv").open(encoding="utf-8") as f:  # every stage's log survives, epochs continue
        logged = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert [r["stage"] for r in logged] == ["reconstruct", "contrast", "contrast", "adapt"]
    assert [int(r["epoch"]) for r in logged] == [0, 1, 2, 3]

    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.stage_cfg.name == "contrast" and trainer.current_epoch == 1:
                raise RuntimeError("killed in stage 2")

    with pytest.raises(RuntimeError, match="killed"):
        fit(_engine_cfg(phantom_root, tmp_path, "killed"), callbacks=[Crash()])
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "reconstruct" / "done").exists()
    assert not (killed / "checkpoints" / "contrast" / "done").exists()
    assert safe_torch_load(killed / "checkpoints" / "contrast" / "last.ckpt")["epoch"] == 0
    resume_run(killed)
    for stage in ("contrast", "adapt"):
        a = safe_torch_load(full / "checkpoints" / stage / "last.ckpt")
        b = safe_torch_load(killed / "checkpoints" / stage / "last.ckpt")
        assert a["global_step"] == b["global_step"]
        for k, v in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=f"{stage}: {k}")

    report = evaluate(full, split="test")
    table = report["modality_combinations"]
    assert len(table["rows"]) == 15 and len({r[0] for r in table["rows"]}) == 15
    assert table["rows"][-1][0] == "flair+t1+t1ce+t2"
    assert {"dice_incomplete", "dice_complete", "dice_WT", "hd95_all_combinations"} <= set(report["metrics"])
    assert (full / "plots" / "combinations_dice.png").is_file()

    case = phantom_root / "Phantom_0003"
    out = predict(full, [str(case / "Phantom_0003_t1ce.nii.gz"), str(case / "Phantom_0003_flair.nii.gz")],
                  tmp_path / "pred", overrides=["eval.save_probabilities=true"])
    pred = out / "Phantom_0003.nii.gz"  # nnU-Net naming, on the input's own grid
    assert pred.is_file() and (out / "Phantom_0003_regions.nii.gz").is_file()
    import nibabel as nib

    src = nib.load(str(case / "Phantom_0003_t1ce.nii.gz"))
    assert nib.load(str(pred)).shape == src.shape
    np.testing.assert_array_equal(nib.load(str(pred)).affine, src.affine)

    assert set(np.unique(np.asarray(nib.load(str(pred)).dataobj)).tolist()) <= {0, 1, 2, 4}  # raw BraTS labels
    assert "flair+t1ce" in (out / "predictions.csv").read_text(encoding="utf-8")
    empty = tmp_path / "empty_case"
    empty.mkdir()
    with pytest.raises(DataError, match="empty modality set"):
        predict(full, [str(empty)], tmp_path / "pred2")


def test_single_stage_runs_from_the_previous_stages_best(phantom_root, tmp_path):
    from medfuse.engine.checkpoint import safe_torch_load
    from medfuse.engine.trainer import fit

    cfg = _engine_cfg(phantom_root, tmp_path, "staged")
    fit(cfg, only_stage="reconstruct", resume=True)
    ck = tmp_path / "staged" / "checkpoints"
    assert (ck / "reconstruct" / "done").exists() and not (ck / "contrast").exists()
    fit(cfg, only_stage="contrast", resume=True)
    assert (ck / "contrast" / "done").exists() and not (ck / "adapt").exists()
    rec = safe_torch_load(ck / "reconstruct" / "best.ckpt")["state_dict"]
    con = safe_torch_load(ck / "contrast" / "best.ckpt")["state_dict"]
    assert not torch.equal(rec["model.encoder.0.0.conv.weight"], con["model.encoder.0.0.conv.weight"])


# ------------------------------------------------------------------------------ one inference pass


def _count_calls(monkeypatch, counts: dict[str, int]) -> None:
    """Count the network's inference calls: ``predict_regions`` (one masked, possibly sliding-window,
    inference of a batch) and plain ``forward`` calls (the generic segmentation path)."""
    predict_regions, forward = IncompleteSegNet.predict_regions, IncompleteSegNet.forward

    def counted_predict_regions(self, *args, **kwargs):
        counts["predict_regions"] += 1
        return predict_regions(self, *args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        counts["forward"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(IncompleteSegNet, "predict_regions", counted_predict_regions)
    monkeypatch.setattr(IncompleteSegNet, "forward", counted_forward)


def _tiny_run_cfg(root, out, name):
    """One epoch of plain segmentation; one case per validation/test batch, 3 combinations per val case."""
    raw = _engine_cfg(root, out, name).model_dump()
    raw["data"]["eval_batch_size"] = 1
    raw["model"]["params"]["val_combos_per_case"] = 3
    raw["train"].update(stages=[], max_epochs=1)
    from medfuse.config import validate

    return validate(raw)


def test_incomplete_seg_validation_infers_each_batch_once(phantom_root, tmp_path, monkeypatch):
    import lightning as L

    from medfuse.engine.build import build_datamodule
    from medfuse.engine.trainer import fit

    counts = {"predict_regions": 0, "forward": 0}
    _count_calls(monkeypatch, counts)
    per_batch: list[dict[str, int]] = []

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.before = dict(counts)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            per_batch.append({k: counts[k] - self.before[k] for k in counts})

    cfg = _tiny_run_cfg(phantom_root, tmp_path, "val_once")
    run = fit(cfg, callbacks=[Spy()])
    n_val = len(build_datamodule(cfg, run).loader("val"))
    assert n_val >= 2 and len(per_batch) == n_val  # one validation epoch, no sanity steps
    # 3 combinations x 1 case <= 8 pairs per forward: one masked inference per batch, and no
    # generic (complete-input) pass besides it
    assert per_batch == [{"predict_regions": 1, "forward": 0}] * n_val


def test_incomplete_seg_evaluate_once(phantom_root, tmp_path, monkeypatch):
    import medfuse.engine.evaluate as ev
    from medfuse.engine.trainer import fit

    run = fit(_tiny_run_cfg(phantom_root, tmp_path, "eval_once"))
    counts = {"predict_regions": 0, "forward": 0}
    seen: dict = {}
    load_trained = ev.load_trained

    def spy(*args, **kwargs):
        cfg, dm, task = load_trained(*args, **kwargs)
        seen["n_batches"] = len(dm.loader("test"))
        _count_calls(monkeypatch, counts)
        return cfg, dm, task

    monkeypatch.setattr(ev, "load_trained", spy)
    report = ev.evaluate(run, split="test")
    n_combos = len(modality_combinations(4))
    assert seen["n_batches"] >= 2 and n_combos == 15
    assert counts == {"predict_regions": n_combos * seen["n_batches"], "forward": 0}
    # the report: combinations, and the generic outputs of the same pass (complete input)
    assert len(report["modality_combinations"]["rows"]) == n_combos and report["n"] == seen["n_batches"]
    assert {"dice_complete", "dice_incomplete", "dice_WT"} <= set(report["metrics"])
    assert set(report["full_input"]["metrics"]) >= {"dice", "hd95"}
    assert len(list((run / "predictions" / "test").glob("*.nii.gz"))) == report["n"]
    complete = report["modality_combinations"]["rows"][-1]
    assert complete[0] == "flair+t1+t1ce+t2"
