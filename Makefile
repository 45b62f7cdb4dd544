# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "AegisLink needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aegisd.demo

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

# Every top-level package that exists (mypy refuses a path that is missing).
typecheck: $(VENV)/.installed-test
	$(PY) -m mypy $(wildcard aegisd aegis_cli aegis_bridge relay bench)

unit: $(VENV)/.installed-test
	$(PY) -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/protocol.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
