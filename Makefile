# One-command set-up: `make demo` and `make test` both create .venv (pip) on first use,
# install samliver editable with everything it needs, then do their job. Idempotent:
# a second run reuses .venv (a stamp keyed on pyproject.toml) and the data caches.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) so users can override them,
# e.g. `make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.samliver-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Test processes (pytest-xdist), one file per process at a time, the longest files first
# (tests/conftest.py, FILE_SECONDS). Much of the suite waits on
# process start-up (notebook kernels, CLI runs, Chromium) rather than on the CPU, so two
# processes on two cores finish sooner; each runs torch on one thread (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint bench browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[ui,test,fast]'
	rm -f $(VENV)/.samliver-*
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium drives the browser tests (never a downloaded browser).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

demo: setup
	$(BIN)/samliver fetch-sample
	$(BIN)/samliver demo

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear.
lint: setup
	$(BIN)/ruff check samliver tests data_scripts

test: setup browser-deps lint
	$(BIN)/samliver fetch-sample
	SAMLIVER_FAST=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 \
		tests notebooks --nbval-lax $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -c 'import nncf' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[int8]'
	$(BIN)/samliver fetch-sample
	$(BIN)/samliver bench

clean:
	rm -rf $(VENV) outputs *.egg-info
