"""ct_encoder report generation and the rest of seed 001's evaluation: the generator (scratch GPT-2 +
word tokenizer, and an hf:<folder> causal LM saved with save_pretrained), greedy and beam decoding,
the CoT-anchored loss, the keyword labeler, lesion masks through the transforms, localization and
volume-to-volume retrieval by hand, train -> evaluate -> predict with every new metric, and the
contrastive half trained bit-for-bit as without a generator (gen_detach)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfuse.config import validate
from medfuse.errors import ConfigError
from medfuse.families.ct_encoder.demo import ABNORMALITIES, make_ct_encoder_demo, sample_case, write_reports
from medfuse.families.ct_encoder.evaluate import localization_scores, volume_to_volume_ranks
from medfuse.families.ct_encoder.generation import ReportGenerator, fit_word_tokenizer, target_text
from medfuse.families.ct_encoder.labeler import KeywordLabeler, build_labeler
from medfuse.families.ct_encoder.task import CTEncoderTask

SMALL = dict(num_regions=9, patch_size=(2, 8, 8), img_size=(8, 32, 32), fpn_levels=3, mask_hidden=4, embed_dim=16)
GEN = dict(gen_decoder="scratch", gen_width=32, gen_depth=1, gen_heads=2, gen_queries=4, gen_vocab_size=128,
           gen_max_length=96)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ctgen") / "data"
    make_ct_encoder_demo(root, n_patients=12, seed=0, shape=(8, 32, 32))
    return root


def _cfg(root: Path, out: Path, name: str, epochs: int = 1, **params) -> dict:
    return validate({
        "name": name, "output_dir": str(out),
        "data": {"root": str(root), "batch_size": 4, "split": {"val": 0.2, "test": 0.3},
                 "transforms": {"spatial_size": [8, 32, 32],
                                "intensity": {"ct": {"kind": "ct_window", "level": -300, "width": 1400}},
                                "augment": {"flip_prob": 0.5, "flip_axes": [0, 1]}},
                 "params": {"hu": "metadata"}},
        "model": {"name": "ct_encoder", "params": {**SMALL, **params}},
        "train": {"max_epochs": epochs, "monitor": "val/mean_recall", "mode": "max", "progress_bar": False},
        "eval": {"n_boot": 20},
    })


def test_target_text():
    steps = [["Right upper lobe - a nodule.", [1]], ["Lungs - otherwise clear.", [1, 2]]]
    assert target_text("A: x.", "Imp.", steps) == "A: x. Impression: Imp."
    assert target_text("A: x.", "A: x.", steps) == "A: x."  # a dataset without impressions
    assert target_text("A: x.", "Imp.", steps, "findings") == "A: x."
    assert target_text("", "Imp.", steps, "findings") == "Imp."
    assert target_text("A: x.", "Imp.", steps, "cot") == "Right upper lobe - a nodule. Lungs - otherwise clear."


def test_word_tokenizer_is_lossless_and_travels_in_the_state_dict():
    texts = ["Right upper lobe: a 21 mm solid, well-circumscribed nodule. Impression: 21 mm nodule.",
             "Heart: normal size."]
    tok = fit_word_tokenizer(texts, 64)
    assert tok.decode(tok.encode(texts[0]).ids) == texts[0]
    gen = ReportGenerator(8, "scratch", queries=2, width=16, depth=1, heads=2, vocab_size=64, max_length=32)
    assert not gen.fitted
    gen.fit_tokenizer(texts)
    ids = gen.tokenizer(texts, add_special_tokens=False)["input_ids"]
    other = ReportGenerator(8, "scratch", queries=2, width=16, depth=1, heads=2, vocab_size=64, max_length=32)
    other.load_state_dict(gen.state_dict())  # tensors only: the vocabulary is a uint8 table
    assert other.fitted and other.tokenizer(texts, add_special_tokens=False)["input_ids"] == ids
    assert other.tokenizer.decode(ids[1]) == texts[1]
    assert other.tokenizer("Lung: xyz.", add_special_tokens=False)["input_ids"][2] == other.tokenizer.unk_token_id


def _learn_two_reports(gen: ReportGenerator, steps: int = 150) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 6, 8, generator=g)
    texts = ["Right upper lobe: a 21 mm solid nodule.", "Heart: enlarged. Small left pleural effusion."]
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    gen.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = gen.loss(tokens, texts)
        loss.backward()
        opt.step()
    gen.eval()
    return tokens, texts


def test_scratch_generator_learns_and_decodes_greedy_and_beam():
    torch.manual_seed(0)
    gen = ReportGenerator(8, "scratch", queries=2, width=32, depth=1, heads=2, dropout=0.0, vocab_size=64,
                          max_length=24)
    gen.fit_tokenizer(["Right upper lobe: a 21 mm solid nodule.", "Heart: enlarged. Small left pleural effusion."])
    before = gen.loss(torch.zeros(2, 6, 8), ["Heart: enlarged.", "Heart: enlarged."]).item()
    tokens, texts = _learn_two_reports(gen)
    assert gen.loss(tokens, texts).item() < 0.05 < before
    assert gen.generate(tokens) == texts  # greedy: the report of each volume, not the other's
    assert gen.generate(tokens, num_beams=3) == texts


def _tiny_gpt2_folder(path: Path, texts: list[str]) -> Path:
    """A random tiny GPT-2 and a word tokenizer, saved with save_pretrained (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=fit_word_tokenizer(texts, 256), bos_token="[BOS]",
                                  eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=160, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(path)
    return path


def test_hf_causal_lm_from_a_local_folder_end_to_end(phantom, tmp_path):
    """hf:<folder> GPT-2: the decoder learns two reports, then train -> evaluate -> predict through the engine."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    rows = list(csv.DictReader((phantom / "reports.csv").open(encoding="utf-8")))
    texts = [target_text(r["Findings_EN"], r["Impressions_EN"], []) for r in rows]
    folder = _tiny_gpt2_folder(tmp_path / "gpt2", [*texts, "Right upper lobe: a 21 mm solid nodule.",
                                                   "Heart: enlarged. Small left pleural effusion."])
    gen = ReportGenerator(8, f"hf:{folder}", queries=2, heads=2, max_length=24)
    assert gen.fitted and gen.lm.config.model_type == "gpt2"
    tokens, two = _learn_two_reports(gen, steps=150)
    assert gen.generate(tokens) == two and gen.generate(tokens, num_beams=2) == two

    run = fit(_cfg(phantom, tmp_path / "runs", "hf", gen_decoder=f"hf:{folder}", gen_queries=4, gen_max_length=96))
    rep = evaluate(run, split="test")
    for key in ("generation/bleu4", "generation/rouge_l", "generation/meteor", "generation/ce_f1"):
        assert key in rep["metrics"] and rep["metrics"][key]["n"] == rep["n"]
    out = predict(run, [str(phantom)], tmp_path / "pred")
    reports = list(csv.DictReader((out / "reports.csv").open(encoding="utf-8")))
    assert len(reports) == 12 and (out / f"{reports[0]['case_id']}.txt").read_text(encoding="utf-8").strip() == reports[0]["report"]
    with pytest.raises(ConfigError, match="gen_decoder"):
        ReportGenerator(8, f"hf:{tmp_path / 'missing'}")


def test_train_evaluate_predict_reports_every_seed_metric(phantom, tmp_path):
    """Scratch generator + anchor loss: evaluate reports generation, nearest-neighbour copy, CE,
    localization, step-patch correlation, linear probe, volume-to-volume and R@k with the configured ks."""
    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict
    from medfuse.engine.trainer import fit

    run = fit(_cfg(phantom, tmp_path / "runs", "all", epochs=2, retrieval_ks=[1, 2, 100],
                   loss_weights={"gen": 1.0, "anchor": 0.5}, **GEN))
    logged = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "train/gen" in logged and "train/anchor" in logged
    rep = evaluate(run, split="test")
    m = rep["metrics"]
    for key in ("image_to_text/R@1", "image_to_text/R@2", "generation/bleu1", "generation/bleu4", "generation/rouge_l",
                "generation/meteor", "generation/ce_f1", "nn_copy/bleu4", "nn_copy/rouge_l", "nn_copy/meteor",
                "nn_copy/ce_f1", "localization_iou", "localization_pointing", "step_patch_corr", "probe/mean_accuracy",
                "probe/mean_auroc"):
        v = m[key]
        assert v["n"] >= 1 and (v["low"] <= v["value"] <= v["high"] or v["n_boot"] == 0), key
    assert "image_to_text/R@100" not in m and "image_to_text/R@5" not in m  # ks are the configured ones, <= n
    assert 0 <= m["localization_iou"]["value"] <= 1 and -1 <= m["step_patch_corr"]["value"] <= 1
    assert "ce_f1" in json.dumps(rep["per_class"]) and "probe_auroc" in json.dumps(rep["per_class"])
    saved = list(csv.DictReader((run / "predictions" / "test_reports.csv").open(encoding="utf-8")))
    assert len(saved) == rep["n"] and {"reference", "generation", "nn_copy"} <= set(saved[0])
    # the nearest-neighbour baseline copies training reports verbatim
    train_refs = {target_text(c.extra["findings"], c.text, []) for c in _train_cases(run)}
    assert all(r["nn_copy"] in train_refs for r in saved)
    out = predict(run, [str(phantom)], tmp_path / "pred")
    assert len(list(out.glob("*.txt"))) == 12 and len(list(out.glob("*.safetensors"))) == 12


def _train_cases(run: Path):
    from medfuse.engine.evaluate import load_trained

    return load_trained(run)[1].cases["train"]


def test_gen_detach_trains_the_contrastive_half_exactly_as_without_generator(phantom, tmp_path):
    """Same seed, one epoch: with a detached generator every non-generator weight equals the run
    without one (same random draws, gradient norms clipped per part); without detach they differ."""
    from medfuse.engine.checkpoint import read_checkpoint
    from medfuse.engine.trainer import fit

    def weights(run: Path) -> dict[str, torch.Tensor]:
        sd = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
        return {k: v for k, v in sd.items() if not k.startswith("model.generator.")}

    base = weights(fit(_cfg(phantom, tmp_path / "runs", "base")))
    detached = weights(fit(_cfg(phantom, tmp_path / "runs", "det", gen_detach=True, gen_lr=0.003, **GEN)))
    joint = weights(fit(_cfg(phantom, tmp_path / "runs", "joint", **GEN)))
    assert base.keys() == detached.keys() == joint.keys()
    assert all(torch.equal(base[k], detached[k]) for k in base)
    assert not all(torch.equal(base[k], joint[k]) for k in base if k.startswith("model.vision."))


def _task(**params) -> CTEncoderTask:
    return CTEncoderTask({"model": {"name": "ct_encoder", "params": {**SMALL, "num_regions": 4, **params}}})


def _batch():
    from test_ct_encoder_model import _batch as base

    b = base()
    b["findings"] = [f"Right upper lobe: a {10 + i} mm nodule." for i in range(3)]
    b["step_lesions"] = [[1, 0, 0] for _ in range(3)]
    return b


def test_anchor_loss_is_off_by_default_and_pulls_attention_into_the_region():
    task = _task()
    batch = _batch()
    out = task.forward_batch(batch)
    assert "anchor" not in task.compute_loss(batch, out) and task.model.generator is None
    task = _task(loss_weights={"global": 0.0, "region": 0.0, "step": 0.0, "anchor": 1.0})
    sa = task.step_attention(batch, task.forward_batch(batch))
    assert torch.allclose(sa["attn"].sum(-1), torch.ones(len(sa["case"])))
    # "Global impression." names no region: left out; the others name regions 1 and {1, 2}
    assert len(sa["case"]) == 6 and bool(sa["has_region"].all()) and sa["lesion"].tolist() == [1, 0] * 3
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = task.compute_loss(batch, task.forward_batch(batch))
        loss["loss"].backward()
        opt.step()
        losses.append(float(loss["anchor"]))
    assert losses[-1] < 0.7 * losses[0]


def test_every_param_gets_grad_with_generator_and_anchor():
    from test_ct_encoder_model import _no_grad

    task = _task(loss_weights={"anchor": 1.0}, gen_inputs="patch+region", **{**GEN, "gen_vocab_size": 32})
    batch = _batch()
    task.model.generator.fit_tokenizer(task.gen_targets(batch))
    losses = task.compute_loss(batch, task.forward_batch(batch))
    assert {"gen", "anchor", "global", "region", "step"} <= set(losses)
    losses["loss"].backward()
    assert _no_grad(task.model) == []


def test_generator_stage_on_a_frozen_encoder_keeps_frozen_batchnorm_statistics():
    stage = {"name": "gen", "trainable": ["generator.*"], "losses": {"gen": 1.0, "global": 0.0, "region": 0.0,
                                                                       "step": 0.0}}
    task = CTEncoderTask({"model": {"name": "ct_encoder", "params": {**SMALL, "num_regions": 4, **GEN,
                                                                     "gen_vocab_size": 32}},
                          "train": {"stages": [stage]}}, stage=stage)
    batch = _batch()
    task.model.generator.fit_tokenizer(task.gen_targets(batch))
    task.train()
    task.on_train_epoch_start()
    head_bn = task.model.global_proj[1]
    before = head_bn.running_mean.clone()
    losses = task.compute_loss(batch, task.forward_batch(batch))
    losses["loss"].backward()
    assert not head_bn.training and torch.equal(head_bn.running_mean, before)  # frozen head: statistics kept
    assert task.model.generator.resampler.standardize.training  # the generator's own BatchNorm learns
    assert all(p.grad is None for n, p in task.model.named_parameters() if not n.startswith("generator."))
    assert task.model.generator.lm.transformer.wte.weight.grad is not None


def test_gen_lr_is_a_second_group_on_the_same_schedule():
    task = _task(gen_lr=0.004, **{**GEN, "gen_vocab_size": 32})
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    gen_ids = {id(p) for p in task.model.generator.parameters()}
    assert [len(g["params"]) for g in opt.param_groups] == [
        sum(1 for p in task.parameters() if p.requires_grad and id(p) not in gen_ids), len(gen_ids)]
    assert all(id(p) in gen_ids for p in opt.param_groups[1]["params"])
    ratio = opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"]
    for _ in range(3):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(ratio)
    assert ratio == pytest.approx(0.004 / task.cfg.train.lr)


def test_gen_weight_without_decoder_and_bad_decoders_are_config_errors():
    with pytest.raises(ConfigError, match="gen_decoder"):
        _task(loss_weights={"gen": 1.0})
    with pytest.raises(ConfigError, match="model.params.gen_decoder"):
        _task(gen_decoder="gpt5")


def test_localization_and_volume_to_volume_by_hand():
    attn = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
    occ = torch.tensor([False, True, False, True, False])
    iou, hit = localization_scores(attn, occ)  # predicted {1, 2} vs lesion {1, 3}: 1 / 3
    assert iou == pytest.approx(1 / 3) and hit == 1.0
    assert localization_scores(attn, torch.tensor([True, False, False, False, False]))[1] == 0.0
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]), dim=-1)
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1]])
    # 0 <-> 2 and 1 <-> 3 share findings; volume 4 has a unique set and is left out
    ranks = volume_to_volume_ranks(img, y)
    # query 0's positive 2 (cos 0) trails 1, 3 and 4 -> rank 3; query 1's positive 3 (cos 0.22) trails 0 and 4
    assert ranks.tolist() == [3, 2, 3, 2]


def test_keyword_labeler_reads_the_phantoms_labels_back():
    lab = build_labeler("keyword")
    assert isinstance(lab, KeywordLabeler)
    names = ABNORMALITIES
    positives = 0
    for i in range(40):
        rep = write_reports(sample_case(np.random.default_rng([5, i]), (16, 32, 32)))
        texts = [rep["findings"], rep["impression"], target_text(rep["findings"], rep["impression"], [])]
        assert lab(texts, names).tolist() == [rep["labels"]] * 3, texts[0]
        positives += sum(rep["labels"])
    assert positives >= 40
    assert lab(["No pleural effusion.", "Pleural effusion was not detected.", "Small pleural effusion."],
               ["Pleural effusion"])[:, 0].tolist() == [0, 0, 1]
    assert np.isnan(lab(["x"], ["Something else"])[0, 0]) and lab.covers(["Emphysema", "x"]) == [True, False]
    assert build_labeler("numpy:zeros") is np.zeros  # any importable classifier
    with pytest.raises(ConfigError, match="labeler"):
        build_labeler("nope")


def test_lesion_masks_ride_with_the_image_through_flips(phantom, tmp_path):
    from medfuse.families.ct_encoder.data import CTEncoderDataModule

    cfg = _cfg(phantom, tmp_path / "runs", "les")
    dm = CTEncoderDataModule(cfg, None)
    assert dm.has_lesions
    ds = dm.dataset("train")  # with random flips along z and y
    seen = 0
    for i in range(len(ds)):
        item = ds[(i, 1000 + i)]
        les, img = item["lesion"][0], item["image"][0]
        assert item["lesion"].shape == item["mask"].shape == (1, 8, 32, 32)
        for k in item["step_lesions"]:
            if k:
                inside = img[les == k]
                # lesion voxels are nodule/lesion soft tissue (windowed >= ~0.4), not lung (~0.1)
                assert inside.numel() and float(inside.mean()) > 0.35
                seen += 1
    assert seen >= 5
