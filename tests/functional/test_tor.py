"""Two daemons in mode tor, each with its own managed Tor, on the private Tor network (issue 12).

One relay process, reached two ways: alice's relay URL is ws://127.0.0.1:EXIT_PORT/v1/ws (the
exit connects to it), bob's is the onion service's ws://NAME.onion/v1/ws (the onion host
connects to it). A recorder in front of each path notes which process opened every connection
(tests/recorder.py): the exit's Tor, the onion host's Tor, never a daemon. Alice deposits to
her contact's mailbox and subscribes to her own through the exit; bob through the onion
service; so texts, receipts and a file cross both paths.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import Client
from tests.daemon.conftest import DaemonProc
from tests.recorder import Recorder, process_endpoints
from tests.relay.conftest import RelayProcess
from tests.support.procs import child, tor_control
from tests.tornet import TorNetwork

T = 90.0
IDLE_TIMEOUT = 3  # the relay closes silent connections without a subscription after this


def wait_for(pred: Callable[[], Any], what: str, timeout: float = T) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class TorPeer:
    name: str
    home: Path
    proc: DaemonProc

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.home / "aegisd.sock", timeout=60) as c:
            return c.call(method, params)

    def tor_pid(self) -> int | None:
        return child(self.proc.proc.pid, "tor")

    def control(self, line: str) -> list[str]:
        return tor_control(self.home, line)

    def relay_streams(self, target: str) -> list[tuple[str, str]]:
        """(stream id, circuit id) of the open streams to `target` (HOST:PORT)."""
        text = self.control("GETINFO stream-status")[0].split("\n", 1)[-1]
        out = []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 4 and f[1] == "SUCCEEDED" and f[3] == target:
                out.append((f[0], f[2]))
        return out

    def socks_usernames(self) -> dict[str, str]:
        """Circuit id -> the SOCKS username it was built for."""
        text = self.control("GETINFO circuit-status")[0].split("\n", 1)[-1]
        out = {}
        for line in text.splitlines():
            for word in line.split():
                if word.startswith("SOCKS_USERNAME="):
                    out[line.split()[0]] = word.split("=", 1)[1].strip('"')
        return out


class StreamWatch:
    """Every stream a daemon's Tor opens (STREAM events on its control socket, in a thread):
    which circuit carried each connection to the relay."""

    def __init__(self, peer: TorPeer, *targets: str) -> None:
        import asyncio
        import threading

        self.targets = targets
        self.streams: dict[str, str] = {}  # stream id -> circuit id
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def watch() -> None:
            from aegisd.transport.torcontrol import TorControl

            c = await TorControl.connect(peer.home / "tor" / "control")
            await c.authenticate()
            c.on_event = self._on_event
            await c.checked("SETEVENTS STREAM")
            ready.set()
            await c.closed.wait()

        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(watch(),), daemon=True
        )
        self._thread.start()
        assert ready.wait(30)

    def _on_event(self, text: str) -> None:
        f = text.split()  # STREAM <id> <status> <circuit> <target> ...
        if len(f) >= 5 and f[0] == "STREAM" and f[2] == "SUCCEEDED" and f[4] in self.targets:
            self.streams[f[1]] = f[3]


class DirectWatch:
    """Samples a daemon's TCP sockets every 50 ms in a thread: each peer they connect to must
    be a listening socket of a process named tor (its managed Tor's SOCKS port)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peers: dict[tuple[str, int], str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tests.recorder import inode_owner, program, sockets

        while not self._stop.wait(0.05):
            for proto, _local, remote in process_endpoints(self.pid):
                if proto != "tcp" or remote[1] == 0 or remote in self.peers:
                    continue
                listener = [i for lo, _r, st, i in sockets("tcp") if lo == remote and st == "0A"]
                owner = inode_owner(listener[0]) if listener else None
                self.peers[remote] = program(owner) if owner else None

    def stop(self) -> dict[tuple[str, int], str | None]:
        self._stop.set()
        self._thread.join(5)
        return self.peers


@dataclass
class Setup:
    net: TorNetwork
    relay: RelayProcess
    via_exit: Recorder
    via_onion: Recorder
    alice: TorPeer
    bob: TorPeer
    exit_target: str
    onion_target: str
    tmp: Path
    direct: list[DirectWatch]


def _aegis(home: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", *args, "--home", str(home)],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def setup(tor_network: TorNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="at", dir="/tmp"))  # short: sockets live in it
    net = tor_network
    (tmp / "relay").mkdir()
    relay = RelayProcess(tmp / "relay", {"--idle-timeout": str(IDLE_TIMEOUT)})
    relay.start()
    exit_port = net.exit_ports[1]
    via_exit = Recorder(exit_port, relay.port).start()
    via_onion = Recorder(net.onion_port, relay.port).start()
    torrc = tmp / "testnet.torrc"
    torrc.write_text("\n".join(net.client_torrc_lines()) + "\n")
    env = {**os.environ, "AEGISD_TOR_EXTRA_TORRC": str(torrc)}
    peers = []
    for name, url, extra in (
        ("alice", f"ws://127.0.0.1:{exit_port}/v1/ws", ["--tor"]),  # loopback: tor by choice
        ("bob", f"ws://{net.onion_hostname}/v1/ws", []),  # an onion relay: tor by default
    ):
        home = tmp / name
        _aegis(home, "init", "--no-passphrase", "--relay", url, *extra)
        proc = DaemonProc(home, ["--test-methods"], env)
        proc.wait_ready()
        peer = TorPeer(name, home, proc)
        peer.call("privacy.set", {"level": "off"})  # Tor here, not cover (test_cover.py)
        if peers:  # alice's relay stands for a public one, but its exit port is on loopback:
            # bob trusts it, or the policy for relays chosen by others refuses her mailboxes
            peer.call("network.set", {"trusted_relays": [f"ws://127.0.0.1:{exit_port}/v1/ws"]})
        peers.append(peer)
    watches = [DirectWatch(p.proc.proc.pid) for p in peers]
    s = Setup(net, relay, via_exit, via_onion, peers[0], peers[1],
              f"127.0.0.1:{exit_port}", f"{net.onion_hostname}:80", tmp, watches)  # fmt: skip
    try:
        yield s
        # Over the whole module: every peer a daemon's socket ever reached was a Tor.
        for w in watches:
            peers_seen = w.stop()
            assert peers_seen, "no socket sampled"
            assert set(peers_seen.values()) == {"tor"}, peers_seen
    finally:
        for p in peers:
            p.proc.stop()
        via_exit.stop()
        via_onion.stop()
        relay.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _only_tor_reached_the_relay(s: Setup) -> None:
    """Every connection to the relay came from the exit's or the onion host's Tor."""
    daemons = {s.alice.proc.proc.pid, s.bob.proc.proc.pid}
    exit_pids = {c.pid for c in s.via_exit.connections}
    onion_pids = {c.pid for c in s.via_onion.connections}
    assert exit_pids == {s.net.exit_pid}, (exit_pids, s.net.exit_pid)
    assert onion_pids == {s.net.hs_pid}, (onion_pids, s.net.hs_pid)
    trap = [c for r in (s.via_exit, s.via_onion) for c in r.connections if c.pid in daemons]
    assert trap == []


def _daemon_talks_only_to_its_tor(peer: TorPeer) -> None:
    """The daemon's own TCP sockets all lead to its Tor's SOCKS port (or none, while Tor is
    down): it never opens a connection to a relay, or anything else, itself."""
    pid = peer.proc.proc.pid
    tor = peer.tor_pid()
    tor_ports = {local[1] for proto, local, _ in process_endpoints(tor)} if tor else set()
    for proto, _local, remote in process_endpoints(pid):
        assert proto == "tcp" or remote == ("0.0.0.0", 0), (proto, remote)
        if proto == "tcp" and remote[1] != 0:
            assert remote[0] == "127.0.0.1" and remote[1] in tor_ports, (remote, tor_ports)


def test_messages_receipts_and_a_file_through_the_exit_and_the_onion(setup: Setup) -> None:
    s = setup
    alice, bob = s.alice, s.bob
    for p in (alice, bob):
        wait_for(lambda p=p: p.call("status")["relay"]["connected"], f"{p.name}: the relay")
        assert p.call("status")["network"]["tor"]["state"] == "ready"
        boot = [e["data"]["progress"] for e in
                p.call("events.list", {"types": ["tor.bootstrap"]})["events"]]  # fmt: skip
        assert boot and boot[-1] == 100 and min(boot) < 100, boot  # progress arrived as events
    # From here on, every connection of alice's: her own relay's URL goes through the exit,
    # bob's mailboxes (where her deposits go) are at his, the onion service.
    watch = StreamWatch(alice, s.exit_target, s.onion_target)
    alice.call("identity.set_name", {"display_name": "alice"})
    link = bob.call("invitations.create")["link"]
    alice.call("contacts.add", {"name": "bob", "link": link})
    wait_for(lambda: alice.call("contacts.list")["contacts"][0]["established"], "the answer")
    wait_for(lambda: bob.call("contacts.list")["contacts"], "the contact at bob")
    # A text each way, with delivery and read receipts.
    mid = alice.call("messages.send", {"contact": "bob", "text": "hello over the exit"})
    mid = mid["message_id"]
    got = wait_for(lambda: bob.call("messages.history", {"contact": "alice"})["messages"],
                   "alice's text at bob")  # fmt: skip
    assert got[-1]["text"] == "hello over the exit"
    bob.call("messages.mark_read", {"contact": "alice"})
    bob.call("messages.send", {"contact": "alice", "text": "hello over the onion"})
    wait_for(lambda: any(m["text"] == "hello over the onion" for m in
                         alice.call("messages.history", {"contact": "bob"})["messages"]),
             "bob's text at alice")  # fmt: skip
    wait_for(lambda: any(m["message_id"] == mid and m["status"] == "read" for m in
                         alice.call("messages.history", {"contact": "bob"})["messages"]),
             "the read receipt")  # fmt: skip
    # A file: alice uploads through the exit, bob downloads through the onion service.
    data = os.urandom(150_000)
    src = s.tmp / "report.bin"
    src.write_bytes(data)
    att = alice.call("attachments.send", {"contact": "bob", "path": str(src)})
    wait_for(lambda: any(a["state"] == "complete" and a["direction"] == "in" for a in
                         bob.call("attachments.list", {})["attachments"]),
             "the file at bob")  # fmt: skip
    incoming = next(a for a in bob.call("attachments.list", {})["attachments"]
                if a["direction"] == "in")  # fmt: skip
    out = s.tmp / "saved.bin"
    bob.call("attachments.save", {"attachment_id": incoming["attachment_id"], "path": str(out)})
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert att["attachment_id"]
    # Who reached the relay: only the two Tors, through both paths; never a daemon.
    assert len(s.via_exit.connections) >= 3 and len(s.via_onion.connections) >= 3
    _only_tor_reached_the_relay(s)
    for p in (alice, bob):
        _daemon_talks_only_to_its_tor(p)
    # One circuit per mailbox: every long-lived stream to the relay has a circuit (and SOCKS
    # username) of its own. Alice receives on her address and on bob's mailbox at least.
    for p, target in ((alice, s.exit_target), (bob, s.onion_target)):
        streams = p.relay_streams(target)
        users = p.socks_usernames()
        circuits = [c for _, c in streams]
        assert len(streams) >= 2, (p.name, streams)
        assert len(set(circuits)) == len(circuits), (p.name, streams)
        names = [users.get(c) for c in circuits]
        assert None not in names and len(set(names)) == len(names), (p.name, names)
    # Over the whole exchange, every connection alice made (subscriptions, owner commands,
    # bundle fetches, deposit batches, file uploads) had a circuit of its own.
    circuits = list(watch.streams.values())
    assert len(circuits) >= 6, watch.streams
    assert len(set(circuits)) == len(circuits), watch.streams
    # Keep-alive: the subscriptions outlive the relay's idle timeout without reconnecting.
    # Connections already open past one idle timeout are the subscriptions: a short one (a
    # deposit batch, a prekey top-up) still open at this moment may close by design.
    time.sleep(IDLE_TIMEOUT + 2)
    settled = time.time() - (IDLE_TIMEOUT + 2)
    open_before = [c for c in s.via_exit.connections if c.closed is None and c.opened < settled]
    assert open_before
    time.sleep(IDLE_TIMEOUT + 2)
    after = {(c.peer, c.opened): c for c in s.via_exit.connections}
    assert all(after[(c.peer, c.opened)].closed is None for c in open_before)
    assert alice.call("status")["relay"]["connected"]


def test_with_its_tor_killed_nothing_goes_direct_and_messaging_resumes(setup: Setup) -> None:
    s = setup
    alice, bob = s.alice, s.bob
    wait_for(lambda: alice.call("status")["relay"]["connected"], "alice connected")
    tor = alice.tor_pid()
    assert tor is not None
    before = len(s.via_exit.connections)
    os.kill(tor, signal.SIGKILL)
    st = wait_for(lambda: (x := alice.call("status"))["relay"]["reason"]
                  and "Tor" in x["relay"]["reason"] and x, "status to say why")  # fmt: skip
    assert st["relay"]["connected"] is False
    # The reason is Tor's state, or the link's own view of it ("Tor's SOCKS port is
    # unreachable") when the link noticed first; Tor may be back by the time status is read,
    # but its failure was told (tor.failed, below).
    # Tor may be back (state ready, the link not yet) by the time status is read; its death
    # was told all the same.
    wait_for(lambda: any("killed by signal 9" in e["data"]["reason"] for e in alice.call(
        "events.list", {"types": ["tor.failed"]})["events"]), "tor.failed: killed by signal 9")
    # Meanwhile alice writes (it waits in her outbox) and bob writes to her (the relay holds it).
    mid = alice.call("messages.send", {"contact": "bob", "text": "written while Tor was down"})
    bob.call("messages.send", {"contact": "alice", "text": "waiting at the relay"})
    # Alice's message leaves only once her new Tor is ready: never while it is not.
    while True:
        tor_state = alice.call("status")["network"]["tor"]["state"]
        mine = next(m for m in alice.call("messages.history", {"contact": "bob"})["messages"]
                if m["message_id"] == mid["message_id"])  # fmt: skip
        if mine["status"] != "queued":
            break
        time.sleep(0.02)
    assert tor_state == "ready" or alice.call("status")["network"]["tor"]["state"] == "ready"
    # Messaging resumes through the restarted Tor.
    wait_for(lambda: any(m["text"] == "waiting at the relay" for m in
                         alice.call("messages.history", {"contact": "bob"})["messages"]),
             "bob's text after the restart")  # fmt: skip
    wait_for(lambda: any(m["text"] == "written while Tor was down" for m in
                         bob.call("messages.history", {"contact": "alice"})["messages"]),
             "alice's text after the restart")  # fmt: skip
    assert mid["status"] == "queued"
    new_tor = alice.tor_pid()
    assert new_tor not in (None, tor)
    failed = alice.call("events.list", {"types": ["tor.failed"]})["events"]
    assert failed and "killed by signal 9" in failed[-1]["data"]["reason"]
    # Not one connection went around Tor, during the outage or after.
    assert len(s.via_exit.connections) > before  # the link came back (through the exit)
    _only_tor_reached_the_relay(s)
    _daemon_talks_only_to_its_tor(alice)
