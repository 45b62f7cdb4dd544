"""A connection that ends with writes in flight leaves the relay's counts right (review of
issue 15, item 1). When a connection closes, the relay cancels its handlers; a write already
queued to the storage writer commits all the same, so what the relay counts (blobs, queued
blocks, mailboxes) must follow the write, never the cancelled handler. Before the fix, a client
taking a blob quota, sending its puts and closing at once filled the blob area past its size
with every quota still granted; an ACK of several mailboxes or a DELETE cut off the same way
left phantom blocks that answered `full` until a restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from relay import wire
from relay.client import RelayClient, RelayError
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner
from tests.relay.relaydb import count as _count

BLOCK = wire.BLOCK_SIZE


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "the relay never got there"
        await asyncio.sleep(0.2)


def _signed(c: RelayClient, ftype: int, key: SigningKey, owner_id: bytes) -> bytes:
    rid = c.next_rid()
    sig = key.sign(wire.auth_message(c.challenge, wire.encode(ftype, rid, owner_id))).signature
    return wire.encode(ftype, rid, owner_id + sig)


async def _granted(c: RelayClient, blocks: int) -> bool:
    try:
        return await c.blob_quota(blocks) == blocks
    except RelayError as exc:
        assert exc.code == wire.E_FULL
        return False


@pytest.mark.both_backends
def test_blob_puts_cut_off_by_a_closed_connection_stay_counted(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """The reviewer's repro: a 64-block area, rounds of a 16-block quota, 16 puts and a close."""
    area = 64
    rp = relay_factory(blob_max_bytes=area * BLOCK)

    async def body() -> None:
        for _ in range(12):
            c = await RelayClient.connect(rp.url)
            if await _granted(c, 16):
                for _ in range(16):
                    await c.send_raw(wire.encode(wire.BLOB_PUT, c.next_rid(),
                                                 os.urandom(16) + os.urandom(32) + block()))
            await c.close()
        # Every put that was queued is stored by now or soon: the area never holds more than
        # its size, and what the relay counts is what it holds.
        probe = await RelayClient.connect(rp.url)
        stored = 0

        async def settled() -> bool:
            nonlocal stored
            stored = _count(rp, "blobs")
            return stored >= area or await _granted(probe, area - stored)

        await _until(settled)
        assert stored <= area
        if stored < area:
            await probe.close()
            probe = await RelayClient.connect(rp.url)
        assert not await _granted(probe, area - stored + 1)  # not one block more than is left
        await probe.close()

    run(body())


@pytest.mark.both_backends
def test_ack_and_delete_cut_off_by_a_closed_connection_free_their_blocks(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Rounds of an ACK of two mailboxes' blocks and a DELETE, each sent just before the
    connection closes (whether each ran is up to the race): once the relay is idle, it admits
    exactly what its budget and mailbox table have left by what the database holds: no
    phantom blocks answering `full`, no phantom mailboxes."""
    budget, table = 128, 12
    rp = relay_factory(storage_budget=budget * BLOCK, queue_limit=200, max_mailboxes=table,
                       crowded_queue_limit=200)

    async def fill(c: RelayClient, mbs: list[Any], token: bytes) -> int:
        n = 0
        while True:
            try:
                await c.deposit(mbs[n % len(mbs)].deposit_id, block(), token=token)
            except RelayError as exc:
                assert exc.code == wire.E_FULL
                return n
            n += 1

    async def body() -> None:
        depositor = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        a = await new_owner(depositor, token=token)
        b = await new_owner(depositor, token=token)
        for i in range(10):
            for mb in (a, b) * 4:
                await depositor.deposit(mb.deposit_id, block(), token=token)
            owner = await RelayClient.connect(rp.url)
            d = await new_owner(owner, token=token)
            got = await a.fetch(owner, 4) + await b.fetch(owner, 4)
            # Writes of this connection ahead of the ACK keep the writer busy with it, so the
            # close lands while the ACK and the DELETE are queued or being written.
            for _ in range(16):
                await owner.send_raw(wire.encode(wire.DEPOSIT, owner.next_rid(),
                                                 d.deposit_id + bytes([wire.AUTH_TOKEN]) + token
                                                 + block()))
            # One ACK for two mailboxes (the relay's task path), a DELETE, then gone.
            await owner.send_raw(wire.encode(wire.ACK, owner.next_rid(),
                                             b"".join(m.msg_id for m in got)))
            await owner.send_raw(_signed(owner, wire.DELETE, d.sig, d.owner_id))
            await asyncio.sleep(0.001 * i)
            await owner.close()
        last = (-1, -1)

        async def idle() -> bool:  # the database stopped changing
            nonlocal last
            now = (_count(rp, "messages"), _count(rp, "mailboxes"))
            same, last = now == last, now
            return same

        await _until(idle)
        held, boxes = last
        assert await fill(depositor, [a, b], token) == budget - held
        made = 0
        while True:
            try:
                await new_owner(depositor)
            except RelayError as exc:
                assert exc.code == wire.E_FULL
                break
            made += 1
        assert made == table - boxes
        await depositor.close()

    run(body())


def test_storage_pending_follows_the_writer_not_the_caller(tmp_path: Path) -> None:
    """storage.pending (what bounds the writer's queue) drops when an operation is done, not
    when the coroutine awaiting it is cancelled."""
    from relay import storage as st

    async def body() -> None:
        s = st.SQLiteStorage(str(tmp_path))
        await s.open()
        try:
            futs: list[asyncio.Future[Any]] = [s.enqueue(1, 10**9, b"x" * BLOCK)
                                               for _ in range(50)]
            waiter = asyncio.ensure_future(asyncio.gather(*futs))
            await asyncio.sleep(0)
            waiter.cancel()  # cancels every future it awaits
            await asyncio.sleep(0)
            assert all(f.cancelled() for f in futs)
            assert s.pending > 0 or _rows(tmp_path) == 50  # still counted while queued
            await _until_sync(lambda: s.pending == 0)
            assert _rows(tmp_path) == 50  # cancelled callers, and every write happened
        finally:
            await s.close()

    run(body())


def _rows(tmp: Path) -> int:
    db = sqlite3.connect(f"file:{tmp / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        db.close()


async def _until_sync(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.05)


@pytest.mark.both_backends
def test_blob_deletes_cut_off_by_a_closed_connection_free_their_room(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """BLOB_DELs sent just before a close: the blobs they deleted leave the area's count."""
    area = 16
    rp = relay_factory(blob_max_bytes=area * BLOCK)

    async def body() -> None:
        token = os.urandom(32)
        live: list[tuple[bytes, bytes]] = []  # (maybe) stored: deleting a missing one is harmless
        for i in range(16):
            up = await RelayClient.connect(rp.url)
            room = area - _count(rp, "blobs")
            ids = [(os.urandom(16), os.urandom(32)) for _ in range(room)]
            if room and await _granted(up, room):
                for blob_id, cap in ids:
                    await up.blob_put(blob_id, cap, block())
                live += ids
            await up.close()
            gone = await RelayClient.connect(rp.url)
            mb = await new_owner(gone, token=token)
            # Deposits of this connection ahead keep the writer busy with it, so the close
            # lands while the deletions are queued or being written.
            for _ in range(32):
                await gone.send_raw(wire.encode(wire.DEPOSIT, gone.next_rid(),
                                                mb.deposit_id + bytes([wire.AUTH_TOKEN]) + token
                                                + block()))
            for blob_id, cap in live:
                await gone.send_raw(wire.encode(wire.BLOB_DEL, gone.next_rid(), blob_id + cap))
            await asyncio.sleep(0.001 * i)
            await gone.close()
        last = -1

        async def idle() -> bool:
            nonlocal last
            now = _count(rp, "blobs")
            same, last = now == last, now
            return same

        await _until(idle)
        probe = await RelayClient.connect(rp.url)
        if last < area:
            assert await _granted(probe, area - last)  # every deleted blob's room is back
        assert not await _granted(probe, area - last + 1)
        await probe.close()

    run(body())


@pytest.mark.both_backends
def test_deposits_cut_off_by_a_closed_connection_stay_counted(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Deposits to mailboxes the relay has not loaded yet (its task path, after a restart),
    sent just before a close: those stored are counted, so the budget is not passed."""
    budget = 256
    rp = relay_factory(storage_budget=budget * BLOCK, queue_limit=1000, crowded_queue_limit=1000)
    token = os.urandom(32)

    async def make() -> list[Any]:
        c = await RelayClient.connect(rp.url)
        mbs = [await new_owner(c, token=token) for _ in range(12)]
        await c.close()
        return mbs

    mbs = run(make())
    assert rp.terminate() == 0
    rp.start()  # an empty mailbox cache: every first deposit loads its mailbox

    async def body() -> None:
        for i, mb in enumerate(mbs[:-1]):
            c = await RelayClient.connect(rp.url)
            for _ in range(16):
                await c.send_raw(wire.encode(wire.DEPOSIT, c.next_rid(),
                                             mb.deposit_id + bytes([wire.AUTH_TOKEN]) + token
                                             + block()))
            await asyncio.sleep(0.001 * i)
            await c.close()
        last = -1

        async def idle() -> bool:
            nonlocal last
            now = _count(rp, "messages")
            same, last = now == last, now
            return same

        await _until(idle)
        c = await RelayClient.connect(rp.url)
        n = 0
        while True:
            try:
                await c.deposit(mbs[-1].deposit_id, block(), token=token)
            except RelayError as exc:
                assert exc.code == wire.E_FULL
                break
            n += 1
        assert n == budget - last  # what is stored is what is counted
        await c.close()

    run(body())
