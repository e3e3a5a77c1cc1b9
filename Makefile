PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt

.PHONY: install install-test system-deps test test-fast demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) --quiet -e .

install-test: $(BIN)/python
	$(PIP) --quiet -e '.[test]'

# Optional: headless Chromium for the report screenshot test (skipped when absent).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "note: chromium not installed; the report screenshot test will be skipped"

test: install-test system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -m "not assets and not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/transferkit demo

bench: install-test
	$(BIN)/python benchmarks/features_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
