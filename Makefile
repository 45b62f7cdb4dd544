# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit bench clean system-deps

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
	$(PY) -m mypy $(wildcard aegisd aegis_cli aegis_client aegis_bridge relay bench contrib/*.py)

unit: $(VENV)/.installed-test
	$(PY) -m pytest -q

# Debian packages some tests need (aegis-bridge's: a real D-Bus session bus). Installed when
# running as root (CI is); elsewhere those tests say they were skipped and why.
# coturn (turnserver): the calls tests' TURN server, started by the tests on 127.0.0.1. A
# temporary policy-rc.d (exit 101: "action forbidden") keeps its postinst from starting a
# system-wide coturn service (Debian's /etc/default/coturn also leaves it disabled); it is
# removed again, even if the install fails or is interrupted (only if we created it).
system-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v dbus-daemon >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends dbus; \
	fi
	@if [ "$$(id -u)" = 0 ] && ! command -v turnserver >/dev/null; then \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			trap 'rm -f /usr/sbin/policy-rc.d' EXIT; trap 'exit 130' INT TERM; \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && \
			chmod 755 /usr/sbin/policy-rc.d; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends coturn; \
	fi

test: system-deps lint typecheck unit

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/protocol.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
