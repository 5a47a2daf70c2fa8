"""ct_encoder family: presets and ablation variants run forward + backward with a gradient for every
trainable parameter, the region path really uses the mask, the three-level loss, the region attention
returned by ``forward_intermediates``, registry and config errors, and train -> evaluate -> predict."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from einops import rearrange

from medfuse.config import apply_overrides, validate
from medfuse.errors import ConfigError, DataError
from medfuse.families.ct_encoder import FAMILY
from medfuse.families.ct_encoder.model import PRESETS, CTEncoderModel
from medfuse.families.ct_encoder.params import CTEncoderParams, build_ct_encoder
from medfuse.families.ct_encoder.task import CTEncoderTask
from medfuse.layers.patch_embed import PatchEmbed3d
from medfuse.losses import multi_positive_info_nce as contrastive_loss
from medfuse.registry import FAMILIES

SMALL = dict(num_regions=4, patch_size=(2, 8, 8), img_size=(8, 32, 32), fpn_levels=3, mask_hidden=4, embed_dim=16)


def ct_encoder(**params) -> CTEncoderModel:
    """The network from validated params (what the registry builds)."""
    return build_ct_encoder(CTEncoderParams(**params))


def _raw(params: dict[str, Any], overrides: tuple[str, ...] = (), **train) -> dict[str, Any]:
    raw = {"model": {"name": "ct_encoder", "params": dict(params)}, "train": train}
    return apply_overrides(raw, list(overrides))


def _task(params: dict[str, Any], overrides: tuple[str, ...] = (), stage: dict | None = None, **train) -> CTEncoderTask:
    """The family's task (no data needed: the model params are given)."""
    return CTEncoderTask(_raw(params, overrides, **train), stage=stage)


def _batch(b=3, shape=(8, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, *shape, dtype=torch.long)
    mask[..., :, :16, :16] = 1
    mask[..., :, :16, 16:] = 2
    mask[..., :4, 16:, :] = 3
    mask[..., 4:, 16:, :] = 4
    texts = [f"{10 + i} mm nodule in the right upper lobe." for i in range(b)]
    return {
        "image": torch.rand(b, 1, *shape, generator=g), "mask": mask, "text": texts, "case_id": [f"c{i}" for i in range(b)],
        "region_text": [[[1, f"Right upper lobe: a {10 + i} mm nodule."], [2, "Right lower lobe: clear."],
                         [3, "Heart: normal."]] for i in range(b)],
        "steps": [[[f"Right upper lobe - a {10 + i} mm nodule.", [1]], ["Lungs - otherwise clear.", [1, 2]],
                   ["Global impression.", []]] for i in range(b)],
    }


def _no_grad(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


@pytest.mark.parametrize("name, overrides", FAMILY.demo_ablations)
def test_demo_variants_forward_backward_every_param_gets_grad(name, overrides):
    torch.manual_seed(0)
    task = _task({**SMALL, "aux_seg": True, "loss_weights": {"seg": 0.5}}, overrides)
    m = task.model
    batch = _batch()
    out = task.forward_batch(batch)
    assert out["image_emb"].shape == (3, 16) and out["text_emb"].shape == (3, 16)
    assert out["region_emb"].shape == (3, 4, 16) and out["patch"].shape == (3, 4 * 4 * 4, m.vision.fpn_dim)
    losses = task.compute_loss(batch, out)
    assert set(losses) == {"loss", "global", "region", "step", "seg"}
    losses["loss"].backward()
    assert _no_grad(m) == []


@pytest.mark.parametrize("entry", FAMILY.models, ids=lambda e: e.name)
def test_every_model_builds_from_its_defaults_and_every_param_gets_grad(entry):
    """The registry's models from their default params (the tiny preset): forward + loss + backward."""
    torch.manual_seed(0)
    assert FAMILIES.find_model(entry.name) == (FAMILY, entry)
    assert isinstance(entry.build(entry.params()), torch.nn.Module)
    task = entry.task({"model": {"name": entry.name}})
    assert task.params == entry.params() and task.kind == "contrastive"
    batch = _batch(b=2)
    out = task.forward_batch(batch)
    task.compute_loss(batch, out)["loss"].backward()
    assert _no_grad(task.model) == []


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_every_param_gets_grad(preset):
    torch.manual_seed(0)
    small = preset == "tiny"
    task = _task({**SMALL, "preset": preset, "fpn_dim": 16 if not small else None})
    m = task.model
    size = PRESETS[preset]
    assert len(m.vision.blocks) == size["depth"] and m.vision.blocks[0].attn.num_heads == size["num_heads"]
    assert m.vision.patch_embed.proj.out_channels == size["dim"]
    if not small:  # base at 768/12/12: one short forward on a 2-patch volume keeps the test fast
        batch = _batch(b=2, shape=(2, 16, 16))
        batch["mask"] = batch["mask"].clamp(max=2)
    else:
        batch = _batch(b=2)
    out = task.forward_batch(batch)
    task.compute_loss(batch, out)["loss"].backward()
    assert _no_grad(m) == []


def test_region_attention_uses_the_mask_and_the_ablation_does_not():
    torch.manual_seed(0)
    full = ct_encoder(**SMALL).eval()
    blind = ct_encoder(**{**SMALL, "region_attention": False}).eval()
    batch = _batch()
    m = batch["mask"]
    other = torch.where(m == 1, 2, torch.where(m == 2, 1, m))  # swap two regions' labels, same image
    with torch.no_grad():
        a, b = full(batch["image"], batch["mask"]), full(batch["image"], other)
        assert not torch.allclose(a["image_emb"], b["image_emb"], atol=1e-5)
        a, b = blind(batch["image"], batch["mask"]), blind(batch["image"], other)
        torch.testing.assert_close(a["image_emb"], b["image_emb"])  # the global embedding never sees the mask
        torch.testing.assert_close(a["region"][:, 0], b["region"][:, 1])  # region pooling still follows it
    assert blind.vision.anatomy.table is None and all(blk.region is None for blk in blind.vision.blocks)


def test_multi_positive_contrastive_loss():
    img = torch.eye(3)
    txt = torch.eye(3)
    perfect = contrastive_loss(img, txt, ["a", "b", "c"], torch.tensor(50.0))
    assert float(perfect) < 1e-3
    # identical strings are positives of each other: two equal texts cost log(2), not more
    dup = contrastive_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                           ["same", "same"], torch.tensor(50.0))
    torch.testing.assert_close(dup, torch.log(torch.tensor(2.0)))
    shuffled = contrastive_loss(img, txt[[1, 2, 0]], ["a", "b", "c"], torch.tensor(50.0))
    assert float(shuffled) > 10


def test_text_embeddings_are_cached_per_unique_string():
    m = ct_encoder(**SMALL)
    calls = []
    enc = __import__("medfuse.families.ct_encoder.model", fromlist=["_frozen_text_encoder"])._frozen_text_encoder(
        "minilm", 128)
    original = enc.forward

    def counting(texts):
        calls.append(list(texts))
        return original(texts)

    enc.forward = counting
    try:
        a = m.text_features(["x is present.", "y is present.", "x is present."])
        b = m.text_features(["y is present.", "x is present."])
    finally:
        del enc.forward
    assert calls == [["x is present.", "y is present."]]
    torch.testing.assert_close(a[0], a[2])
    torch.testing.assert_close(a[:2], b[[1, 0]])
    assert a.shape[1] == enc.dim == 384 and not any(p.requires_grad for p in enc.parameters())
    assert not any(k.startswith("text_encoder") for k in m.state_dict())  # frozen encoder stays out of checkpoints


def test_stage_losses_override_weights_and_unknown_names_fail():
    torch.manual_seed(0)
    task = _task(SMALL, stage={"name": "s1", "losses": {"region": 0.0, "step": 0.0}})
    batch = _batch()
    out = task.forward_batch(batch)
    only_global = task.compute_loss(batch, out)
    torch.testing.assert_close(only_global["loss"], only_global["global"])
    full = _task(SMALL).compute_loss(batch, out)
    assert {"region", "step"} <= set(full)
    # an unknown loss name in any stage is refused when the task is built, before any training
    with pytest.raises(ConfigError, match=r"train\.stages\.s1\.losses\.caption"):
        _task(SMALL, stage={"name": "s1", "losses": {"caption": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.stages\.b\.losses\.caption"):
        _task(SMALL, stages=[{"name": "a"}, {"name": "b", "losses": {"caption": 1.0}}])


def test_patch_embed_interpolates_positions_and_returns_coords():
    pe = PatchEmbed3d(1, 12, patch_size=(2, 4, 4), img_size=(4, 8, 8))
    tokens, coords, grid = pe(torch.rand(2, 1, 6, 10, 8))  # not a multiple of the patch: zero-padded
    assert grid == (3, 3, 2) and tokens.shape == (2, 18, 12)
    assert coords.tolist()[:3] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]] and coords.tolist()[-1] == [2, 2, 1]
    # the linear patch projection equals the Conv3d it stands for
    x = torch.rand(1, 1, 4, 8, 8)
    conv = torch.nn.functional.conv3d(x, pe.proj.weight, pe.proj.bias, stride=(2, 4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe(x)[0], conv + pe.pos.encoding((2, 2, 2)))


def test_errors_are_config_or_data_errors():
    with pytest.raises(ConfigError):
        CTEncoderModel(**{**SMALL, "preset": "huge"})
    with pytest.raises(ConfigError):
        CTEncoderModel(**{**SMALL, "weighting": "sum"})
    with pytest.raises(ConfigError):
        CTEncoderModel(**{**SMALL, "in_channels": 2})
    with pytest.raises(ConfigError, match="model.params.loss_weights.*unknown loss 'caption'"):
        _task({**SMALL, "loss_weights": {"caption": 1.0}})
    task = _task(SMALL)
    batch = _batch()
    batch.pop("mask")
    with pytest.raises(DataError):
        task.forward_batch(batch)
    assert FAMILIES.find_model("ct_encoder")[0] is FAMILY


@pytest.mark.parametrize("params, key", [
    ({"num_region": 9}, "model.params.num_region"),  # unknown key
    ({"num_regions": "many"}, "model.params.num_regions"),  # ill-typed
    ({"preset": "huge"}, "model.params.preset"),  # not one of the choices
    ({"patch_size": "big"}, "model.params.patch_size"),
])
def test_bad_model_params_give_a_one_line_config_error(params, key):
    from medfuse.engine.build import model_params

    with pytest.raises(ConfigError) as e:
        model_params(validate({"model": {"name": "ct_encoder", "params": params}}))
    assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value)


def test_forward_intermediates_returns_the_last_blocks_region_attention():
    """One pass gives the same outputs as forward and the attention the layer itself applies."""
    torch.manual_seed(0)
    m = ct_encoder(**SMALL).eval()
    batch = _batch()
    region = m.vision.blocks[-1].region
    seen = {}

    def keep(mod, args, out):
        seen["args"], seen["out"] = args, out

    handle = region.register_forward_hook(keep)
    try:
        with torch.no_grad():
            plain = m(batch["image"], batch["mask"])
            assert "out" in seen  # forward runs the layer itself
            out, inter = m.forward_intermediates(batch["image"], batch["mask"])
    finally:
        handle.remove()
    for k in ("image_emb", "region_emb", "global", "patch", "region", "mass"):
        assert torch.equal(out[k], plain[k]), k  # identical numbers, not just close
    attn = inter["region_attn"]
    n = 4 * 4 * 4
    assert attn.shape == (3, region.num_heads, n, 5) and not attn.requires_grad
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, region.num_heads, n))
    # the returned weights reproduce the layer's own output from its own inputs (last call: with weights)
    x, regions, _ = seen["args"]
    layer_out, layer_attn = seen["out"]
    assert torch.equal(layer_attn, attn)
    v = rearrange(region.kv(regions), "b r (two h d) -> two b h r d", two=2, h=region.num_heads)[1]
    torch.testing.assert_close(region.proj(rearrange(attn @ v, "b h n d -> b n (h d)")), layer_out)
    # the region-blind variant has no map
    blind = ct_encoder(**{**SMALL, "region_attention": False}).eval()
    with torch.no_grad():
        assert blind.forward_intermediates(batch["image"], batch["mask"])[1] == {}


def test_train_evaluate_predict_end_to_end(tmp_path):
    """fit -> evaluate (retrieval both ways, zero-shot AUROC, region-text accuracy, attention maps) -> predict."""
    from safetensors.torch import load_file

    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit
    from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

    root = tmp_path / "data"
    make_ct_encoder_demo(root, n_patients=14, seed=0, shape=(8, 32, 32))
    cfg = validate({
        "name": "ct", "family": "ct_encoder", "task": "contrastive", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.2, "test": 0.4},
                 "transforms": {"spatial_size": [8, 32, 32], "intensity": {"ct": {"kind": "ct_window", "level": -300,
                                                                                  "width": 1400}}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {**SMALL, "num_regions": 9}},
        "train": {"max_epochs": 2, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False},
        "eval": {"n_boot": 20},
    })
    run = fit(cfg)
    rep = evaluate(run, split="test")
    m = rep["metrics"]
    for key in ("image_to_text/R@1", "image_to_text/R@5", "text_to_image/R@1", "text_to_image/R@5",
                "zero_shot/mean_auroc", "region_text_accuracy"):
        assert m[key]["n"] >= 3 and m[key]["low"] <= m[key]["value"] <= m[key]["high"], key
    assert "Right upper lobe nodule" in rep["per_class"]
    maps = rep["region_attention_maps"]
    assert maps and all((run / x["png"]).is_file() for x in maps)
    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64") >= len(maps) + 1  # the maps and the training curves
    out = predict(run, [str(root)], tmp_path / "emb")
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 14
    t = load_file(str(files[0]))
    assert t["global_emb"].shape == (16,) and t["region_emb"].shape == (9, 16)
    assert t["patch_features"].shape[0] == int(t["grid"].prod()) and abs(float(t["global_emb"].norm()) - 1) < 1e-4
    vol = next((root / "train").rglob("train_1_a_1.nii.gz"))
    with pytest.raises(DataError, match="metadata"):
        predict(run, [str(vol), str(root / "masks" / "train_1_a_1.nii.gz")], tmp_path / "emb2")


def test_ct_encoder_evaluate_once(tmp_path, monkeypatch):
    """`medfuse evaluate` runs the encoder once per test batch (retrieval, zero-shot AUROC, region-text
    alignment, attention maps, step metrics all come from that one pass), then once per training
    batch (linear probe, nearest-neighbour baseline)."""
    import medfuse.engine.evaluate as ev
    from medfuse.engine.trainer import fit
    from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

    root = tmp_path / "data"
    make_ct_encoder_demo(root, n_patients=10, seed=0, shape=(8, 32, 32))
    cfg = validate({
        "name": "once", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "batch_size": 2, "split": {"val": 0.2, "test": 0.4},
                 "transforms": {"spatial_size": [8, 32, 32], "intensity": {"ct": {"kind": "ct_window", "level": -300,
                                                                                  "width": 1400}}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {**SMALL, "num_regions": 9}},
        "train": {"max_epochs": 1, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False},
        "eval": {"n_boot": 5},
    })
    run = fit(cfg)
    calls, batches, train_batches = [], [], []
    load_trained = ev.load_trained

    def counting(*args, **kwargs):
        cfg, dm, task = load_trained(*args, **kwargs)
        # every encoder pass (forward and forward_intermediates) embeds the patches once
        task.model.vision.patch_embed.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
        batches.extend(len(b["case_id"]) for b in dm.loader("test"))
        train_batches.extend(len(b["case_id"]) for b in dm.eval_loader("train"))
        return cfg, dm, task

    monkeypatch.setattr(ev, "load_trained", counting)
    rep = ev.evaluate(run, split="test")
    assert len(batches) >= 2 and calls == batches + train_batches
    assert rep["n"] == sum(batches) == rep["metrics"]["image_to_text/R@1"]["n"]
    assert "zero_shot/mean_auroc" in rep["metrics"] and "region_text_accuracy" in rep["metrics"]
    assert rep["region_attention_maps"] and all((run / x["png"]).is_file() for x in rep["region_attention_maps"])


@pytest.mark.slow
def test_tiny_model_learns_to_retrieve_its_training_reports(tmp_path):
    """Learning check: after a few epochs on 40 phantoms the model retrieves training reports far above chance."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.trainer import fit
    from medfuse.families.ct_encoder.demo import make_ct_encoder_demo

    root = tmp_path / "data"
    make_ct_encoder_demo(root, n_patients=40, seed=0, shape=(16, 32, 32))
    cfg = validate({
        "name": "learn", "family": "ct_encoder", "task": "contrastive", "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "batch_size": 8, "split": {"val": 0.1, "test": 0.1},
                 "transforms": {"spatial_size": [16, 32, 32], "intensity": {"ct": {"kind": "ct_window", "level": -300,
                                                                                   "width": 1400}}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {**SMALL, "num_regions": 9, "patch_size": [4, 8, 8],
                                                   "img_size": [16, 32, 32], "embed_dim": 64}},
        "train": {"max_epochs": 12, "lr": 0.002, "monitor": "train/loss", "mode": "min", "progress_bar": False},
        "eval": {"n_boot": 50},
    })
    rep = evaluate(fit(cfg), split="train")
    n = rep["metrics"]["image_to_text/R@5"]["n"]
    chance = 5 / n
    for d in ("image_to_text", "text_to_image"):
        assert rep["metrics"][f"{d}/R@5"]["value"] > chance + 0.3, rep["metrics"]
