"""text_seg model and task: variants forward/backward, frozen parts, parameter budget, caches, loss,
learning, params errors, and the engine path (train, evaluate once, counterfactual, predict)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfuse.config import validate_params
from medfuse.errors import ConfigError
from medfuse.families.text_seg.model import FUSIONS, TextSegModel, shared_text_encoder
from medfuse.families.text_seg.params import TextSegParams, build_text_seg
from medfuse.families.text_seg.task import TextSegTask, multi_positive_info_nce
from medfuse.losses import info_nce

S = 64
TINY = {"image_encoder": "tiny", "image_size": S, "tiny_dim": 32, "tiny_hidden": (8, 16), "token_dim": 16}


def text_seg(**kw) -> TextSegModel:
    """Build through the family's params model, as the engine does (bad keys -> ConfigError)."""
    return build_text_seg(validate_params(TextSegParams, kw, "model.params"))


def _tiny(**kw) -> TextSegModel:
    torch.manual_seed(0)
    return text_seg(**{**TINY, **kw})


def _task(**kw) -> TextSegTask:
    """The family's task around a tiny model (the same random draws as :func:`_tiny`)."""
    torch.manual_seed(0)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in {**TINY, **kw}.items()}
    return TextSegTask({"name": "t", "model": {"name": "text_seg", "params": params}})


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
    task = _task(fusion=fusion, freeze_image_side=frozen)
    model = task.model
    task.train()
    assert model.image_side.encoder.training is not frozen
    batch = _batch()
    out = task.forward_batch(batch)
    assert set(out) == {"mask_logits", "image_emb", "text_emb"}  # the real mask logits, no 2-class stand-in
    assert out["mask_logits"].shape == (4, 1, S, S)
    assert out["image_emb"].shape == out["text_emb"].shape == (4, model.fusion.embed_dim)
    losses = task.compute_loss(batch, out)
    assert set(losses) >= {"loss", "dice_loss", "bce", "contrastive", "temperature"}
    # bypass has no adapter: its (shape-compatible) contrastive head is frozen, and with a frozen
    # image side nothing trains at all (MedSAM as it is is evaluated, never trained)
    no_adapter = ({id(p) for p in [*model.image_proj.parameters(), *model.contrastive.parameters()]}
                  if fusion == "bypass" else set())
    if not any(p.requires_grad for p in model.parameters()):
        assert fusion == "bypass" and frozen
        return
    losses["loss"].backward()
    unused = {id(p) for p in model.image_side.decoder.unused_for_boxes()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
            assert frozen or id(p) in unused or id(p) in no_adapter, name
    side = [p.requires_grad for p in model.image_side.parameters()]
    assert not any(side) if frozen else any(side)


def test_default_config_has_about_500k_trainable_parameters():
    """MedSAM image side (random weights, frozen) + MiniLM + hierarchical fusion: the seed's ~500K."""
    model = text_seg()
    counts = model.parameter_counts()
    assert 400_000 <= counts["trainable"] <= 600_000, counts
    assert counts["frozen"] > 90_000_000  # SAM ViT-B encoder + prompt encoder + mask decoder
    assert model.fusion.gates == pytest.approx([0.5, 0.8], abs=1e-7)
    assert model.level_gates() == pytest.approx([0.5, 0.8], abs=1e-7)
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
    task = _task()
    model = task.model
    batch = _batch()
    task.train()
    train = task.compute_loss(batch, task.forward_batch(batch))
    task.eval()
    with torch.no_grad():
        ev = task.compute_loss(batch, task.forward_batch(batch))
    assert torch.allclose(ev["loss"], ev["dice_loss"] + ev["bce"], atol=1e-6)
    assert train["loss"] > train["dice_loss"] + train["bce"]
    w = {"dice": 1.0, "bce": 1.0, "contrastive": 2.0}  # the seed's weights, the defaults
    assert task.loss_weights() == w
    assert torch.allclose(train["loss"], train["dice_loss"] + train["bce"] + 2.0 * train["contrastive"], atol=1e-5)
    with torch.no_grad():
        model.contrastive.log_scale.fill_(50.0)
    assert float(1 / model.contrastive.scale.detach()) == pytest.approx(0.01)
    assert model.temperature == pytest.approx(0.01)


def test_stage_losses_override_the_weights():
    from medfuse.config import StageConfig

    task = _task(contrastive_weight=0.5)
    assert task.loss_weights() == {"dice": 1.0, "bce": 1.0, "contrastive": 0.5}
    task.stage_cfg = StageConfig(name="s", losses={"contrastive": 0.0, "bce": 3.0})
    assert task.loss_weights() == {"dice": 1.0, "bce": 3.0, "contrastive": 0.0}
    task.train()
    batch = _batch()
    losses = task.compute_loss(batch, task.forward_batch(batch))
    assert torch.allclose(losses["loss"], losses["dice_loss"] + 3.0 * losses["bce"], atol=1e-6)


def test_validation_dice_scores_the_real_masks():
    from medfuse.families.text_seg.task import binary_dice

    mask = _batch(2)["mask"]
    logits = torch.where(mask > 0.5, 5.0, -5.0)
    assert binary_dice(logits, mask).tolist() == [1.0, 1.0]
    assert binary_dice(-logits, mask).tolist() == [0.0, 0.0]
    empty = torch.zeros_like(mask)
    assert binary_dice(torch.full_like(mask, -1.0), empty).tolist() == [1.0, 1.0]  # nothing to find, nothing found
    half = logits.clone()
    half[:, :, 10:20] = -5.0  # half of the 20 target rows
    assert binary_dice(half, mask) == pytest.approx([2 * 10 / (10 + 20)] * 2)
    task = _task()
    task.eval()
    batch = _batch(2)
    with torch.no_grad():
        kept = task.collect(batch, task.forward_batch(batch))
    assert kept["dice"].shape == (2,)
    assert task.epoch_metrics({"dice": np.array([0.5, 1.0])}) == {"dice": 0.75}


def test_inference_returns_decoder_resolution_logits_and_the_gated_gate():
    task = _task(fusion="gated")
    task.eval()
    batch = _batch(2)
    with torch.no_grad():
        out = task.infer(batch)
    assert out["mask_logits"].shape == (2, 1, S // 2, S // 2)  # 4h x 4w of the tiny pair (stride 8)
    assert out["gate"].shape == (2,) and torch.allclose(out["gate"], torch.full((2,), 0.8), atol=1e-5)
    assert task.model.level_gates() is None
    hier = _task()
    with torch.no_grad():
        assert set(hier.infer(batch)) == {"mask_logits"}


def test_wrong_image_size_is_a_config_error():
    task = _task()
    batch = _batch()
    batch["image"] = torch.rand(4, 3, 32, 32)
    with pytest.raises(ConfigError, match="image_size"):
        task.forward_batch(batch)
    with pytest.raises(ConfigError, match="model.params.fusion"):
        _tiny(fusion="concat")
    with pytest.raises(ConfigError, match="unknown fusion"):
        TextSegModel(**{**TINY, "fusion": "concat"})  # built directly, without the params model
    with pytest.raises(ConfigError, match="frozen encoder"):
        _tiny(freeze_image_side=False, embedding_cache="/tmp/x")


@pytest.mark.parametrize("key, value, msg", [("no_such_key", 1, "unknown key"), ("token_dim", "wide", "token_dim"),
                                             ("tiny_hidden", [8], "tiny_hidden"),
                                             ("contrastive_pool", "max", "contrastive_pool"),
                                             ("coarse_gate", 1.5, "coarse_gate")])
def test_params_errors_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=f"model.params.{key}") as e:
        text_seg(**{**TINY, key: value})
    assert "\n" not in e.value.one_line() and msg in e.value.one_line()


def test_every_registered_model_builds_from_its_defaults_and_trains_every_parameter():
    """The family's registry record: each model builds (tiny image side) and all trainable params get gradients."""
    from medfuse.engine.predict import Predictor
    from medfuse.families.text_seg import FAMILY
    from medfuse.families.text_seg.demo import make_text_seg_demo
    from medfuse.families.text_seg.evaluate import TextSegEvaluator
    from medfuse.families.text_seg.params import TextSegDataParams
    from medfuse.families.text_seg.predict import TextSegPredictor
    from medfuse.registry import FAMILIES

    assert FAMILIES.get("text_seg") is FAMILY
    assert FAMILY.data_params is TextSegDataParams and FAMILY.make_demo is make_text_seg_demo
    assert [name for name, _ in FAMILY.demo_ablations][0] == "hierarchical fusion"
    for entry in FAMILY.models:
        assert entry.task.kind == "segmentation"
        assert issubclass(entry.evaluator, TextSegEvaluator) and issubclass(entry.predictor, Predictor)
        assert entry.predictor is TextSegPredictor
        assert entry.params().model_dump()["image_encoder"] == "medsam"  # defaults validate
        torch.manual_seed(0)
        task = entry.task({"name": "t", "model": {"name": entry.name, "params": {"image_encoder": "tiny",
                                                                                  "image_size": S}}})
        task.train()
        batch = _batch()
        task.compute_loss(batch, task.forward_batch(batch))["loss"].backward()
        for name, p in task.model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_embedding_cache_returns_identical_embeddings_without_rerunning_the_encoder(tmp_path, monkeypatch):
    model = _tiny(embedding_cache=str(tmp_path / "cache"))
    model.eval()
    batch = _batch(2)
    with torch.no_grad():
        first = model(batch["image"], batch["box"], batch["text"])["mask_logits"]
    assert model.extractor.stats == {"hits": 0, "misses": 2}
    assert not any(k.startswith("extractor.") for k in model.state_dict())
    monkeypatch.setattr(model.image_side.encoder, "forward", lambda x: (_ for _ in ()).throw(AssertionError("ran")))
    with torch.no_grad():
        again = model(batch["image"], batch["box"], batch["text"])["mask_logits"]
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


def _dice(task, batch) -> float:
    with torch.no_grad():
        pred = (task.forward_batch(batch)["mask_logits"] > 0).float()
    inter = (pred * batch["mask"]).sum((1, 2, 3))
    return float((2 * inter / (pred.sum((1, 2, 3)) + batch["mask"].sum((1, 2, 3)) + 1e-6)).mean())


def test_tiny_model_learns_to_follow_the_text():
    """The box holds two lesions: correct text must beat chance (0.5 overlap at best) and swapped text."""
    task = _task(freeze_image_side=False, contrastive_weight=0.5)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    task.train()
    for step in range(70):
        batch = _two_blob_batch(16, step)
        loss = task.compute_loss(batch, task.forward_batch(batch))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    task.eval()
    correct = _dice(task, _two_blob_batch(32, 999))
    swapped = _dice(task, _two_blob_batch(32, 999, swap=True))
    assert correct > 0.75 and correct - swapped > 0.5, (correct, swapped)


def _tiny_run_config(data, runs, name: str):
    from medfuse.config import load_config
    from medfuse.families.text_seg import FAMILY

    return load_config(FAMILY.demo_config, [
        f"data.root={data}", f"output_dir={runs}", f"name={name}", "train.max_epochs=1",
        "data.batch_size=8", "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
        "model.params.tiny_dim=32", "model.params.token_dim=16", "eval.n_boot=20",
        "data.split.val=0.25", "data.split.test=0.3", "train.accelerator=cpu"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run of the demo config (1 epoch), trained once for the engine-path tests."""
    import os

    from medfuse.engine.trainer import fit
    from medfuse.families.text_seg.demo import make_text_seg_demo

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = tmp_path_factory.mktemp("text_seg_run")
    data = root / "data"
    make_text_seg_demo(data, n_patients=14, seed=1, size=64)
    cfg = _tiny_run_config(data, root / "runs", "e2e")
    return fit(cfg), data


def test_demo_config_selects_on_validation_dice(trained_run):
    import csv

    from medfuse.engine.build import resolve
    from medfuse.engine.trainer import load_run

    run, _ = trained_run
    cfg = resolve(load_run(run))
    assert (cfg.task, cfg.train.monitor, cfg.train.mode) == ("segmentation", "val/dice", "max")
    rows = list(csv.DictReader((run / "metrics.csv").open(encoding="utf-8")))
    dice = [float(r["val/dice"]) for r in rows if r.get("val/dice") not in (None, "")]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
    assert any(r.get("train/contrastive") not in (None, "") for r in rows)


def test_text_seg_evaluate_once(trained_run, tmp_path, monkeypatch):
    """evaluate() infers the test split once; each counterfactual text adds exactly one pass of its own."""
    import shutil

    import medfuse.engine.evaluate as ev
    from medfuse.families.text_seg.model import TextSegModel

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    calls: list[int] = []
    seen: dict = {}
    original_forward, original_load = TextSegModel.forward_intermediates, ev.load_trained

    def counting(self, image, *args, **kwargs):
        calls.append(int(image.shape[0]))
        return original_forward(self, image, *args, **kwargs)

    def load(*args, **kwargs):
        cfg, dm, task = original_load(*args, **kwargs)
        seen["dm"] = dm
        return cfg, dm, task

    monkeypatch.setattr(TextSegModel, "forward_intermediates", counting)
    monkeypatch.setattr(ev, "load_trained", load)
    rep = ev.evaluate(run, split="test")
    n_batches = len(seen["dm"].loader("test"))
    n_cases = len(seen["dm"].records["test"])
    assert len(calls) == n_batches and sum(calls) == n_cases == rep["n"]
    calls.clear()
    rep = ev.evaluate(run, split="test", counterfactual=["text=shuffle", "margin=irregular"])
    assert len(calls) == 3 * n_batches and sum(calls) == 3 * n_cases
    assert "dice drop (text=shuffle)" in rep["metrics"] and "dice drop (margin=irregular)" in rep["metrics"]


def test_counterfactual_needs_the_base_pass(trained_run, tmp_path):
    import shutil

    from medfuse.engine.evaluate import load_trained
    from medfuse.families.text_seg.evaluate import TextSegEvaluator

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    cfg, dm, task = load_trained(run)
    evaluator = TextSegEvaluator(task, dm, cfg, run, "test", 10)
    with pytest.raises(RuntimeError, match="run"):
        evaluator.counterfactual(["text=shuffle"])
    rep = evaluator.run()
    assert rep["n"] == len(evaluator.base.case_id) and evaluator.base_metrics is not None
    cf = evaluator.counterfactual(["text=shuffle"])
    assert cf["counterfactual"]["text=shuffle"]["n"] == rep["n"]


@pytest.mark.slow
def test_train_evaluate_counterfactual_and_predict_end_to_end(trained_run, tmp_path):
    """The engine path: fit under the segmentation task, evaluate at original resolution, wrong text, predict."""
    import csv
    import shutil

    from PIL import Image

    from medfuse.engine.evaluate import evaluate
    from medfuse.engine.predict import predict

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    data = trained_run[1]
    rep = evaluate(run, split="test", counterfactual=["text=shuffle", "margin=irregular"])
    dice = rep["metrics"]["dice"]
    assert rep["task"] == "segmentation"
    # n counts images; the CI's n counts patients when a patient has several images (n_items: images)
    assert rep["n"] == dice.get("n_items", dice["n"]) >= dice["n"] > 0 and dice["low"] <= dice["value"] <= dice["high"]
    assert rep["parameters"]["trainable"] > 0 and len(rep["gates"]) == 2
    cf = rep["counterfactual"]["text=shuffle"]
    assert cf["texts_changed"] > 0 and "dice drop (margin=irregular)" in rep["metrics"]
    assert (run / rep["overlays"]).is_file() and (run / "predictions" / "test" / "per_case.csv").is_file()

    # inference: boxes and text from a CSV, masks at the original size
    rows = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))[:3]
    infer = tmp_path / "infer.csv"
    with infer.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "image_us", "box", *[k for k in rows[0] if k in
                                                                          ("size", "echogenicity", "margin", "position")]])
        w.writeheader()
        for r in rows:
            w.writerow({k: (str(data / r[k]) if k == "image_us" else r[k]) for k in w.fieldnames})
    out = predict(run, [str(infer)], tmp_path / "pred")
    assert (out / "predictions.csv").is_file()
    assert len(list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))) == 3
    mask = np.array(Image.open(out / f"{rows[0]['case_id']}.png"))  # named by case id, as evaluate names it
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}


def test_predict_refuses_manifests_it_cannot_honour(trained_run, tmp_path):
    """A box off the image, a NaN box, an empty manifest and another image column: one line each
    (they used to predict on a clamped box, say 'x1 < x0', write an empty predictions.csv, or use
    the other column silently)."""
    import csv

    from medfuse.engine.predict import predict
    from medfuse.errors import DataError

    run, data = trained_run
    row = next(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))
    fields = [k for k in row if k in ("size", "echogenicity", "margin", "position")]

    def manifest(name, rows, column="image_us"):
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id", column, "box", *fields])
            w.writeheader()
            for box in rows:
                w.writerow({"case_id": row["case_id"], column: str(data / row["image_us"]), "box": box,
                            **{k: row[k] for k in fields}})
        return str(path)

    cases = {"off": (manifest("off", ["-50 -50 -10 -10"]), "lies outside its"),
             "nan": (manifest("nan", ["nan 1 5 5"]), "not 4 finite numbers"),
             "empty": (manifest("empty", []), "lists no case"),
             "column": (manifest("column", [row["box"]], column="image_xx"), "has no image_us column")}
    for name, (path, message) in cases.items():
        with pytest.raises(DataError, match=message):
            predict(run, [path], tmp_path / f"out_{name}")


def test_restrict_to_box_keeps_the_grown_box_and_nothing_else():
    import torch

    from medfuse.families.text_seg.model import BACKGROUND_LOGIT, restrict_to_box

    logits = torch.full((2, 1, 32, 32), 3.0)  # over a 64 x 64 input: cells of 2 px, centres 0.5, 2.5, ...
    boxes = torch.tensor([[10.0, 20.0, 29.0, 39.0], [0.0, 0.0, 63.0, 63.0]])
    out = restrict_to_box(logits, boxes, 64, 0.1)
    keep = out[0, 0] > 0
    ys, xs = torch.nonzero(keep, as_tuple=True)
    centres = lambda i: 2 * i + 0.5  # noqa: E731
    # grown by 0.1 x 19 px + one 2 px cell on each side: x in [6.1, 32.9], y in [16.1, 42.9]
    assert centres(xs.min()) >= 6.1 and centres(xs.max()) <= 32.9 and centres(xs.min() - 1) < 6.1
    assert centres(ys.min()) >= 16.1 and centres(ys.max()) <= 42.9 and centres(ys.max() + 1) > 42.9
    assert (out[0, 0][~keep] == BACKGROUND_LOGIT).all() and (out[0, 0][keep] == 3.0).all()
    assert (out[1] == 3.0).all()  # a box over the whole image keeps everything
    tight = restrict_to_box(logits, boxes, 64, 0.0)[0, 0] > 0
    assert tight.sum() < keep.sum() and (keep | ~tight).all()
