"""text_seg: several-field and always-wrong counterfactual text, MedSAM as it is (no adapter), and the
demo's evaluation-only rows (weights of another variant, wrong test text)."""

from __future__ import annotations

import pytest
import torch

from medfuse.config import validate_params
from medfuse.errors import ConfigError
from medfuse.families.text_seg.data import Record
from medfuse.families.text_seg.evaluate import counterfactual_texts, parse_counterfactual
from medfuse.families.text_seg.params import TextSegDataParams, TextSegParams, build_text_seg

TEMPLATE = "{size} {shade} mass, {margin} margins"
S = 64
TINY = {"image_encoder": "tiny", "image_size": S, "tiny_dim": 32, "tiny_hidden": (8, 16), "token_dim": 16}


def _records(n: int = 12) -> list[Record]:
    return [Record(f"c{i}", "x.png", "m.png", {"size": ["small", "large"][i % 2], "shade": ["dark", "bright", "grey"][i % 3],
                                               "margin": "smooth", "text": f"free {i}"}) for i in range(n)]


def _texts(recs):
    return [TEMPLATE.format(**r.fields) for r in recs]


def test_parse_several_fields_and_refusals():
    assert parse_counterfactual("birads=wrong, margin=shuffle") == [("birads", "wrong"), ("margin", "shuffle")]
    assert parse_counterfactual("margin=spiculated") == [("margin", "spiculated")]
    for bad, msg in [("oops", "FIELD="), ("a=shuffle,a=wrong", "twice"), ("text=shuffle,margin=wrong", "whole text"),
                     ("margin=", "FIELD=")]:
        with pytest.raises(ConfigError, match=f"--counterfactual: .*{msg}") as e:
            parse_counterfactual(bad)
        assert "\n" not in e.value.one_line()
    with pytest.raises(ConfigError, match="data.params.test_counterfactual"):
        validate_params(TextSegDataParams, {"test_counterfactual": "a=1,a=2"}, "data.params")


def test_wrong_always_changes_every_record_and_counts_per_field():
    recs = _records()
    cf = counterfactual_texts(recs, TEMPLATE, "size=wrong,shade=wrong", seed=3)
    assert cf.fields_changed == {"size": 12, "shade": 12} and cf.texts_changed == cf.n == 12
    for r in recs:
        size, shade = cf.texts[r.case_id].split(" ")[:2]
        assert size != r.fields["size"] and shade != r.fields["shade"]
        assert cf.texts[r.case_id].endswith("smooth margins")  # the other fields stay
    # a derangement of the values: every "dark" becomes the same other shade
    dark = {cf.texts[r.case_id].split(" ")[1] for r in recs if r.fields["shade"] == "dark"}
    assert len(dark) == 1 and dark != {"dark"}
    with pytest.raises(ConfigError, match="margin=wrong' is impossible"):
        counterfactual_texts(recs, TEMPLATE, "margin=wrong")


def test_shuffle_may_keep_values_and_counts_what_changed():
    recs = _records()
    cf = counterfactual_texts(recs, TEMPLATE, "size=shuffle,shade=shuffle", seed=0)
    assert sorted(cf.texts) == sorted(r.case_id for r in recs)
    assert 0 < cf.fields_changed["size"] <= 12 and 0 < cf.fields_changed["shade"] <= 12
    true = dict(zip([r.case_id for r in recs], _texts(recs), strict=True))
    assert cf.texts_changed == sum(cf.texts[c] != true[c] for c in true)
    # each field is a permutation of the records' values: the value counts stay
    sizes = sorted(t.split(" ")[0] for t in cf.texts.values())
    assert sizes == sorted(r.fields["size"] for r in recs)


def test_one_field_shuffle_keeps_the_published_draws():
    """A one-field shuffle is the random cycle (Sattolo, numpy default_rng(seed)) the published
    counterfactual tables were made with, so their numbers still hold."""
    import numpy as np

    recs = _records()
    rng, perm = np.random.default_rng(5), list(range(12))
    for i in range(11, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    expected = {r.case_id: TEMPLATE.format(**{**r.fields, "shade": recs[perm[k]].fields["shade"]})
                for k, r in enumerate(recs)}
    assert counterfactual_texts(recs, TEMPLATE, "shade=shuffle", seed=5).texts == expected
    forced = counterfactual_texts(recs, TEMPLATE, "margin=spiculated", seed=5)
    assert all(t.endswith("spiculated margins") for t in forced.texts.values()) and forced.fields_changed == {"margin": 12}


def test_whole_text_wrong_and_unknown_field():
    recs = _records()
    cf = counterfactual_texts(recs, None, "text=wrong", seed=1)
    assert cf.fields_changed == {"text": 12} and all(cf.texts[r.case_id] != r.fields["text"] for r in recs)
    with pytest.raises(ConfigError, match="'birads' is not a text field"):
        counterfactual_texts(recs, TEMPLATE, "birads=wrong")


def _model(**kw):
    torch.manual_seed(0)
    return build_text_seg(validate_params(TextSegParams, {**TINY, **kw}, "model.params"))


def test_bypass_is_the_image_side_alone_with_nothing_to_train():
    """fusion=bypass: the decoder sees the embedding as it is (text ignored); no adapter parameters."""
    frozen = _model(fusion="bypass", freeze_image_side=True).eval()
    assert frozen.parameter_counts()["trainable"] == 0 and frozen.parameter_counts()["adapter"] == 0
    img, box = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1)), torch.tensor([[4.0, 4, 40, 40]] * 2)
    with torch.no_grad():
        a = frozen(img, box, ["small dark mass", "large bright mass"])["mask_logits"]
        b = frozen(img, box, ["anything", "else"])["mask_logits"]
        direct = frozen.image_side.decode(frozen.image_side.embed(img), box)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, direct)
    box_only = _model(fusion="none")
    own, other = set(frozen.state_dict()), set(box_only.state_dict())
    assert own < other and all(k.startswith("fusion.") for k in other - own)  # the box-only run's weights fit
    assert {k: tuple(v.shape) for k, v in frozen.state_dict().items()} == {
        k: tuple(v.shape) for k, v in box_only.state_dict().items() if k in own}


def test_demo_rows_take_weights_and_the_two_field_row_exists():
    from medfuse.engine.demo import split_harness
    from medfuse.families.text_seg import FAMILY

    rows = dict(FAMILY.demo_ablations)
    names = list(rows)
    medsam = next(n for n in names if n.startswith("MedSAM as it is"))
    assert split_harness(list(rows[medsam])) == (["model.params.fusion=bypass"],
                                                  {"demo.weights_from": "no text (box only)"})
    two = [n for n in names if "both wrong" in n]
    assert len(two) == 1
    cfg_over, harness = split_harness(list(rows[two[0]]))
    spec = cfg_over[0].split("=", 1)[1]
    assert len(parse_counterfactual(spec)) == 2 and harness == {"demo.weights_from": "hierarchical fusion"}
    for name in names:  # every weights_from names an earlier variant
        src = split_harness(list(rows[name]))[1].get("demo.weights_from")
        assert src is None or names.index(src) < names.index(name)


@pytest.fixture(scope="module")
def box_only_run(tmp_path_factory):
    """A tiny box-only run (1 epoch) of the demo config: the source of the evaluation-only rows."""
    from medfuse.config import load_config
    from medfuse.engine.trainer import fit
    from medfuse.families.text_seg import FAMILY
    from medfuse.families.text_seg.demo import make_text_seg_demo

    root = tmp_path_factory.mktemp("text_seg_eval_only")
    make_text_seg_demo(root / "data", n_patients=14, seed=1, size=64)
    base = [f"data.root={root / 'data'}", f"output_dir={root / 'runs'}", "train.max_epochs=1", "data.batch_size=8",
            "data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
            "model.params.tiny_dim=32", "model.params.token_dim=16", "eval.n_boot=20", "data.split.val=0.25",
            "data.split.test=0.3", "train.accelerator=cpu"]
    return fit(load_config(FAMILY.demo_config, [*base, "name=box", "model.params.fusion=none"])), base


def test_evaluation_only_rows_reuse_weights_and_count_what_changed(box_only_run):
    """MedSAM as it is (bypass) from the box-only run's weights, and two fields wrong, without training."""
    from medfuse.config import load_config
    from medfuse.engine.checkpoint import read_checkpoint
    from medfuse.engine.demo import reuse_weights
    from medfuse.engine.evaluate import evaluate
    from medfuse.families.text_seg import FAMILY

    src, base = box_only_run
    cfg = load_config(FAMILY.demo_config, [*base, "name=medsam", "model.params.fusion=bypass"])
    run = reuse_weights(cfg, src)
    own = read_checkpoint(run / "checkpoints" / "best.ckpt")["state_dict"]
    theirs = read_checkpoint(src / "checkpoints" / "best.ckpt")["state_dict"]
    assert own and set(own) < set(theirs) and all(torch.equal(v, theirs[k]) for k, v in own.items())
    assert (run / "splits.csv").read_text(encoding="utf-8") == (src / "splits.csv").read_text(encoding="utf-8")
    rep = evaluate(run, split="test")
    assert rep["parameters"]["adapter"] == 0 and 0.0 <= rep["metrics"]["dice"]["value"] <= 1.0

    spec = "size=wrong,echogenicity=wrong"
    cfg = load_config(FAMILY.demo_config, [*base, "name=wrong2", "model.params.fusion=none",
                                           f"data.params.test_counterfactual={spec}"])
    rep = evaluate(reuse_weights(cfg, src), split="test")
    tc = rep["test_counterfactual"]
    assert tc["spec"] == spec and tc["fields_changed"] == {"size": tc["n"], "echogenicity": tc["n"]}
    assert tc["texts_changed"] == tc["n"] == rep["n"]
    cf = evaluate(src, split="test", counterfactual=[spec, "text=shuffle"])["counterfactual"]
    assert cf[spec]["fields_changed"] == {"size": rep["n"], "echogenicity": rep["n"]}
    assert cf[spec]["texts_changed"] == rep["n"] and cf["text=shuffle"]["fields_changed"]["text"] > 0
