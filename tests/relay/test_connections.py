"""Connections against one client that holds many (issue 15, item 3): a cap per source address,
connections counted and timed from the TCP accept (before any HTTP), a full relay shared fairly
between sources, and subscribed connections that send nothing closed.

Every client here is on loopback; a second source is 127.0.0.2 (the whole 127/8 is local)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import HandshakeFailed, RelayClient

from .conftest import RelayProcess, run
from .helpers import new_owner

OTHER = ("127.0.0.2", 0)


def closed_by_peer(sock: socket.socket, within: float = 15) -> bool:
    """Did the relay close this raw connection (EOF or reset) within `within` seconds?"""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_cap_per_source(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(source_connections=3, source_cap_loopback="true")

    async def body() -> None:
        held = [await RelayClient.connect(rp.url) for _ in range(3)]
        with pytest.raises(HandshakeFailed) as e:
            await RelayClient.connect(rp.url)
        assert e.value.status == 503
        # A health checker of the same source is still answered (over a raw socket: one
        # request, then the relay closes).
        reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in answer, answer[:60]
        # Another source is not held back by this one.
        other = await RelayClient.connect(rp.url, local_addr=OTHER)
        # A connection given back makes room for the source again.
        await held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                held.append(await RelayClient.connect(rp.url))
                break
            except HandshakeFailed:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        for c in [*held, other]:
            await c.close()

    run(body())


def test_connections_before_the_upgrade_are_counted_and_timed_out(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Raw TCP connections that never send a request hold a place under max_connections. A
    newcomer of the same source takes the place of one only once it has not upgraded for
    FRESH_MIN (here half of handshake_timeout): before, it is refused, so a source that reopens
    each connection the relay closes cannot churn them. The others are closed after
    handshake_timeout."""
    rp = relay_factory(max_connections=4, handshake_timeout=4)
    raw = [socket.create_connection(("127.0.0.1", rp.port)) for _ in range(4)]
    try:
        async def newcomer() -> None:
            c = await RelayClient.connect(rp.url)
            await c.close()

        with pytest.raises(HandshakeFailed) as e:
            run(newcomer())
        assert e.value.status == 503
        time.sleep(2.2)  # the four are older than FRESH_MIN now (min(2, 4 / 2) s)
        run(newcomer())
        # One was evicted for the newcomer, the rest time out: all end up closed.
        assert all(closed_by_peer(s) for s in raw)
    finally:
        for s in raw:
            s.close()


def test_slow_headers_are_timed_out(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(handshake_timeout=1)
    s = socket.create_connection(("127.0.0.1", rp.port))
    try:
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
        assert closed_by_peer(s)
    finally:
        s.close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_request_head_in_pieces_then_a_frame_in_the_same_write(
        relay_factory: Callable[..., RelayProcess], event_loop: str) -> None:
    """The gate holds a request's head until its blank line before aiohttp takes over: a head
    that arrives a byte at a time (the blank line split across writes) is answered as a whole,
    and a WebSocket frame written with the head's last byte reaches the relay (HELLO_OK)."""
    rp = relay_factory(event_loop=event_loop)
    s = socket.create_connection(("127.0.0.1", rp.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        head = (b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
        hello = wire.encode(wire.HELLO, 1, b"")
        mask = b"\x01\x02\x03\x04"
        frame = bytes([0x82, 0x80 | len(hello)]) + mask + bytes(
            b ^ mask[i % 4] for i, b in enumerate(hello))
        for i in range(len(head) - 1):
            s.sendall(head[i:i + 1])
            time.sleep(0.002)
        s.sendall(head[-1:] + frame)
        s.settimeout(10)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 101"), got[:40]
        rest = got.split(b"\r\n\r\n", 1)[1]
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            rest += s.recv(4096)
        assert rest[0] == 0x82
        assert wire.decode(rest[2:2 + rest[1]]).type == wire.HELLO_OK
    finally:
        s.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` on a fresh connection; everything the relay answers until it closes."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(request)
        s.settimeout(15)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
        return got
    finally:
        s.close()


UPGRADE = (b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_a_refused_connection_gets_a_health_answer_and_nothing_else(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """A refused connection (its source at its cap) is answered by the gate: 503 to anything
    but a health check, which aiohttp answers, and then the connection ends, also when an
    upgrade request follows in the same write. A request head over 16 KiB is answered 431."""
    rp = relay_factory(source_connections=1, source_cap_loopback="true")

    async def hold() -> RelayClient:
        return await RelayClient.connect(rp.url)

    loop = asyncio.new_event_loop()
    try:
        held = loop.run_until_complete(hold())
        got = raw_exchange(rp.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + UPGRADE)
        assert got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1 ") == 1, got[:200]
        for path in (b"/healthX", b"/v1/ws", b"/health/"):
            got = raw_exchange(rp.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 503") and got.endswith(b"busy\n"), (path, got)
        loop.run_until_complete(held.close())
    finally:
        loop.close()
    big = b"GET /v1/ws HTTP/1.1\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"a" * 90) for i in range(200)) + b"\r\n"
    assert raw_exchange(rp.port, big).startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_full_relay_is_shared_between_sources(
        relay_factory: Callable[..., RelayProcess], event_loop: str) -> None:
    """One source holds every place (subscribed, so none is idle): a newcomer from another
    source still gets in, in place of the first source's connection least recently heard from.
    On both event loops: the gate's order and each connection's buffer bound go through the
    loop's transports, and uvloop's are no asyncio.Transport subclasses."""
    rp = relay_factory(max_connections=4, event_loop=event_loop)

    async def body() -> None:
        hog = [await RelayClient.connect(rp.url) for _ in range(4)]
        owners = []
        for c in hog:
            owners.append(await new_owner(c))
            await owners[-1].subscribe(c)
        # Heard from in this order since: 3, 0, 1; 2 is the one least recently heard from.
        for i in (3, 0, 1):
            await owners[i].fetch(hog[i])
        other = await RelayClient.connect(rp.url, local_addr=OTHER)
        await new_owner(other)
        await asyncio.wait_for(
            asyncio.wait([asyncio.ensure_future(c.closed.wait()) for c in hog],
                         return_when=asyncio.FIRST_COMPLETED), 10)
        assert [c.closed.is_set() for c in hog] == [False, False, True, False]
        # The same source cannot take a place back from its own subscribed connections.
        with pytest.raises(HandshakeFailed):
            await RelayClient.connect(rp.url)
        for c in [*hog, other]:
            with contextlib.suppress(Exception):
                await c.close()

    run(body())


def test_subscribed_connection_that_sends_nothing_is_closed(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Closed after subscribed_idle_timeout without a frame or a ping; one that pings (as the
    daemon does) stays."""
    rp = relay_factory(subscribed_idle_timeout=1)

    async def body() -> None:
        silent = await RelayClient.connect(rp.url)
        pinging = await RelayClient.connect(rp.url, heartbeat=0.2)
        await (await new_owner(silent)).subscribe(silent)
        owner = await new_owner(pinging)
        await owner.subscribe(pinging)
        await asyncio.wait_for(silent.closed.wait(), 15)
        await asyncio.sleep(1.5)
        assert not pinging.closed.is_set()
        await owner.fetch(pinging)  # still served
        await pinging.close()

    run(body())


def test_places_come_back_after_resets_refusals_and_evictions(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """The gate's counts return to 0 (review, item 10): after connections reset in the middle
    of their upgrade, refused ones (503), evicted ones and closed ones, the relay admits
    max_connections again, upgraded and subscribed."""
    rp = relay_factory(max_connections=4, source_connections=4, source_cap_loopback="true")

    def reset(s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST

    async def body() -> None:
        for _ in range(3):
            # Reset halfway through the upgrade request, and right after the accept.
            half = [socket.create_connection(("127.0.0.1", rp.port)) for _ in range(4)]
            for s in half[:2]:
                s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            with pytest.raises(HandshakeFailed):  # the source's four places are held
                await RelayClient.connect(rp.url)
            for s in half:
                reset(s)
            # Evictions: another source fills the relay with places of its own.
            held = []
            deadline = time.monotonic() + 10
            while len(held) < 4:
                try:
                    held.append(await RelayClient.connect(rp.url))
                except HandshakeFailed:
                    assert time.monotonic() < deadline, "a place did not come back"
                    await asyncio.sleep(0.1)
            others = [await RelayClient.connect(rp.url, local_addr=OTHER) for _ in range(2)]
            for c in [*held, *others]:
                with contextlib.suppress(Exception):
                    await c.close()
        # Everything gone: four places, all of them usable.
        final = []
        deadline = time.monotonic() + 10
        while len(final) < 4:
            try:
                c = await RelayClient.connect(rp.url)
                await (await new_owner(c)).subscribe(c)
                final.append(c)
            except HandshakeFailed:
                assert time.monotonic() < deadline, "the relay lost count of its places"
                await asyncio.sleep(0.1)
        for c in final:
            await c.close()

    run(body())
