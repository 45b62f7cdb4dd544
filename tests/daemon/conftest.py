"""Real aegisd processes on real sockets under short temporary directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis_cli.client import Client, DaemonNotRunning
from aegisd.store import KdfParams, create_profile

FAST_KDF = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
FAST_KDF_ARGS = ["--kdf-memory-kib", "1024", "--kdf-time-cost", "1", "--kdf-parallelism", "1"]
PASSPHRASE = "tr0ub4dor & 3"  # strong enough for the rule (aegisd/passphrase_strength.py)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (sockets are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ae", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class DaemonProc:
    def __init__(self, home: Path, extra: list[str], env: dict[str, str] | None) -> None:
        self.home = home
        self.sock = home / "aegisd.sock"
        self._err: str | None = None
        argv = [sys.executable, "-m", "aegisd.main", "run", "--home", str(home), *extra]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        # Read as it comes: a daemon whose log passes the pipe's 64 KiB before the test reads it
        # would block on its next line (at its stop, say) and be killed as hung.
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            self._chunks.append(chunk)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"aegisd exited: {self.stderr()}")
            try:
                with Client(self.sock, timeout=5) as c:
                    c.call("version")
                return
            except (DaemonNotRunning, OSError):
                time.sleep(0.02)
        raise AssertionError("aegisd did not start")

    def client(self, timeout: float | None = 20) -> Client:
        return Client(self.sock, timeout=timeout)

    def stderr(self) -> str:
        """What aegisd wrote to stderr, once it has exited."""
        if self.proc.poll() is None:
            return ""
        if self._err is None:
            self._reader.join(10)
            self._err = b"".join(self._chunks).decode(errors="replace")
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return self._err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)  # a clean stop, whose log the tests read, even under load
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def spawn(short_tmp: Path) -> Iterator[object]:
    """spawn(home=None, passphrase=PASSPHRASE | None, extra=[], create=True) -> DaemonProc."""
    procs: list[DaemonProc] = []

    def _spawn(
        home: Path | None = None,
        passphrase: str | None = PASSPHRASE,
        extra: list[str] | None = None,
        create: bool = True,
        ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> DaemonProc:
        home = home or short_tmp / "h"
        if create and not (home / "keyring.json").exists():
            create_profile(home, passphrase, FAST_KDF).close()
        d = DaemonProc(home, ["--test-methods", *(extra or [])], env)
        procs.append(d)
        if ready:
            d.wait_ready()
        return d

    try:
        yield _spawn
    finally:
        for d in procs:
            d.kill()
            d.stderr()


@pytest.fixture
def cli_env(short_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AEGIS_HOME", None)
    return env
