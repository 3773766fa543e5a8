# Two commands on a fresh machine: `make demo` (the method end to end on Fashion-MNIST, CPU)
# and `make test` (the whole suite). Both create .venv and install the project first.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test bench fashion-mnist

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

# Until `mealv2 demo` lands (issue 5), the demo is this chain of the real commands on a
# Fashion-MNIST subset: two teachers, their cached ensemble, a hard-label baseline and
# the distilled student, all at 32 px on the CPU (about two minutes).
DEMO ?= runs/demo
FIT = --init scratch --epochs 3 --lr 0.1 --lr-steps 2 --batch-size 64 --res 32 --no-progress
demo: $(BIN)/.installed fashion-mnist
	rm -rf $(DEMO)
	$(BIN)/mealv2 data fashion-mnist --out $(DEMO)/data --limit-train 2000 --limit-val 500
	$(BIN)/mealv2 train --data $(DEMO)/data --model resnet10t --out $(DEMO)/teacher-a $(FIT)
	$(BIN)/mealv2 train --data $(DEMO)/data --model resnet18 --out $(DEMO)/teacher-b $(FIT)
	$(BIN)/mealv2 cache-teachers --data $(DEMO)/data --store $(DEMO)/labels.zarr --res 32 --seeds 2 \
		--teachers resnet10t=$(DEMO)/teacher-a/model.safetensors,resnet18=$(DEMO)/teacher-b/model.safetensors
	$(BIN)/mealv2 train --data $(DEMO)/data --model mobilenetv3_small_050 --out $(DEMO)/baseline $(FIT)
	$(BIN)/mealv2 distill --data $(DEMO)/data --labels $(DEMO)/labels.zarr --student mobilenetv3_small_050 \
		--out $(DEMO)/distilled $(FIT)
	$(BIN)/mealv2 labels info $(DEMO)/labels.zarr

test: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python -m bench --quick
