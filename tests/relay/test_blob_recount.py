"""A recount of the blob area on a shared store (Relay.recount, at every sweep) must not lose a
put that is in flight or settles while the count is read: it did (the count read, then assigned),
so for one sweep the area looked emptier than it was and a quota could be granted past it (seen
once in CI as a second client's quota granted right after four puts filled the area)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from relay.app import RELAY_KEY, create_app
from relay.client import RelayClient
from relay.config import Config

from .conftest import run
from .helpers import block


def test_a_put_in_flight_or_settling_during_a_recount_stays_counted(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = Config(data_dir=str(tmp_path), pow_deposit_bits=0, pow_create_bits=0,
                     pow_blob_bits=0, sweep_interval=3600)
        app = create_app(cfg)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/ws"
        relay = app[RELAY_KEY]
        c = await RelayClient.connect(url)
        try:
            orig_put, orig_count = relay.storage.put_blob, relay.storage.blob_count
            gate = asyncio.Event()

            def gated_put(*args: object) -> asyncio.Future[bool]:
                out: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

                async def later() -> None:
                    await gate.wait()
                    out.set_result(await orig_put(*args))  # type: ignore[arg-type]
                relay.spawn(later())
                return out

            relay.storage.put_blob = gated_put  # type: ignore[method-assign]
            assert await c.blob_quota(2) == 2
            first = asyncio.ensure_future(c.blob_put(os.urandom(16), os.urandom(32), block()))
            while relay.blob_writing == 0:
                await asyncio.sleep(0.01)
            # 1. The put is in flight for the whole recount: not stored, still counted.
            await relay.recount()
            assert relay.blob_blocks == 1

            # 2. The put settles while the count is read (the read saw it unstored).
            async def count_then_settle() -> int:
                n = await orig_count()
                gate.set()
                await first
                return n

            relay.storage.blob_count = count_then_settle  # type: ignore[method-assign]
            await relay.recount()
            assert relay.blob_blocks == 1
            relay.storage.blob_count = orig_count  # type: ignore[method-assign]
            await relay.recount()
            assert relay.blob_blocks == 1 and relay.blob_writing == 0
        finally:
            await c.close()
            await runner.cleanup()

    run(body())
