# Developer entry points. `make help` lists them.
# The virtualenv is (re)installed only when it is missing or when a requirements file or
# pyproject.toml is newer than its stamp, so repeated `make test` runs go straight to pytest.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQUIREMENTS := requirements.txt requirements-test.txt
PROJECT := pyproject.toml
PIP_FLAGS ?= --disable-pip-version-check --no-input $(if $(CI),--progress-bar off)
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: help venv test demo bench clean distclean FORCE

help:
	@echo "make venv       create $(VENV) (Python 3.11), install requirements-test.txt and this project (editable)"
	@echo "make test       run the whole test suite (extra pytest flags: PYTEST_ARGS=...)"
	@echo "make demo       learn a held-out toy subject on the CPU: scripts/demo.py (extra flags: DEMO_ARGS=...)"
	@echo "make bench      run scripts/benchmark.py --config tiny (extra flags: BENCH_ARGS=...)"
	@echo "make clean      remove caches; make distclean also removes $(VENV)"

venv: $(STAMP)

# A venv whose interpreter is missing or broken is rebuilt whatever the stamp's age.
VENV_BROKEN := $(shell test -x $(VENV_PY) || echo yes)

$(VENV_PY):
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is not Python 3.11; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)

# Reinstalls when a requirements file or pyproject.toml is newer than the stamp. The stamp is written
# only after pip succeeded, so a failed install is retried on the next run. The project (ldm, main.py)
# is installed editable on top of the pins: no dependencies of its own to resolve, and no build
# isolation, so it builds offline with the pinned setuptools.
$(STAMP): $(REQUIREMENTS) $(PROJECT) $(if $(VENV_BROKEN),FORCE) | $(VENV_PY)
	$(VENV_PY) -m pip install $(PIP_FLAGS) -r requirements-test.txt
	$(VENV_PY) -m pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

FORCE:

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV_PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV_PY) scripts/demo.py $(DEMO_ARGS)

bench: $(STAMP)
	$(VENV_PY) scripts/benchmark.py --config tiny $(BENCH_ARGS)

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache

distclean: clean
	rm -rf $(VENV)
