# Two commands do all the set-up:  `make train`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
# Where pip finds torch's CPU build: empty uses pip's own configuration (on the project's machines, a
# directory of wheels); elsewhere https://download.pytorch.org/whl/cpu, PyTorch's CPU-only index.
TORCH_INDEX ?=
BIN := $(VENV)/bin
RUN_DIR ?= runs/seed-$(shell date +%Y%m%d-%H%M%S)

.PHONY: train test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Train the seed recipe on CIFAR-10 (downloaded into DATA_DIR when missing) and report test accuracy.
train: venv
	$(BIN)/miniresnet train --preset seed --data-dir $(DATA_DIR) --out $(RUN_DIR)

# The test suite, then the linter and the formatter's check. Real-data tests read MINIRESNET_CIFAR10
# and skip without it.
test: venv
	$(BIN)/python -m pytest
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
