"""A real relay process and real aegisd processes with real SQLCipher profiles, on loopback."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegisd.main import main as aegisd_main
from tests.daemon.conftest import DaemonProc
from tests.relay.conftest import RelayProcess

from .sound_server import PulseAudio, pulseaudio

T_READY = 30.0
# A contact's session with a newly listed device: its opening is retried 1, 2, 5, 15 and 60 s
# after a bundle the device has not published yet (services/fanout.py OPEN_RETRIES), so on a
# loaded machine it may come only after the 60 s retry.
T_DEVICE = 120.0


def init_profile(home: Path, relay_url: str) -> None:
    """What `aegis init --home HOME --no-passphrase --relay URL` does, without its two
    interpreters: the CLI only checks its options and runs `aegisd init` (aegisd/main.py),
    which this calls in-process, the very same code. About 0.4 s less per peer (hundreds of
    peers in the suite); the CLI's own init is tested in tests/daemon/test_cli.py."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = aegisd_main(["init", "--home", str(home), "--no-passphrase", "--relay", relay_url])
    assert rc == 0, err.getvalue()


class Peer:
    """One profile: its home, its daemon process and a JSON-RPC client to it."""

    def __init__(self, home: Path, relay_url: str, name: str) -> None:
        self.home = home
        self.name = name
        init_profile(home, relay_url)
        self.proc: DaemonProc | None = None
        self.start()
        self.call("identity.set_name", {"display_name": name})

    def start(self) -> None:
        self.proc = DaemonProc(self.home, [], None)
        self.proc.wait_ready()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        assert self.proc is not None
        with self.proc.client() as c:
            return c.call(method, params)

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = T_READY) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: timed out waiting for {what}")

    def wait_connected(self) -> None:
        self.wait_for(lambda: self.call("status")["relay"]["connected"], "the relay")

    def live(self, types: list[str]) -> LiveEvents:
        """A subscription from now on, read by a thread: what a connected client is sent,
        live events (contact.typing, never stored: not in ``events``) included."""
        assert self.proc is not None
        return LiveEvents(self.proc.client(timeout=None), types)

    def events(self, since: int = 0, types: list[str] | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call(
            "events.list", {"since": since, "limit": 1000, "types": types}
        )["events"]
        return out


class LiveEvents:
    """One ``events.subscribe`` on its own connection; ``got`` is every event's params, in
    the order sent. It ends when the daemon closes the connection."""

    def __init__(self, client: Any, types: list[str]) -> None:
        self.client = client
        self.got: list[dict[str, Any]] = []
        client.call("events.subscribe", {"types": types})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for note in self.client.notifications():
                params = note.get("params")
                if note.get("method") == "event" and isinstance(params, dict):
                    self.got.append(params)
        except (OSError, ValueError):
            pass  # the daemon went away

    def data(self) -> list[dict[str, Any]]:
        return [e["data"] for e in list(self.got)]


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="af", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# The call tests' microphones: each person's is a sine source of their own frequency.
TONES = {"alice": 440.0, "bob": 660.0, "carol": 880.0}


@pytest.fixture(scope="session")
def sound() -> Iterator[PulseAudio]:
    """One real PulseAudio for the session (no sound card needed), in a short temporary
    directory (its socket path must fit a sockaddr_un); daemons reach it through
    ``sound.daemon_env(name)``."""
    tmp = Path(tempfile.mkdtemp(prefix="pa", dir="/tmp"))
    try:
        with pulseaudio(tmp, TONES) as server:
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def relay_proc(tmp_short: Path) -> Iterator[RelayProcess]:
    sub = tmp_short / "relay"
    sub.mkdir()
    rp = RelayProcess(sub, {})
    rp.start()
    try:
        yield rp
    finally:
        rp.close()


@pytest.fixture
def peers(tmp_short: Path, relay_proc: RelayProcess) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"

    def make(name: str) -> Peer:
        p = Peer(tmp_short / name, url, name)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.stop()


def connect(alice: Peer, bob: Peer) -> None:
    """Bob invites, Alice uses the invitation; both end up with an established contact."""
    alice.wait_connected()
    bob.wait_connected()
    link = bob.call("invitations.create")["link"]
    alice.call("contacts.add", {"name": bob.name, "link": link})
    bob.wait_for(
        lambda: [c for c in bob.call("contacts.list")["contacts"] if c["established"]],
        "the invitation to be used",
    )
    alice.wait_for(lambda: alice.call("contacts.list")["contacts"][0]["established"], "the answer")
