# Two entry points that work on a fresh machine: `make demo` and `make test` (each sets up .venv itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel pinned for this repo's machines; GPU users: `make TORCH=` keeps the torch already in the venv,
# or install their CUDA build of torch first.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The locked set-up of `make demo` and `make test`: every package but torch at one exact version (pip's own format,
# read by plain pip, which also finds the CPU torch wheel on this repo's machines). Refresh with `make lock`.
LOCK   := requirements/lock.txt
PIP    := pip==26.3
# The tested range: the newest releases pyproject.toml allows (`make test-latest`) and its floors (`make test-lowest`).
TORCH_LATEST ?= torch>=2.13,<2.15
LOWEST := requirements/lowest.txt

.PHONY: install demo test lint bench gpu-check clean lock test-latest test-lowest model-table

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP)"
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
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
# glibc hands every freed block above 32 MiB back to the kernel and maps it afresh on the next allocation; the suite's
# many short forwards (full-vocabulary logits, float64 equivalence runs) then spent as much time in page faults as in
# torch (sys ~ user). Keeping freed memory in the process cut the suite from 25 to 18 minutes on 2 cores. Tests only:
# benchmarks keep the allocator's defaults.
TEST_ENV := OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# Rewrite the lock from the newest releases in range (a throw-away venv), then run `make test` on it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIP)"
	$(if $(TORCH),.venv-lock/bin/python -m pip install -q "$(TORCH)")
	.venv-lock/bin/python -m pip install -q ".[test,plot]"
	( echo "# Locked set-up of make demo / make test (all but torch, which the Makefile pins). Refresh: make lock"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|trl-prefix-share)( |=|@)' ) > $(LOCK)
	rm -rf .venv-lock

# The suite on the newest releases in range, in its own venv (not the lock).
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q "$(PIP)"
	.venv-latest/bin/python -m pip install -q --upgrade "$(TORCH_LATEST)"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,plot]"
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|datasets|accelerate) '
	$(TEST_ENV) .venv-latest/bin/python -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# The suite on the lowest releases pyproject.toml declares (requirements/lowest.txt), in its own venv.
test-lowest:
	test -x .venv-lowest/bin/python || $(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q "$(PIP)"
	.venv-lowest/bin/python -m pip install -q -c $(LOWEST) torch
	.venv-lowest/bin/python -m pip install -q -c $(LOWEST) -e ".[test,plot]"
	.venv-lowest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|datasets|accelerate) '
	$(TEST_ENV) .venv-lowest/bin/python -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# docs/model_support.md for the installed transformers (the lock's in .venv).
model-table: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python docs/make_model_table.py

bench: $(STAMP)
	$(BIN)/trl-prefix-share bench

# On a CUDA machine (bring its torch: `make TORCH= gpu-check`): flash-linear-attention (requirements/fla.txt, for the
# gated-delta mixers' variable-length kernel), the GPU tests, the scaling sweep's CUDA grid (2k and 16k-token prompts,
# 16 completions, DPO and GRPO, each run capped at 20 s + 1.5x) and the GPU benchmark (bf16, FlexAttention, a
# Qwen2.5-0.5B-shaped model, stock vs packed-unshared vs ours on hh_harmless and ultrafeedback), sized for under 8
# minutes; figures land in gpu-check/ (bench_dpo_gpu.json, logs).
gpu-check: $(STAMP)
	mkdir -p gpu-check
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA device')"
	$(BIN)/python -m pip install -q --no-deps -r requirements/fla.txt
	$(BIN)/python -c "from trl_prefix_share.core.mixers.varlen import installed_fla_kernel as k; print('fla varlen kernel:', k())" \
		| tee gpu-check/fla.log
	set -o pipefail; $(BIN)/python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee gpu-check/pytest.log
	set -o pipefail; $(BIN)/trl-prefix-share bench --model-preset qwen2.5-0.5b --trainer dpo \
		--dataset hh_harmless ultrafeedback --variants stock unshared ours --batch-size 8 --steps 3 --warmup 1 \
		--rounds 1 --device cuda --json gpu-check/bench_dpo_gpu.json 2>&1 | tee gpu-check/bench.log
	set -o pipefail; $(BIN)/trl-prefix-share bench --sweep --model-preset qwen2.5-0.5b --trainer dpo grpo \
		--prompt-lengths 2048 16384 --completions 16 --completion-length 64 --steps 1 --time-cap 20 --device cuda \
		--json gpu-check/sweep_gpu.json --plot gpu-check/sweep_gpu.png 2>&1 | tee gpu-check/sweep.log

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest .venv-lock .pytest_cache .ruff_cache .hypothesis
