# Every target creates or reuses .venv and installs what it needs (see README).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned torch/torchvision pair has wheels on local disk for CPython 3.11 x86_64; elsewhere pip resolves them.
TORCH_SPEC ?= $(shell $(PY) -c 'import platform,sys; print("torch==2.14.1 torchvision==0.29.1" if (sys.version_info[:2]==(3,11) and platform.machine()=="x86_64") else "torch>=2.4 torchvision")')
STAMP := $(VENV)/.medfuse-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONDONTWRITEBYTECODE := 1
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made torch ~5x slower.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test test-slow test-gpu test-oracles bench lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[setup] installing $(TORCH_SPEC) and medfuse[dev] into $(VENV) (first run takes a few minutes)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.medfuse-installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medfuse demo staging --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Parity against the peers' own packages (sam2, segment-anything), installed on demand; .ci/run
# runs it after `make test`. SAM2_BUILD_CUDA=0: sam2's optional CUDA extension is not built.
test-oracles: $(STAMP)
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[oracles]'
	@# the oracle tests skip when their package is absent: fail here instead of passing silently
	$(BIN)/python -c 'import sam2, segment_anything'
	$(BIN)/python -m pytest -q -m oracles -rs

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run_all.py --out docs/benchmarks.md

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache build *.egg-info src/*.egg-info
