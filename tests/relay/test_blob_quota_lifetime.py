"""A blob quota has a lifetime (review of issue 15, item 4): before, a quota lasted as long as
its connection, and any frame (or a subscription) kept that alive, so one proof of work held
the whole blob area indefinitely. Now what is left of a quota is released after
blob_quota_idle seconds without a put, and blob_quota_lifetime seconds after its grant in all.
Short lifetimes here; the test waits by polling, never asserts a time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest

from relay import wire
from relay.client import RelayClient, RelayError
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block

BLOCK = wire.BLOCK_SIZE


async def _granted(c: RelayClient, blocks: int) -> bool:
    try:
        return await c.blob_quota(blocks) == blocks
    except RelayError as exc:
        assert exc.code == wire.E_FULL
        return False


async def _put(c: RelayClient) -> None:
    await c.blob_put(os.urandom(16), os.urandom(32), block())


@pytest.mark.both_backends
def test_an_idle_blob_quota_is_released(relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(blob_max_bytes=8 * BLOCK, blob_quota_idle=1, blob_quota_lifetime=600)

    async def body() -> None:
        holder = await RelayClient.connect(rp.url)
        other = await RelayClient.connect(rp.url)
        assert await holder.blob_quota(8) == 8
        deadline = time.monotonic() + 30
        while not await _granted(other, 8):  # the holder's connection stays open meanwhile
            assert time.monotonic() < deadline, "the idle quota was never released"
            await asyncio.sleep(0.2)
        with pytest.raises(RelayError) as e:
            await _put(holder)
        assert e.value.code == wire.E_LIMIT  # what it did not use is gone
        await _put(other)
        await holder.close()
        await other.close()

    run(body())


@pytest.mark.both_backends
def test_a_used_blob_quota_ends_with_its_lifetime(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """A holder that keeps putting (never idle) still loses the rest of its quota at the end
    of its lifetime: the area is not its for as long as it keeps a trickle going."""
    quota = 60
    rp = relay_factory(blob_max_bytes=64 * BLOCK, blob_quota_idle=600, blob_quota_lifetime=2)

    async def body() -> None:
        holder = await RelayClient.connect(rp.url)
        other = await RelayClient.connect(rp.url)
        assert await holder.blob_quota(quota) == quota
        puts = 0
        while True:
            try:
                await _put(holder)
            except RelayError as exc:
                assert exc.code == wire.E_LIMIT
                break
            puts += 1
            assert puts < quota, "the quota outlived its lifetime"
            await asyncio.sleep(0.2)
        assert await _granted(other, 64 - puts)  # the rest went back to the area
        await holder.close()
        await other.close()

    run(body())
