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
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check longitudinal storage flows tests benchmarks

layers: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP) lint layers
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m longitudinal.demo

# Each benchmark prints its table; the last ones reuse forecast_quality.py's work folder (trained models).
BENCH_FQ := workspace/bench/forecast_quality
bench: $(STAMP)
	for b in synth ingest registration_qc train_throughput tracking_overhead forecast_latency forecast_quality tune; do \
		$(BIN)/python benchmarks/$$b.py || exit 1; done
	$(BIN)/python benchmarks/next_visit.py --work $(BENCH_FQ)
	$(BIN)/python benchmarks/calibration_forms.py --work $(BENCH_FQ)
	$(BIN)/python benchmarks/forecast_quality.py --work $(BENCH_FQ)_fresh --seed 1 --models "" --train-only
	$(BIN)/python benchmarks/calibration_heldout.py --work $(BENCH_FQ) --fresh $(BENCH_FQ)_fresh
	$(BIN)/python benchmarks/calibration_difficulty.py --work $(BENCH_FQ) --fresh $(BENCH_FQ)_fresh
	$(BIN)/python benchmarks/forecast_quality.py --work $(BENCH_FQ)_confirm --seed 2 --models "" --train-only
	$(BIN)/python benchmarks/calibration_confirm.py --work $(BENCH_FQ) --fresh $(BENCH_FQ)_fresh \
		--confirm $(BENCH_FQ)_confirm

clean:
	rm -rf $(VENV) workspace .pytest_cache .ruff_cache
