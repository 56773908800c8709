# voxq — the two commands that matter: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Every dependency's exact version (all extras, Python 3.11, Linux x86_64): CI, the image and this venv
# install the same releases. `make lock` refreshes it after a change to pyproject.toml's dependencies;
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest allowed release.
CONSTRAINTS := constraints.txt
UV_VERSION := 0.13.9
LOCK_ARGS ?=

.PHONY: install lock demo test test-unit test-integration test-e2e test-chaos test-long lint format bench dev clean fws-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,embedded,local]'
	@touch $(STAMP)

install: $(STAMP)

## The real third-party server of the e2e tier (faster-whisper-server, tests/third_party.py) in its own
## venv, cached in .venv-fws; the test installs it itself when missing.
FWS_VENV ?= .venv-fws
FWS_VERSION := 0.0.3
fws-venv: $(FWS_VENV)/.installed-faster-whisper-server-$(FWS_VERSION)
$(FWS_VENV)/.installed-faster-whisper-server-$(FWS_VERSION):
	@test -x $(FWS_VENV)/bin/python || $(PYTHON) -m venv $(FWS_VENV)
	$(FWS_VENV)/bin/python -m pip install --quiet 'faster-whisper-server==$(FWS_VERSION)'
	@touch $@

## Re-resolve constraints.txt from pyproject.toml (keeps existing pins that still fit).
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv==$(UV_VERSION)'
	$(PY) -m uv pip compile pyproject.toml --extra dev --extra embedded --extra local \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command 'make lock' --quiet $(LOCK_ARGS) -o $(CONSTRAINTS)

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

## The lifecycle property test with many more examples and steps than `make test` runs (tens of minutes).
PROPERTY_EXAMPLES ?= 60
PROPERTY_STEPS ?= 60
test-long: $(STAMP)
	VOXQ_PROPERTY_EXAMPLES=$(PROPERTY_EXAMPLES) VOXQ_PROPERTY_STEPS=$(PROPERTY_STEPS) \
		$(PY) -m pytest tests/integration/test_lifecycle_property.py -k state_machine $(PYTEST_ARGS)

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
