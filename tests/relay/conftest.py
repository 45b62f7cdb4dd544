"""Fixtures: the relay as a real subprocess on an ephemeral 127.0.0.1 port.

Its storage backend is SQLite unless a test is marked `both_backends`: then it runs once on
SQLite and once on a PostgreSQL database of its own (one server per session, tests/relay/
postgres.py; its fixture `postgres_server` is in tests/conftest.py, shared with the functional
tests). Every test of storage through a relay (a process, or an app in-process) is so
marked; the multi-node, load balancer and PostgreSQL-metadata tests run on PostgreSQL only.
Left on SQLite, and why:

* about SQLite itself: test_disk_full (--max-db-bytes is SQLite's page count; a small tmpfs
  under its file; its --disk-reserve file), test_checkpointer (its WAL file), test_no_order,
  test_mailbox_expiry and test_storage_price's schema test (its file format, schema upgrades
  and query plans; test_storage_pg.py checks the same properties on PostgreSQL),
  test_writer_fairness and test_dropped_connection's pending test (its writer thread),
  test_cache_write_in_flight's eviction test (an in-memory cache, no storage);
* test_fetch_bound's `busy` test: it needs the last of four pipelined FETCHes handled before
  the first ones' blocks drain into the kernel; on PostgreSQL each FETCH's read is a round trip
  to the server, the output drains meanwhile, and the last FETCH finds room (in about half of
  the runs on this loaded machine it answered `OK 1` or `OK 2` on all 12 fresh connections:
  never `OK 0`, the property tested, but never `busy` either). The code it tests
  (handlers.h_fetch) is the same on both backends;
* no storage at all: connections, handshakes and frames before any mailbox (test_connections,
  test_gate, test_turnstile, test_client_connect, test_bad_input's frame, timeout and
  connection-cap tests), the help text and documents (test_lifecycle), --host/--port.

The test binds and listens on the socket itself and hands it to the relay (`--listen-fd`), so
the port is known without the relay printing it, and a restarted relay (after kill -9) serves the
very same port.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

FAST = {  # cheap proofs of work, so tests stay fast
    "--pow-deposit-bits": "8",
    "--pow-bundle-bits": "8",
    "--pow-blob-bits": "8",
    "--pow-create-bits": "8",
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class RelayProcess:
    def __init__(self, tmp: Path, options: dict[str, str]) -> None:
        self.data = tmp / "data"
        self.log_path = tmp / "relay-output.log"
        self.options = {**FAST, **options}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/ws"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "relay.main", "--listen-fd", str(self.sock.fileno()),
                "--data", str(self.data)]
        for k, v in self.options.items():
            args += [k, v]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     pass_fds=(self.sock.fileno(),))
        log.close()
        self._wait_started()

    def _started_count(self) -> int:
        return self.output().count("relay started")

    def _wait_started(self) -> None:
        want = self._starts = getattr(self, "_starts", 0) + 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._started_count() >= want:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("relay exited:\n" + self.output())
            time.sleep(0.02)
        raise RuntimeError("relay did not start:\n" + self.output())

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "both_backends"):
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest) -> str:
    """The relay's --store: "" (SQLite) or a fresh PostgreSQL database of this test."""
    if backend == "sqlite":
        return ""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def relay_factory(tmp_path: Path, store: str) -> Iterator[Callable[..., RelayProcess]]:
    made: list[RelayProcess] = []

    def make(**options: str) -> RelayProcess:
        sub = tmp_path / f"relay{len(made)}"
        sub.mkdir()
        if store:
            options = {"store": store, **options}
        rp = RelayProcess(sub, {"--" + k.replace("_", "-"): str(v) for k, v in options.items()})
        made.append(rp)
        rp.start()
        return rp

    yield make
    for rp in made:
        rp.close()


@pytest.fixture
def relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory()
