"""FETCH within the per-connection bound (issue 15 review, items 1 and 4).

Concurrent FETCHes of one connection read one after another, each sized after what the one
before pushed: 64 of them on a full mailbox no longer hold 64 windows (32 MiB) in the relay at
once. And a FETCH that sends nothing because the connection's output is above conn_buffer
answers `busy`, never `OK 0` (which means an empty mailbox)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from relay import wire
from relay.client import RelayClient

from .conftest import RelayProcess, run
from .helpers import Owner, block, new_owner
from .test_slow_reader import small_receive_buffer

WINDOW = 32
FETCHES = 64


def peak_rss(rp: RelayProcess) -> int:
    """The relay's peak resident size (bytes), from /proc (Linux)."""
    assert rp.proc is not None
    with open(f"/proc/{rp.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def fetch_raw(c: RelayClient, o: Owner, n: int) -> None:
    """A FETCH sent raw: nothing reads its answer."""
    rid = c.next_rid()
    unsigned = o.owner_id + bytes([n])
    sig = o.sig.sign(wire.auth_message(c.challenge, wire.encode(wire.FETCH, rid, unsigned)))
    await c.send_raw(wire.encode(wire.FETCH, rid, unsigned + sig.signature))


async def stop_reading(c: RelayClient) -> None:
    assert c._reader is not None
    c._reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await c._reader


@pytest.mark.both_backends
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_parallel_fetches_hold_one_window(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory()

    async def body() -> None:
        feeder = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        o = await new_owner(feeder, token=token)
        await asyncio.gather(*(feeder.deposit(o.deposit_id, block(), token=token)
                               for _ in range(WINDOW)))
        await asyncio.sleep(0.5)
        before = peak_rss(rp)
        for _ in range(3):  # three connections, so the relay's peak stands out of its noise
            slow = await RelayClient.connect(
                rp.url, connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer))
            await stop_reading(slow)
            for _ in range(FETCHES):
                await fetch_raw(slow, o, WINDOW)
            await asyncio.sleep(1.5)
            with contextlib.suppress(Exception):
                await slow.close()
        grown = peak_rss(rp) - before
        # One window per connection is 0.5 MiB; 64 windows read at once were 32 MiB.
        assert grown < 16 * 1024 * 1024, grown
        await feeder.close()

    run(body())


def test_fetch_above_the_bound_answers_busy(relay_factory: Callable[..., RelayProcess]) -> None:
    """FETCHes read back to back: the first ones fill the output above conn_buffer, so the
    last finds the connection congested with blocks waiting, and must answer `busy`.

    The relay pauses reading a congested connection, so the last FETCH has to be read before
    the first ones' pushes land: all are sent corked, in one TCP segment, and the relay parses
    them in one read. Their blocks may partly drain into the kernel's buffers, whose size is
    not known here, so fresh connections fill those first with 0, 1, 2, ... blocks until one
    answers `busy`. No attempt may ever answer `OK 0`."""
    # A small kernel send buffer, so the first FETCH's blocks stay in the relay's own output
    # (counted against conn_buffer) instead of draining into the kernel.
    rp = relay_factory(conn_buffer=64 * 1024, conn_sndbuf=4096, stall_timeout=60)

    async def attempt(filler: Owner, last: Owner, prefill: int) -> wire.Frame:
        socks: list[socket.socket] = []

        def corkable(addr_info: Any) -> socket.socket:
            socks.append(small_receive_buffer(addr_info))
            return socks[-1]

        c = await RelayClient.connect(
            rp.url, connector=aiohttp.TCPConnector(socket_factory=corkable))
        await stop_reading(c)
        try:
            for _ in range(prefill):
                await fetch_raw(c, filler, 1)
                await asyncio.sleep(0.1)
            socks[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            # Each of these pushes until the output is just above conn_buffer; the writer
            # drains a little between them, so one is not always enough.
            for _ in range(3):
                await fetch_raw(c, filler, WINDOW)
            rid = c.next_rid()
            unsigned = last.owner_id + bytes([WINDOW])
            sig = last.sig.sign(wire.auth_message(c.challenge,
                                                  wire.encode(wire.FETCH, rid, unsigned)))
            await c.send_raw(wire.encode(wire.FETCH, rid, unsigned + sig.signature))
            socks[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            async with asyncio.timeout(20):
                while True:
                    msg = await c.ws.receive()
                    assert msg.type == aiohttp.WSMsgType.BINARY
                    f = wire.decode(msg.data)
                    if f.rid == rid and f.type != wire.MSG:
                        return f
        finally:
            with contextlib.suppress(Exception):
                await c.close()

    async def body() -> None:
        feeder = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        owners = [await new_owner(feeder, token=token) for _ in range(2)]
        for o in owners:
            await asyncio.gather(*(feeder.deposit(o.deposit_id, block(), token=token)
                                   for _ in range(WINDOW)))
        answers = []
        for prefill in range(12):
            answer = await attempt(owners[0], owners[1], prefill)
            answers.append((answer.type, answer.body))
            sent_ok_zero = answer.type == wire.OK and answer.body == b"\x00\x00"
            assert not sent_ok_zero, "OK 0 for a mailbox holding 32 blocks"
            if answer.type == wire.ERROR:
                assert wire.parse_error(answer.body) == wire.E_BUSY
                break
            await asyncio.sleep(0.5)  # the closed connection's deliveries return to the queue
        assert answers[-1][0] == wire.ERROR, answers
        await feeder.close()

    run(body())
