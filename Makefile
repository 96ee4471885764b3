# Two commands: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LONGITUDINAL_HOME ?= $(CURDIR)/workspace
# Offline and quiet: no telemetry, no version checks.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_TELEMETRY := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint layers venv clean bench

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so nothing else can pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	@# setuptools reports every editable install as a warning (nothing to act on); the filter drops only that one.
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check longitudinal storage flows tests benchmarks

layers: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP) lint layers
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/python -m longitudinal.demo

# The product benchmarks at sizes that fit in under an hour on 2 cores, each printing its table, then how long each
# took (benchmarks/README.md lists them with their full-size commands and last figures).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --work workspace/bench

clean:
	rm -rf $(VENV) workspace .pytest_cache .ruff_cache
