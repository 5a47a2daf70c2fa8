"""Safe weights loading: refusing code-executing pickles, round trips, remapping, load reports."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from medfuse.encoders.weights import (
    LoadReport,
    load_state_dict_file,
    load_weights,
    remap_keys,
    save_safetensors,
)
from medfuse.errors import WeightsError


class _Payload:
    """Unpickling this object runs ``exec``, which writes a marker file (the attack we refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _Net(nn.Module):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, hidden, 3)
        self.norm = nn.BatchNorm2d(hidden)
        self.head = nn.Linear(hidden, 2)


def _sd(seed: int = 0, hidden: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _Net(hidden).state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ---------------------------------------------------------------- unsafe pickles
@pytest.mark.parametrize("wrap", ["bare", "in_state_dict", "under_model"])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_code_executing_pickle_is_refused(tmp_path, wrap, legacy, suffix):
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    obj = {"bare": payload, "in_state_dict": {"w": payload}, "under_model": {"model": {"w": payload}}}[wrap]
    evil = tmp_path / f"evil{suffix}"
    torch.save(obj, evil, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match="refused to unpickle") as info:
        load_state_dict_file(evil)
    assert not marker.exists()
    assert str(evil) in str(info.value) and "safetensors" in str(info.value)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        load_weights(_Net(), evil, strict=False)
    assert not marker.exists()


def test_payload_really_executes_when_unpickled_unsafely(tmp_path):
    """Control for the test above: the payload is live, so its absence there means it was refused."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)
    assert marker.read_text(encoding="utf-8") == "pwned"


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "full_model.pt"
    torch.save(_Net(), path)
    with pytest.raises(WeightsError, match="needs code execution"):
        load_state_dict_file(path)


# ---------------------------------------------------------------- bad files
def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="not found") as info:
        load_state_dict_file(path)
    assert info.value.where == str(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(WeightsError, match="directory"):
        load_state_dict_file(tmp_path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_raises_weights_error(tmp_path, name, damage):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_safetensors(_sd(), path)
    else:
        torch.save(_sd(), path)
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(WeightsError) as info:
        load_state_dict_file(path)
    assert info.value.where == str(path)
    assert "refused" not in info.value.problem  # corrupt, not mistaken for an attack


def test_unknown_format_is_rejected(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_state_dict_file(path)


def test_non_state_dict_content_is_rejected(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"weights": _sd(), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="epoch"):
        load_state_dict_file(path)
    _assert_same(load_state_dict_file(path, key="weights"), _sd())
    with pytest.raises(WeightsError, match="no key 'ema'"):
        load_state_dict_file(path, key="ema")


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_torch_round_trip(tmp_path, wrapper, suffix):
    sd = _sd(1)
    path = tmp_path / f"w{suffix}"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    _assert_same(load_state_dict_file(path), sd)


def test_safetensors_round_trip_from_module_and_dict(tmp_path):
    torch.manual_seed(2)
    net = _Net()
    a = save_safetensors(net, tmp_path / "sub" / "a.safetensors")
    b = save_safetensors(dict(net.state_dict()), tmp_path / "b.safetensors", metadata={"arch": "net"})
    _assert_same(load_state_dict_file(a), net.state_dict())
    _assert_same(load_state_dict_file(b), net.state_dict())
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "a.safetensors",
        "b.safetensors",
        "sub",
    ]  # no tmp left


def test_safetensors_detected_by_content_not_suffix(tmp_path):
    path = save_safetensors(_sd(), tmp_path / "weights.bin")
    _assert_same(load_state_dict_file(path), _sd())


def test_save_safetensors_handles_tied_weights(tmp_path):
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight
    path = save_safetensors(net, tmp_path / "tied.safetensors")
    loaded = load_state_dict_file(path)
    torch.testing.assert_close(loaded["0.weight"], loaded["1.weight"])


# ---------------------------------------------------------------- remap
def test_remap_rules_strip_rename_and_drop():
    t = torch.zeros(1)
    sd = {
        "image_encoder.trunk.blocks.0.mlp.layers.0.weight": t,
        "image_encoder.trunk.blocks.0.mlp.layers.1.bias": t,
        "image_encoder.trunk.pos_embed": t,
        "image_encoder.neck.convs.0.conv.weight": t,
        "sam_mask_decoder.x": t,
    }
    rules = [
        (r"^image_encoder\.trunk\.", ""),
        (r"^image_encoder\.neck\.", None),
        (r"^sam_", None),
        (r"\.mlp\.layers\.0\.", ".mlp.fc1."),
        (r"\.mlp\.layers\.1\.", ".mlp.fc2."),
    ]
    assert sorted(remap_keys(sd, rules)) == ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "pos_embed"]


def test_remap_callable_and_collision():
    sd = {"a.w": torch.zeros(1), "b.w": torch.ones(1), "c.w": torch.zeros(1)}
    out = remap_keys(sd, lambda k: None if k.startswith("c") else k.upper())
    assert sorted(out) == ["A.W", "B.W"]
    with pytest.raises(ValueError, match="'a.w' and 'b.w'"):
        remap_keys(sd, [(r"^[ab]\.", "x.")])


# ---------------------------------------------------------------- load_weights
def test_load_weights_exact_match_copies_values(tmp_path):
    path = save_safetensors(_sd(5), tmp_path / "w.safetensors")
    torch.manual_seed(9)
    net = _Net()
    report = load_weights(net, path)
    assert report.ok and report.loaded == len(_sd()) and not report.allowed_missing
    _assert_same(net.state_dict(), _sd(5))


def test_load_weights_with_prefix_and_remap(tmp_path):
    sd = {f"image_encoder.trunk.{k.replace('head.', 'fc_out.')}": v for k, v in _sd(4).items()}
    sd["image_encoder.neck.w"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "medsam2_like.pt")
    net = _Net()
    report = load_weights(
        net, tmp_path / "medsam2_like.pt", prefix="image_encoder.trunk.", remap=[(r"^fc_out\.", "head.")]
    )
    assert report.ok
    _assert_same(net.state_dict(), _sd(4))


@pytest.fixture
def mismatched(tmp_path):
    """A checkpoint missing head.*, with one extra key and one wrongly shaped conv bias."""
    sd = {k: v for k, v in _sd(6).items() if not k.startswith("head.")}
    sd["extra.weight"] = torch.zeros(3)
    sd["conv.bias"] = torch.zeros(5)
    return save_safetensors(sd, tmp_path / "mismatch.safetensors")


def test_load_weights_strict_raises_and_leaves_model_untouched(mismatched):
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(net, mismatched)
    msg = str(info.value)
    assert str(mismatched) in msg and "_Net" in msg
    assert "2 missing (head.weight, head.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "conv.bias: (5,) vs model (4,)" in msg
    _assert_same(net.state_dict(), before)


def test_load_weights_non_strict_reports(mismatched):
    net = _Net()
    report = load_weights(net, mismatched, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.shape_mismatch == [("conv.bias", (5,), (4,))]
    expected_loaded = len(_sd()) - 3  # all but head.weight, head.bias, conv.bias
    assert report.loaded == expected_loaded
    torch.testing.assert_close(net.conv.weight, _sd(6)["conv.weight"])
    summary = report.summary()
    assert "\n" not in summary and f"loaded {expected_loaded}" in summary


@pytest.mark.parametrize(("patterns", "strict_ok"), [(["head.*"], True), (["head.w*"], False), ([], False)])
def test_allow_missing_patterns(tmp_path, patterns, strict_ok):
    sd = {k: v for k, v in _sd(7).items() if not k.startswith("head.")}
    path = save_safetensors(sd, tmp_path / "no_head.safetensors")
    report = load_weights(_Net(), path, allow_missing=patterns, strict=False)
    assert report.ok == strict_ok
    assert sorted(report.missing + report.allowed_missing) == ["head.bias", "head.weight"]
    if strict_ok:
        assert load_weights(_Net(), path, allow_missing=patterns).ok
    else:
        with pytest.raises(WeightsError, match="missing"):
            load_weights(_Net(), path, allow_missing=patterns)


@pytest.mark.parametrize("strict", [True, False])
def test_zero_keys_loaded_always_raises(tmp_path, strict):
    # timm features_only-style prefix: every key is 'model.<name>', so nothing lines up.
    sd = {f"model.{k}": v for k, v in _sd(8).items()}
    path = save_safetensors(sd, tmp_path / "prefixed.safetensors")
    net = _Net()
    with pytest.raises(WeightsError, match="no weights loaded") as info:
        load_weights(net, path, strict=strict, allow_missing=["*"])
    assert "model.conv" in str(info.value)


def test_all_shapes_mismatched_counts_as_nothing_loaded(tmp_path):
    path = save_safetensors({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="no weights loaded"):
        load_weights(nn.Linear(4, 4), path, strict=False)
    report = load_weights(nn.Linear(3, 3), path)  # same file, matching shapes: loads
    assert report.ok and report.loaded == 2


def test_unknown_prefix_is_reported(tmp_path):
    path = save_safetensors(_sd(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="prefix 'image_encoder.'"):
        load_weights(_Net(), path, prefix="image_encoder.")


def test_weights_error_is_one_line(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload(tmp_path / "m")}, evil)
    with pytest.raises(WeightsError) as info:
        load_state_dict_file(evil)
    assert "\n" not in info.value.one_line() and not isinstance(info.value, pickle.UnpicklingError)
