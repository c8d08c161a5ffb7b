# Two entry points that work on a fresh machine: `make demo` and `make test` (each sets up .venv itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel pinned for this repo's machines; GPU users: `make TORCH=` keeps the torch already in the venv,
# or install their CUDA build of torch first.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m trl_prefix_share.commands.demo

lint: $(STAMP)
	$(BIN)/ruff check trl_prefix_share tests benchmarks docs/*.py
	$(BIN)/ruff format --check trl_prefix_share tests benchmarks docs/*.py

# Two test processes of one torch thread each: on CI's 2 cores that beats one process of two threads (tiny models
# leave a second thread mostly idle). `make TEST_WORKERS=0 test` runs in one process.
TEST_WORKERS ?= 2

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

bench: $(STAMP)
	$(BIN)/trl-prefix-share bench

# On a CUDA machine (bring its torch: `make TORCH= gpu-check`): the GPU tests and the GPU benchmark (bf16,
# FlexAttention, a Qwen2.5-0.5B-shaped model, stock vs packed-unshared vs ours on hh_harmless and ultrafeedback),
# sized for under 8 minutes; figures land in gpu-check/ (bench_dpo_gpu.json, logs).
gpu-check: $(STAMP)
	mkdir -p gpu-check
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA device')"
	set -o pipefail; $(BIN)/python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee gpu-check/pytest.log
	set -o pipefail; $(BIN)/trl-prefix-share bench --model-preset qwen2.5-0.5b --trainer dpo \
		--dataset hh_harmless ultrafeedback --variants stock unshared ours --batch-size 8 --steps 3 --warmup 1 \
		--rounds 1 --device cuda --json gpu-check/bench_dpo_gpu.json 2>&1 | tee gpu-check/bench.log

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
