# Outpost: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-stop test lint typecheck unit venv clean system-deps

$(STAMP): pyproject.toml setup.py src/outpost/pooler/_engine.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

demo: $(STAMP)
	@bash scripts/demo.sh

demo-stop:
	@bash scripts/demo.sh stop

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: system-deps lint typecheck
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .outpost .mypy_cache .ruff_cache .pytest_cache
