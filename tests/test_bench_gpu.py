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
    text = doc.read_text()
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
    assert "medfuse imports" in (out / "environment.txt").read_text()
    log = (out / "part1.log").read_text()
    assert log.count(": exit 0 ") == 3 and "bench scan gemm" in log and "bench encoders" in log
    assert (out / "benchmarks_gpu.md").read_text() == (ROOT / "docs" / "benchmarks_gpu.md").read_text()
    bad = subprocess.run(["bash", "bench/gpu_session.sh", str(tmp_path / "o2"), "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "part is 1 or 2" in bad.stdout
