# Two entry points that work on a fresh machine: `make demo` and `make test` (each sets up .venv itself).
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel pinned for this repo's machines; GPU users: `make TORCH=` keeps the torch already in the venv,
# or install their CUDA build of torch first.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m trl_prefix_share.demo

lint: $(STAMP)
	$(BIN)/ruff check trl_prefix_share tests benchmarks docs/*.py
	$(BIN)/ruff format --check trl_prefix_share tests benchmarks docs/*.py

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/trl-prefix-share bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
