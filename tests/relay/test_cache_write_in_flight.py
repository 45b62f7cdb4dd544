"""A mailbox whose deposit is being written stays in the relay's cache (review of the turnstile,
item 1). Evicted meanwhile, the owner's SUBSCRIBE loaded a second object for it, with no block
queued yet; the write's push looked for a subscriber on the first one and found none, so the
acknowledged block reached neither that SUBSCRIBE nor (the second object counting 0 queued)
any later one: only a FETCH found it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from relay.app import RELAY_KEY, create_app
from relay.client import RelayClient
from relay.config import Config

from .conftest import run
from .helpers import block, new_owner, next_message


def test_a_block_written_while_the_cache_is_full_reaches_every_subscription(
        tmp_path: Path) -> None:
    async def body() -> None:
        cfg = Config(data_dir=str(tmp_path), pow_deposit_bits=0, pow_create_bits=0)
        app = create_app(cfg)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/ws"
        relay = app[RELAY_KEY]
        relay.cache_max = 1  # any other mailbox loaded pushes this one out of the cache
        conns: list[RelayClient] = []

        async def connect() -> RelayClient:
            conns.append(await RelayClient.connect(url))
            return conns[-1]

        try:
            c = await connect()
            token = os.urandom(32)
            owner = await new_owner(c, token=token)
            other = await new_owner(c)
            # The write lands late (the writer serving others first), so that the cache fills
            # and the owner subscribes while it is in flight.
            orig = relay.storage.enqueue
            gate = asyncio.Event()

            def slow(mailbox: int, expiry: int, sealed: bytes) -> asyncio.Future[int]:
                out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

                async def later() -> None:
                    await gate.wait()
                    out.set_result(await orig(mailbox, expiry, sealed))
                relay.spawn(later())
                return out

            relay.storage.enqueue = slow  # type: ignore[method-assign]
            sent = block(b"ONE")
            dep = asyncio.create_task((await connect()).deposit(owner.deposit_id, sent,
                                                                token=token))
            while relay.storage.enqueue is slow and not any(
                    mb.writing for mb in relay.by_id.values()):
                await asyncio.sleep(0.01)
            relay.storage.enqueue = orig  # type: ignore[method-assign]
            await other.subscribe(await connect())  # loads another mailbox: the cache is full
            first = await connect()
            await owner.subscribe(first)
            gate.set()
            await dep
            assert owner.open(await next_message(first, 10)) == sent
            await first.close()
            for _ in range(2):  # not acknowledged: every later subscription gets it again
                later = await connect()
                await owner.subscribe(later)
                assert owner.open(await next_message(later, 10)) == sent
                await later.close()
        finally:
            for conn in conns:
                await conn.close()
            await runner.cleanup()

    run(body())
