import pytest
import torch

from medfuse.errors import MedfuseError
from medfuse.text import build_text_encoder


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def test_minilm_shapes_and_dim_from_config(minilm):
    out = minilm(["hypoechoic lesion with irregular margin", "a small round cyst"])
    assert minilm.dim == minilm.model.config.hidden_size == out.tokens.shape[-1]
    assert out.tokens.shape[:2] == out.mask.shape and out.pooled.shape == (2, minilm.dim)
    # the pooled vector is the masked mean: padding of the shorter text must not leak in
    m = out.mask[1].unsqueeze(-1).float()
    assert torch.allclose(out.pooled[1], (out.tokens[1] * m).sum(0) / m.sum(), atol=1e-6)
    assert not out.mask[1].all()  # the shorter text was padded


def test_minilm_is_frozen_and_semantic(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training  # dropout stays off for a frozen encoder
    a, b, c = minilm(["a bright lesion on the left", "a bright lesion on the left side", "the cat sat on the mat"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0) + 0.2


def test_hf_folder_round_trip(minilm, tmp_path):
    minilm.model.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    enc = build_text_encoder(f"hf:{tmp_path}")
    texts = ["irregular margin"]
    assert torch.allclose(enc(texts).pooled, minilm(texts).pooled, atol=1e-6)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(MedfuseError, match="config.json"):
        build_text_encoder(f"hf:{tmp_path / 'nope'}")


def test_unknown_name_lists_valid(tmp_path):
    with pytest.raises(MedfuseError, match="minilm"):
        build_text_encoder("pubmedbert")
