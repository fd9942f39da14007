# Multimodal toolkit: every target installs what it needs on first use.
# Only Python >= 3.10 and make are assumed; uv is installed into .tools/ when missing.

.DEFAULT_GOAL := help
SHELL := /bin/bash

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(CURDIR)/.tools/bin/uv
endif
PYTHON ?= python3
STAMP := .venv/.installed-stamp

.PHONY: help
help: ## Show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(CURDIR)/.tools/bin/uv:
	@echo "uv not found: installing it into .tools/"
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# --compile-bytecode: write every .pyc once at install (about 25 s). Where the environment sets
# PYTHONDONTWRITEBYTECODE (this project's machines do), each process otherwise recompiles what
# it imports: 1 s for torch, 4 s more when the optimiser first imports torch._dynamo
$(STAMP): uv.lock pyproject.toml packages/*/pyproject.toml | $(UV)
	$(UV) sync --frozen --all-packages --compile-bytecode
	@touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Install every package and the dev tools into .venv (uv sync)

.PHONY: test
test: $(STAMP) ## Run the test suite
	$(UV) run --frozen pytest -q

.PHONY: test-cuda
test-cuda: $(STAMP) ## Run tests/cuda: each package on a CUDA GPU beside the CPU (skipped without one)
	$(UV) run --frozen pytest -q tests/cuda

.PHONY: lint
lint: $(STAMP) ## ruff check + format check
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

.PHONY: typecheck
typecheck: $(STAMP) ## mypy on the packages (each ships py.typed) and the benchmark harness
	$(UV) run --frozen mypy

.PHONY: all
all: lint typecheck test test-oldest ## lint, typecheck, test and test-oldest: what CI runs

# The lowest versions each package declares (torch 2.2 for mmcore, wander, cggm and casp; 2.5
# for mm-prompts), resolved by uv's lowest-direct strategy into throwaway environments. Test
# tools are pinned to versions of their time (transformers 4.46 is the last for torch < 2.6).
# Warnings are not errors there: old releases warn about their own code.
OLDEST := .venv-oldest
OLDEST_TOOLS := "pytest==8.3.3" "transformers==4.46.3" "matplotlib==3.8.4" "pillow==10.4.0" "nibabel==5.2.1"
OLDEST_PYTEST := -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
	-W "ignore:Lazy modules are a new feature:UserWarning"

.PHONY: test-oldest
test-oldest: | $(UV) ## The packages' tests on the oldest dependency versions they declare
	rm -rf $(OLDEST)-torch22 $(OLDEST)-torch25
	$(UV) venv -q --python $(PYTHON) $(OLDEST)-torch22
	$(UV) pip install -q --python $(OLDEST)-torch22/bin/python --resolution lowest-direct \
		-e "packages/mmcore[segmentation]" -e packages/wander-adapter -e packages/cggm-balance \
		-e packages/casp-tta $(OLDEST_TOOLS)
	@# mm-prompts (torch >= 2.5) only so that the harness imports; its tests run below
	$(UV) pip install -q --python $(OLDEST)-torch22/bin/python --no-deps -e packages/mm-prompts
	$(OLDEST)-torch22/bin/python -c "import torch; print('torch', torch.__version__)"
	$(OLDEST)-torch22/bin/python $(OLDEST_PYTEST) tests/mmcore tests/wander tests/cggm tests/casp
	$(UV) venv -q --python $(PYTHON) $(OLDEST)-torch25
	$(UV) pip install -q --python $(OLDEST)-torch25/bin/python --resolution lowest-direct \
		-e packages/mmcore -e packages/mm-prompts $(OLDEST_TOOLS)
	$(OLDEST)-torch25/bin/python -c "import torch; print('torch', torch.__version__)"
	$(OLDEST)-torch25/bin/python $(OLDEST_PYTEST) tests/mm_prompts

# The oldest Python the packages declare (requires-python >= 3.10), with the locked versions.
# Not in CI (a fresh machine may have no Python 3.10, and uv downloads none here).
PY310 ?= python3.10

.PHONY: test-py310
test-py310: | $(UV) ## The test suite on Python 3.10, the oldest declared (needs python3.10 on PATH)
	@command -v $(PY310) >/dev/null || { echo "$(PY310) not found: set PY310=/path/to/python3.10"; exit 1; }
	UV_PROJECT_ENVIRONMENT=.venv-py310 $(UV) sync -q --frozen --all-packages --python $(PY310)
	UV_PROJECT_ENVIRONMENT=.venv-py310 $(UV) run --frozen --python $(PY310) pytest -q -p no:cacheprovider

.PHONY: format
format: $(STAMP) ## Format and auto-fix with ruff
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

.PHONY: build
build: | $(UV) ## Build one wheel (and sdist) per package into dist/
	@for p in mmcore wander-adapter cggm-balance casp-tta mm-prompts; do \
		$(UV) build --quiet --package $$p --out-dir dist || exit 1; done
	@ls dist

.PHONY: bench
bench: $(STAMP) ## Run the quick benchmark profile on the embedded data; writes benchmarks/results/<run>/
	$(UV) run --frozen python -m benchmarks run --profile quick

.PHONY: clean
clean: ## Remove build outputs
	rm -rf dist .pytest_cache .ruff_cache .mypy_cache $(OLDEST)-torch22 $(OLDEST)-torch25 .venv-py310
