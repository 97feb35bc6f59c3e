# `make demo` and `make test` each create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
BENCH_ARGS ?=
DEMO_ARG ?=  # e.g. make demo DEMO_ARG=near_perfect,seed=1 (experiments/tiny_instructgpt.py)

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m instructrl.main --config=experiments/tiny_instructgpt.py$(if $(DEMO_ARG),:$(DEMO_ARG)) \
	  --workdir=$(DEMO_DIR)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15 tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The benchmark suite (experiments/benchmarks/suite.py): JSON on stdout, Markdown table on
# stderr. e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--threads 1 --json runs/bench.json"
bench: $(VENV)/.installed-test
	$(BIN)/python -m experiments.benchmarks.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
