# metaembed: every target sets up what is missing itself (a .venv in the repo, torch==2.13.0 only
# when no torch is importable there, the package in editable mode with its dev extra).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.metaembed-installed
PYTEST_ARGS ?=

.PHONY: setup test test-gpu gpu-check gpu-wheels quickstart reproduce reproduce-quick bench train-bench kernels strip-notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

## The test command (CI runs this): unit tests + notebooks under nbval.
test: setup
	$(PY) -m pytest tests notebooks --nbval-lax $(PYTEST_ARGS)

## On a GPU machine: kernel/index tests against the fp64 reference (+ compute-sanitizer when on PATH).
test-gpu: setup
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

## On a GPU machine: every GPU check of the open issues in one run (~9 min; logs + JSON in $$OUT or runs/gpu-check).
gpu-check:
	bash experiments/gpu_check.sh

## Wheels (Python 3.12, manylinux) of the transformers/peft versions this .venv tests with, into .whl/ for a
## GPU machine without a package index (gpu_check.sh installs them into /tmp/site when present).
gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -m pip freeze | grep -iE '^(transformers|tokenizers|huggingface.hub|safetensors|peft)==')

## Train the quickstart model (MMR and NoMMR) and print its budget table (4.5 to 9 min on 2 quiet CPU cores,
## longer on shared ones: README.md, "Quickstart result").
quickstart: setup
	$(VENV)/bin/metaembed quickstart --output runs/quickstart

## The main job: the quickstart, then every CPU parameter set in experiments/ through papermill
## (executed notebooks and tables in experiments/runs/, figures regenerated in figures/).
reproduce: quickstart
	$(VENV)/bin/metaembed reproduce

## Smoke run with each set's quick overrides (runs, summary and figures in experiments/runs/quick/).
reproduce-quick: setup
	$(VENV)/bin/metaembed reproduce --quick

## Table 3 on this device (kernel when a GPU is present, PyTorch path otherwise).
bench: setup
	$(VENV)/bin/metaembed bench

## Training step time, tokens/s, peak memory at MetaEmbed-3B size (random weights; a GPU in practice).
train-bench: setup
	$(VENV)/bin/metaembed train-bench --backbone metaembed-3b

## Compile the CUDA MaxSim kernel for sm_80 and sm_90 (needs nvcc, not a GPU).
kernels: setup
	bash .ci/compile_kernels.sh

clean:
	rm -rf runs experiments/runs .pytest_cache

## Strip outputs/execution counts from committed notebooks (keeps cells marked # NBVAL_CHECK_OUTPUT).
strip-notebooks: setup
	$(PY) -m metaembed.reproduce strip
