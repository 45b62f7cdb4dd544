"""Deposits pipelined on one connection are stored in the order they were sent, also to a
mailbox the relay has to load first (issue 16: the daemon's outbox pipelines a mailbox's
blocks, which must reach its owner in the order they were written)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from relay.client import RelayClient
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner

MAILBOXES = 2
PER_MAILBOX = 100


@pytest.mark.both_backends
def test_pipelined_deposits_to_unloaded_mailboxes_keep_their_order(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(max_inflight=64, frame_burst=10_000, lookup_burst=10_000)
    token = os.urandom(32)

    async def make() -> list:  # type: ignore[type-arg]
        c = await RelayClient.connect(rp.url)
        try:
            return [await new_owner(c, token=token) for _ in range(MAILBOXES)]
        finally:
            await c.close()

    owners = run(make())
    # A restarted relay holds no mailbox in its cache: the first deposit to each loads it
    # while the ones after it are already arriving.
    rp.kill9()
    rp.start()

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        try:
            # Sent without waiting for answers, mailbox after mailbox in turn: frame k of
            # every mailbox before frame k + 1 of any.
            await asyncio.gather(*(
                c.deposit(owners[i % MAILBOXES].deposit_id,
                          block((i // MAILBOXES).to_bytes(2, "big")), token)
                for i in range(MAILBOXES * PER_MAILBOX)
            ))
            for o in owners:
                got: list[int] = []
                while msgs := await o.fetch(c):
                    got += [int.from_bytes(o.open(m)[:2], "big") for m in msgs]
                    await c.ack([m.msg_id for m in msgs])
                assert got == list(range(PER_MAILBOX))
        finally:
            await c.close()

    run(body())
