"""PostgresStorage on a real server: the same storage properties test_no_order.py checks on
SQLite (random row keys, one mailbox's order only, handles that never repeat while queued, order
keys renumbered before they overflow), and what PostgreSQL itself orders (xmin, ctid: stated in
docs/threat-model.md, shown here so the statement stays true)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from relay import pg_notify, storage_pg
from relay import storage as st
from relay.storage_pg import PostgresStorage

from .postgres import PostgresServer
from .test_multinode import _files_holding
from .test_no_order import N, assert_unordered, dkey, okey

T = TypeVar("T")


def run_pg(server: PostgresServer, body: Callable[[PostgresStorage, asyncpg.Connection],
                                                  Awaitable[T]], **kw: Any) -> T:
    dsn = server.new_database()

    async def main() -> T:
        s = PostgresStorage(dsn, **kw)
        await s.open()
        con = await asyncpg.connect(dsn)
        try:
            return await body(s, con)
        finally:
            await con.close()
            await s.close()

    return asyncio.run(main())


async def plain_messages(con: asyncpg.Connection) -> dict[bytes, tuple[int, int, int]]:
    """Every queued block, decrypted with its key: its row key, order key and xmin."""
    return {storage_pg.unseal(bytes(r[4]), bytes(r[3])): (int(r[0]), int(r[1]), int(r[2]))
            for r in await con.fetch(
                "SELECT m.id, m.seq, m.xmin::text::bigint, m.block, k.secret FROM messages m"
                " JOIN message_keys k ON k.id = m.id")}


def test_no_row_key_or_column_orders_rows_by_creation(postgres_server: PostgresServer) -> None:
    async def body(s: PostgresStorage, con: asyncpg.Connection) -> None:
        boxes = [await s.create_mailbox(okey(i), dkey(i), b"s" * 32, b"b" * 32, b"o" * 32,
                                        False) for i in range(N)]  # fmt: skip
        firsts = [await s.enqueue(b, 1000, b"%d" % i) for i, b in enumerate(boxes)]
        for i in range(3 * N):
            await s.enqueue(boxes[i % N], 1000, b"m%d" % i)
        for i, b in enumerate(boxes):
            await s.set_bundle_base(b, b"base")
            assert await s.add_bundle_items(b, 1, [b"i%d" % i], 10) == (1, 0)
        for i in range(N):
            assert await s.put_blob(st.blob_key(b"%d" % i), b"c" * 32, 1000, b"x")
        assert_unordered(boxes, "mailbox keys")
        stored = await plain_messages(con)
        assert_unordered([stored[b"m%d" % i][0] for i in range(3 * N)], "block keys")
        assert_unordered([stored[b"%d" % i][1] for i in range(N)], "first order keys")
        assert_unordered(firsts, "handles")
        items = {bytes(r[0]): r[1] for r in await con.fetch("SELECT item, id FROM bundle_items")}
        assert_unordered([int(items[b"i%d" % i]) for i in range(N)], "bundle item keys")
        # No sequence anywhere; the only order is PostgreSQL's own (threat model): a row's
        # xmin grows with the transaction that wrote it.
        assert await con.fetchval("SELECT count(*) FROM pg_sequences") == 0
        ordered = [stored[b"m%d" % i][2] for i in range(3 * N)]
        assert ordered == sorted(ordered)
        # The relay's role stores nothing it could not: no time column, no address type.
        types = {r[0] for r in await con.fetch(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public'")}
        assert types <= {"bigint", "bytea", "boolean", "integer"}, types

    run_pg(postgres_server, body)


def test_one_mailbox_keeps_its_order_and_handles_never_repeat(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(s: PostgresStorage, con: asyncpg.Connection) -> None:
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        other = await s.create_mailbox(okey(2), dkey(2), b"s", b"b", b"o", False)
        blocks = [os.urandom(8) for _ in range(20)]
        for i, b in enumerate(blocks):
            await s.enqueue(box, 1000, b)
            await s.enqueue(other, 1000, b"o%d" % i)
        got = await s.queued(box, (), 100)
        assert [b for _, b in got] == blocks
        handles = [h for h, _ in got]
        assert [b for _, b in await s.queued(box, set(handles[:5]), 3)] == blocks[5:8]
        assert await s.remove(box, handles[:10]) == 10
        assert [b for _, b in await s.queued(box, (), 100)] == blocks[10:]
        assert len(await s.queued(other, (), 100)) == 20
        # Order keys may repeat once a block is gone (forced: every step 1); handles not.
        monkeypatch.setattr(storage_pg, "SEQ_STEP", 1)
        for h, _ in await s.queued(box, (), 100):
            await s.remove(box, [h])
        await s.enqueue(box, 1000, b"a")
        b = await s.enqueue(box, 1000, b"b")
        assert await s.remove(box, [b]) == 1
        await s.enqueue(box, 1000, b"c")
        assert await s.remove(box, [b]) == 0  # the late ACK of b
        assert [x for _, x in await s.queued(box, (), 10)] == [b"a", b"c"]
        # Renumbered before an order key would overflow.
        await con.execute("UPDATE messages SET seq = $1 WHERE id = $2",
                          st.KEY_MAX - 5, (await plain_messages(con))[b"c"][0])
        await s.enqueue(box, 1000, b"d")
        await s.enqueue(box, 1000, b"e")
        assert [x for _, x in await s.queued(box, (), 10)] == [b"a", b"c", b"d", b"e"]

    run_pg(postgres_server, body)


def test_limits_are_checked_in_the_writing_transaction(postgres_server: PostgresServer) -> None:
    async def body(s: PostgresStorage, con: asyncpg.Connection) -> None:
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        # Concurrent deposits from two nodes: exactly the limit is stored.
        node2 = PostgresStorage(s._dsn, queue_limit=5)
        await node2.open()
        results = await asyncio.gather(*(n.enqueue(box, 1000, b"%d" % i)
                                         for i in range(6) for n in (s, node2)),
                                       return_exceptions=True)
        await node2.close()
        assert sum(isinstance(r, int) for r in results) == 5
        assert all(isinstance(r, int | st.QueueFull) for r in results)
        assert await con.fetchval("SELECT count(*) FROM messages") == 5
        await s.create_mailbox(okey(2), dkey(2), b"s", b"b", b"o", False)
        with pytest.raises(st.TooMany):
            await s.create_mailbox(okey(3), dkey(3), b"s", b"b", b"o", False)
        await s.delete_mailbox(box)
        with pytest.raises(st.QueueFull):  # deleted meanwhile (another node): not stored
            await s.enqueue(box, 1000, b"late")
        assert s.pending == 0

    run_pg(postgres_server, body, queue_limit=5, max_mailboxes=2)


async def to_schema_1(con: asyncpg.Connection) -> None:
    """Back to schema 1: its tables are schema 2's but for the key tables and relay_enqueue's
    arguments (and relay_schema's `rewrite`, which schema 2 adds if missing)."""
    await con.execute(
        "DROP TABLE message_keys; DROP TABLE blob_keys;"
        " DROP FUNCTION relay_enqueue(bigint, bigint, bigint, bigint, bigint, bytea,"
        " bigint, bytea, boolean);"
        " CREATE FUNCTION relay_enqueue(bigint, bigint, bigint, bigint, bigint, bytea,"
        " bigint) RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint';"
        " ALTER TABLE relay_schema DROP COLUMN rewrite;"
        " UPDATE relay_schema SET version = 1")


def test_a_schema_1_database_is_migrated(postgres_server: PostgresServer) -> None:
    """Schema 1 stored blocks in the clear (its tables are schema 2's but for the key tables
    and relay_enqueue's arguments): opening it encrypts every queued block and blob under a
    key of its own, drops the old relay_enqueue, and the relay reads what it had."""
    dsn = postgres_server.new_database()

    async def main() -> None:
        s = PostgresStorage(dsn)
        await s.open()
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        await s.close()
        con = await asyncpg.connect(dsn)
        try:
            # Back to schema 1, with what a schema-1 relay had stored.
            await to_schema_1(con)
            olds = [b"old block %d" % i + os.urandom(300) for i in range(300)]
            await con.executemany(
                "INSERT INTO messages (id, mailbox, seq, expiry, block)"
                " VALUES ($1, $2, $3, 1000, $4)",
                [(10_000 + i, box, 5 + i, b) for i, b in enumerate(olds)])
            await con.execute("INSERT INTO blobs (id, key, cap_hash, expiry, block)"
                              " VALUES (7, $1, $2, 1000, 'old blob')",
                              st.blob_key(b"b"), b"c" * 32)
            s = PostgresStorage(dsn)
            await s.open()
            try:
                assert [b for _, b in await s.queued(box, (), 1000)] == olds
                assert await s.get_blob(st.blob_key(b"b")) == (b"c" * 32, b"old blob")
                assert await con.fetchval("SELECT version FROM relay_schema") == 2
                assert await con.fetchval(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'relay_enqueue'") == 1
                # Nothing in the clear is left in the rows, and every block has its key.
                assert await con.fetchval(
                    "SELECT count(*) FROM messages WHERE position('old block' in block) > 0"
                    " OR id NOT IN (SELECT id FROM message_keys)") == 0
                assert await con.fetchval("SELECT count(*) FROM blob_keys") == 1
                h = await s.enqueue(box, 1000, b"new")
                assert (await s.queued(box, (), 1000))[-1] == (h, b"new")
                assert await s.remove(box, [h]) == 1
                assert await con.fetchval("SELECT count(*) FROM message_keys") == 300
            finally:
                await s.close()
        finally:
            await con.close()

    asyncio.run(main())


def test_an_interrupted_migration_rewrite_runs_again(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The migration from schema 1 commits first and rewrites `messages` (VACUUM FULL) after:
    a node killed (or a timeout) between the two left schema 1's clear blocks in the table's
    files for good. The migration's transaction records the rewrite as owed; the next open,
    of any node, does it, and only then clears it."""
    dsn = postgres_server.new_database()
    marker = b"SCHEMA-1-CLEAR-" + os.urandom(8).hex().encode()

    async def main() -> None:
        s = PostgresStorage(dsn, rewrite_rows=2)
        await s.open()
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        await s.close()
        con = await asyncpg.connect(dsn)
        try:
            await to_schema_1(con)
            await con.executemany(
                "INSERT INTO messages (id, mailbox, seq, expiry, block)"
                " VALUES ($1, $2, $3, 1000, $4)",
                [(10_000 + i, box, 5 + i, marker + os.urandom(16000)) for i in range(10)])
            await con.execute("CHECKPOINT")
            assert _files_holding(postgres_server.data, marker)
            # The rewrite fails once, after the migration's commit.
            execute = asyncpg.Connection.execute

            async def failing(self: asyncpg.Connection, query: str, *a: Any, **k: Any) -> Any:
                if query.startswith("VACUUM FULL messages"):
                    raise asyncpg.QueryCanceledError("canceling statement due to timeout")
                return await execute(self, query, *a, **k)
            monkeypatch.setattr(asyncpg.Connection, "execute", failing)
            s = PostgresStorage(dsn, rewrite_rows=2)
            with pytest.raises(st.StorageError):
                await s.open()
            await s.close()
            monkeypatch.setattr(asyncpg.Connection, "execute", execute)
            assert await con.fetchval("SELECT version FROM relay_schema") == 2
            assert await con.fetchval("SELECT rewrite FROM relay_schema")
            s = PostgresStorage(dsn, rewrite_rows=2)
            await s.open()  # the owed rewrite runs
            await s.close()
            assert not await con.fetchval("SELECT rewrite FROM relay_schema")
            await con.execute("CHECKPOINT")
            left = [f for f in _files_holding(postgres_server.data, marker)
                    if not f.startswith("pg_wal")]  # the WAL: until its segments go (§4.11)
            assert left == []
        finally:
            await con.close()

    asyncio.run(main())


def test_deposits_are_announced_in_batches(postgres_server: PostgresServer) -> None:
    """A node announces the deposits committed within its batch window in one notification
    (each mailbox's key once per block), after their commits, with nothing but `d` and the
    mailboxes' row keys; with a window of 0 each deposit's own transaction notifies. A payload
    stays within PostgreSQL's 8000 bytes however many mailboxes wait."""
    longest = pg_notify.payloads("d", [st.KEY_MAX] * 1000)
    assert len(longest) == 3 and max(map(len, longest)) <= 8000
    dsn = postgres_server.new_database()

    async def main() -> None:
        # A window of a minute: only closing sends the batch (no race with the clock).
        a = PostgresStorage(dsn, notify_batch_ms=60_000)
        b = PostgresStorage(dsn, notify_batch_ms=0)
        await a.open()
        await b.open()
        heard: list[tuple[str, int]] = []
        b.watch(lambda kind, mailbox: heard.append((kind, mailbox)))
        payloads: list[str] = []
        con = await asyncpg.connect(dsn)
        await con.add_listener(pg_notify.CHANNEL, lambda *args: payloads.append(args[3]))
        try:
            boxes = [await a.create_mailbox(okey(i), dkey(i), b"s", b"b", b"o", False)
                     for i in range(3)]
            await asyncio.gather(*(a.enqueue(x, 1000, b"%d" % i)
                                   for i, x in enumerate(boxes * 2)))
            # Committed (the futures are done), not announced yet.
            assert await con.fetchval("SELECT count(*) FROM messages") == 6
            await con.execute("SELECT 1")  # a round trip: a notification sent would be here
            assert payloads == [] and heard == []
            await a.close()
            deadline = time.monotonic() + 10
            while not heard:
                assert time.monotonic() < deadline, "the batch never came"
                await asyncio.sleep(0.05)
            assert len(payloads) == 1
            # Each mailbox's key once per block: the nodes count a mailbox's blocks.
            assert sorted(heard) == sorted(("d", x) for x in boxes * 2)
            assert payloads[0][0] == "d"
            assert sorted(int(k) for k in payloads[0][1:].split(",")) == sorted(boxes * 2)
            # Unbatched: one notification per deposit, in its commit.
            await b.enqueue(boxes[0], 1000, b"x")
            await b.enqueue(boxes[1], 1000, b"y")
            deadline = time.monotonic() + 10
            while len(payloads) < 3:
                assert time.monotonic() < deadline, "no notification"
                await con.execute("SELECT 1")
                await asyncio.sleep(0.05)
            assert payloads[1:] == [f"d{boxes[0]}", f"d{boxes[1]}"]
        finally:
            await con.close()
            await b.close()

    asyncio.run(main())


def test_a_node_gone_within_a_second_of_its_start_is_noticed(
        postgres_server: PostgresServer) -> None:
    """A node that started after another node last read pg_stat_activity, took a deposit (its
    announcement batched) and died within the second was never seen by that node, whose queues
    were then not read again: a lost push. Its listening connection announces itself (`n<pid>`)
    before it serves, so the other node watches it from then on, and checks whatever its own
    batch window (0 here)."""
    dsn = postgres_server.new_database()

    async def main() -> None:
        b = PostgresStorage(dsn, notify_batch_ms=0)
        await b.open()
        heard: list[tuple[str, int]] = []
        b.watch(lambda kind, key: heard.append((kind, key)))
        box = await b.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        assert await b.check_listener() is None  # B's view: only itself
        a = PostgresStorage(dsn, notify_batch_ms=600_000)  # announces only when closing
        await a.open()
        listening = a._listener.connection
        assert listening is not None
        deadline = time.monotonic() + 10
        while not any(kind == "n" for kind, _ in heard):
            assert time.monotonic() < deadline, "the new node was not announced"
            await asyncio.sleep(0.02)
        await a.enqueue(box, 1000, b"committed, never announced")
        # Killed: its backends end (as when its sockets close).
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p",
                              list(a._own_pids | {listening.get_server_pid()}))
        finally:
            await con.close()
        assert a._announcer.task is not None
        a._announcer.task.cancel()
        deadline = time.monotonic() + 10
        while (missed := await b.check_listener()) is None:
            assert time.monotonic() < deadline, "node B never noticed node A go"
            await asyncio.sleep(0.2)
        assert missed == "node_gone"  # not reported as B's own listener lost
        assert not any(kind == "d" for kind, _ in heard)  # no announcement: the re-read did it
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_checkpoint_warns_of_an_old_snapshot(
        postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot open anywhere on the server (here another database's repeatable-read
    transaction) keeps the deleted keys in the rewritten key tables (VACUUM FULL copies what
    it may still see): a checkpoint says so, with the snapshot's age in seconds only, once
    that is older than the checkpoint interval; and no more once it ended."""
    dsn = postgres_server.new_database()
    text = "keeps deleted blocks' keys"

    async def main() -> None:
        s = PostgresStorage(dsn, checkpoint_interval=1)
        await s.open()
        box = await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        other = await asyncpg.connect(postgres_server.admin_dsn)
        try:
            await s.checkpoint()
            assert text not in caplog.text
            tr = other.transaction(isolation="repeatable_read")
            await tr.start()
            await other.fetchval("SELECT txid_current()")
            h = await s.enqueue(box, 1000, b"acked")
            assert await s.remove(box, [h]) == 1
            await asyncio.sleep(2.2)
            await s.checkpoint()
            warned = [r.getMessage() for r in caplog.records if text in r.getMessage()]
            assert len(warned) == 1
            assert re.fullmatch(r"storage: a snapshot open for \d+ s " + text
                                + " in the rewritten key tables until it ends", warned[0])
            await tr.rollback()
            caplog.clear()
            await s.checkpoint()
            assert text not in caplog.text
        finally:
            await other.close()
            await s.close()

    with caplog.at_level(logging.WARNING, logger="aegis.relay"):
        asyncio.run(main())


def test_a_heartbeat_that_drops_a_dead_node_notifies(postgres_server: PostgresServer) -> None:
    """A node killed without retiring counts until its row expires; the first heartbeat of any
    node after that deletes the row and notifies `n0`, so every node counts again at once
    rather than at its own sweep."""
    dsn = postgres_server.new_database()

    async def main() -> None:
        s = PostgresStorage(dsn)
        await s.open()
        payloads: list[str] = []
        con = await asyncpg.connect(dsn)
        await con.add_listener(pg_notify.CHANNEL, lambda *args: payloads.append(args[3]))
        try:
            assert await s.heartbeat(9) == 1
            await con.execute("SELECT 1")
            assert payloads == []  # nothing dropped, nothing announced
            await con.execute("INSERT INTO relay_nodes VALUES (42, 1)")  # expired long ago
            assert await s.heartbeat(9) == 1
            deadline = time.monotonic() + 10
            while payloads != ["n0"]:
                assert time.monotonic() < deadline, payloads
                await con.execute("SELECT 1")
                await asyncio.sleep(0.05)
        finally:
            await con.close()
            await s.close()

    asyncio.run(main())


def test_no_migration_while_other_nodes_use_the_database(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    """Nodes of schema 1 and 2 must not share a database (a schema-1 node would store clear
    blocks without keys): a node finding a schema-1 database while other relay sessions are
    on it refuses to upgrade it, says why, and exits non-zero; alone, it upgrades."""
    dsn = postgres_server.new_database()

    async def prepare() -> None:
        s = PostgresStorage(dsn)
        await s.open()
        await s.close()
        con = await asyncpg.connect(dsn)
        try:
            await to_schema_1(con)
        finally:
            await con.close()

    asyncio.run(prepare())
    old_node = asyncio.new_event_loop()
    other = old_node.run_until_complete(asyncpg.connect(
        dsn, server_settings={"application_name": "aegis-relay"}))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "relay.main", "--store", dsn, "--host", "127.0.0.1",
             "--port", "0", "--data", str(tmp_path / "data")],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=60,
            check=False)
        assert done.returncode == 1
        out = (done.stdout + done.stderr).decode()
        assert "cannot open the store: other relay nodes use this database" in out, out
        assert "Traceback" not in out
        assert postgres_server.query("SELECT version FROM relay_schema",
                                     dsn.rsplit("/", 1)[1])[0][0] == 1
    finally:
        old_node.run_until_complete(other.close())
        old_node.close()

    async def alone() -> None:
        s = PostgresStorage(dsn)
        await s.open()
        await s.close()

    asyncio.run(alone())
    assert postgres_server.query("SELECT version FROM relay_schema",
                                 dsn.rsplit("/", 1)[1])[0][0] == 2


def test_holding_names_the_mailboxes_with_queued_blocks(
        postgres_server: PostgresServer) -> None:
    """What a node re-reads after a node went (or its listener was lost): only the subscribed
    mailboxes that hold blocks, found in one query, not every subscribed queue."""
    async def body(s: PostgresStorage, _con: asyncpg.Connection) -> None:
        boxes = [await s.create_mailbox(okey(i), dkey(i), b"s", b"b", b"o", False)
                 for i in range(4)]
        h = await s.enqueue(boxes[1], 1000, b"x")
        await s.enqueue(boxes[3], 1000, b"y")
        assert await s.holding(boxes) == {boxes[1], boxes[3]}
        assert await s.remove(boxes[1], [h]) == 1
        assert await s.holding(boxes) == {boxes[3]}
        assert await s.holding([]) == set()

    run_pg(postgres_server, body)


def test_a_database_without_the_delete_key_column_gets_it(
        postgres_server: PostgresServer) -> None:
    """A schema-2 database made before delete keys (no `del_pub`): opening it adds the column
    in place; its mailboxes have none, new ones keep theirs."""
    dsn = postgres_server.new_database()

    async def main() -> None:
        s = PostgresStorage(dsn)
        await s.open()
        await s.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        await s.close()
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("ALTER TABLE mailboxes DROP COLUMN del_pub")
            s = PostgresStorage(dsn)
            await s.open()
            try:
                old = await s.load_mailbox(okey=okey(1))
                assert old is not None and old.del_pub is None
                await s.create_mailbox(okey(2), dkey(2), b"s", b"b", b"o", False, 0, b"k" * 32)
                new = await s.load_mailbox(dkey=dkey(2))
                assert new is not None and new.del_pub == b"k" * 32
                assert await con.fetchval("SELECT version FROM relay_schema") == 2
            finally:
                await s.close()
        finally:
            await con.close()

    asyncio.run(main())


def test_a_node_start_does_not_wait_for_a_reader_of_mailboxes(
        postgres_server: PostgresServer) -> None:
    """A transaction reading mailboxes is open while another node starts: open() takes no lock
    that waits for it (an ALTER TABLE at every start would, and stall the cluster behind it).
    The starting node's lock_timeout turns such a wait into an error rather than a hang."""
    dsn = postgres_server.new_database()

    async def main() -> None:
        first = PostgresStorage(dsn)
        await first.open()
        await first.create_mailbox(okey(1), dkey(1), b"s", b"b", b"o", False)
        reader = await asyncpg.connect(dsn)
        try:
            tx = reader.transaction()
            await tx.start()
            await reader.fetch("SELECT * FROM mailboxes")
            old = storage_pg._SETTINGS.get("lock_timeout")
            storage_pg._SETTINGS["lock_timeout"] = "2000"
            try:
                second = PostgresStorage(dsn)
                await second.open()  # StorageError(LockNotAvailableError) if it had to wait
            finally:
                if old is None:
                    del storage_pg._SETTINGS["lock_timeout"]
                else:
                    storage_pg._SETTINGS["lock_timeout"] = old
            try:
                got = await second.load_mailbox(okey=okey(1))
                assert got is not None
            finally:
                await second.close()
            await tx.rollback()
        finally:
            await reader.close()
            await first.close()

    asyncio.run(main())
