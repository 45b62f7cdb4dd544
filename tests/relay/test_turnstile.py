"""The turnstile of new connections (relay/turnstile.py; bench/attack.py scenario 3t): at most
`setups_per_turn` set up per turn of the event loop, in arrival order, and a burst of them, some
leaving while they wait, loses nothing and strands nobody."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import RelayClient
from relay.turnstile import Turnstile

from .conftest import RelayProcess, run
from .test_connections import UPGRADE


def test_order_and_bound_per_turn() -> None:
    """Seven arrivals with room for two a turn: served first come first served, two a turn,
    one of them failing without stranding the rest; without a bound, all at once."""

    async def main() -> None:
        turn = 0
        ticking = True

        def tick() -> None:  # one increment per turn of the loop
            nonlocal turn
            turn += 1
            if ticking:
                asyncio.get_running_loop().call_soon(tick)

        tick()
        gate = Turnstile(2)
        served: list[tuple[int, int]] = []

        def arrival(i: int) -> Callable[[], bool]:
            def cb() -> bool:
                served.append((i, turn))
                if i == 3:
                    raise RuntimeError("one connection's set-up failed")
                return True
            return cb

        start = turn
        for i in range(7):
            gate.enter(arrival(i))
        assert [i for i, _ in served] == [0, 1]  # room in this turn: at once
        assert len(gate) == 5
        for _ in range(10):
            await asyncio.sleep(0)
        ticking = False
        assert [i for i, _ in served] == list(range(7))
        per_turn: dict[int, int] = {}
        for _, t in served:
            per_turn[t] = per_turn.get(t, 0) + 1
        assert max(per_turn.values()) <= 2
        assert len(per_turn) == 4  # 2 + 2 + 2 + 1
        assert served[0][1] == start and len(gate) == 0 and gate.passed == 7

        free = Turnstile(0)
        done: list[int] = []
        for i in range(5):
            free.enter(lambda i=i: done.append(i) is None)
        assert done == [0, 1, 2, 3, 4]

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _ctx: None)  # the failing set-up is reported there
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_the_departed_use_up_no_place_and_the_queue_stays_bounded() -> None:
    """Waiting connections that ended (a cancelled ticket: evicted or timed out; or a callback
    finding its connection gone at its turn) let the live ones behind them through in the same
    turn; and cancelled tickets are dropped from the queue, not kept until their turn."""

    async def main() -> None:
        turn = 0
        ticking = True

        def tick() -> None:
            nonlocal turn
            turn += 1
            if ticking:
                asyncio.get_running_loop().call_soon(tick)

        tick()
        gate = Turnstile(2)
        served: list[tuple[str, int]] = []

        def arrival(name: str, live: bool = True) -> Callable[[], bool]:
            def cb() -> bool:
                if live:
                    served.append((name, turn))
                return live
            return cb

        gate.enter(arrival("a"))
        gate.enter(arrival("b"))  # this turn is full now
        assert gate.enter(arrival("gone", live=False)) is not None
        evicted = gate.enter(arrival("evicted"))
        for name in ("c", "d", "e"):
            gate.enter(arrival(name))
        assert evicted is not None
        gate.cancel(evicted)
        assert len(gate) == 4
        start = turn
        for _ in range(5):
            await asyncio.sleep(0)
        ticking = False
        names = [n for n, _ in served]
        assert names == ["a", "b", "c", "d", "e"] and gate.passed == 5
        by_name = dict(served)
        assert by_name["c"] == by_name["d"] == start + 1 and by_name["e"] == start + 2

        # Thousands evicted while they wait: the queue holds about twice the live ones.
        assert gate.enter(arrival("f")) is None and gate.enter(arrival("g")) is None
        tickets = [gate.enter(arrival("late")) for _ in range(4000)]
        for n, ticket in enumerate(tickets[:-10]):
            assert ticket is not None
            gate.cancel(ticket)
            assert len(gate._waiting) <= 2 * len(gate) + 2, n
        assert len(gate) == 10

    asyncio.run(main())


def masked(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([0x82, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


def read_hello_ok(s: socket.socket) -> bool:
    """The 101 and then a HELLO_OK frame on this raw connection."""
    s.settimeout(15)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            return False
        got += chunk
    if not got.startswith(b"HTTP/1.1 101"):
        return False
    rest = got.split(b"\r\n\r\n", 1)[1]
    while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
        chunk = s.recv(65536)
        if not chunk:
            return False
        rest += chunk
    return rest[0] == 0x82 and wire.decode(rest[2:2 + rest[1]]).type == wire.HELLO_OK


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_burst_of_new_connections_waits_its_turn_and_loses_nothing(
        relay_factory: Callable[..., RelayProcess], event_loop: str) -> None:
    """60 connections send their upgrade request with a HELLO in the same write, all before
    the relay answers any, to a relay that sets up one a turn: most wait at the turnstile, with
    their HELLO read already or still in the socket. Every fifth leaves at once (it ends while
    it waits, or before). Each of the others gets its 101 and HELLO_OK, and afterwards the relay
    takes a client as usual: nothing was lost while waiting and the leavers stranded nobody."""
    rp = relay_factory(event_loop=event_loop, setups_per_turn=1)
    request = UPGRADE + masked(wire.encode(wire.HELLO, 1, b""))
    socks = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", rp.port))
            socks.append(s)
        for i, s in enumerate(socks):
            s.sendall(request)
            if i % 5 == 4:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()  # a reset: gone while waiting (or before its turn came)
        for i, s in enumerate(socks):
            if i % 5 != 4:
                assert read_hello_ok(s), i

        async def usual() -> None:
            c = await RelayClient.connect(rp.url)
            await c.close()

        run(usual())
    finally:
        for s in socks:
            s.close()
