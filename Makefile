# Two commands on a fresh machine: `make demo` (the method end to end on Fashion-MNIST, CPU)
# and `make test` (the whole suite). Both create .venv and install the project first.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test bench gpu-check fashion-mnist

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The method end to end on Fashion-MNIST on the CPU (docs/demo.md); SEED=1 make demo for another seed.
DEMO ?= runs/demo
SEED ?= 0
demo: $(BIN)/.installed fashion-mnist
	rm -rf $(DEMO)
	$(BIN)/mealv2 demo --out $(DEMO) --seed $(SEED)

test: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python -m bench --quick

# On a GPU machine, with that machine's python and the packages already there (no venv, no network, mealv2 not
# installed): the GPU check's tier (1: without DALI, 2: with it), as docs/benchmarks.md sequences them.
GPU_CHECK ?= runs/gpu-check
TIER ?= 1
gpu-check:
	$(PYTHON) -m bench.gpu_check --out $(GPU_CHECK) --device cuda --tier $(TIER)
