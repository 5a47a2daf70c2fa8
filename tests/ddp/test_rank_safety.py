"""The single-process pieces of multi-process training (issue 15): one writer per cache entry,
atomic cache files, the unpadded validation sampler, the launcher check, rank-0 data preparation
and the ``train.sync_batchnorm`` switch."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_cls_config
from medfuse.config import TrainConfig, validate
from medfuse.data.datamodule import CaseDataModule, SeededSampler
from medfuse.dist import gather_eval_outputs
from medfuse.encoders.slicewise import SlicewiseExtractor
from medfuse.encoders.tiny import TinySliceEncoder
from medfuse.engine.tasks import BaseTask
from medfuse.engine.trainer import UnpaddedSampler, build_trainer, check_launch
from medfuse.errors import ConfigError
from medfuse.fileio import claim


def _write_later(path, delay: float = 0.3, text: str = "done"):
    def run():
        time.sleep(delay)
        path.write_text(text)

    t = threading.Thread(target=run)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------- claim
def test_claim_gives_one_writer_and_removes_its_lock(tmp_path):
    target = tmp_path / "sub" / "entry.bin"
    with claim(target) as mine:
        assert mine and (tmp_path / "sub" / ".entry.bin.lock").is_file()
        with claim(target, wait_s=0.2) as theirs:  # a second process meanwhile: waits, then gives up
            assert theirs  # it computes itself after wait_s rather than hang
        target.write_text("x")
    assert not (tmp_path / "sub" / ".entry.bin.lock").exists()
    with claim(target) as again:
        assert not again  # the entry exists: nobody writes it


def test_claim_waits_for_the_writer_instead_of_computing(tmp_path):
    target = tmp_path / "entry.bin"
    (tmp_path / ".entry.bin.lock").write_text("123\n")  # another process is writing it
    t = _write_later(target)
    start = time.monotonic()
    with claim(target) as mine:
        assert not mine and target.read_text(encoding="utf-8") == "done"
    assert time.monotonic() - start >= 0.25
    t.join()


def test_claim_takes_over_a_stale_lock(tmp_path):
    target = tmp_path / "entry.bin"
    lock = tmp_path / ".entry.bin.lock"
    lock.write_text("999999\n")
    old = time.time() - 3600
    import os

    os.utime(lock, (old, old))
    with claim(target, stale_s=60) as mine:
        assert mine
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------- caches
def test_feature_cache_waits_for_another_writer_and_never_reencodes(tmp_path):
    torch.manual_seed(0)
    enc = TinySliceEncoder(out_channels=8).freeze()
    writer = SlicewiseExtractor(enc, cache_dir=tmp_path)
    reader = SlicewiseExtractor(enc, cache_dir=tmp_path)
    case = torch.rand(1, 3, 16, 16) * 100
    key, _ = writer.cache_key(case, {"case_id": "c1"})
    path = tmp_path / key[:2] / f"{key}.safetensors"
    path.parent.mkdir(parents=True)
    lock = path.with_name(f".{path.name}.lock")
    lock.write_text("1\n")  # the writer's claim, as another rank holds it

    def write():
        time.sleep(0.3)
        writer._compute_and_store(case, path, writer.cache_key(case, {"case_id": "c1"})[1], torch.device("cpu"),
                                  None, None)
        lock.unlink()

    t = threading.Thread(target=write)
    t.start()
    feats = reader.extract_cached(case, {"case_id": "c1"})
    t.join()
    assert reader.stats == {"hits": 1, "misses": 0}  # read the other writer's entry
    torch.testing.assert_close(feats, writer.extract_cached(case, {"case_id": "c1"}))
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


def test_transform_cache_is_written_in_place_atomically_and_survives_a_damaged_entry(cls_dataset, tmp_path,
                                                                                     monkeypatch):
    import tempfile

    def no_system_temp(*a, **k):
        raise AssertionError("the cache must not be staged in the system temp folder")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_system_temp)
    cfg = validate(tiny_cls_config(cls_dataset.parent, tmp_path, name="c", data__cache_dir=str(tmp_path / "cache")))
    dm = CaseDataModule(cfg, tmp_path / "c")
    first = dm.dataset("val")[0]
    entries = list((tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 1 and not list((tmp_path / "cache").glob(".*"))
    entries[0].write_bytes(b"PK\x03\x04 truncated")  # a damaged entry is recomputed, not fatal
    with pytest.warns(UserWarning, match="unreadable"):
        again = CaseDataModule(cfg, tmp_path / "c").dataset("val")[0]
    torch.testing.assert_close(again["image"], first["image"])
    assert torch.load(entries[0], weights_only=True)  # rewritten whole


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize(("n", "world"), [(5, 2), (7, 3), (4, 2)])
def test_unpadded_sampler_gives_every_case_to_one_rank(n, world):
    inner = SeededSampler(n, seed=3, shuffle=False)
    parts = [list(UnpaddedSampler(inner, world, r)) for r in range(world)]
    assert sorted(i for p in parts for i, _ in p) == list(range(n))  # no case twice, none missing
    assert [len(UnpaddedSampler(inner, world, r)) for r in range(world)] == [len(p) for p in parts]
    assert [i for i, _ in parts[1]] == list(range(1, n, world))  # rank r: r, r + W, ... (gather relies on it)


def test_unpadded_sampler_forwards_the_epoch_to_the_seeded_sampler():
    inner = SeededSampler(4, seed=3, shuffle=False)
    s = UnpaddedSampler(inner, 2, 0)
    before = list(s)
    s.set_epoch(5)
    assert inner.epoch == 5 and list(s) != before  # per-sample seeds follow the epoch, as in one process


def test_eval_outputs_pass_through_in_one_process():
    local = {"probs": torch.ones(2, 3).numpy(), "case_id": ["a", "b"]}
    assert gather_eval_outputs(local, 2) is local


# ---------------------------------------------------------------------------------------------- launch
@pytest.mark.parametrize(("devices", "world", "ok"), [(2, "2", True), (1, "2", False), ("auto", "2", False),
                                                      ("0,1", "2", True), (4, "2", False)])
def test_torchrun_process_count_must_match_train_devices(cls_dataset, tmp_path, monkeypatch, devices, world, ok):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = validate(tiny_cls_config(cls_dataset.parent, tmp_path, train__devices=devices, train__accelerator="cpu"))
    if ok:
        check_launch(cfg)
    else:
        with pytest.raises(ConfigError, match=r"train.devices.*torchrun started 2.*train.devices=2"):
            check_launch(cfg)


def test_prepare_data_builds_train_and_val_datasets_first_only_under_ddp():
    class DM(CaseDataModule):
        def __init__(self):
            self.cases, self.built = {"train": [1], "val": [1], "test": [1]}, []

        def dataset(self, split):
            self.built.append(split)

    for world, expected in ((2, ["train", "val"]), (1, [])):
        dm = DM()
        BaseTask.prepare_data(SimpleNamespace(_trainer=SimpleNamespace(world_size=world, datamodule=dm)))
        assert dm.built == expected


def test_sync_batchnorm_reaches_lightning(cls_dataset, tmp_path):
    if "sync_batchnorm" not in TrainConfig.model_fields:
        pytest.skip("config.py has no train.sync_batchnorm yet")
    for flag in (True, False):
        cfg = validate(tiny_cls_config(cls_dataset.parent, tmp_path, train__sync_batchnorm=flag,
                                       train__accelerator="cpu", train__devices=1))
        trainer = build_trainer(cfg, tmp_path, tmp_path / "ck", 1)
        assert (trainer._accelerator_connector._layer_sync is not None) is flag  # TorchSyncBatchNorm when on
