"""A client that does not read (issue 15, item 5): what waits for it stays within conn_buffer
(the relay's queue and the transport's buffer together) however many subscriptions push to
it, and it is closed once it has stayed above that for stall_timeout.

bench/relay_memory.py measures the relay's memory under many such clients."""

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

MAILBOXES = 40
WINDOW = 32


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose kernel buffer holds little, so what the relay keeps shows."""
    family, type_, proto, _, _ = addr_info
    s = socket.socket(family, type_, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


async def subscribe_without_reading(c: RelayClient, owners: list[Owner]) -> None:
    """SUBSCRIBE to every mailbox, sent raw: nothing reads the answers or the pushes."""
    assert c._reader is not None
    c._reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await c._reader
    for o in owners:
        rid = c.next_rid()
        sig = o.sig.sign(wire.auth_message(c.challenge,
                                           wire.encode(wire.SUBSCRIBE, rid, o.owner_id)))
        await c.send_raw(wire.encode(wire.SUBSCRIBE, rid, o.owner_id + sig.signature))


@pytest.mark.both_backends
def test_client_that_does_not_read_is_bounded_then_closed(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(conn_buffer=64 * 1024, stall_timeout=2)

    async def body() -> None:
        feeder = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        owners = [await new_owner(feeder, token=token) for _ in range(MAILBOXES)]
        for o in owners:
            await asyncio.gather(*(feeder.deposit(o.deposit_id, block(), token=token)
                                   for _ in range(WINDOW)))
        slow = await RelayClient.connect(
            rp.url, connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer))
        await subscribe_without_reading(slow, owners)
        await asyncio.sleep(5)  # beyond stall_timeout: the relay gives up on it
        got = 0
        ended = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while True:
                    msg = await slow.ws.receive()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        ended = True
                        break
                    if wire.decode(msg.data).type == wire.MSG:
                        got += 1
        assert ended, "the relay kept a client that does not read"
        # It stopped pushing at the bound: a small part of the 1280 blocks queued for it
        # reached the client (the bound, and what the kernel buffers held), not all of them.
        assert got < MAILBOXES * WINDOW // 4, got
        with contextlib.suppress(Exception):
            await slow.close()
        # The relay serves on: the blocks are all still queued for their owners (a FETCH
        # answers what fits in conn_buffer; the rest comes with the next FETCH).
        o = owners[0]
        fetched = 0
        while batch := await o.fetch(feeder):
            fetched += len(batch)
        assert fetched == WINDOW
        await feeder.close()

    run(body())
