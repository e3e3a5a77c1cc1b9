PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt

.PHONY: install install-test test test-fast demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) --quiet -e .

install-test: $(BIN)/python
	$(PIP) --quiet -e '.[test]'

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -m "not assets and not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/transferkit demo

bench: install-test
	$(BIN)/python benchmarks/features_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
