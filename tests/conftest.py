"""Fixtures for the whole suite: the private Tor network on loopback (tests/tornet.py), and
one PostgreSQL server (tests/relay/postgres.py) for the relay's tests and the daemons' tests
through relay nodes on it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relay.postgres import PostgresServer
from tests.tornet import TorNetwork, TorNetworkError, missing_programs


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Started by the first test that asks for it; `new_database()` gives each test its own."""
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.fail(f"PostgreSQL is not installed: {exc} (make system-deps, as root)")
    yield server
    server.close()


@pytest.fixture(scope="session")
def tor_network() -> Iterator[TorNetwork]:
    """Three authorities, an exit, a middle relay and an onion host, shared by the session.

    Started by the first test that asks for it (about 20 s: that test's time includes it) and
    stopped when the session ends. See TorNetwork for what it offers (exit_ports, onion_port,
    onion_hostname, exit_pid, hs_pid, client_torrc_lines()). Skipped only where tor is missing
    and we are not root; as root (CI, where `make test` installs it) a missing tor fails.
    """
    missing = missing_programs()
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed (Debian package tor): "
            "run `make system-deps` as root, or apt-get install tor"
        )
        if os.geteuid() != 0:
            pytest.skip(reason)
        pytest.fail(reason, pytrace=False)
    # Under /tmp with a short name: the nodes' control sockets live in it (107-byte limit).
    base = Path(tempfile.mkdtemp(prefix="tornet-", dir="/tmp"))
    net = TorNetwork(base)
    try:
        net.start()
    except TorNetworkError as e:
        raise TorNetworkError(f"{e}\n(the nodes' logs are kept in {base})") from None
    try:
        yield net
    finally:
        net.stop()
        shutil.rmtree(base, ignore_errors=True)
