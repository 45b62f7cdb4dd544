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

# Serial on purpose. pytest-xdist (-n 2) is not switched on until shown safe: each worker
# would start its own session fixtures (tests/conftest.py: the Tor network, PostgreSQL; the
# calls' PulseAudio), which is right, but tests/tornet.py takes random ports it checked free
# (20000-32000) and coturn a UDP port bound then released (calls_support.py), both racy across
# workers; every coturn relays on 49152-65535; and the tests' quiet waits ("nothing more within
# 2 s") were tuned for one test at a time on the machine.
unit: $(VENV)/.installed-test
	$(PY) -m pytest -q --durations=30

# Debian packages some tests need, installed when running as root (CI is); elsewhere those
# tests say they were skipped and why, or fail saying what to install:
#   dbus (dbus-daemon): aegis-bridge's tests start a real D-Bus session bus;
#   coturn (turnserver): the calls tests' TURN server, started by the tests on 127.0.0.1;
#   tor (tor, tor-gencert): the private Tor network on loopback (tests/tornet.py) and the
#     daemons' managed Tor; obfs4proxy: the obfs4 bridge lines given to that Tor;
#   libportaudio2: the daemon's microphone and speaker in calls (PortAudio, through the Python
#     package sounddevice); libasound2-plugins: ALSA's pulse plugin, PortAudio's way to
#     PulseAudio / PipeWire; pulseaudio, pulseaudio-utils (pactl, parec): the calls tests start
#     their own PulseAudio with virtual microphones and speakers (no sound card needed);
#   postgresql (initdb, postgres under /usr/lib/postgresql/*/bin): the relay's tests on
#     PostgreSQL start their own server on 127.0.0.1 (as `nobody` when run as root; the
#     package's cluster service is kept from starting by policy-rc.d below); haproxy: the load
#     balancer in front of several relay nodes in those tests.
# One apt-get for whatever is missing, under a temporary policy-rc.d (exit 101: "action
# forbidden") that keeps the packages' postinst scripts from starting system-wide services
# (Debian's tor enables and starts tor.service; coturn, dbus and pulseaudio come with services
# too); it is removed again, even if the install fails or is interrupted (only if we created it).
system-deps:
	@missing=""; \
	command -v dbus-daemon >/dev/null || missing="$$missing dbus"; \
	command -v turnserver >/dev/null || missing="$$missing coturn"; \
	{ command -v tor && command -v tor-gencert; } >/dev/null || missing="$$missing tor"; \
	command -v obfs4proxy >/dev/null || missing="$$missing obfs4proxy"; \
	ldconfig -p | grep -q 'libportaudio\.so\.2 ' || missing="$$missing libportaudio2"; \
	ls /usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so >/dev/null 2>&1 || \
		missing="$$missing libasound2-plugins"; \
	command -v pulseaudio >/dev/null || missing="$$missing pulseaudio"; \
	{ command -v pactl && command -v parec; } >/dev/null || missing="$$missing pulseaudio-utils"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || missing="$$missing nginx"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ "$$(id -u)" = 0 ] && [ -n "$$missing" ]; then \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			trap 'rm -f /usr/sbin/policy-rc.d' EXIT; trap 'exit 130' INT TERM; \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && \
			chmod 755 /usr/sbin/policy-rc.d; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: system-deps lint typecheck unit

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/protocol.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
