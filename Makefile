# One task runner. `make demo` and `make test` work on a fresh machine (Python 3.10+, pip, network to PyPI).
PY ?= python3
VENV ?= .venv
# The machine this project is developed on has a local CPU build of torch 2.13.0; on a GPU machine use
# `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"` or similar.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo s3-demo test test-fast lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/drcr-pipeline make-sample out/sample
	$(BIN)/drcr-pipeline run --spec jobs/demo.toml

# The S3 example job against a local S3-compatible server (rclone, from the test extras): uploads a sample
# to s3://drcr-demo/archives/, runs jobs/s3_example.toml on a local Ray, opens a cube with xarray.
s3-demo: setup
	$(BIN)/python scripts/s3_demo.py

test: setup
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

test-fast: setup
	$(BIN)/pytest -q -m "not integration and not slow"

lint: setup
	$(BIN)/ruff check drcr_model pipeline tests benchmarks
	$(BIN)/ruff format --check drcr_model pipeline

typecheck: setup
	$(BIN)/mypy

bench: setup  # performance suite, small configs, bounded time; `bench-full` for full sizes
	$(BIN)/python benchmarks/run_all.py --quick

bench-full: setup
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/bench_tiling.py

clean:
	rm -rf out .pytest_cache
