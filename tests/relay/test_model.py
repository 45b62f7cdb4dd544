"""Random sequences of deposits, (re)connections, subscriptions, fetches and acknowledgements
against a live relay, checked against a model: nothing acknowledged comes back, nothing
unacknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.client import Message, RelayClient

from .conftest import RelayProcess, run
from .helpers import Owner, block, new_owner


async def scenario(url: str, seed: int) -> None:
    rnd = random.Random(seed)
    token = os.urandom(32)
    sender = await RelayClient.connect(url)
    owner_c = await RelayClient.connect(url)
    owners = [await new_owner(owner_c, token=token) for _ in range(2)]
    queued: dict[bytes, bytes] = {}  # block -> owner_id, not yet acknowledged
    acked: set[bytes] = set()
    held: dict[bytes, tuple[Owner, Message]] = {}  # msg_id -> delivered on owner_c, not acked
    subscribed = False

    def take(o: Owner, m: Message) -> None:
        b = o.open(m)
        assert b not in acked, "an acknowledged block came back"
        assert queued.get(b) == o.owner_id, "a block nobody deposited, or to another mailbox"
        held[m.msg_id] = (o, m)

    def by_id(owner_id: bytes) -> Owner:
        return next(o for o in owners if o.owner_id == owner_id)

    for _ in range(40):
        op = rnd.choice(["deposit"] * 4 + ["fetch", "ack", "ack", "subscribe", "reconnect"])
        while not owner_c.messages.empty():
            m = owner_c.messages.get_nowait()
            take(by_id(m.owner_id), m)
        if op == "deposit":
            o = rnd.choice(owners)
            b = block()
            await sender.deposit(o.deposit_id, b, token=token)
            queued[b] = o.owner_id
        elif op == "fetch":
            o = rnd.choice(owners)
            for m in await o.fetch(owner_c, rnd.randint(1, 5)):
                take(o, m)
        elif op == "ack" and held:
            ids = rnd.sample(sorted(held), rnd.randint(1, len(held)))
            await owner_c.ack(ids)
            for i in ids:
                o, m = held.pop(i)
                b = o.open(m)
                acked.add(b)
                del queued[b]
        elif op == "subscribe" and not subscribed:
            for o in owners:
                await o.subscribe(owner_c)
            subscribed = True
        elif op == "reconnect":
            await owner_c.close()
            owner_c = await RelayClient.connect(url)
            held.clear()
            subscribed = False

    # Drain on a fresh connection: exactly the unacknowledged blocks remain.
    await owner_c.close()
    c = await RelayClient.connect(url)
    left: dict[bytes, bytes] = {}
    for o in owners:
        while msgs := await o.fetch(c):
            for m in msgs:
                left[o.open(m)] = o.owner_id
            await c.ack([m.msg_id for m in msgs])
    assert left == queued
    await c.close()
    await sender.close()
    await asyncio.sleep(0)


@pytest.mark.both_backends
def test_random_sequences_match_model(relay: RelayProcess) -> None:
    @settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 2**32))
    def one(seed: int) -> None:
        run(scenario(relay.url, seed))

    one()
    assert "Traceback" not in relay.output()
