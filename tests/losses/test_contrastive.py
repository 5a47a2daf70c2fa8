"""The merged multi-positive InfoNCE (ct_encoder's three levels, text_seg's image-text term) against
the two formulas it replaced, and the plain InfoNCE against its textbook form, in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfuse.losses import InfoNCE, info_nce, multi_positive_info_nce


def _ct_encoder_formula(img, txt, texts, scale):  # ct_encoder/task.py before the merge
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tid = torch.tensor([ids[t] for t in texts])
    pos = (tid[:, None] == tid[None, :]).to(img.dtype)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


def _text_seg_formula(a, b, groups, scale):  # text_seg/task.py before the merge
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = scale * a @ b.t()
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    g = torch.tensor([ids[k] for k in groups])
    same = (g[:, None] == g[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@pytest.mark.parametrize("groups", [list("abcdef"), ["x", "y", "x", "z", "y", "x"]])
def test_multi_positive_matches_both_former_formulas_and_gradients(groups):
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    scale = torch.tensor(7.0, requires_grad=True)
    out = multi_positive_info_nce(a, b, groups, scale)
    grads = torch.autograd.grad(out, (a, b, scale))
    for ref_fn in (_ct_encoder_formula, _text_seg_formula):
        ref = ref_fn(a, b, groups, scale)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, torch.autograd.grad(ref, (a, b, scale)), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_info_nce_is_clip_loss_and_multi_positive_with_distinct_groups():
    torch.manual_seed(1)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    logits = 10.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    torch.testing.assert_close(info_nce(a, b, 10.0), clip)
    torch.testing.assert_close(multi_positive_info_nce(a, b, list("vwxyz"), 10.0), clip)
    assert InfoNCE(init_temp=0.1)(a, b).item() == pytest.approx(clip.item(), rel=1e-5)


def test_multi_positive_refuses_a_group_count_that_is_not_the_row_count():
    with pytest.raises(ValueError, match="groups"):
        multi_positive_info_nce(torch.randn(3, 2), torch.randn(3, 2), ["a", "b"], 1.0)
