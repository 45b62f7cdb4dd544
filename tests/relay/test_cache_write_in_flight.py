"""A mailbox whose deposit is being written stays in the relay's cache (review of the turnstile,
item 1). Evicted meanwhile, the owner's SUBSCRIBE loaded a second object for it, with no block
queued yet; the write's push looked for a subscriber on the first one and found none, so the
acknowledged block reached neither that SUBSCRIBE nor (the second object counting 0 queued)
any later one: only a FETCH found it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web

from relay.app import RELAY_KEY, create_app
from relay.client import RelayClient
from relay.config import Config

from .conftest import run
from .helpers import block, new_owner, next_message


@pytest.mark.both_backends
def test_a_block_written_while_the_cache_is_full_reaches_every_subscription(
        tmp_path: Path, store: str) -> None:
    async def body() -> None:
        cfg = Config(data_dir=str(tmp_path), store=store, pow_deposit_bits=0, pow_create_bits=0)
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

            def slow(mailbox: int, expiry: int, sealed: bytes,
                     limit: int = 0) -> asyncio.Future[int]:
                out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

                async def later() -> None:
                    await gate.wait()
                    out.set_result(await orig(mailbox, expiry, sealed, limit))
                relay.spawn(later())
                return out

            relay.storage.enqueue = slow  # type: ignore[method-assign]
            sent = block(b"ONE")
            dep = asyncio.create_task((await connect()).deposit(owner.deposit_id, sent,
                                                                token=token))
            while relay.storage.enqueue is slow and not any(
                    mb.writing for mb in relay.by_id.values()):
                assert not dep.done(), dep.result()  # (a deposit that failed: why)
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


@pytest.mark.both_backends
def test_a_pipelined_deposit_waiting_its_turn_writes_on_the_mailbox_cached_now(
        tmp_path: Path, store: str) -> None:
    """The slow path (h_deposit): a deposit to a cached mailbox Y waits behind the same
    connection's deposit whose mailbox X is loading; meanwhile a full cache lets Y go and the
    owner's SUBSCRIBE loads another object for it. The write must count and push on that one
    (it was acknowledged, then reached no subscription)."""
    async def body() -> None:
        cfg = Config(data_dir=str(tmp_path), store=store, pow_deposit_bits=0, pow_create_bits=0)
        app = create_app(cfg)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/ws"
        relay = app[RELAY_KEY]
        conns: list[RelayClient] = []

        async def connect() -> RelayClient:
            conns.append(await RelayClient.connect(url))
            return conns[-1]

        try:
            c = await connect()
            ty, tx = os.urandom(32), os.urandom(32)
            y = await new_owner(c, token=ty)
            x = await new_owner(c, token=tx)
            other = await new_owner(c)
            for mb in list(relay.by_id.values()):
                relay._uncache(mb)
            zero, second = block(b"zero"), block(b"B")
            await (await connect()).deposit(y.deposit_id, zero, token=ty)
            assert len(relay.by_id) == 1  # Y alone, cached by that deposit
            relay.cache_max = 1
            orig = relay.storage.load_mailbox
            gate = asyncio.Event()

            async def slow(**kw: bytes | None) -> object:
                await gate.wait()
                return await orig(**kw)

            relay.storage.load_mailbox = slow  # type: ignore[method-assign,assignment]
            d = await connect()
            a = asyncio.create_task(d.deposit(x.deposit_id, block(b"A"), token=tx))
            while not relay._loading:  # X is loading: the next deposit waits its turn
                assert not a.done(), a.result()
                await asyncio.sleep(0.01)
            b = asyncio.create_task(d.deposit(y.deposit_id, second, token=ty))
            await asyncio.sleep(0.1)  # (ordering only) B holds the Y object while it waits
            relay.storage.load_mailbox = orig  # type: ignore[method-assign]
            await other.subscribe(await connect())  # the cache is full: Y goes
            first = await connect()
            await y.subscribe(first)  # loads another object for Y
            gate.set()
            await a
            await b
            got = [y.open(await next_message(first, 10)) for _ in range(2)]
            assert sorted(got) == sorted([zero, second])
        finally:
            for conn in conns:
                await conn.close()
            await runner.cleanup()

    run(body())


def test_held_mailboxes_at_the_front_do_not_stop_eviction(tmp_path: Path) -> None:
    """The cache looked only at its 64 oldest entries for one to let go: 64 subscribed
    mailboxes there (long-lived subscribers after a restart) stopped every eviction, and the
    cache grew without bound."""
    from nacl.signing import SigningKey

    from relay.app import Relay
    from relay.state import MailboxState
    from relay.storage import MailboxRow

    relay = Relay(Config(data_dir=str(tmp_path)))
    relay.cache_max = 100
    sig = bytes(SigningKey.generate().verify_key)

    def state(i: int) -> MailboxState:
        row = MailboxRow(i, b"o%d" % i, b"d%d" % i, sig, b"s" * 32, b"b" * 32, False, (), 0)
        return MailboxState(row, relay.cfg, 0.0)

    for i in range(64):
        mb = state(i)
        mb.sub = object()  # type: ignore[assignment]
        relay._cache(mb)
    for i in range(64, 2000):
        relay._cache(state(i))
    assert len(relay.by_id) <= relay.cache_max + 64
    assert all(i in relay.by_id for i in range(64))  # held ones stay
