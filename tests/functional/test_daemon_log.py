"""The daemon's log (issue 14, item 10): every line carries its UTC time, to the second, and
every line is a life-cycle event (start, unlock, relay connected/lost, Tor, lock, stop) or an
aggregate: a conversation adds no line, since with timestamps a line per message would make
the log a diary of who wrote when. And no shutdown leaves a task pending ("Task was destroyed
but it is pending!")."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aegis_cli.client import Client
from tests.daemon.conftest import DaemonProc
from tests.functional.conftest import Peer, connect

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ aegisd: (INFO|WARNING|ERROR) (.*)$")
#: What the log may say (life cycle); anything else is a new kind of line to look at.
LIFE_CYCLE = re.compile(
    r"^(listening on \S+( \(inherited\))? \((un)?locked\)|unlocked|locked|new identity created"
    r"|(old )?relay connected|(old )?relay connection lost: .+|(old )?relay connection closed"
    r"|cannot reach the (old )?relay: .+"
    r"|another connection took over this profile's mailboxes at the (old )?relay: .+"
    r"|network settings changed \(mode \w+\)|relay changed|relay move finished"
    r"|managed Tor: \w+|stopping|stopped"
    r"|since the unlock \(counted, not logged one by one\): .*)$"
)
BAD = ("Task was destroyed", "Traceback", "was never retrieved", "coroutine ")


def check_log(text: str) -> list[str]:
    """The log's messages; every line timestamped, life-cycle, and free of shutdown noise."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        assert m, f"a line without a timestamp or of another shape: {line!r} in:\n{text}"
        assert LIFE_CYCLE.match(m.group(2)), f"not a life-cycle line: {line!r} in:\n{text}"
        out.append(m.group(2))
    for bad in BAD:
        assert bad not in text, text
    return out


def test_a_conversation_adds_no_log_line(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    for i in range(5):
        alice.call("messages.send", {"contact": "bob", "text": f"secret diary entry {i}"})
        bob.call("messages.send", {"contact": "alice", "text": f"an answer {i}"})
    bob.wait_for(
        lambda: len([m for m in bob.call("messages.history", {"contact": "alice"})["messages"]
                     if m["direction"] == "in"]) == 5,
        "alice's five messages",
    )  # fmt: skip
    for p in (alice, bob):
        p.stop()
        assert p.proc is not None
        text = p.proc.stderr()
        lines = check_log(text)
        for word in ("alice", "bob", "diary", "answer", "secret"):
            assert word not in text.replace(str(p.home), "HOME").lower()
        # The conversation (an invitation, ten messages, receipts) added no line at all: only
        # the life cycle (a relay reconnect under load aside).
        assert [ln for ln in lines if not ln.startswith("relay c")] == [
            "new identity created", "unlocked", f"listening on {p.home}/aegisd.sock (unlocked)",
            "stopping", "locked", "stopped",
        ]  # fmt: skip
        assert_one_line_per_connection(lines)


def assert_one_line_per_connection(lines: list[str], connections: int | None = None) -> None:
    """Exactly one "relay connected" per connection established, and one "relay connection
    lost: ..." or "relay connection closed" per connection that ended, alternating (never the
    same state twice in a row)."""
    states = [ln for ln in lines if ln in ("relay connected", "relay connection closed")
              or ln.startswith("relay connection lost: ")]  # fmt: skip
    assert states, lines
    for i, ln in enumerate(states):
        assert (ln == "relay connected") == (i % 2 == 0), f"the state twice in a row: {lines}"
    if connections is not None:
        assert states.count("relay connected") == connections, lines


def test_a_relay_outage_logs_one_lost_and_one_connected_line(
    peers: Callable[[str], Peer], relay_proc
) -> None:
    """Stop and restart the relay: the daemon logs the loss once and the new connection once
    (the link and the daemon both used to log "relay connected"), without any address."""
    alice = peers("alice")
    alice.wait_connected()
    relay_proc.terminate()
    alice.wait_for(lambda: not alice.call("status")["relay"]["connected"], "the outage")
    relay_proc.start()  # on the same (inherited) listening socket: the same URL
    alice.wait_connected()
    alice.stop()
    assert alice.proc is not None
    text = alice.proc.stderr()
    lines = check_log(text)
    assert_one_line_per_connection(lines, connections=2)
    lost = [ln for ln in lines if ln.startswith("relay connection lost: ")]
    assert lost == ["relay connection lost: the relay closed the connection"], lines
    assert "127.0.0.1" not in text and "ws://" not in text


def _init(home: Path, url: str, passphrase_file: Path | None) -> None:
    auth = ["--passphrase-file", str(passphrase_file)] if passphrase_file else ["--no-passphrase"]
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home), *auth,
         "--relay", url, "--kdf-memory-kib", "1024", "--kdf-time-cost", "1",
         "--kdf-parallelism", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_no_task_is_left_pending_when_the_daemon_stops_in_a_busy_state(
    tmp_short: Path, relay_proc
) -> None:
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with socket.socket() as s:  # a port nothing listens on: the link keeps connecting
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}/v1/ws"
    pw = tmp_short / "pw"
    pw.write_text("velvet orbit lantern zebra\n")
    cases = [("connected", url, None), ("connecting", dead, None), ("locking", url, pw)]
    for name, relay, passphrase in cases:
        home = tmp_short / name
        _init(home, relay, passphrase)
        extra = ["--passphrase-file", str(passphrase)] if passphrase else []
        d = DaemonProc(home, extra, None)
        d.wait_ready()
        with Client(d.sock, timeout=20) as c:
            if relay == url:
                deadline = time.monotonic() + 30
                while not c.call("status")["relay"]["connected"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            if passphrase:  # lock and unlock a few times: each lock stops the relay link
                for _ in range(4):
                    c.call("lock")
                    c.call("unlock", {"passphrase": passphrase.read_text().strip()})
                    deadline = time.monotonic() + 30
                    while not c.call("status")["relay"]["connected"]:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        lines = check_log(d.stderr())
        assert lines[-1] == "stopped"
