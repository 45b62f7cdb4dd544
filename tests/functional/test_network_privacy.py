"""Network privacy (issue 5): the daemon's relay connections through a SOCKS5 proxy, one
connection per mailbox, deposits apart from subscriptions, failing closed.

Real relay and daemon processes; the SOCKS5 proxy is a small asyncio server written here (on
127.0.0.1, in a thread) that records every CONNECT (credentials, target as requested) and reads
the client's WebSocket frames (plaintext ws:// on loopback) to know which relay frames each
connection carried.

The relay URL the daemons know is ``ws://localhost:TRAP/v1/ws``: TRAP is a listener that only
records connections, so any direct connection from a daemon would show there. Only the proxy
knows that ``localhost:TRAP`` is really the relay's port, and asking for ``localhost`` by name
(not an address) shows that the daemon left name resolution to the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay import wire
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess

T = 30.0


@dataclass
class Conn:
    user: str | None
    password: str | None
    atyp: int
    host: str
    port: int
    frames: list[int] = field(default_factory=list)  # relay frame types, client to relay
    subscribed: list[bytes] = field(default_factory=list)  # owner IDs in SUBSCRIBE frames
    # (type, owner ID) of every signed owner command (its body starts with the owner ID)
    owned: list[tuple[int, bytes]] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None


class WsFrames:
    """Client-to-server WebSocket frames (RFC 6455; masked, unfragmented binary) after the
    HTTP upgrade request, decoded as relay frames."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.buf = b""
        self.upgraded = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf, self.upgraded = self.buf[end + 4 :], True
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, pos = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, pos = struct.unpack(">Q", self.buf[2:10])[0], 10
            mask = b""
            if b1 & 0x80:
                mask, pos = self.buf[pos : pos + 4], pos + 4
            if len(self.buf) < pos + n:
                return
            payload = self.buf[pos : pos + n]
            self.buf = self.buf[pos + n :]
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if b0 & 0x0F == 0x2:  # binary: a relay frame
                frame = wire.decode(payload)
                self.conn.frames.append(frame.type)
                if frame.type == wire.SUBSCRIBE:
                    self.conn.subscribed.append(frame.body[:16])
                if frame.type in wire.SIGNED_OWNER_TYPES:
                    self.conn.owned.append((frame.type, frame.body[:16]))


class Socks5:
    """A SOCKS5 server (RFC 1928, username/password RFC 1929) that records what it serves and
    forwards CONNECTs to the targets it is told about (others: 'host unreachable')."""

    def __init__(self, targets: dict[tuple[str, int], int]) -> None:
        self.targets = targets
        self.conns: list[Conn] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self.server.sockets[0].getsockname()[1]

        self._run(go())

    def stop(self) -> None:
        """Stop listening and cut every connection."""

        async def go() -> None:
            if self.server is not None:
                self.server.close()
                for w in list(self.writers):
                    w.transport.abort()
                await self.server.wait_closed()
                self.server = None

        self._run(go())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.add(w)
        try:
            _, n = await r.readexactly(2)
            methods = await r.readexactly(n)
            user = password = None
            if 2 in methods:
                w.write(b"\x05\x02")
                await r.readexactly(1)
                user = (await r.readexactly((await r.readexactly(1))[0])).decode()
                password = (await r.readexactly((await r.readexactly(1))[0])).decode()
                w.write(b"\x01\x00")
            else:
                w.write(b"\x05\x00")
            _, cmd, _, atyp = await r.readexactly(4)
            if atyp == 1:
                host = socket.inet_ntoa(await r.readexactly(4))
            elif atyp == 3:
                host = (await r.readexactly((await r.readexactly(1))[0])).decode()
            else:
                host = socket.inet_ntop(socket.AF_INET6, await r.readexactly(16))
            (port,) = struct.unpack(">H", await r.readexactly(2))
            conn = Conn(user, password, atyp, host, port)
            self.conns.append(conn)
            real = self.targets.get((host, port))
            if cmd != 1 or real is None:
                w.write(b"\x05\x04\x00\x01" + bytes(6))
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", real)
            self.writers.add(uw)
            w.write(b"\x05\x00\x00\x01" + bytes(6))
            frames = WsFrames(conn)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                           watch: bool) -> None:
                try:
                    while data := await src.read(65536):
                        if watch:
                            frames.feed(data)
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()

            try:
                await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False),
                                     return_exceptions=True)
            finally:
                self.writers.discard(uw)
                conn.closed = time.monotonic()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(w)
            w.close()


class Trap:
    """A listener that records every connection made to it and closes it."""

    def __init__(self) -> None:
        self.hits = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                s, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits += 1
            s.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def net(tmp_short: Path) -> Iterator[dict[str, Any]]:
    sub = tmp_short / "relay"
    sub.mkdir()
    relay = RelayProcess(sub, {})
    relay.start()
    trap = Trap()
    proxies: list[Socks5] = []

    def proxy() -> Socks5:
        p = Socks5({("localhost", trap.port): relay.port})
        p.start()
        proxies.append(p)
        return p

    try:
        yield {"relay": relay, "trap": trap, "proxy": proxy,
               "url": f"ws://localhost:{trap.port}/v1/ws"}
    finally:
        for p in proxies:
            p.close()
        trap.close()
        relay.close()


def make_peer(tmp: Path, url: str, name: str, proxy_port: int) -> Peer:
    """A profile created with `aegis init --proxy`; Peer's own init has no --proxy, so the
    profile is made here and handed to Peer with init skipped."""
    import subprocess
    import sys

    home = tmp / name
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home), "--no-passphrase",
         "--relay", url, "--proxy", f"socks5://127.0.0.1:{proxy_port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    peer = Peer.__new__(Peer)
    peer.home, peer.name, peer.proc = home, name, None
    peer.start()
    peer.call("identity.set_name", {"display_name": name})
    return peer


@pytest.fixture
def make(tmp_short: Path, net: dict[str, Any]) -> Iterator[Callable[[str, int], Peer]]:
    made: list[Peer] = []

    def mk(name: str, proxy_port: int) -> Peer:
        p = make_peer(tmp_short, net["url"], name, proxy_port)
        made.append(p)
        return p

    try:
        yield mk
    finally:
        for p in made:
            p.stop()


def wait(predicate: Callable[[], Any], what: str, timeout: float = T) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_through_the_proxy_one_connection_per_mailbox(
    net: dict[str, Any], make: Callable[[str, int], Peer]
) -> None:
    pa, pb = net["proxy"](), net["proxy"]()
    alice, bob = make("alice", pa.port), make("bob", pb.port)
    connect(alice, bob)
    sent = alice.call("messages.send", {"contact": "bob", "text": "over the proxy"})
    bob.wait_for(lambda: bob.events(types=["message.received"]), "the message")
    alice.wait_for(
        lambda: alice.call("messages.history", {"contact": "bob"})["messages"][0]["status"]
        == "delivered",
        "the delivery receipt",
    )
    assert sent["status"] == "queued"

    # No connection reached the relay except through a proxy.
    assert net["trap"].hits == 0
    for proxy in (pa, pb):
        conns = list(proxy.conns)
        assert conns
        # The relay's name went to the proxy as a name: no local DNS lookup.
        assert all(c.atyp == 3 and c.host == "localhost" for c in conns)
        # Every connection had SOCKS credentials of its own (its own Tor circuit).
        creds = [(c.user, c.password) for c in conns]
        assert all(u and p for u, p in creds)
        assert len(set(creds)) == len(creds)
        # Each subscription travelled alone on its connection; deposits never on one that
        # subscribed, and on connections that closed again.
        subscribing = [c for c in conns if c.subscribed]
        assert all(len(c.subscribed) == 1 for c in subscribing)
        assert len({c.subscribed[0] for c in subscribing}) == len(subscribing)
        deposits = [c for c in conns if wire.DEPOSIT in c.frames]
        assert deposits
        assert all(not c.subscribed for c in deposits)
        wait(lambda d=deposits: all(c.closed is not None for c in d), "deposits to close")
        # Owner commands (create, tokens, bundles) never on a subscription connection, but
        # for the mailbox it holds: the address's prekey top-ups go on its own connection,
        # which the relay already sees own it (a new connection would add one, on a beat).
        assert all(wire.CREATE not in c.frames for c in subscribing)
        assert all(owner == c.subscribed[0] for c in subscribing for _, owner in c.owned)
    # Alice's mailboxes: her address and her mailbox for Bob, each still subscribed alone.
    open_subs = [c for c in pa.conns if c.subscribed and c.closed is None]
    assert len(open_subs) == 2
    settings = alice.call("settings.get")
    assert settings["proxy"] == f"socks5://127.0.0.1:{pa.port}" and settings["isolation"]


def test_proxy_down_fails_closed(net: dict[str, Any], make: Callable[[str, int], Peer]) -> None:
    # A proxy that is not there at start: no direct connection, a clear status and event.
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()
    alice = make("alice", dead_port)
    st = wait(lambda: (s := alice.call("status")["relay"])["reason"] == "proxy unreachable" and s,
              "the status to say why")
    assert st["connected"] is False
    downs = alice.wait_for(lambda: alice.events(types=["relay.down"]), "relay.down")
    assert downs[0]["data"]["reason"] == "proxy unreachable"
    time.sleep(2)
    assert net["trap"].hits == 0

    # Now through a live proxy, which then goes away: down again, still nothing direct.
    proxy = net["proxy"]()
    alice.call("settings.set", {"proxy": f"socks5://127.0.0.1:{proxy.port}"})
    alice.wait_connected()
    proxy.stop()
    wait(lambda: alice.call("status")["relay"]["reason"] == "proxy unreachable",
         "the status to say why")
    assert alice.call("status")["relay"]["connected"] is False
    n = len(alice.events(types=["relay.down"]))
    assert n >= 2
    # Sending while the proxy is down queues the message: nothing leaves directly.
    time.sleep(2)
    assert net["trap"].hits == 0
    # The proxy comes back on the same port: the daemon reconnects through it.
    proxy.start()
    alice.wait_connected()
    assert net["trap"].hits == 0


def test_proxy_without_isolation_shares_one_connection(
    net: dict[str, Any], make: Callable[[str, int], Peer]
) -> None:
    proxy = net["proxy"]()
    alice = make("alice", proxy.port)
    alice.wait_connected()
    before = len(proxy.conns)
    alice.call("settings.set", {"isolation": False})
    alice.wait_connected()
    alice.call("invitations.create")
    alice.call("invitations.create")
    # One connection, no credentials (Tor then uses one circuit), carrying every subscription
    # (the address mailbox and the two invitations); the isolated link's connections are gone.
    wait(lambda: [c for c in proxy.conns[before:] if len(set(c.subscribed)) == 3], "3 subs")
    wait(lambda: len([c for c in proxy.conns if c.closed is None]) == 1, "one open connection")
    (shared,) = [c for c in proxy.conns if c.closed is None]
    assert shared.user is None and len(set(shared.subscribed)) == 3
    assert net["trap"].hits == 0


def test_isolation_without_proxy_and_send_jitter(peers: Callable[[str], Peer]) -> None:
    """Isolation is a setting without a proxy (off by default); messages flow with it on, and
    with a jittered send window."""
    alice, bob = peers("alice"), peers("bob")
    assert "isolation" not in alice.call("settings.get")  # defaults: no proxy, no isolation
    for p in (alice, bob):
        p.wait_connected()
        got = p.call("settings.set", {"isolation": True, "send_jitter_max": 1})
        assert got["isolation"] is True and got["proxy"] is None and got["send_jitter_max"] == 1
    connect(alice, bob)
    alice.call("messages.send", {"contact": "bob", "text": "isolated, jittered"})
    bob.wait_for(lambda: bob.events(types=["message.received"]), "the message")
    alice.wait_for(
        lambda: alice.call("messages.history", {"contact": "bob"})["messages"][0]["status"]
        == "delivered",
        "the delivery receipt",
    )
    with pytest.raises(Exception, match="send_jitter_max"):
        alice.call("settings.set", {"send_jitter_max": -1})
    with pytest.raises(Exception, match="socks5"):
        alice.call("settings.set", {"proxy": "http://127.0.0.1:8080"})


def test_init_refuses_a_bad_proxy(tmp_short: Path) -> None:
    import subprocess
    import sys

    for bad in ("http://127.0.0.1:9050", "socks5://127.0.0.1", "socks5://u:p@127.0.0.1:9050"):
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(tmp_short / "x"),
             "--no-passphrase", "--proxy", bad],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode != 0 and "proxy" in r.stderr, r.stderr
        assert bad not in r.stderr  # the address is not echoed
        assert not (tmp_short / "x" / "keyring").exists()


def test_rotated_mailbox_gets_a_new_connection_and_the_old_one_closes(
    net: dict[str, Any], make: Callable[[str, int], Peer]
) -> None:
    pa, pb = net["proxy"](), net["proxy"]()
    alice, bob = make("alice", pa.port), make("bob", pb.port)
    connect(alice, bob)

    def open_subs() -> dict[bytes, Conn]:
        return {c.subscribed[0]: c for c in pa.conns if c.subscribed and c.closed is None}

    before = wait(lambda: len(s := open_subs()) == 2 and s, "alice's two subscriptions")
    alice.call("contacts.rotate_mailbox", {"name": "bob"})
    alice.wait_for(lambda: alice.events(types=["contact.mailbox_rotated"]), "the rotation")
    # The retired mailbox's connection closed; the new mailbox has a connection of its own.
    after = wait(lambda: len(s := open_subs()) == 2 and set(s) != set(before) and s,
                 "the old subscription to close and the new one to open")
    (old,) = set(before) - set(after)
    (new,) = set(after) - set(before)
    assert before[old].closed is not None
    assert (after[new].user, after[new].password) != (before[old].user, before[old].password)
    alice.call("messages.send", {"contact": "bob", "text": "after the rotation"})
    bob.call("messages.send", {"contact": "alice", "text": "to the new mailbox"})
    alice.wait_for(
        lambda: [e for e in alice.events(types=["message.received"])
                 if e["data"]["text"] == "to the new mailbox"],
        "bob's message on the new mailbox",
    )
    assert net["trap"].hits == 0
