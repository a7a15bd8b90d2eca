# honeyfleet developer entry points. `make test` is the one command CI runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
EXTRAS ?= dev,postgres,poolnode

# Arguments for `make up`, e.g. UP_ARGS="--hypervisor qemu --guests 3".
UP_ARGS ?=

.PHONY: test test-image up check lint types protos protos-check system-deps clean

test: system-deps check test-image
	$(BIN)/pytest

# The VM tests' guest image, built from Debian packages before pytest starts, so that
# the tests themselves reach nothing beyond the machine.
test-image: $(VENV)/.installed
	$(BIN)/python -m tests.e2e.image

# The whole fleet on this machine (Ctrl-C stops it and cleans up).
up: system-deps $(VENV)/.installed
	bash scripts/setup-libvirt.sh
	bash scripts/start-libvirtd.sh
	$(BIN)/honeyfleet up $(UP_ARGS)

check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
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
