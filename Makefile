# Everything a fresh machine needs is installed by these targets themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv test lint typecheck unit golden-update bench render-example demo clean

help:
	@echo "make test          lint, type-check and run the test suite (installs into $(VENV))"
	@echo "make demo          the main job (see README)"
	@echo "make golden-update regenerate tests/golden/*.injected"
	@echo "make bench         mutation benchmark, figures to bench-results.json"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check injector sidecar tests benchmarks
	$(BIN)/ruff format --check injector sidecar tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

golden-update: $(STAMP)
	$(BIN)/pytest tests/test_golden.py --update-golden

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_mutation.py

render-example: $(STAMP)
	$(BIN)/python -m injector render -f examples/bento-deployment.yaml

demo: render-example

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
