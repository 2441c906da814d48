# metaembed: every target sets up what is missing itself (a .venv in the repo, torch==2.13.0 only
# when no torch is importable there, the package in editable mode with its dev extra).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.metaembed-installed
PYTEST_ARGS ?=

.PHONY: setup test quickstart reproduce reproduce-quick kernels strip-notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

## The test command (CI runs this): unit tests + notebooks under nbval.
test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

## The main job: train the quickstart model (MMR and NoMMR) and print its budget table.
quickstart: setup
	$(VENV)/bin/metaembed quickstart --output runs/quickstart

reproduce: setup
	$(VENV)/bin/metaembed reproduce

reproduce-quick: setup
	$(VENV)/bin/metaembed reproduce --quick

## Compile the CUDA MaxSim kernel for sm_80 and sm_90 (needs nvcc, not a GPU).
kernels: setup
	bash .ci/compile_kernels.sh

clean:
	rm -rf runs experiments/runs .pytest_cache

## Strip outputs/execution counts from committed notebooks (keeps cells marked # NBVAL_CHECK_OUTPUT).
strip-notebooks: setup
	$(PY) -m metaembed.reproduce strip
