"""Text -> image fusion blocks of the text_seg family: gates, null key, gradients, parity."""

from __future__ import annotations

import math

import pytest
import torch

from medfuse.families.text_seg.fusion import (
    GatedTextFusion,
    HierarchicalTextFusion,
    TextCrossAttentionLevel,
    gate_logit,
)

C, CT, L = 32, 48, 20


def _inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, C, generator=g), torch.randn(b, CT, generator=g), torch.randn(1, L, C, generator=g)


def test_gates_start_exactly_at_the_seed_values():
    fusion = HierarchicalTextFusion(256, 384)
    coarse, fine = fusion.gates
    assert coarse == pytest.approx(0.5, abs=1e-7) and fine == pytest.approx(0.8, abs=1e-7)
    # the peer passed 0.5 / 0.8 through a sigmoid: effective 0.62 / 0.69
    peer = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-0.8))]
    assert abs(coarse - peer[0]) > 0.1 and abs(fine - peer[1]) > 0.1
    assert [lvl.num_tokens for lvl in fusion.levels] == [1, 2]
    assert [lvl.attn.num_heads for lvl in fusion.levels] == [4, 8]


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, 1.5])
def test_gate_logit_refuses_values_outside_the_open_interval(value):
    with pytest.raises(ValueError, match="strictly between"):
        gate_logit(value)


def test_gate_scales_the_text_message_not_the_image():
    torch.manual_seed(0)
    level = TextCrossAttentionLevel(C, CT, num_tokens=2, num_heads=4, token_dim=16, init_gate=0.8, init_scale=1.0)
    x, t, pos = _inputs()
    delta = level(x, t, pos) - x
    with torch.no_grad():
        level.gate_logit.fill_(gate_logit(0.2))
    assert torch.allclose(level(x, t, pos) - x, delta * 0.25, atol=1e-5)


def test_null_key_makes_the_single_token_level_vary_over_pixels():
    """Without a null key a 1-token softmax is 1 everywhere: the output is one vector (the peer's level 1)."""
    torch.manual_seed(0)
    level = TextCrossAttentionLevel(C, CT, num_tokens=1, num_heads=4, token_dim=16, init_scale=1.0)
    x, t, _ = _inputs()
    delta = level(x, t) - x  # (B, L, C)
    assert delta.std(dim=1).mean() > 1e-3
    without_null = level.attn(level.norm(x), level.tokens(t))  # keys: the text token alone
    assert without_null.std(dim=1).max() < 1e-5


def test_near_identity_at_initialisation():
    fusion = HierarchicalTextFusion(C, CT, token_dim=16)
    x, t, pos = _inputs()
    out = fusion(x, t, pos)
    assert (out - x).abs().max() < 0.05 * x.abs().max()
    assert not torch.equal(out, x)


@pytest.mark.parametrize("kind", ["hierarchical", "null", "gated"])
def test_every_parameter_gets_a_gradient(kind):
    torch.manual_seed(0)
    if kind == "gated":
        fusion = GatedTextFusion(C, CT)
    else:
        fusion = HierarchicalTextFusion(C, CT, token_dim=16, text_mode="null" if kind == "null" else "text")
    x, t, pos = _inputs()
    out = fusion(x, t, pos)
    loss = (out * torch.randn_like(out)).sum() + fusion.text_embedding(t).pow(2).sum()
    loss.backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_changes_the_output_unless_null():
    torch.manual_seed(0)
    x, t, pos = _inputs()
    t2 = torch.randn_like(t)
    for mode in ("text", "null"):
        fusion = HierarchicalTextFusion(C, CT, token_dim=16, text_mode=mode)
        for lvl in fusion.levels:
            torch.nn.init.normal_(lvl.attn.proj.weight, std=0.2)
        diff = (fusion(x, t, pos) - fusion(x, t2, pos)).abs().max()
        assert (diff > 1e-3) if mode == "text" else (diff == 0)


def test_gated_baseline_starts_at_its_gate_and_mixes_text():
    fusion = GatedTextFusion(C, CT, init_gate=0.8)
    x, t, _ = _inputs()
    out, inter = fusion.forward_intermediates(x, t)
    gate = inter["gate"]
    assert gate.shape == x.shape and torch.allclose(gate, torch.full_like(gate, 0.8))
    token = fusion.text_embedding(t)[:, None]
    assert torch.allclose(out, 0.8 * x + 0.2 * token, atol=1e-6)
    assert torch.equal(fusion(x, t), out)
    assert not any(isinstance(v, torch.Tensor) for v in vars(fusion).values())  # no state left on the module


def test_hierarchical_fusion_has_no_intermediates_and_keeps_no_state():
    fusion = HierarchicalTextFusion(C, CT, token_dim=16)
    x, t, pos = _inputs()
    out, inter = fusion.forward_intermediates(x, t, pos)
    assert inter == {} and torch.equal(out, fusion(x, t, pos))
    for m in fusion.modules():
        assert not any(isinstance(v, torch.Tensor) for v in vars(m).values() if not isinstance(v, dict)), m


def test_sdpa_and_reference_attention_agree_on_outputs_and_gradients():
    torch.manual_seed(0)
    fused = HierarchicalTextFusion(C, CT, token_dim=16)
    for lvl in fused.levels:
        torch.nn.init.normal_(lvl.attn.proj.weight, std=0.2)
    ref = HierarchicalTextFusion(C, CT, token_dim=16)
    ref.load_state_dict(fused.state_dict())
    for lvl in ref.levels:
        lvl.attn.fused = False
    x, t, pos = _inputs()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi, t, pos) for m, xi in zip((fused, ref), xs, strict=True)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    w = torch.randn_like(outs[0])
    for o in outs:
        (o * w).sum().backward()
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5)
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n


def test_hierarchical_parameter_count_at_medsam_width():
    """MedSAM width (256) and MiniLM (384): the adapter is about 475K (the peer's was 1.12M)."""
    n = sum(p.numel() for p in HierarchicalTextFusion(256, 384).parameters())
    assert 400_000 < n < 520_000
