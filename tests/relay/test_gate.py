"""The connection gate's bookkeeping (issue 15 review, items 2, 3, 10), in process: sources
by prefix, eviction from the coarsest prefix over its share, counts back to 0.

The transports here stand in for accepted sockets from addresses a test cannot bind (other
IPv6 /64s, /48s); relay/gate.py is the real code. test_connections.py runs the gate in the
relay process over real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from relay.config import Config
from relay.gate import FRESH_MIN, Gate, _Admission, source_chain, source_of


class Transport:
    def __init__(self, host: str, port: int = 40000) -> None:
        self.peer = (host, port) if host else None
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class Peer:
    def __init__(self, subscribed: bool) -> None:
        self.subs: dict[int, Any] = {1: object()} if subscribed else {}
        self.last_seen = time.monotonic()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def connect(gate: Gate, host: str, subscribed: bool = False) -> Transport:
    t = Transport(host)
    gate.accept(t)  # type: ignore[arg-type]
    entry = gate.entry(t)  # type: ignore[arg-type]
    if entry is not None and not entry.refused:
        gate.upgraded(entry, Peer(subscribed))
    return t


def alive(gate: Gate, t: Transport) -> bool:
    entry = gate.entry(t)  # type: ignore[arg-type]
    return entry is not None and not entry.refused


@pytest.mark.parametrize(("host", "key", "loopback"), [
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64", False),
    ("2001:db8:1:2::9", "2001:db8:1:2::/64", False),
    ("fe80::1%eth0", "fe80::/64", False),  # a zone id is not part of the address
    ("::ffff:192.0.2.7", "192.0.2.7", False),  # IPv4-mapped: the IPv4 address
    ("192.0.2.7", "192.0.2.7", False),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.2", "127.0.0.2", True),
    ("::1", "::1", True),
    ("::ffff:127.0.0.1", "127.0.0.1", True),
    ("", "local", True),  # a Unix socket
    ("not an address", "unknown", False),
])
def test_source_of(host: str, key: str, loopback: bool) -> None:
    assert source_of(Transport(host)) == (key, loopback)  # type: ignore[arg-type]


def test_source_chain_prefixes() -> None:
    assert source_chain(Transport("2001:db8:1:2::9")) == (  # type: ignore[arg-type]
        ["2001:db8:1::/48", "2001:db8:1::/56", "2001:db8:1:2::/64"], False)
    assert source_chain(Transport("192.0.2.7")) == (  # type: ignore[arg-type]
        ["192.0.2.0/24", "192.0.2.7"], False)


def test_spreading_over_a_48_evicts_the_spreader_not_honest_users() -> None:
    """An attacker with a /48 fills the relay, one connection per /64; honest daemons holding
    two subscribed connections each keep them, and an honest newcomer gets in."""
    gate = Gate(Config(max_connections=100, source_connections=1000))
    honest = [connect(gate, f"2001:db8:{n}::1", subscribed=True) for n in range(1, 6)
              for _ in range(2)]
    attacker = [connect(gate, f"2001:db8:bad:{n:x}::1") for n in range(90)]
    assert gate.admitted == 100
    for n in range(90, 400):  # more newcomers from fresh /64s of the same /48
        attacker.append(connect(gate, f"2001:db8:bad:{n:x}::1"))
    assert all(alive(gate, t) for t in honest), "an honest subscribed connection was evicted"
    newcomer = connect(gate, "2001:db8:77::1")
    assert alive(gate, newcomer)
    assert all(alive(gate, t) for t in honest)
    assert gate.admitted == 100


def test_spreading_over_a_24_evicts_the_spreader() -> None:
    gate = Gate(Config(max_connections=50, source_connections=1000))
    honest = [connect(gate, "198.51.100.9", subscribed=True) for _ in range(2)]
    for n in range(1, 200):
        connect(gate, f"203.0.113.{n}")
    assert all(alive(gate, t) for t in honest)


def test_coarse_prefix_cap() -> None:
    """A /48 holds at most COARSE_FACTOR times source_connections, spread or not."""
    gate = Gate(Config(max_connections=1000, source_connections=3))
    got = [connect(gate, f"2001:db8:bad:{n:x}::1") for n in range(20)]
    assert sum(alive(gate, t) for t in got) == 12
    assert alive(gate, connect(gate, "2001:db8:cafe::1"))


def test_counts_return_to_zero() -> None:
    """Admitted and refused go back to 0 after refusals, evictions, forgetting and closing."""
    gate = Gate(Config(max_connections=10, source_connections=4))
    ts = [connect(gate, f"2001:db8:{n % 3}::{n}") for n in range(40)]
    ts += [connect(gate, "::1") for _ in range(5)]
    assert gate.refused > 0
    gate.closing = True
    ts += [connect(gate, "192.0.2.1") for _ in range(3)]
    for t in ts:
        gate.forget(t)  # type: ignore[arg-type]
    assert (gate.admitted, gate.refused, gate.entries) == (0, 0, {})
    assert gate.root.children == {} and gate.root.buckets == {} and gate.root.top == 0


def test_a_newcomer_to_a_full_relay_looks_at_few_connections() -> None:
    """Item 3: a newcomer costs O(1), not a look at every connection (10,000 on loopback)."""
    looked = 0

    class Counting(Peer):
        @property
        def subs(self) -> dict[int, Any]:
            nonlocal looked
            looked += 1
            return {1: object()}  # subscribed: none may be taken by its own source

        @subs.setter
        def subs(self, _: dict[int, Any]) -> None:
            pass

    n = 10_000
    gate = Gate(Config(max_connections=n))
    for _ in range(n):
        t = Transport("127.0.0.1")
        gate.accept(t)  # type: ignore[arg-type]
        entry = gate.entry(t)  # type: ignore[arg-type]
        assert entry is not None
        peer = Counting(subscribed=True)
        peer.last_seen = 0.0  # silent long enough to be looked at
        gate.upgraded(entry, peer)
    looked = 0
    late = connect(gate, "127.0.0.1")
    assert not alive(gate, late)
    assert looked <= 256, looked
    gate.forget(late)  # type: ignore[arg-type]


def test_a_young_connection_not_upgraded_is_taken_only_by_another_source() -> None:
    """On a full relay a newcomer takes the place of its own source's connection that has not
    upgraded only once that one is FRESH_MIN old (a source reopening what the relay closes
    would otherwise churn), while a newcomer of a smaller source takes one at once."""
    gate = Gate(Config(max_connections=3, handshake_timeout=10))
    held = [Transport("127.0.0.2") for _ in range(3)]
    for t in held:
        assert gate.accept(t)  # type: ignore[arg-type]
    same = Transport("127.0.0.2")
    gate.accept(same)  # type: ignore[arg-type]
    assert not alive(gate, same) and not any(t.aborted for t in held)
    gate.forget(same)  # type: ignore[arg-type]
    for t in held:
        entry = gate.entry(t)  # type: ignore[arg-type]
        assert entry is not None
        entry.since -= FRESH_MIN + 0.1
    same = Transport("127.0.0.2")
    gate.accept(same)  # type: ignore[arg-type]
    assert alive(gate, same) and held[0].aborted
    # A smaller source's newcomer takes a place from the biggest, young as it is.
    for t in (*held[1:], same):
        entry = gate.entry(t)  # type: ignore[arg-type]
        assert entry is not None
        entry.since = time.monotonic()
    other = Transport("127.0.0.1")
    gate.accept(other)  # type: ignore[arg-type]
    assert alive(gate, other) and held[1].aborted


class AdmittedTransport(Transport):
    """What _Admission uses of a socket transport."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.protocol: Any = None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


def test_half_open_connections_are_evicted_before_those_waiting_at_the_turnstile() -> None:
    """On a full relay a newcomer of the same source takes the place of a connection whose
    request head is incomplete first; one whose head is complete and waits at the turnstile
    only once no such one is old enough. Evicted while it waits, its place in the turnstile's
    queue goes, and it is never handed to aiohttp."""

    async def main() -> None:
        gate = Gate(Config(max_connections=3, handshake_timeout=10, setups_per_turn=1))
        handed: list[object] = []

        def server() -> Any:
            handed.append(object())
            raise AssertionError("a connection evicted while it waited was set up")

        def arrive(head: bytes) -> tuple[AdmittedTransport, _Admission]:
            t = AdmittedTransport("127.0.0.2")
            adm = _Admission(gate, server)  # type: ignore[arg-type]
            adm.connection_made(t)  # type: ignore[arg-type]
            if head:
                adm.data_received(head)
            return t, adm

        assert gate.turnstile.enter(lambda: True) is None  # this turn's place is taken
        waiting, waiting_adm = arrive(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert waiting_adm.queued and len(gate.turnstile) == 1
        half = [arrive(b"GET /v1/ws HT")[0] for _ in range(2)]
        for t in (waiting, *half):
            entry = gate.entry(t)  # type: ignore[arg-type]
            assert entry is not None
            entry.since -= FRESH_MIN + 0.1
        for n in range(2):
            newcomer, _ = arrive(b"")
            assert alive(gate, newcomer) and half[n].aborted and not waiting.aborted
        # Only young half-open ones are left beside it: the waiting one goes now.
        last, _ = arrive(b"")
        assert alive(gate, last) and waiting.aborted
        waiting_adm.connection_lost(None)  # what the aborted transport reports
        assert len(gate.turnstile) == 0
        for _ in range(3):
            await asyncio.sleep(0)
        assert not handed

    asyncio.run(main())
