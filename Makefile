# Local set-up on a CPU machine: CPU torch pinned (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-fast lint demo clean

$(BIN)/eep: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(BIN)/eep

setup: $(BIN)/eep

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check eep tests bench

demo: setup
	$(BIN)/eep demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
