"""The storage budget cannot be held through a few long queues (review of issue 15, item 3).
Before, whoever filled the budget (free deposits into its own token mailboxes, kept alive by a
subscription a month) refused every deposit relay-wide, and refilled first whenever honest
owners acknowledged. Now, above crowded_fraction of the budget, a mailbox holding
crowded_queue_limit blocks gets `queue_full` while short queues still take deposits; the budget
is also rebuilt from storage after a restart."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import RelayClient, RelayError
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import Owner, block, new_owner

BLOCK = wire.BLOCK_SIZE


async def _fill(c: RelayClient, mb: Owner, token: bytes) -> tuple[int, int]:
    """Deposit into `mb` until refused: (accepted, the refusal's code)."""
    n = 0
    while True:
        try:
            await c.deposit(mb.deposit_id, block(), token=token)
        except RelayError as exc:
            return n, exc.code
        n += 1


@pytest.mark.both_backends
def test_a_crowded_budget_still_takes_short_queues(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(storage_budget=16 * BLOCK, queue_limit=100, crowded_fraction=0.5,
                       crowded_queue_limit=4)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        hog = await new_owner(c, token=token)
        honest = await new_owner(c, token=token)
        other = await new_owner(c, token=token)
        # One long queue takes half the budget, and no more.
        assert await _fill(c, hog, token) == (8, wire.E_QUEUE_FULL)
        # Short queues still take deposits, up to crowded_queue_limit each ...
        assert await _fill(c, honest, token) == (4, wire.E_QUEUE_FULL)
        # ... until the whole budget is used: then `full`, for everyone.
        assert await _fill(c, other, token) == (4, wire.E_FULL)
        # The honest owner drains: its queue takes deposits again (the hog's does not).
        got = await honest.fetch(c, 4)
        await c.ack([m.msg_id for m in got])
        assert (await _fill(c, hog, token))[0] == 0
        assert await _fill(c, honest, token) == (4, wire.E_FULL)
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_a_full_budget_stays_full_across_a_restart(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """The counts are rebuilt from storage at start: a restart neither forgets what is stored
    (room beyond the budget) nor keeps what was acknowledged before it."""
    rp = relay_factory(storage_budget=8 * BLOCK, queue_limit=100, crowded_queue_limit=100)
    token = os.urandom(32)

    async def before() -> Owner:
        c = await RelayClient.connect(rp.url)
        mb = await new_owner(c, token=token)
        assert await _fill(c, mb, token) == (8, wire.E_FULL)
        await c.close()
        return mb

    mb = run(before())
    assert rp.terminate() == 0
    rp.start()

    async def after() -> None:
        c = await RelayClient.connect(rp.url)
        assert await _fill(c, mb, token) == (0, wire.E_FULL)
        got = await mb.fetch(c, 3)
        await c.ack([m.msg_id for m in got])
        assert await _fill(c, mb, token) == (3, wire.E_FULL)
        await c.close()

    run(after())
