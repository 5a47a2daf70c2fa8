"""text_seg model: variants forward/backward, frozen parts, parameter budget, caches, loss, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.losses import info_nce
from medfuse.models.text_seg import (
    FUSIONS,
    TextSegModel,
    multi_positive_info_nce,
    shared_text_encoder,
    text_seg,
)

S = 64


def _tiny(**kw) -> TextSegModel:
    torch.manual_seed(0)
    args = {"image_encoder": "tiny", "image_size": S, "tiny_dim": 32, "tiny_hidden": (8, 16), "token_dim": 16, **kw}
    return text_seg(**args)


def _batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, S, S)
    mask[:, :, 10:30, 12:34] = 1.0
    return {"image": torch.rand(b, 3, S, S, generator=g), "box": torch.tensor([[8.0, 6.0, 40.0, 36.0]] * b),
            "text": [f"{'small' if i % 2 else 'large'} hypoechoic mass" for i in range(b)], "mask": mask,
            "case_id": [f"c{i}" for i in range(b)]}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("frozen", [True, False])
def test_every_variant_trains_and_frozen_parts_get_no_gradient(fusion, frozen):
    model = _tiny(fusion=fusion, freeze_image_side=frozen)
    model.train()
    assert model.image_side.encoder.training is not frozen
    batch = _batch()
    out = model.forward_batch(batch)
    assert out["mask_logits"].shape == (4, 1, S, S) and out["logits"].shape == (4, 2, S, S)
    assert torch.allclose(out["logits"].softmax(1)[:, 1:], out["mask_logits"].sigmoid(), atol=1e-6)
    losses = model.loss(batch, out)
    assert set(losses) >= {"loss", "dice_loss", "bce", "contrastive", "temperature"}
    losses["loss"].backward()
    unused = {id(p) for p in model.image_side.decoder.unused_for_boxes()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
            assert frozen or id(p) in unused, name
    side = [p.requires_grad for p in model.image_side.parameters()]
    assert not any(side) if frozen else any(side)


def test_default_config_has_about_500k_trainable_parameters():
    """MedSAM image side (random weights, frozen) + MiniLM + hierarchical fusion: the seed's ~500K."""
    model = text_seg()
    counts = model.parameter_counts()
    assert 400_000 <= counts["trainable"] <= 600_000, counts
    assert counts["frozen"] > 90_000_000  # SAM ViT-B encoder + prompt encoder + mask decoder
    assert model.fusion.gates == pytest.approx([0.5, 0.8], abs=1e-7)
    assert model.image_side.embed_dim == 256 and model.image_side.input_size == 1024


def test_frozen_image_side_is_left_out_of_checkpoints_and_reloads():
    model = _tiny()
    model._state_excludes_image_side = True  # as with a frozen medsam image side loaded from image_weights
    sd = model.state_dict()
    assert sd and not any(k.startswith("image_side.") for k in sd)
    other = _tiny(fusion="hierarchical")
    other._state_excludes_image_side = True
    result = other.load_state_dict(sd, strict=True)
    assert not result.missing_keys
    assert torch.equal(other.fusion.levels[0].gate_logit, model.fusion.levels[0].gate_logit)
    model._state_excludes_image_side = False
    assert any(k.startswith("image_side.") for k in model.state_dict())


def test_text_encoder_runs_once_per_unique_string(monkeypatch):
    model = _tiny()
    enc = shared_text_encoder("minilm")
    seen: list[str] = []
    original = type(enc).forward

    def counting(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(type(enc), "forward", counting)
    texts = ["an unseen prompt alpha", "an unseen prompt beta", "an unseen prompt alpha"]
    a = model.text_features(texts)
    b = model.text_features(list(reversed(texts)))
    assert sorted(seen) == ["an unseen prompt alpha", "an unseen prompt beta"]
    assert a.shape == (3, enc.dim) and torch.equal(a[0], a[2]) and torch.equal(a[0], b[0])
    assert not model.text_features(["an unseen prompt beta"]).requires_grad


def test_multi_positive_info_nce_reduces_to_info_nce_and_treats_equal_texts_as_positives():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(10.0)
    assert torch.allclose(multi_positive_info_nce(a, b, list("abcde"), scale), info_nce(a, b, scale), atol=1e-6)
    # rows 0 and 1 share a text: swapping their text embeddings changes nothing
    groups = ["x", "x", "y", "z", "w"]
    swapped = b.clone()
    swapped[[0, 1]] = b[[1, 0]]
    assert torch.allclose(multi_positive_info_nce(a, b, groups, scale), multi_positive_info_nce(a, swapped, groups, scale))
    aligned = multi_positive_info_nce(b, b, list("abcde"), scale)
    assert aligned < multi_positive_info_nce(a, b, list("abcde"), scale)


def test_eval_loss_is_the_segmentation_part_and_temperature_is_clamped():
    model = _tiny()
    batch = _batch()
    model.train()
    train = model.loss(batch, model.forward_batch(batch))
    model.eval()
    with torch.no_grad():
        ev = model.loss(batch, model.forward_batch(batch))
    assert torch.allclose(ev["loss"], ev["dice_loss"] + ev["bce"], atol=1e-6)
    assert train["loss"] > train["dice_loss"] + train["bce"]
    with torch.no_grad():
        model.contrastive.log_scale.fill_(50.0)
    assert float(1 / model.contrastive.scale.detach()) == pytest.approx(0.01)


def test_wrong_image_size_is_a_config_error():
    from medfuse.errors import ConfigError

    model = _tiny()
    batch = _batch()
    batch["image"] = torch.rand(4, 3, 32, 32)
    with pytest.raises(ConfigError, match="image_size"):
        model.forward_batch(batch)
    with pytest.raises(ConfigError, match="unknown fusion"):
        _tiny(fusion="concat")
    with pytest.raises(ConfigError, match="frozen encoder"):
        _tiny(freeze_image_side=False, embedding_cache="/tmp/x")


def test_embedding_cache_returns_identical_embeddings_without_rerunning_the_encoder(tmp_path, monkeypatch):
    model = _tiny(embedding_cache=str(tmp_path / "cache"))
    model.eval()
    batch = _batch(2)
    with torch.no_grad():
        first = model.forward_batch(batch)["mask_logits"]
    assert model.extractor.stats == {"hits": 0, "misses": 2}
    assert not any(k.startswith("extractor.") for k in model.state_dict())
    monkeypatch.setattr(model.image_side.encoder, "forward", lambda x: (_ for _ in ()).throw(AssertionError("ran")))
    with torch.no_grad():
        again = model.forward_batch(batch)["mask_logits"]
    assert model.extractor.stats == {"hits": 2, "misses": 2}
    assert torch.equal(first, again)


def _two_blob_batch(n: int, seed: int, swap: bool = False) -> dict:
    """Two squares in one box, one bright and one dark; the text says which one is the target."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((n, 3, S, S), 0.5) + 0.05 * torch.randn(n, 3, S, S, generator=g)
    mask = torch.zeros(n, 1, S, S)
    texts = []
    for i in range(n):
        left_bright = bool(torch.rand(1, generator=g) < 0.5)
        want_bright = bool(torch.rand(1, generator=g) < 0.5)
        for x0, bright in ((12, left_bright), (36, not left_bright)):
            image[i, :, 22:38, x0: x0 + 16] = 0.95 if bright else 0.05
            if bright == want_bright:
                mask[i, 0, 22:38, x0: x0 + 16] = 1.0
        said = want_bright != swap
        texts.append("a bright hyperechoic lesion" if said else "a dark hypoechoic lesion")
    return {"image": image.clamp(0, 1), "box": torch.tensor([[8.0, 18.0, 56.0, 42.0]] * n), "text": texts,
            "mask": mask}


def _dice(model, batch) -> float:
    with torch.no_grad():
        pred = (model.forward_batch(batch)["mask_logits"] > 0).float()
    inter = (pred * batch["mask"]).sum((1, 2, 3))
    return float((2 * inter / (pred.sum((1, 2, 3)) + batch["mask"].sum((1, 2, 3)) + 1e-6)).mean())


def test_tiny_model_learns_to_follow_the_text():
    """The box holds two lesions: correct text must beat chance (0.5 overlap at best) and swapped text."""
    torch.manual_seed(0)
    model = _tiny(freeze_image_side=False, contrastive_weight=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(70):
        batch = _two_blob_batch(16, step)
        loss = model.loss(batch, model.forward_batch(batch))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = _dice(model, _two_blob_batch(32, 999))
    swapped = _dice(model, _two_blob_batch(32, 999, swap=True))
    assert correct > 0.75 and correct - swapped > 0.5, (correct, swapped)


@pytest.mark.slow
def test_train_evaluate_counterfactual_and_predict_end_to_end(tmp_path, monkeypatch):
    """The engine path: fit under the contrastive task, evaluate at original resolution, wrong text, predict."""
    import csv

    from PIL import Image

    from medfuse.config import load_config
    from medfuse.data.demo.text_seg import make_text_seg_demo
    from medfuse.engine.evaluate import evaluate, predict
    from medfuse.engine.trainer import fit
    from medfuse.registry import DEMO_ABLATIONS

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    data = tmp_path / "data"
    make_text_seg_demo(data, n_patients=14, seed=1, size=64)
    from medfuse.cli import demo_config_path

    cfg = load_config(demo_config_path("text_seg"), [
        f"data.root={data}", f"output_dir={tmp_path / 'runs'}", "name=e2e", "train.max_epochs=1",
        "data.batch_size=8", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "eval.n_boot=20",
        "data.split.val=0.25", "data.split.test=0.3"])
    run = fit(cfg)
    rep = evaluate(run, split="test", counterfactual=["text=shuffle", "margin=irregular"])
    dice = rep["metrics"]["dice"]
    assert rep["n"] == dice["n"] > 0 and dice["low"] <= dice["value"] <= dice["high"]
    assert rep["parameters"]["trainable"] > 0 and len(rep["gates"]) == 2
    cf = rep["counterfactual"]["text=shuffle"]
    assert cf["texts_changed"] > 0 and "dice drop (margin=irregular)" in rep["metrics"]
    assert (run / rep["overlays"]).is_file() and (run / "predictions" / "test" / "per_case.csv").is_file()
    assert [name for name, _ in DEMO_ABLATIONS["text_seg"]][0] == "hierarchical fusion"

    # inference: boxes and text from a CSV, masks at the original size
    rows = list(csv.DictReader((data / "manifest.csv").open()))[:3]
    infer = tmp_path / "infer.csv"
    with infer.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "image_us", "box", *[k for k in rows[0] if k in
                                                                          ("size", "echogenicity", "margin", "position")]])
        w.writeheader()
        for r in rows:
            w.writerow({k: (str(data / r[k]) if k == "image_us" else r[k]) for k in w.fieldnames})
    out = predict(run, [str(infer)], tmp_path / "pred")
    assert (out / "predictions.csv").is_file()
    mask = np.array(Image.open(out / f"{rows[0]['case_id']}_mask.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
