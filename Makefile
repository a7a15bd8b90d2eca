# honeyfleet developer entry points. `make test` is the one command CI runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
EXTRAS ?= dev,postgres,poolnode

.PHONY: test check lint types protos protos-check system-deps clean

test: system-deps check
	$(BIN)/pytest

check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/python scripts/gen_protos.py --check

system-deps:
	bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# Regenerate honeyfleet/v1 from protos/ (commit the result).
protos: $(VENV)/.installed
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
