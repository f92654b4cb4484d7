# fleetbridge — developer entry points.  Both targets set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install lint typecheck schema web bench clean

$(BIN)/fleetbridge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/fleetbridge

## Set up, migrate, create a demo product with tokens, and serve on SQLite.
run: install
	@./scripts/demo.sh

## Set up and run the whole suite: lint, types, schema and web build freshness, tests.
test: install lint typecheck
	$(BIN)/python scripts/export_schema.py --check
	$(BIN)/python scripts/check_web_build.py
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check app tests bench scripts

typecheck:
	$(BIN)/mypy

schema: install
	$(BIN)/python scripts/export_schema.py

## Rebuild the board and GraphiQL into app/web/static (commit the result).
web:
	cd web && npm ci --no-audit --no-fund && npm run build

## The benchmark harness (bench/run.py; `make bench ARGS=--quick` for the short run).
bench: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache fleetbridge.db* build dist *.egg-info
