"""SlicewiseExtractor with the tiny encoder: shapes, chunking, checkpointing, gradients, feature cache."""

from __future__ import annotations

import logging

import pytest
import torch

from medfuse.encoders.slicewise import SlicewiseExtractor, tensor_sha256
from medfuse.encoders.tiny import TinySliceEncoder
from medfuse.errors import ConfigError


def make_encoder(seed: int = 0, **kw) -> TinySliceEncoder:
    torch.manual_seed(seed)
    return TinySliceEncoder(out_channels=16, **kw)


def count_calls(enc: torch.nn.Module) -> list[int]:
    """Slices seen by each encoder forward, including checkpoint recomputation (hooks miss those)."""
    calls: list[int] = []
    forward = enc.forward

    def counted(x):
        calls.append(x.shape[0])
        return forward(x)

    enc.forward = counted
    return calls


def volume(b: int = 2, d: int = 5, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, d, h, w, generator=g) * 100


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(("b", "d", "h", "w"), [(1, 3, 16, 16), (2, 5, 24, 32), (3, 1, 40, 24)])
@pytest.mark.parametrize("input_size", [None, 32])
def test_output_shape(b, d, h, w, input_size):
    enc = make_encoder(input_size=input_size).freeze()
    out = SlicewiseExtractor(enc, slice_batch_size=2)(volume(b, d, h, w))
    sh, sw = (input_size, input_size) if input_size else (h, w)
    assert out.shape == (b, d, 16, sh // 8, sw // 8)


@pytest.mark.parametrize("sbs", [1, 3, 4, 10])
def test_chunking_invariance(sbs):
    enc = make_encoder().freeze()
    vol = volume(2, 5)
    calls = count_calls(enc)
    with torch.no_grad():
        ref = SlicewiseExtractor(enc, slice_batch_size=vol.shape[2] * 2)(vol)  # one call for all slices
        calls.clear()
        out = SlicewiseExtractor(enc, slice_batch_size=sbs)(vol)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert max(calls) <= sbs and sum(calls) == 10


def test_slices_match_encoder_on_each_case():
    enc = make_encoder().freeze()
    vol = volume(2, 4)
    out = SlicewiseExtractor(enc, slice_batch_size=3)(vol)
    with torch.no_grad():
        expected = enc(enc.preprocess(vol[1, 0]))  # (D, C, h, w) of case 1
    torch.testing.assert_close(out[1], expected, atol=1e-5, rtol=1e-5)


def test_preprocessed_input_path():
    enc = make_encoder().freeze()
    vol = volume(1, 4)
    ready = enc.preprocess(vol[0, 0]).transpose(0, 1)[None]  # (1, 3, D, H, W)
    a = SlicewiseExtractor(enc)(vol)
    b = SlicewiseExtractor(enc, preprocess=False)(ready)
    torch.testing.assert_close(a, b)


def test_volume_wise_preprocessing_is_used_when_available():
    class VolumeEncoder(TinySliceEncoder):
        def preprocess_volume(self, vol, modality="mr", window=None):
            self.seen = (tuple(vol.shape), modality, window)
            return self.preprocess(vol, modality, window)

    enc = VolumeEncoder()
    SlicewiseExtractor(enc, modality="ct", window=(40, 400))(volume(1, 3))
    assert enc.seen == ((3, 24, 32), "ct", (40.0, 400.0))


@pytest.mark.parametrize(
    ("shape", "kw", "match"),
    [((1, 2, 3, 8, 8), {}, "one modality"), ((1, 1, 3, 8, 8), {"preprocess": False}, "3 encoder-ready"),
     ((1, 3, 8, 8), {}, r"\(B, C_in, D, H, W\)")],
)
def test_bad_input_shapes(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        SlicewiseExtractor(make_encoder(), **kw)(torch.rand(shape))


@pytest.mark.parametrize(("kw", "key"), [({"slice_batch_size": 0}, "slice_batch_size"),
                                         ({"checkpointing": "yes"}, "checkpointing")])
def test_bad_settings(kw, key):
    with pytest.raises(ConfigError, match=key):
        SlicewiseExtractor(make_encoder(), **kw)


# ---------------------------------------------------------------------------------------------- gradients
def _grads(checkpointing: bool | str) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    enc = make_encoder(seed=3)
    calls = count_calls(enc)
    ext = SlicewiseExtractor(enc, slice_batch_size=2, checkpointing=checkpointing)
    out = ext(volume(2, 3))
    (out.square().mean() + out[:, 1].mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}, calls


def test_checkpointing_matches_plain_backward():
    out_p, g_p, calls_p = _grads(False)
    out_c, g_c, calls_c = _grads("auto")
    torch.testing.assert_close(out_c, out_p)
    assert g_c.keys() == g_p.keys()
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], atol=1e-6, rtol=1e-5, msg=name)
    assert len(calls_p) == 3 and len(calls_c) == 6  # each chunk recomputed once in backward


def test_every_trainable_parameter_gets_a_gradient():
    _, grads, _ = _grads("auto")
    enc = make_encoder()
    assert set(grads) == {n for n, _ in enc.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(("frozen", "grad_mode", "expected"), [(True, True, False), (False, False, False),
                                                              (False, True, True)])
def test_auto_checkpointing_only_when_training_the_encoder(frozen, grad_mode, expected):
    enc = make_encoder()
    if frozen:
        enc.freeze()
    ext = SlicewiseExtractor(enc)
    with torch.set_grad_enabled(grad_mode):
        assert ext._use_checkpointing(torch.rand(1, 3, 8, 8)) is expected


# ---------------------------------------------------------------------------------------------- cache
@pytest.fixture
def cached(tmp_path):
    enc = make_encoder().freeze()
    calls = count_calls(enc)
    return SlicewiseExtractor(enc, slice_batch_size=2, cache_dir=tmp_path / "cache"), calls


def test_cache_second_pass_skips_encoder(cached, tmp_path):
    ext, calls = cached
    case = volume(1, 5)[0]
    first = ext.extract_cached(case, {"case_id": "c1"})
    assert len(calls) == 3 and ext.stats == {"hits": 0, "misses": 1}
    calls.clear()
    second = ext.extract_cached(case, {"case_id": "c1"})
    assert calls == [] and ext.stats == {"hits": 1, "misses": 1}
    assert torch.equal(first, second) and first.shape == (5, 16, 3, 4)
    torch.testing.assert_close(first, ext(case[None])[0])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1


@pytest.mark.parametrize(
    "change",
    ["weights", "window", "modality", "content", "key_parts"],
)
def test_cache_miss_when_anything_changes(cached, change):
    ext, calls = cached
    case = volume(1, 4)[0]
    ext.extract_cached(case, {"case_id": "c1"})
    calls.clear()
    kw: dict = {"key_parts": {"case_id": "c1"}}
    if change == "weights":
        with torch.no_grad():
            next(ext.encoder.parameters()).add_(0.01)  # in place: same tensors, new weights_id
    elif change == "window":
        kw["window"] = (40.0, 400.0)
    elif change == "modality":
        kw["modality"] = "ct"
    elif change == "content":
        case = case.clone()
        case[0, 0, 0, 0] += 1
    else:
        kw["key_parts"] = {"case_id": "c2"}
    ext.extract_cached(case, **kw)
    assert ext.stats["misses"] == 2 and len(calls) == 2


def test_file_hash_stands_for_the_content(cached):
    ext, calls = cached
    a, b = volume(1, 3, seed=1)[0], volume(1, 3, seed=2)[0]
    key_a, desc = ext.cache_key(a, {"file_hash": "abc"})
    assert key_a == ext.cache_key(b, {"file_hash": "abc"})[0] and desc["content"] == "abc"
    assert ext.cache_key(a)[0] != ext.cache_key(b)[0]
    assert ext.cache_key(a)[1]["content"] == tensor_sha256(a)


def test_forward_with_cache_keys(cached):
    ext, calls = cached
    vol = volume(2, 3)
    keys = [{"case_id": "a"}, {"case_id": "b"}]
    first = ext(vol, cache_keys=keys)
    calls.clear()
    second = ext(vol, cache_keys=keys)
    assert calls == [] and torch.equal(first, second)
    torch.testing.assert_close(first, ext(vol))


def test_cache_dtype_hit_equals_miss(tmp_path):
    ext = SlicewiseExtractor(make_encoder().freeze(), cache_dir=tmp_path, cache_dtype=torch.float16)
    case = volume(1, 3)[0]
    miss = ext.extract_cached(case)
    hit = ext.extract_cached(case)
    assert ext.stats["hits"] == 1 and hit.dtype == torch.float32 and torch.equal(miss, hit)


def test_corrupt_cache_entry_is_recomputed(cached, tmp_path, caplog):
    ext, calls = cached
    case = volume(1, 3)[0]
    first = ext.extract_cached(case)
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        again = ext.extract_cached(case)
    assert "unreadable" in caplog.text and ext.stats["misses"] == 2
    assert torch.equal(first, again) and entry.stat().st_size > 100


@pytest.mark.parametrize(("frozen", "cache_dir", "match"), [(False, True, "trainable"), (True, False, "folder")])
def test_cache_refuses_trainable_encoder_or_no_folder(tmp_path, frozen, cache_dir, match):
    enc = make_encoder()
    if frozen:
        enc.freeze()
    ext = SlicewiseExtractor(enc, cache_dir=tmp_path if cache_dir else None)
    with pytest.raises(ConfigError, match=match):
        ext.extract_cached(volume(1, 2)[0])
