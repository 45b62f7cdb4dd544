"""A connection's fair share of the relay while it is loaded (issue 15, item 8): with
fair_load storage operations waiting relay-wide, a connection that already has fair_share of
its own waiting is not read further (its next DEPOSIT or BLOB_PUT, and everything after it,
waits in its socket) until one of its own is done, while a light connection's deposit is
still taken. Nothing is refused: a pipelining client only goes slower. The caps are lowered so
one pipelining client reaches them at once; nothing here asserts a time, only orders."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import RelayClient, RelayError
from relay.config import Config
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner

FLOOD = 20


def test_defaults_share_the_writer_under_load() -> None:
    cfg = Config()
    assert 0 < cfg.fair_share < cfg.max_inflight  # a pipelining client cannot fill its slots
    assert 0 < cfg.fair_load < cfg.max_pending_writes


async def _flood_then_marker(rp: RelayProcess) -> tuple[list[str], list[str]]:
    """FLOOD deposits pipelined on one connection, then a frame answered without storage work;
    meanwhile another connection deposits one block at a time. The order of the heavy
    connection's answers, and the light one's outcomes."""
    setup = await RelayClient.connect(rp.url)
    token = os.urandom(32)
    heavy_box = await new_owner(setup, token=token)
    light_box = await new_owner(setup, token=token)
    heavy = await RelayClient.connect(rp.url)
    light = await RelayClient.connect(rp.url)
    order: list[str] = []

    async def deposit() -> None:
        await heavy.deposit(heavy_box.deposit_id, block(), token=token)
        order.append("ok")

    async def marker() -> None:
        try:
            await heavy.ack([os.urandom(wire.ID_LEN)])  # answered at once, nothing stored
        except RelayError as exc:
            assert exc.code == wire.E_UNKNOWN_MESSAGE
        order.append("marker")

    flood = [asyncio.ensure_future(deposit()) for _ in range(FLOOD)]
    mark = asyncio.ensure_future(marker())
    light_codes = []
    for _ in range(3):
        try:
            await light.deposit(light_box.deposit_id, block(), token=token)
            light_codes.append("ok")
        except RelayError as exc:
            light_codes.append(str(exc.code))
    await asyncio.gather(*flood, mark)  # every deposit succeeds: none is refused
    for c in (setup, heavy, light):
        await c.close()
    return order, light_codes


@pytest.mark.both_backends
def test_a_connection_over_its_share_is_not_read_until_its_writes_are_done(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(fair_load=1, fair_share=1)
    order, light = run(_flood_then_marker(rp))
    # The marker was sent after the flood: read only once the heavy connection's writes got
    # their turns, so some of them were answered before it. Without the share the relay reads
    # all 20 at once (up to max_inflight) and answers the marker before any write is done.
    assert order.index("marker") > 0, order
    assert order.count("ok") == FLOOD
    assert light == ["ok"] * 3  # one deposit at a time, from another connection: taken


@pytest.mark.both_backends
def test_off_when_fair_load_is_zero(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(fair_load=0, fair_share=1)
    order, light = run(_flood_then_marker(rp))
    assert order.count("ok") == FLOOD and light == ["ok"] * 3
