"""Crash safety: kill -9 in the middle of a stream of deposits loses no acknowledged deposit."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

import pytest

from relay.client import RelayClient

from .conftest import RelayProcess, run
from .helpers import Owner, block, new_owner

WRITERS = 8


@pytest.mark.both_backends
def test_kill_9_loses_no_acknowledged_deposit(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(deposit_rate=100000, deposit_burst=100000)
    token = os.urandom(32)
    acked: set[int] = set()
    attempted: set[int] = set()

    async def setup() -> list[Owner]:
        c = await RelayClient.connect(rp.url)
        owners = [await new_owner(c, token=token) for _ in range(4)]
        await c.close()
        return owners

    owners = run(setup())

    async def stream(round_: int, kill_after: int) -> None:
        counter = iter(range(round_ * 1_000_000, (round_ + 1) * 1_000_000))
        killed = asyncio.Event()

        async def writer() -> None:
            c = await RelayClient.connect(rp.url)
            try:
                while not killed.is_set():
                    n = next(counter)
                    attempted.add(n)
                    o = owners[n % len(owners)]
                    try:
                        await c.deposit(o.deposit_id, block(struct.pack(">Q", n)), token=token)
                    except Exception:
                        return
                    acked.add(n)
                    if len(acked) >= kill_after and not killed.is_set():
                        killed.set()
                        await asyncio.to_thread(rp.kill9)
            finally:
                await c.close()

        await asyncio.gather(*(writer() for _ in range(WRITERS)))

    for round_ in range(2):
        run(stream(round_, kill_after=len(acked) + 150))
        assert rp.proc is not None and rp.proc.returncode == -9
        rp.start()  # same data directory, same listening socket

    async def drain() -> set[int]:
        got: set[int] = set()
        c = await RelayClient.connect(rp.url)
        for o in owners:
            while True:
                msgs = await o.fetch(c)
                if not msgs:
                    break
                for m in msgs:
                    got.add(struct.unpack(">Q", o.open(m)[:8])[0])
                await c.ack([m.msg_id for m in msgs])
        await c.close()
        return got

    delivered = run(drain())
    assert acked <= delivered, f"{len(acked - delivered)} acknowledged deposits lost"
    assert delivered <= attempted
    assert "Traceback" not in rp.output()
