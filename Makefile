# The two commands (README): `make up` runs the whole service, `make test` runs the tests.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install up test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

up: install
	$(VENV)/bin/visionloop up

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy

bench: install
	$(PY) -m benchmarks.run_all
