"""The relay's database keeps no order across mailboxes (issue 13): random row keys everywhere,
one order per mailbox only, and a schema-1 database upgraded in place.

These open the storage in-process on a real SQLite file in a temporary directory, then read
that file as someone who holds the disk would."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relay import storage as st

T = TypeVar("T")
N = 60


def run_storage(tmp: Path, body: Callable[[st.SQLiteStorage], Awaitable[T]]) -> T:
    async def main() -> T:
        s = st.SQLiteStorage(str(tmp))
        await s.open()
        try:
            return await body(s)
        finally:
            await s.close()

    return asyncio.run(main())


def kendall_tau(xs: list[int]) -> float:
    """Rank correlation between position (creation order) and value: +1 for values that
    increase with creation, about 0 (sd 0.09 for 60) for values unrelated to it."""
    n = len(xs)
    s = sum((xs[j] > xs[i]) - (xs[j] < xs[i]) for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def neighbours_kept(xs: list[int]) -> int:
    """How many pairs made one after the other are also next to each other by value (about 2
    when values are unrelated to creation, n - 1 for a sequence)."""
    rank = {v: r for r, v in enumerate(sorted(xs))}
    return sum(abs(rank[a] - rank[b]) == 1 for a, b in itertools.pairwise(xs))


def assert_unordered(values: list[int], what: str) -> None:
    assert len(set(values)) == len(values), what
    assert abs(kendall_tau(values)) < 0.4, (what, kendall_tau(values))
    assert neighbours_kept(values) < len(values) // 4, (what, neighbours_kept(values))


def okey(i: int) -> bytes:
    return st.owner_key(i.to_bytes(4, "big"))


def dkey(i: int) -> bytes:
    return st.deposit_key(i.to_bytes(4, "big"))


def read(tmp: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(tmp / "relay.sqlite3")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_no_row_key_or_column_orders_rows_by_creation(tmp_path: Path) -> None:
    async def body(s: st.SQLiteStorage) -> tuple[list[int], list[int]]:
        boxes = [await s.create_mailbox(okey(i), dkey(i), b"s" * 32, b"b" * 32, b"o" * 32,
                                        False) for i in range(N)]  # fmt: skip
        firsts = [await s.enqueue(b, 1000, b"%d" % i) for i, b in enumerate(boxes)]
        for i in range(3 * N):  # interleaved deposits into every mailbox
            await s.enqueue(boxes[i % N], 1000, b"m%d" % i)
        for i, b in enumerate(boxes):
            await s.set_bundle_base(b, b"base")
            assert await s.add_bundle_items(b, 1, [b"i%d" % i], 10) == (1, 0)
        for i in range(N):
            assert await s.put_blob(st.blob_key(b"%d" % i), b"c" * 32, 1000, b"x")
        return boxes, firsts

    boxes, firsts = run_storage(tmp_path, body)
    assert_unordered(boxes, "mailbox keys")
    # What the disk holds, in creation order: each table's row keys (and the first order key
    # of each mailbox, drawn independently).
    by_okey = dict(read(tmp_path, "SELECT owner_key, id FROM mailboxes"))
    assert [by_okey[okey(i)] for i in range(N)] == boxes
    msgs = dict(read(tmp_path, "SELECT block, id FROM messages"))
    assert_unordered([int(msgs[b"m%d" % i]) for i in range(3 * N)], "block keys")
    seqs = dict(read(tmp_path, "SELECT block, seq FROM messages"))
    assert_unordered([int(seqs[b"%d" % i]) for i in range(N)], "first order keys")
    assert_unordered(firsts, "handles")
    items = dict(read(tmp_path, "SELECT item, id FROM bundle_items"))
    assert_unordered([int(items[b"i%d" % i]) for i in range(N)], "bundle item keys")
    blobs = dict(read(tmp_path, "SELECT key, id FROM blobs"))
    assert_unordered([int(blobs[st.blob_key(b"%d" % i)]) for i in range(N)], "blob keys")
    names = {r[0] for r in read(tmp_path, "SELECT name FROM sqlite_master")}
    assert "sqlite_sequence" not in names  # no AUTOINCREMENT anywhere
    assert read(tmp_path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]


def test_one_mailbox_keeps_its_order_and_an_emptied_queue_starts_again_at_random(
    tmp_path: Path,
) -> None:
    async def body(s: st.SQLiteStorage) -> list[int]:
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        other = await s.create_mailbox(okey(2), dkey(2), b"s", b"b", b"o", False)
        blocks = [os.urandom(8) for _ in range(20)]
        for i, b in enumerate(blocks):
            await s.enqueue(box, 1000, b)
            await s.enqueue(other, 1000, b"o%d" % i)
        got = await s.queued(box, (), 100)
        assert [b for _, b in got] == blocks  # the order of deposit into this mailbox
        handles = [h for h, _ in got]
        # Skipping what is already out: the next oldest, still in order.
        assert [b for _, b in await s.queued(box, set(handles[:5]), 3)] == blocks[5:8]
        assert await s.remove(box, handles[:10]) == 10
        assert [b for _, b in await s.queued(box, (), 100)] == blocks[10:]
        starts = []
        for _ in range(20):  # empty the queue, then deposit again: a fresh random start
            left = [h for h, _ in await s.queued(box, (), 100)]
            assert await s.remove(box, left) == len(left)
            await s.enqueue(box, 1000, b"again")
            starts.append(await s._run(lambda db: int(db.execute(
                "SELECT seq FROM messages WHERE mailbox = ?", (box,)).fetchone()[0])))
        assert len(await s.queued(other, (), 100)) == 20  # untouched
        return starts

    starts = run_storage(tmp_path, body)
    assert starts != sorted(starts)  # a counter would only grow (1 in 20! by chance)
    assert len(set(starts)) == len(starts)


def test_a_handle_acknowledged_late_never_removes_a_newer_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Order keys can repeat once a block is gone (here forced: every step is 1); handles must
    not, or a late ACK from a connection that still holds the old one deletes the new block."""
    monkeypatch.setattr(st, "SEQ_STEP", 1)

    async def body(s: st.SQLiteStorage) -> None:
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        await s.enqueue(box, 1000, b"a")
        b = await s.enqueue(box, 1000, b"b")
        assert await s.remove(box, [b]) == 1  # the newest goes: its order key is free again
        await s.enqueue(box, 1000, b"c")
        assert await s.remove(box, [b]) == 0  # the late ACK of b
        assert [x for _, x in await s.queued(box, (), 10)] == [b"a", b"c"]

    run_storage(tmp_path, body)


def test_order_keys_are_renumbered_before_they_would_overflow(tmp_path: Path) -> None:
    async def body(s: st.SQLiteStorage) -> None:
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        await s.enqueue(box, 1000, b"first")

        def near_top(db: sqlite3.Connection) -> None:
            db.execute("UPDATE messages SET seq = ? WHERE mailbox = ?", (st.KEY_MAX - 5, box))

        await s._run(near_top)
        await s.enqueue(box, 1000, b"second")
        await s.enqueue(box, 1000, b"third")
        assert [b for _, b in await s.queued(box, (), 10)] == [b"first", b"second", b"third"]

    run_storage(tmp_path, body)


def test_a_schema_1_database_is_upgraded_in_place_keeping_everything(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    db.executescript(st.SCHEMA_1)
    for i in range(N):
        db.execute("INSERT INTO mailboxes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (i + 1, okey(i), dkey(i), b"sig", b"sec", b"pub", i % 2, b"t" * 32))
        db.execute("INSERT INTO bundles VALUES (?, ?)", (i + 1, b"base%d" % i))
        db.execute("INSERT INTO bundle_items (mailbox, kind, item) VALUES (?, 1, ?)",
                   (i + 1, b"item%d" % i))
        db.execute("INSERT INTO blobs (key, cap_hash, expiry, block) VALUES (?, ?, 7, ?)",
                   (st.blob_key(b"%d" % i), b"cap%d" % i, b"blob%d" % i))
    for j in range(3 * N):
        db.execute("INSERT INTO messages (mailbox, expiry, block) VALUES (?, 5, ?)",
                   (j % N + 1, b"m%d" % j))
    db.execute("INSERT INTO messages (mailbox, expiry, block) VALUES (999, 5, x'00')")  # orphan
    db.commit()
    db.close()

    async def body(s: st.SQLiteStorage) -> list[int]:
        keys = []
        for i in range(N):
            row = await s.load_mailbox(okey=okey(i))
            assert row is not None
            assert (row.deposit_key, row.sig_pub, row.box_secret, row.owner_box_pub,
                    row.public, row.tokens, row.queued) == (
                dkey(i), b"sig", b"sec", b"pub", bool(i % 2), (b"t" * 32,), 3)
            blocks = [b for _, b in await s.queued(row.id, (), 10)]
            assert blocks == [b"m%d" % j for j in (i, i + N, i + 2 * N)]  # order kept
            assert await s.take_bundle(row.id, (1, 2)) == (b"base%d" % i, b"item%d" % i, None)
            assert await s.get_blob(st.blob_key(b"%d" % i)) == (b"cap%d" % i, b"blob%d" % i)
            keys.append(row.id)
        return keys

    keys = run_storage(tmp_path, body)
    assert_unordered(keys, "upgraded mailbox keys")
    msgs = dict(read(tmp_path, "SELECT block, id FROM messages"))
    assert len(msgs) == 3 * N  # the orphan block is gone
    assert_unordered([int(msgs[b"m%d" % j]) for j in range(3 * N)], "upgraded block keys")
    names = {r[0] for r in read(tmp_path, "SELECT name FROM sqlite_master")}
    assert not any(n.startswith("v1_") for n in names)
    assert read(tmp_path, "PRAGMA user_version") == [(st.SCHEMA_VERSION,)]
    assert read(tmp_path, "SELECT count(*) FROM sqlite_sequence") == [(0,)]
