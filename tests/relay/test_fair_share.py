"""A connection's fair share of the relay while it is loaded (issue 15, item 8): with
fair_load storage operations waiting relay-wide, a connection that already has fair_share of
its own waiting gets `busy` (15) for another DEPOSIT or BLOB_PUT, and its reading pauses until
one of its own is done, while a light connection's deposit is still taken. The caps are lowered
so one pipelining client reaches them at once; nothing here asserts a time."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from relay import wire
from relay.client import RelayClient, RelayError
from relay.config import Config
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner

FLOOD = 300


def test_defaults_share_the_writer_under_load() -> None:
    cfg = Config()
    assert 0 < cfg.fair_share < cfg.max_inflight  # a pipelining client cannot fill its slots
    assert 0 < cfg.fair_load < cfg.max_pending_writes


def test_a_connection_over_its_share_gets_busy_and_a_light_one_is_served(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(fair_load=1, fair_share=1)

    async def body() -> None:
        setup = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        heavy_box = await new_owner(setup, token=token)
        light_box = await new_owner(setup, token=token)
        heavy = await RelayClient.connect(rp.url)
        light = await RelayClient.connect(rp.url)

        async def one(c: RelayClient, deposit_id: bytes) -> int:
            try:
                await c.deposit(deposit_id, block(), token=token)
            except RelayError as exc:
                return exc.code
            return 0

        flood = [asyncio.ensure_future(one(heavy, heavy_box.deposit_id)) for _ in range(FLOOD)]
        await asyncio.sleep(0)  # the flood's frames are on their way first
        light_codes = [await one(light, light_box.deposit_id) for _ in range(5)]
        codes = await asyncio.gather(*flood)
        # The pipelining connection was held to its share: part of its flood was refused...
        assert codes.count(wire.E_BUSY) > 0, "a connection over its share was never refused"
        assert set(codes) <= {0, wire.E_BUSY}
        assert codes.count(0) > 0
        # ...while one deposit at a time, from another connection, was always taken.
        assert light_codes == [0] * 5
        # Refusals are no punishment: once its writes are done the heavy one deposits again.
        assert await one(heavy, heavy_box.deposit_id) == 0
        # Acknowledgements are never held back by the share (they free room).
        got = await light_box.fetch(setup, 32)
        await setup.ack([m.msg_id for m in got])
        for c in (setup, heavy, light):
            await c.close()

    run(body())


def test_off_when_fair_load_is_zero(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(fair_load=0, fair_share=1)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        box = await new_owner(c, token=token)
        await asyncio.gather(*(c.deposit(box.deposit_id, block(), token=token)
                               for _ in range(100)))
        await c.close()

    run(body())
