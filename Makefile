# Two commands do everything, each setting itself up first:
#   make demo   fine-tune SmolLM2-135M-Instruct on the shipped task (CPU, a few minutes) and compare with the base
#   make test   the test suite (unit tests on tiny random models, plus end-to-end tests on the real model)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast setup clean

$(BIN)/tunesmith: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/tunesmith

setup: $(BIN)/tunesmith

demo: setup
	$(BIN)/python -m tunesmith.demo.run

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

clean:
	rm -rf runs/demo .pytest_cache
