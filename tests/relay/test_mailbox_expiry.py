"""Mailbox expiry (review of issue 15, items 6 and 9): the sweep finds stale mailboxes through
an index on their last use, one call deletes a bounded number of blocks (the writer is
shared), a forward jump of the wall clock while the relay runs expires nothing at once, and
the upgrade from schema 2 gives every mailbox its last use without rewriting a row."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from aiohttp import web

from relay import storage as st
from relay.app import RELAY_KEY, create_app
from relay.client import RelayClient, RelayError
from relay.config import Config

from .conftest import run
from .helpers import block, new_owner


def _db(tmp: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{tmp / 'relay.sqlite3'}?mode=ro", uri=True)


def _uses_index(tmp: Path) -> bool:
    db = _db(tmp)
    try:
        plan = db.execute("EXPLAIN QUERY PLAN SELECT id FROM mailboxes WHERE used < 5").fetchall()
        return any("mailboxes_used" in str(row[-1]) for row in plan)
    finally:
        db.close()


def test_expiry_uses_an_index_and_deletes_a_bounded_number_of_blocks(tmp_path: Path) -> None:
    async def body() -> None:
        s = st.SQLiteStorage(str(tmp_path))
        await s.open()
        try:
            boxes = [await s.create_mailbox(os.urandom(32), os.urandom(32), b"s", b"b", b"o",
                                            False, 10) for _ in range(3)]
            fresh = await s.create_mailbox(os.urandom(32), os.urandom(32), b"s", b"b", b"o",
                                           False, 1000)
            for b in boxes:
                for _ in range(5):
                    await s.enqueue(b, 10**9, b"x")
            # Stops once 6 blocks went: two mailboxes (10 blocks), and says more are left.
            ids, removed, more = await s.expire_mailboxes(100, 6)
            assert (len(ids), removed, more) == (2, 10, True)
            ids2, removed2, more2 = await s.expire_mailboxes(100, 6)
            assert (removed2, more2) == (5, False)
            assert sorted(ids + ids2) == sorted(boxes) and fresh not in ids + ids2
        finally:
            await s.close()

    run(body())
    assert _uses_index(tmp_path)


def test_schema_2_upgrade_sets_last_use_by_default_and_indexes_it(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(st._SCHEMA + "\nPRAGMA user_version=2;")
    db.execute("INSERT INTO mailboxes VALUES (7, ?, ?, x'01', x'02', x'03', 0, x'')",
               (b"o" * 32, b"d" * 32))
    db.close()

    async def body() -> None:
        s = st.SQLiteStorage(str(tmp_path), clock=lambda: 1_000_123.0, use_granularity=1000)
        await s.open()
        await s.close()

    run(body())
    db = _db(tmp_path)
    try:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'mailboxes'").fetchone()
        # The upgrade's time is the column's default (no UPDATE of every row) ...
        assert "DEFAULT 1000000" in sql
        assert db.execute("SELECT used FROM mailboxes").fetchall() == [(1_000_000,)]
    finally:
        db.close()
    assert _uses_index(tmp_path)  # ... and the sweep reads an index, not the table


def test_a_forward_clock_jump_expires_no_mailbox_at_once(tmp_path: Path) -> None:
    """The wall clock jumps 10 TTLs ahead while the relay runs: the unsubscribed mailbox
    survives the sweeps of the grace period (its owner can come back); time that really
    passes (both clocks) still expires it."""
    wall, mono = [1_000_000.0], [0.0]
    cfg = Config(data_dir=str(tmp_path / "data"), mailbox_ttl=1000, mailbox_use_granularity=10,
                 sweep_interval=1e6, pow_deposit_bits=0, pow_create_bits=0)

    async def body() -> None:
        app = create_app(cfg, clock=lambda: wall[0], monotonic=lambda: mono[0])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/ws"
        relay = app[RELAY_KEY]
        try:
            c = await RelayClient.connect(url)
            token = os.urandom(32)
            o = await new_owner(c, token=token)

            async def alive() -> bool:
                try:
                    await c.deposit(o.deposit_id, block(), token=token)
                except RelayError:
                    return False
                return True

            for step in (20.0, 20.0):  # past the start's grace period, well within the TTL
                wall[0] += step
                mono[0] += step
                await relay.sweep()
            assert await alive()
            wall[0] += 10_000  # the jump: the wall clock alone
            mono[0] += 1
            await relay.sweep()
            assert await alive()
            for _ in range(3):  # real time passes: past the new grace period and the TTL
                wall[0] += 1000
                mono[0] += 1000
                await relay.sweep()
            assert not await alive()
            await c.close()
        finally:
            await runner.cleanup()

    run(body())
