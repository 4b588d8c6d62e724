# Two commands for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	@# The daemon in the foreground with per-user defaults (root: /run/lockd, /var/lib/...).
	$(BIN)/lockd serve --verbose

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# One worker per CPU: most end-to-end tests wait on daemons and child processes, so
# two workers on two cores take about two thirds of the serial time. A plain
# `pytest FILE` still runs in this process, for debugging.
unit: $(STAMP)
	$(BIN)/pytest -q -n auto

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
