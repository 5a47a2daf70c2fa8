"""The demo harness: key comparisons, harness overrides, evaluation-only variants, the seeds table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import medfuse.families  # noqa: F401  (registers the families)
from medfuse.engine import demo
from medfuse.errors import ConfigError
from medfuse.registry import FAMILIES


@pytest.mark.parametrize("family", [f.name for f in FAMILIES if f.make_demo is not None])
def test_key_comparison_names_real_variants(family):
    metric, names = demo.key_comparison(family)
    all_names = [n for n, _ in demo.ablations(family)]
    assert len(names) >= 2 and set(names) <= set(all_names) and names[0] == all_names[0]
    assert metric is None or isinstance(metric, str)


def test_key_comparison_covers_the_issue_families():
    assert set(demo.KEY_COMPARISONS) == {"staging", "incomplete_seg", "text_seg", "ct_encoder", "context_seg"}


def test_split_harness_and_sources():
    over, harness = demo.split_harness(["model.params.fusion=bypass", "demo.weights_from=no text (box only)"])
    assert over == ["model.params.fusion=bypass"] and harness == {"demo.weights_from": "no text (box only)"}
    with pytest.raises(ConfigError, match="demo.nope: unknown demo harness option"):
        demo.split_harness(["demo.nope=1"])
    names = [n for _, n, _ in demo._with_sources("text_seg", ["hierarchical, shuffled test text"])]
    assert names == ["hierarchical fusion", "hierarchical, shuffled test text"]  # its weights come along


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), (" 3 , 5", [3, 5])])
def test_parse_seeds(text, seeds):
    assert demo.parse_seeds(text) == seeds


@pytest.mark.parametrize("bad", ["", "a,b", "1,1", "-1"])
def test_parse_seeds_refuses(bad):
    with pytest.raises(ConfigError, match="--seeds"):
        demo.parse_seeds(bad)


def _row(name, value, low, high, n=20):
    return {"name": name, "run": f"runs/{name}", "n": n, "acc": {"value": value, "low": low, "high": high, "n": n}}


def test_seeds_table_mean_sd_and_each_seed_with_its_ci(tmp_path, monkeypatch):
    values = {0: (0.9, 0.6), 1: (0.8, 0.7), 2: (0.7, 0.5)}

    def fake_runs(family, cfg_path, base, variants, slug, console):
        seed = int(next(o for o in base if o.startswith("train.seed=")).split("=")[1])
        assert [n for _, n, _ in variants] == ["full", "baseline"] and "{i}" in slug
        full, other = values[seed]
        return [_row("full", full, full - 0.1, full + 0.1), _row("baseline", other, other - 0.1, other + 0.1)], \
            {"full": {"ci": 0.95}, "baseline": {"ci": 0.95}}

    monkeypatch.setattr(demo, "_run_variants", fake_runs)
    monkeypatch.setattr(demo, "key_comparison", lambda family: ("acc", ["full", "baseline"]))
    monkeypatch.setattr(demo, "_with_sources", lambda family, names: [(0, "full", []), (1, "baseline", [])])
    monkeypatch.setattr(demo, "demo_family", lambda family: type("F", (), {"demo_config": tmp_path / "x.yaml"})())
    summary = demo.run_demo("fam", tmp_path / "out", seeds=[0, 1, 2])
    full, base = summary["variants"]
    assert full["mean"] == pytest.approx(0.8) and full["sd"] == pytest.approx(0.1)
    assert base["mean"] == pytest.approx(0.6) and base["sd"] == pytest.approx(0.1)
    assert base["diff_to_first_mean"] == pytest.approx(-0.2) and base["diff_to_first_sd"] == pytest.approx(0.1)
    assert full["per_seed"]["1"] == pytest.approx({"value": 0.8, "low": 0.7, "high": 0.9, "n": 20})
    saved = json.loads((tmp_path / "out" / "seeds.json").read_text(encoding="utf-8"))
    assert saved["seeds"] == [0, 1, 2] and saved["metric"] == "acc" and saved["varies"] == "train.seed"
    md = (tmp_path / "out" / "seeds.md").read_text(encoding="utf-8")
    assert "| full | 0.800 ± 0.100 | - | 0.900 [0.800, 1.000] (n=20) |" in md
    assert "| baseline | 0.600 ± 0.100 | -0.200 ± 0.100 |" in md
    assert "medfuse demo fam --seeds 0,1,2" in md


def test_reuse_weights_refuses_a_source_without_the_models_weights(tmp_path):
    """An evaluation-only variant needs every weight of its model in the source checkpoint."""
    import torch

    from medfuse.config import load_config
    from medfuse.engine.checkpoint import atomic_torch_save
    from medfuse.families.text_seg.demo import make_text_seg_demo

    data = tmp_path / "data"
    make_text_seg_demo(data, n_patients=8, seed=1, size=64)
    src = tmp_path / "runs" / "src"
    (src / "checkpoints").mkdir(parents=True)
    atomic_torch_save({"state_dict": {"model.other": torch.zeros(1)}, "epoch": 0}, src / "checkpoints" / "best.ckpt")
    cfg = load_config(FAMILIES.get("text_seg").demo_config, [
        f"data.root={data}", f"output_dir={tmp_path / 'runs'}", "name=dst", "data.params.image_size=64",
        "data.params.mask_size=64", "model.params.image_size=64", "model.params.tiny_dim=32",
        "model.params.token_dim=16", "model.params.fusion=bypass", "data.split.val=0.2", "data.split.test=0.3"])
    with pytest.raises(ConfigError, match="demo.weights_from: .* lacks .* weights"):
        demo.reuse_weights(cfg, src)


@pytest.mark.parametrize("family", sorted(demo.KEY_COMPARISONS))
def test_family_page_has_the_three_seed_table(family):
    """Each family page carries its key comparison over seeds 0, 1, 2 (issue 19) with the command."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "families" / f"{family}.md").read_text(encoding="utf-8")
    assert "### 3-seed results" in page
    section = page.split("### 3-seed results", 1)[1]
    assert f"medfuse demo {family} --seeds 0,1,2" in section
    for name in demo.KEY_COMPARISONS[family][1]:
        row = re.search(r"^\| " + re.escape(name) + r" \| (\d\.\d{3}) ± (\d\.\d{3}) \|(.*)$", section, re.M)
        assert row, f"{family}: no 3-seed row for '{name}'"
        assert len(re.findall(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", row.group(3))) == 3, row.group(0)


def test_a_finished_run_is_reused_only_with_its_own_config(tmp_path, monkeypatch):
    """Rerunning a demo into the same folder after changing an override retrains (and says why);
    with the same config it reuses the finished run."""
    from medfuse.config import load_config, save_config
    from medfuse.engine.build import resolve

    cfg_path = FAMILIES.get("text_seg").demo_config
    base = [f"output_dir={tmp_path}", f"data.root={tmp_path / 'data'}"]
    fits: list[str] = []

    def fake_fit(cfg):
        run = cfg.run_dir
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
        (run / "checkpoints" / "done").write_text("ok\n")
        save_config(resolve(cfg), run / "config.yaml")
        fits.append(str(cfg.train.max_epochs))
        return run

    import medfuse.engine.evaluate as ev
    import medfuse.engine.trainer as tr

    monkeypatch.setattr(tr, "fit", fake_fit)
    monkeypatch.setattr(ev, "evaluate", lambda run, split="test": {"n": 3, "metrics": {}})
    from rich.console import Console

    console = Console(record=True, width=300)
    variants = [(0, "main", [])]
    demo._run_variants("text_seg", cfg_path, [*base, "train.max_epochs=3"], variants, "t_{i}", console)
    demo._run_variants("text_seg", cfg_path, [*base, "train.max_epochs=3"], variants, "t_{i}", console)
    assert fits == ["3"] and "reusing it" in console.export_text()
    demo._run_variants("text_seg", cfg_path, [*base, "train.max_epochs=5"], variants, "t_{i}", console)
    assert fits == ["3", "5"] and "train.max_epochs; retraining" in console.export_text()
    cfg = load_config(cfg_path, [*base, "train.max_epochs=5", "name=t_0"])
    assert demo.config_changes(cfg.run_dir, cfg) == []
    assert demo.config_changes(cfg.run_dir, load_config(cfg_path, [*base, "name=t_0", "eval.n_boot=7"])) \
        == ["eval.n_boot", "train.max_epochs"]


def test_families_and_quick_demos_keep_their_phantoms_apart():
    out = Path("runs/x")
    full, quick = demo.demo_paths(out, "staging", False), demo.demo_paths(out, "staging", True)
    other = demo.demo_paths(out, "ct_encoder", False)
    assert full[0] == f"data.root={out / 'data' / 'staging'}" and quick[0] == f"data.root={out / 'data' / 'staging-quick'}"
    assert len({full[0], quick[0], other[0]}) == 3  # three phantoms
    assert full[1:] == quick[1:] == other[1:]  # one content-keyed cache, one output folder


def test_a_phantom_made_with_other_parameters_is_refused(tmp_path):
    """A phantom folder records what made it; a config asking for another phantom there is refused."""
    from medfuse.config import load_config
    from medfuse.engine.build import PHANTOM_RECORD, prepare_demo_data

    cfg_path = FAMILIES.get("text_seg").demo_config
    root = tmp_path / "data"
    small = ["data.demo_params.quick=true", "data.demo_params.n_patients=8"]
    prepare_demo_data(load_config(cfg_path, [f"data.root={root}", *small]))
    record = json.loads((root / PHANTOM_RECORD).read_text(encoding="utf-8"))
    assert record == {"family": "text_seg", "demo_params": load_config(cfg_path, small).data.demo_params}
    made = sorted(p.name for p in root.rglob("*"))
    prepare_demo_data(load_config(cfg_path, [f"data.root={root}", *small]))  # the same phantom: used as it is
    assert sorted(p.name for p in root.rglob("*")) == made
    with pytest.raises(ConfigError, match=r"data.root: .* holds the text_seg phantom made with .*quick"):
        prepare_demo_data(load_config(cfg_path, [f"data.root={root}", "data.demo_params.n_patients=8"]))
    (root / PHANTOM_RECORD).unlink()  # a folder without a record (the user's, or made before records): used
    prepare_demo_data(load_config(cfg_path, [f"data.root={root}", "data.demo_params.n_patients=8"]))


def test_console_cells_leave_out_the_n_the_table_already_has():
    row = {"name": "full", "n": 12, "dice": {"value": 0.5, "low": 0.4, "high": 0.6, "n": 12},
           "hd95": {"value": None, "n": 0}}
    assert demo.table_cell(row, "dice") == "0.500 [0.400, 0.600]"
    assert demo.table_cell(row, "hd95") == "n/a n=0"  # another n than the variant's: kept
    assert demo.table_cell(row, "auc") == "-"


def test_console_cells_of_a_patient_bootstrap_leave_out_the_counts_the_n_column_has():
    row = {"name": "full", "n": 53, "n_patients": 50,
           "acc": {"value": 0.868, "low": 0.769, "high": 0.944, "n": 50, "n_items": 53},
           "auc": {"value": 0.9, "low": 0.8, "high": 0.95, "n": 40, "n_items": 43}}
    assert demo.row_count(row) == "50 patients, 53 cases"
    assert demo.row_count({"n": 12}) == "12"
    assert demo.table_cell(row, "acc") == "0.868 [0.769, 0.944]"
    assert demo.table_cell(row, "auc") == "0.900 [0.800, 0.950] n=40 patients, 43 cases"  # other counts: kept


def test_seeds_without_a_key_metric_take_the_first_metric_not_a_count(tmp_path, monkeypatch):
    """baseline has no key-comparison metric: the first metric entry is taken (n_patients, an int,
    crashed the run after all its trainings)."""

    def fake_runs(family, cfg_path, base, variants, slug, console):
        row = {"name": "full", "run": "r", "n": 20, "n_patients": 18, **_row("full", 0.7, 0.6, 0.8)}
        return [row, {**row, "name": "baseline"}], {"full": {"ci": 0.95}, "baseline": {"ci": 0.95}}

    monkeypatch.setattr(demo, "_run_variants", fake_runs)
    monkeypatch.setattr(demo, "key_comparison", lambda family: (None, ["full", "baseline"]))
    monkeypatch.setattr(demo, "_with_sources", lambda family, names: [(0, "full", []), (1, "baseline", [])])
    monkeypatch.setattr(demo, "demo_family", lambda family: type("F", (), {"demo_config": tmp_path / "x.yaml"})())
    summary = demo.run_demo("fam", tmp_path / "out", seeds=[0, 1])
    assert summary["metric"] == "acc" and (tmp_path / "out" / "seeds.md").is_file()


def test_the_combined_report_keeps_every_variants_evaluation_notes(tmp_path, monkeypatch):
    """The demo's report.json used to replace the main variant's own notes (e.g. "R@k left out for
    k = 10 ...") with the demo's, and dropped the other variants' notes; now the main variant's stay
    as they are and another variant's are kept under its name."""
    import medfuse.reports

    def fake_runs(family, cfg_path, base, variants, slug, console):
        rows = [_row("full", 0.9, 0.8, 1.0), _row("ablated", 0.7, 0.6, 0.8)]
        for r in rows:
            r["run"] = str(tmp_path / r["run"])
        return rows, {"full": {"ci": 0.95, "notes": ["R@k left out for k = 10", "a phantom of 8 cases"]},
                      "ablated": {"ci": 0.95, "notes": ["a phantom of 8 cases", "3 of 8 generated reports are empty"]}}

    written = {}
    monkeypatch.setattr(demo, "_run_variants", fake_runs)
    monkeypatch.setattr(demo, "ablations", lambda family: [("full", []), ("ablated", ["x=1"])])
    monkeypatch.setattr(demo, "demo_family",
                        lambda family: type("F", (), {"demo_config": tmp_path / "x.yaml", "demo_compare": None})())
    monkeypatch.setattr(medfuse.reports, "write_report", lambda run, rep, plots: written.update(rep))
    combined = demo.run_demo("fam", tmp_path / "out")
    assert combined["notes"][:3] == ["R@k left out for k = 10", "a phantom of 8 cases",
                                     "ablated: 3 of 8 generated reports are empty"]  # the same note once
    assert any(n.startswith("demo wall time") for n in combined["notes"]) and written["notes"] == combined["notes"]
