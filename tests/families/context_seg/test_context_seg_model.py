"""context_seg family: fusion formula, stream separation, gradients, sliding window, learning."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from medfuse.config import validate_params
from medfuse.errors import ConfigError
from medfuse.families.context_seg import FAMILY
from medfuse.families.context_seg.fusion import ContextAttentionFusion
from medfuse.families.context_seg.network import FUSIONS
from medfuse.families.context_seg.params import ContextSegParams, build_context_seg
from medfuse.registry import FAMILIES

C = 6  # feature channels of each stream
SMALL = dict(feature_channels=C, base=4, levels=2)


def context_seg(**kw):
    """Build through the family's params model, as the engine does (bad keys -> ConfigError)."""
    return build_context_seg(validate_params(ContextSegParams, kw, "model.params"))


def _x(b=2, size=(8, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, *size, generator=g), torch.randn(b, C, *size, generator=g)


def test_registered_with_its_ablations():
    assert FAMILIES.get("context_seg") is FAMILY
    assert FAMILIES.find_model("context_seg") == (FAMILY, FAMILY.model("context_seg"))
    assert FAMILY.model("context_seg").task.kind == "segmentation"
    names = [n for n, _ in FAMILY.demo_ablations]
    assert len(names) == 3 and "attention" in names[0] and FAMILY.demo_ablations[0][1] == ()
    assert {o[0].split("=")[1] for _, o in FAMILY.demo_ablations[1:]} == {"concat", "none"}
    assert FAMILY.demo_config.is_file()


@pytest.mark.parametrize("entry", FAMILY.models, ids=lambda e: e.name)
def test_every_model_builds_from_its_defaults_and_trains_every_param(entry):
    """Defaults plus what the data gives (num_classes); feature_channels defaults to the tiny encoder's C."""
    from medfuse.encoders.base import build_encoder

    params = entry.params()
    assert params.feature_channels == build_encoder("tiny").out_channels  # the default data encoder
    torch.manual_seed(0)
    m = entry.build(params.model_copy(update={"num_classes": 3}))
    x = torch.randn(2, 2 * params.feature_channels, 16, 16, 16)  # the stacked raw + context item
    logits = m(x)
    assert logits.shape == (2, 3, 16, 16, 16)
    logits.logsumexp(1).sum().backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)] == []


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_fusion_is_raw_plus_raw_times_attention(norm):
    torch.manual_seed(0)
    f = ContextAttentionFusion(8, reduction=4, norm=norm)
    raw, ctx = torch.randn(2, 8, 4, 5, 6), torch.randn(2, 8, 4, 5, 6)
    att = f.attention(ctx).detach()
    assert float(att.min()) > 0 and float(att.max()) < 1
    assert torch.equal(f(raw, ctx), raw + raw * f.attention(ctx))
    # att = sigmoid(conv1x1(C -> C/4) -> norm -> ReLU -> conv1x1(C/4 -> C))
    assert f.att[0].out_channels == 2 and f.att[3].in_channels == 2
    torch.testing.assert_close(att, torch.sigmoid(f.att[3](torch.relu(f.att[1](f.att[0](ctx))))).detach())


def test_model_skips_use_the_fusion_formula():
    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion="attention", **SMALL).eval()
    raw, ctx = _x()
    seen = []
    for fuse in m.fusions:
        fuse.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp, out)))
    m(raw, ctx)
    assert len(seen) == 2
    for mod, (r, c), out in seen:
        assert torch.equal(out, r + r * mod.attention(c))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_variant_forward_backward_all_params_get_grad(fusion):
    torch.manual_seed(0)
    m = context_seg(num_classes=4, fusion=fusion, feature_channels=C, base=4, levels=4)
    raw, ctx = _x(size=(16, 16, 16))
    logits = m(torch.cat([raw, ctx], 1))  # the engine's stacked item
    assert logits.shape == (2, 4, 16, 16, 16)
    logits.logsumexp(1).sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    has_context = any(n.startswith(("context.", "fusions.")) for n, _ in m.named_parameters())
    assert has_context == (fusion == "attention")


def _encoder_outputs(m, raw, ctx):
    outs = {}
    mods = {"input_conv": m.input_conv, **{f"enc{i}": b for i, b in enumerate(m.enc)}, "bottleneck": m.bottleneck}
    hooks = [mod.register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o.clone())) for k, mod in mods.items()]
    with torch.no_grad():
        logits = m(raw, ctx)
    for h in hooks:
        h.remove()
    return outs, logits


@pytest.mark.parametrize("fusion, separate", [("attention", True), ("none", True), ("concat", False)])
def test_streams_stay_separate_until_the_skips(fusion, separate):
    """With attention fusion the whole raw encoder path is blind to the context; the output is not."""
    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion=fusion, **SMALL).eval()
    raw, ctx = _x()
    a, la = _encoder_outputs(m, raw, ctx)
    b, lb = _encoder_outputs(m, raw, ctx + 3 * torch.randn_like(ctx))
    same = [torch.equal(a[k], b[k]) for k in a]
    assert all(same) if separate else not any(same)
    assert m.input_conv.conv.in_channels == (2 * C if fusion == "concat" else C)
    assert torch.equal(la, lb) == (fusion == "none")


def test_attention_raw_and_context_are_never_concatenated():
    """No torch.cat in the attention model ever joins tensors with the raw and the context width."""
    from torch.overrides import TorchFunctionMode

    cats = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.cat:
                cats.append([t.shape[1] for t in args[0]])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion="attention", feature_channels=5, context_channels=7, base=4, levels=2)
    raw, ctx = torch.randn(1, 5, 8, 8, 8), torch.randn(1, 7, 8, 8, 8)
    with Spy():
        m(raw, ctx)
    assert cats and all(c != [5, 7] for c in cats)  # only decoder [upsampled, fused skip] joins
    cats.clear()
    mc = context_seg(num_classes=3, fusion="concat", feature_channels=5, context_channels=7, base=4, levels=2)
    with Spy():
        mc(raw, ctx)
    assert cats[0] == [5, 7]  # the ablation baseline does concatenate, first


def test_stacked_input_is_split_into_the_two_streams():
    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion="attention", **SMALL).eval()
    raw, ctx = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(torch.cat([raw, ctx], 1)), m(raw, ctx))
    with pytest.raises(ValueError, match="context channels"):
        m(torch.randn(1, C + 1, 8, 8, 8))


@pytest.mark.parametrize("size", [(20, 24, 28), (16, 16, 16), (9, 17, 13)])
def test_sliding_window_output_has_input_shape(size):
    torch.manual_seed(0)
    m = context_seg(num_classes=5, fusion="attention", **SMALL).eval()
    raw, ctx = _x(b=1, size=size)
    image = torch.cat([raw, ctx], 1)
    with torch.no_grad():
        out = sliding_window_inference(image, (16, 16, 16), sw_batch_size=2, predictor=m, overlap=0.25, mode="gaussian")
        direct = m(image)
    assert out.shape == (1, 5, *size) and direct.shape == (1, 5, *size)
    assert torch.isfinite(out).all()


def test_config_errors():
    with pytest.raises(ConfigError, match="model.params.fusion"):
        context_seg(num_classes=3, fusion="sum", feature_channels=4)
    with pytest.raises(ConfigError, match="model.params.norm"):
        context_seg(num_classes=3, norm="layer", feature_channels=4)
    with pytest.raises(ConfigError, match="model.params.up_mode"):
        context_seg(num_classes=3, up_mode="nearest", feature_channels=4)
    with pytest.raises(ConfigError, match="num_classes"):
        context_seg(num_classes=1, feature_channels=4)
    with pytest.raises(ConfigError, match="data.num_classes"):  # none set, none derived from the data
        context_seg(feature_channels=4)


@pytest.mark.parametrize("key, value, msg", [("no_such_key", 1, "unknown key"), ("base", "wide", "base"),
                                             ("levels", 0, "levels"), ("fusion", "sum", "fusion")])
def test_params_errors_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=f"model.params.{key}") as e:
        context_seg(num_classes=3, **{key: value})
    assert "\n" not in e.value.one_line() and msg in e.value.one_line()


@pytest.mark.parametrize("size", [(8, 8, 8), (9, 17, 13)])
def test_forward_intermediates_returns_the_gates_of_the_same_pass(size):
    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion="attention", **SMALL).eval()
    raw, ctx = _x(size=size)
    with torch.no_grad():
        logits, inter = m.forward_intermediates(torch.cat([raw, ctx], 1))
        torch.testing.assert_close(logits, m(raw, ctx))
        gates = inter["attention"]
        assert len(gates) == 2 and not any(k.startswith(("last_", "_eval")) for k in vars(m))
        for i, (g, w) in enumerate(zip(gates, m.widths, strict=True)):
            assert g.shape == (2, w, *(-(-s // 2**i) for s in size))
            assert float(g.min()) > 0 and float(g.max()) < 1
        # level 1 runs at full resolution: its gate is the fusion MLP of the projected context
        ctx_feats = m.context(m._pad(ctx)[0])[0]
        d, h, w = size
        torch.testing.assert_close(gates[0], m.fusions[0].attention(ctx_feats)[:, :, :d, :h, :w])
    for fusion in ("concat", "none"):
        plain = context_seg(num_classes=3, fusion=fusion, **SMALL).eval()
        with torch.no_grad():
            out, extra = plain.forward_intermediates(raw, ctx)
            torch.testing.assert_close(out, plain(raw, ctx))
        assert extra == {}


def test_task_infers_gates_with_the_sliding_window():
    """The evaluator's inference with gates gives the same logits as the task's plain inference."""
    from medfuse.families.context_seg.task import ContextSegTask

    torch.manual_seed(0)
    cfg = {"model": {"name": "context_seg", "params": SMALL}, "eval": {"roi_size": [8, 8, 8]}}
    task = ContextSegTask(cfg, auto={"num_classes": 3, "in_channels": 2, "modalities": ["raw", "context"]}).eval()
    assert task.cfg.family == "context_seg" and task.cfg.task == "segmentation"
    raw, ctx = _x(b=1, size=(12, 16, 16))
    batch = {"image": torch.cat([raw, ctx], 1)}
    with torch.no_grad():
        plain = task.infer(batch)
        out = task.infer_intermediates(batch)
    torch.testing.assert_close(out["logits"], plain["logits"])
    assert out["attention"].shape == (1, 1, 12, 16, 16)
    assert float(out["attention"].min()) > 0 and float(out["attention"].max()) < 1


def _context_task(n=24, size=8, seed=0):
    """Raw features mark blobs (identical everywhere); context says which region: the label is blob x region."""
    g = torch.Generator().manual_seed(seed)
    raw = 0.3 * torch.randn(n, C, size, size, size, generator=g)
    blob = torch.rand(n, 1, size, size, size, generator=g) < 0.15
    raw[:, :1] += 2.0 * blob
    region = (torch.arange(n) % 2).view(n, 1, 1, 1, 1).float()  # constant over a patch, as a coarse context is
    ctx = 0.3 * torch.randn(n, C, size, size, size, generator=g)
    ctx[:, :1] += 2.0 * region
    label = (blob * (1 + region)).long()[:, 0]  # 0 background, 1 blob in region 0, 2 blob in region 1
    return raw, ctx, label


@pytest.mark.parametrize("fusion", ["attention", "none"])
def test_tiny_model_learns_and_only_context_disambiguates(fusion):
    """Fresh samples every step (no memorising): attention learns blob x region; raw only cannot."""
    from medfuse.metrics import confusion_stats, scores_from_stats

    torch.manual_seed(0)
    m = context_seg(num_classes=3, fusion=fusion, feature_channels=C, base=8, levels=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    w = torch.tensor([0.2, 1.0, 1.0])
    for step in range(60):
        raw, ctx, y = _context_task(n=8, seed=100 + step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(raw, ctx), y, weight=w).backward()
        opt.step()
    m.eval()
    rt, ct, yt = _context_task(n=16, seed=1)
    with torch.no_grad():
        pred = m(rt, ct).argmax(1)
    f1 = scores_from_stats(confusion_stats(pred, yt, 3))["f1"][1:]
    if fusion == "attention":
        assert f1.min() > 0.85, f1  # both blob classes, told apart by the context
    else:
        # a context-blind labelling of blobs whose region is 50/50 has min(F1_1, F1_2) <= 0.5
        assert f1.min() < 0.6, f1
