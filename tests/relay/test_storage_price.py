"""Issue 15, items 1, 4 and 6: every way of making the relay store something has a price or a
cap. Mailbox creation costs a proof of work; a relay-wide storage budget, a full mailbox table
and a full blob area answer `full` (17); mailboxes nobody uses expire; a blob quota's proof of
work grows with its size and is reserved in the blob area when it is granted; unfetched blobs
expire after blob_ttl, well before queued blocks. Caps are lowered so each limit is reached in
a few requests; expiries are waited for by polling, never by asserting a time."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from relay import pow as pow_
from relay import wire
from relay.client import RelayClient, RelayError
from relay.config import Config
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner

BLOCK = wire.BLOCK_SIZE


async def _code(coro: Awaitable[Any]) -> int:
    with pytest.raises(RelayError) as e:
        await coro
    return e.value.code


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "the relay never got there"
        await asyncio.sleep(0.2)


def test_defaults_are_sized_for_storage() -> None:
    """The defaults the Limits section of docs/relay-protocol.md argues for."""
    cfg = Config()
    assert cfg.queue_limit <= 1024  # was 10,000 (160 MiB per free mailbox)
    assert cfg.pow_create_bits >= 20  # was free
    assert cfg.blob_ttl <= 72 * 3600 < cfg.message_ttl  # was the message TTL, 14 days
    assert 0 < cfg.mailbox_ttl < 365 * 24 * 3600  # was never
    assert cfg.storage_budget == 0  # sized to the disk at start
    hello = wire.HelloOk(bytes(32), BLOCK, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert wire.HelloOk.parse(hello.encode_body()).pow_create_bits == 8


@pytest.mark.both_backends
def test_create_needs_a_proof_of_work_bound_to_its_keys(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(pow_create_bits=12)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        assert c.hello is not None and c.hello.pow_create_bits == 12
        key, box_pub = SigningKey.generate(), bytes(PrivateKey.generate().public_key)

        async def raw_create(nonce: bytes) -> int:
            rid = c.next_rid()
            unsigned = bytes(key.verify_key) + box_pub + b"\x00" + nonce
            sig = key.sign(wire.auth_message(c.challenge, wire.encode(wire.CREATE, rid,
                                                                      unsigned))).signature
            return await _code(c.request(wire.CREATE, unsigned + sig, rid=rid))

        assert await raw_create(bytes(16)) == wire.E_BAD_POW  # unpaid
        # Paid for other keys: worthless for these.
        other = pow_.solve(12, c.challenge, wire.POW_CREATE, pow_.ZERO_TARGET,
                           wire.create_pow_hash(os.urandom(32), box_pub, 0))
        assert await raw_create(other) == wire.E_BAD_POW
        created = await c.create(key, box_pub)  # the reference client pays
        assert len(created.owner_id) == 16
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_relay_wide_storage_budget_answers_full(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Free mailboxes do not multiply storage: past the budget every deposit gets `full`,
    whichever mailbox it is for, until blocks are acknowledged."""
    rp = relay_factory(storage_budget=12 * BLOCK, queue_limit=100)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        a = await new_owner(c, token=token)
        b = await new_owner(c, token=token)
        for _ in range(6):
            await c.deposit(a.deposit_id, block(), token=token)
            await c.deposit(b.deposit_id, block(), token=token)
        third = await new_owner(c, token=token)  # a fresh mailbox adds no room
        for mb in (a, b, third):
            assert await _code(c.deposit(mb.deposit_id, block(), token=token)) == wire.E_FULL
        assert await _code(c.blob_quota(1)) == wire.E_FULL  # blobs share the budget
        got = await a.fetch(c, 3)
        await c.ack([m.msg_id for m in got])  # the owner drains: room again
        for _ in range(3):
            await c.deposit(third.deposit_id, block(), token=token)
        assert await _code(c.deposit(b.deposit_id, block(), token=token)) == wire.E_FULL
        await c.close()

    run(body())
    assert "relay storage full" not in rp.output()  # an answer, not a log line


@pytest.mark.both_backends
def test_mailbox_table_full_answers_full_and_unused_mailboxes_expire(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """A full mailbox table is `full` (not a per-connection `limit`); a mailbox whose owner
    neither sends a command nor holds a subscription for mailbox_ttl is deleted, which frees
    its place; a subscribed one is kept however long it stays quiet."""
    rp = relay_factory(max_mailboxes=2, mailbox_ttl=3, mailbox_use_granularity=1,
                       sweep_interval=0.2)

    async def body() -> None:
        holder = await RelayClient.connect(rp.url)
        token = os.urandom(32)
        kept = await new_owner(holder, token=token)
        await kept.subscribe(holder)
        maker = await RelayClient.connect(rp.url)
        unused = await new_owner(maker, token=token)
        await maker.close()
        c = await RelayClient.connect(rp.url)
        key = SigningKey.generate()
        assert await _code(c.create(key, bytes(PrivateKey.generate().public_key))) == wire.E_FULL

        async def unused_gone() -> bool:
            try:
                await c.deposit(unused.deposit_id, block(), token=token)
            except RelayError as exc:
                assert exc.code == wire.E_DENIED
                return True
            return False

        # Deposits are not a use: only the owner's commands and subscriptions are.
        await _until(unused_gone)
        await c.create(key, bytes(PrivateKey.generate().public_key))  # its place is free
        # The subscribed mailbox outlived the TTL and still delivers.
        b = block(b"kept")
        await c.deposit(kept.deposit_id, b, token=token)
        while True:
            m = await asyncio.wait_for(holder.messages.get(), 10)
            if kept.open(m) == b:
                break
        await c.close()
        await holder.close()

    run(body())


def _weak_nonce(bits: int, want: int, challenge: bytes, blocks: int) -> bytes:
    """A nonce good for `bits` zero bits and not for `want`."""
    target = wire.blob_pow_target(blocks)
    while True:
        nonce = pow_.solve(bits, challenge, wire.POW_BLOB, target)
        digest = hashlib.sha256(wire.POW_CONTEXT + challenge + bytes([wire.POW_BLOB]) + target
                                + pow_.ZERO_HASH + nonce).digest()
        if pow_.leading_zero_bits(digest) < want:
            return nonce


@pytest.mark.both_backends
def test_blob_quota_price_grows_with_its_size(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(pow_blob_bits=6)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        assert wire.blob_pow_bits(6, 1) == wire.blob_pow_bits(6, 256) == 6
        assert wire.blob_pow_bits(6, 257) == 7
        assert wire.blob_pow_bits(6, 8192) == 11  # 32 units: 32 times the hashes
        # The price of a small quota does not buy a large one.
        cheap = _weak_nonce(6, 11, c.challenge, 8192)
        frame = struct.pack(">I", 8192) + cheap
        assert await _code(c.request(wire.BLOB_QUOTA, frame)) == wire.E_BAD_POW
        # Nor does a proof made for another size.
        other = pow_.solve(11, c.challenge, wire.POW_BLOB, wire.blob_pow_target(8191))
        assert await _code(c.request(wire.BLOB_QUOTA, struct.pack(">I", 8192) + other)) \
            == wire.E_BAD_POW
        assert await _code(c.blob_quota(8193)) == wire.E_LIMIT  # over blob_quota_blocks
        assert await c.blob_quota(8192) == 8192
        assert await c.blob_quota(3) == 3  # replaces what was left
        for _ in range(3):
            await c.blob_put(os.urandom(16), os.urandom(32), block())
        assert await _code(c.blob_put(os.urandom(16), os.urandom(32), block())) == wire.E_LIMIT
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_blob_quotas_are_reserved_in_the_area_until_used_or_released(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """The area counts uploads granted and in flight, not only those stored: two quotas
    cannot together promise more than the area holds."""
    rp = relay_factory(blob_max_bytes=10 * BLOCK, sweep_interval=0.05)

    async def body() -> None:
        a = await RelayClient.connect(rp.url)
        b = await RelayClient.connect(rp.url)
        assert await a.blob_quota(8) == 8
        assert await _code(b.blob_quota(8)) == wire.E_FULL
        await asyncio.gather(*(a.blob_put(os.urandom(16), os.urandom(32), block())
                               for _ in range(8)))
        assert await b.blob_quota(2) == 2
        c = await RelayClient.connect(rp.url)
        assert await _code(c.blob_quota(1)) == wire.E_FULL  # 8 stored + 2 reserved
        await b.close()  # its unused quota goes back

        async def released() -> bool:
            try:
                return await c.blob_quota(2) == 2
            except RelayError as exc:
                assert exc.code == wire.E_FULL
                return False

        await _until(released)
        await a.close()
        await c.close()

    run(body())


@pytest.mark.both_backends
def test_unfetched_blobs_expire_long_before_queued_blocks(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(blob_ttl=2, expiry_granularity=1, sweep_interval=0.2,
                       blob_max_bytes=4 * BLOCK)

    async def body() -> None:
        c = await RelayClient.connect(rp.url)
        up = await RelayClient.connect(rp.url)
        try:
            await checks(c, up)
        finally:  # a failed check leaves no client for a later test's garbage collection
            await up.close()
            await c.close()

    async def checks(c: RelayClient, up: RelayClient) -> None:
        token = os.urandom(32)
        owner = await new_owner(c, token=token)
        await c.deposit(owner.deposit_id, block(), token=token)
        assert await c.blob_quota(4) == 4
        ids = [(os.urandom(16), os.urandom(32)) for _ in range(4)]
        for blob_id, cap in ids:
            await c.blob_put(blob_id, cap, block())
        assert await _code(up.blob_quota(1)) == wire.E_FULL
        key = PrivateKey.generate()

        async def gone() -> bool:
            try:
                await c.blob_get(*ids[0], key)
            except RelayError as exc:
                assert exc.code == wire.E_DENIED
                return True
            return False

        await _until(gone)
        assert len(await owner.fetch(c, 32)) == 1  # the queued block is still there
        assert await up.blob_quota(4) == 4  # expired blobs left the area's count

    run(body())


def test_a_schema_2_database_gets_last_use_columns_counting_as_used_now(tmp_path: Path) -> None:
    """Upgrade 2 -> 3: every mailbox counts as used at the upgrade (never expired at once),
    rounded down to the granularity like every other last use."""
    import sqlite3

    from relay import storage as st

    path = tmp_path / "relay.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(st._SCHEMA + "\nPRAGMA user_version=2;")
    db.execute("INSERT INTO mailboxes VALUES (7, ?, ?, x'01', x'02', x'03', 0, x'')",
               (b"o" * 32, b"d" * 32))
    db.close()

    async def body() -> st.MailboxRow | None:
        s = st.SQLiteStorage(str(tmp_path), clock=lambda: 1_000_123.0, use_granularity=1000)
        await s.open()
        try:
            return await s.load_mailbox(okey=b"o" * 32)
        finally:
            await s.close()

    row = run(body())
    assert row is not None and row.id == 7 and row.used == 1_000_000
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (st.SCHEMA_VERSION,) == (4,)
    db.close()
