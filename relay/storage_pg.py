"""The relay's storage on PostgreSQL (`aegis-relay --store postgresql://...`): several relay
nodes share one database (docs/relay-protocol.md §8.1).

Driver: asyncpg. It speaks PostgreSQL's protocol natively on the relay's event loop (no thread
per connection as a blocking driver needs, no copy of each 16 KiB block through a second
layer), supports LISTEN/NOTIFY with a callback, and has prepared-statement caching per
connection; psycopg 3 would do, at a higher cost per operation.

The same promises as `SQLiteStorage`: an operation's future completes only once its transaction
committed (synchronous_commit is forced on for every connection, whatever the server's default),
an acknowledged block is deleted in the ACK's own transaction, only digests of IDs are stored,
every row key is random and only one mailbox's blocks are ordered. Nothing about a client (no
address, port or time) reaches a table or a notification.

Across nodes, what one node's memory cannot know is in the database or announced through it:
- the queue limit of a mailbox and the cap on mailboxes are checked inside the writing
  transaction (the mailbox's row locked, creations serialised by an advisory lock), so two
  nodes cannot both pass them (`QueueFull`, `TooMany`);
- committed deposits are announced on channel `aegis_relay` as `d<mailbox row key>[,<key>...]`
  (a mailbox's key once per block): a node gathers the deposits committed within
  `notify_batch_ms` and announces them in one notification (0: each deposit's own transaction
  notifies, as `relay_enqueue` does).
  A token change or a deletion is `m<key>`; a subscription `s<key>` (the node holding the
  mailbox's subscription ends it: the subscription moved). Payloads are random row keys only,
  already visible to anyone who can read the tables; see docs/threat-model.md.
- the live nodes are rows of `relay_nodes` (a random key and a coarse expiry by the database's
  clock, refreshed at every sweep): each node applies 1/N of the per-mailbox rates. A node
  joining or leaving notifies `n0`; a listening connection, once made, notifies `n<its server
  process id>`, so that the other nodes watch it (check_listener). The announcements, their
  batching and the nodes' liveness are in relay/pg_notify.py.

A block (queued or blob) is stored encrypted under a random key of its own, kept in a narrow
table (`message_keys`, `blob_keys`) that every checkpoint rewrites whatever its size; deleting
a block deletes its key in the same statement. A deleted block's ciphertext may stay in a large
table's freed space, its key does not stay in the live files beyond one checkpoint interval
while no older snapshot is open on the server (checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import pg_notify
from .storage import (
    KEY_MAX,
    SEQ_START,
    SEQ_STEP,
    WRITER_OWNER,
    MailboxRow,
    QueueFull,
    StorageError,
    StorageFull,
    TooMany,
)

log = logging.getLogger("aegis.relay")
T = TypeVar("T")

SCHEMA_VERSION = 2
# Every key encrypts one block only, so a fixed nonce is safe.
_NONCE = bytes(12)
# Creations take this advisory lock, so the count of mailboxes they check is exact across nodes.
_CREATE_LOCK = 0x6165676973  # "aegis"

# Every row key is a random bigint drawn by the relay (never a sequence); `seq` orders one
# mailbox's blocks only. Blocks are stored out of line (TOAST, uncompressed: they are
# ciphertext), so a block's bytes live in the TOAST table and its row in `messages` is small.
_HAS_DEL_PUB = ("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = 'mailboxes' AND column_name = 'del_pub')")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL);
-- True from the migration's own commit until `messages` and `blobs` were rewritten (VACUUM
-- FULL): schema 1's blocks in the clear may still be in their files meanwhile.
ALTER TABLE relay_schema ADD COLUMN IF NOT EXISTS rewrite boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS mailboxes (
    id bigint PRIMARY KEY,
    owner_key bytea NOT NULL UNIQUE,
    deposit_key bytea NOT NULL UNIQUE,
    sig_pub bytea NOT NULL,
    box_secret bytea NOT NULL,
    owner_box_pub bytea NOT NULL,
    public boolean NOT NULL,
    tokens bytea NOT NULL,
    used bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS mailboxes_used ON mailboxes(used);
-- The delete-only key (`del_pub`, NULL: none) is added in place by open(), in schema 2, only
-- when missing: a node that predates it neither reads nor writes the column, and its
-- mailboxes simply have none.
CREATE TABLE IF NOT EXISTS messages (
    id bigint PRIMARY KEY,
    mailbox bigint NOT NULL,
    seq bigint NOT NULL,
    expiry bigint NOT NULL,
    block bytea NOT NULL
);
ALTER TABLE messages ALTER COLUMN block SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX IF NOT EXISTS messages_mailbox ON messages(mailbox, seq);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages(expiry);
CREATE TABLE IF NOT EXISTS bundles (mailbox bigint PRIMARY KEY, base bytea NOT NULL);
CREATE TABLE IF NOT EXISTS bundle_items (
    id bigint PRIMARY KEY,
    mailbox bigint NOT NULL,
    kind integer NOT NULL,
    item bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS bundle_items_mailbox ON bundle_items(mailbox, kind, id);
CREATE TABLE IF NOT EXISTS blobs (
    id bigint PRIMARY KEY,
    key bytea NOT NULL UNIQUE,
    cap_hash bytea NOT NULL,
    expiry bigint NOT NULL,
    block bytea NOT NULL
);
ALTER TABLE blobs ALTER COLUMN block SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS blobs_expiry ON blobs(expiry);
-- The live nodes (heartbeat): a random key per node process and when its row stops counting,
-- in seconds of the database's clock rounded up to the node's sweep interval. Nothing about
-- clients or mailboxes.
CREATE TABLE IF NOT EXISTS relay_nodes (node bigint PRIMARY KEY, expires bigint NOT NULL);
-- Each block's key (schema 2), deleted with its block; these narrow tables are rewritten at
-- every checkpoint (VACUUM FULL), so a deleted block's key leaves the live files.
CREATE TABLE IF NOT EXISTS message_keys (id bigint PRIMARY KEY, secret bytea NOT NULL);
CREATE TABLE IF NOT EXISTS blob_keys (id bigint PRIMARY KEY, secret bytea NOT NULL);
-- A deposit in one round trip (one statement: its own transaction). Each statement of a
-- PL/pgSQL function takes a fresh snapshot, so the count and the last order key are read after
-- the mailbox's row lock is held: deposits from several nodes queue on that lock. Returns the
-- key, or 0: the key is taken (draw again), -1: no such mailbox, -2: the queue is full, -3: the
-- order keys would overflow (the caller renumbers). `p_block` is encrypted under `p_secret`,
-- stored beside it in message_keys. `p_notify`: announce the deposit in its own transaction
-- (the node's notifications unbatched), else the node announces it in a batch.
CREATE OR REPLACE FUNCTION relay_enqueue(p_mailbox bigint, p_key bigint, p_first bigint,
        p_step bigint, p_expiry bigint, p_block bytea, p_limit bigint, p_secret bytea,
        p_notify boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE n bigint; last_seq bigint; next_seq bigint;
BEGIN
    PERFORM 1 FROM mailboxes WHERE id = p_mailbox FOR UPDATE;
    IF NOT FOUND THEN RETURN -1; END IF;
    SELECT count(*), max(seq) INTO n, last_seq FROM messages WHERE mailbox = p_mailbox;
    IF n >= p_limit THEN RETURN -2; END IF;
    IF last_seq IS NULL THEN
        next_seq := p_first;
    ELSIF last_seq > 9223372036854775807 - p_step THEN
        RETURN -3;
    ELSE
        next_seq := last_seq + p_step;
    END IF;
    INSERT INTO messages (id, mailbox, seq, expiry, block)
        VALUES (p_key, p_mailbox, next_seq, p_expiry, p_block) ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN RETURN 0; END IF;
    INSERT INTO message_keys (id, secret) VALUES (p_key, p_secret);
    IF p_notify THEN
        PERFORM pg_notify('aegis_relay', 'd' || p_mailbox);
    END IF;
    RETURN p_key;
END $$;
"""

# The connection's settings: commits wait for the WAL flush (the relay answers OK only then);
# no statement of a client's request runs forever; nothing the server logs names the relay's
# clients (it never sees them), and the relay's own queries carry no client data in their text.
_SETTINGS = {"synchronous_commit": "on", "application_name": "aegis-relay",
             "statement_timeout": "30000"}

_AWAY = pg_notify.AWAY


_LOAD = ("SELECT id, owner_key, deposit_key, sig_pub, box_secret, owner_box_pub, public, tokens,"
         " used, (SELECT count(*) FROM messages WHERE mailbox = mailboxes.id), del_pub"
         " FROM mailboxes")
_LOAD_BY_OWNER = _LOAD + " WHERE owner_key = $1"
_LOAD_BY_DEPOSIT = _LOAD + " WHERE deposit_key = $1"


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection given back without asyncpg's reset query (`RESET ALL`, `UNLISTEN *`,
    ...): a round trip per operation, for session state the relay never leaves behind (its
    locks are transaction-scoped, it listens on a connection of its own, its settings are the
    connection's startup parameters)."""

    def get_reset_query(self) -> str:
        return ""


def _random_key() -> int:
    return secrets.randbelow(KEY_MAX) + 1


def seal(secret: bytes, block: bytes) -> bytes:
    """A block as stored: encrypted under its own key (ChaCha20-Poly1305)."""
    return ChaCha20Poly1305(secret).encrypt(_NONCE, block, None)


def unseal(secret: bytes, stored: bytes) -> bytes:
    """The block a row holds. A row altered on disk is handed on as it is: the relay's own
    at-rest box (MailboxState.unseal) then fails and drops it, as on SQLite (one error path)."""
    try:
        return ChaCha20Poly1305(secret).decrypt(_NONCE, stored, None)
    except InvalidTag:
        return stored


class PostgresStorage:
    """PostgreSQL backend: a pool of connections, one transaction per operation (the server's
    group commit batches the WAL flushes of concurrent commits), LISTEN on one more connection.
    """

    shared = True

    def __init__(self, dsn: str, *, queue_limit: int = 1024, max_mailboxes: int = 0,
                 pool_size: int = 8, vacuum: bool = True, rewrite_rows: int = 4096,
                 notify_batch_ms: float = 5.0, checkpoint_interval: float = 60.0) -> None:
        self._dsn = dsn
        self._queue_limit = queue_limit
        self._max_mailboxes = max_mailboxes
        self._pool_size = pool_size
        self._vacuum = vacuum
        self._rewrite_rows = rewrite_rows
        self._interval = checkpoint_interval
        self._batch = max(0.0, notify_batch_ms) / 1000
        self._pool: asyncpg.Pool | None = None
        self._own_pids: set[int] = set()
        self._announcer = pg_notify.Announcer(self._batch, lambda: self._pool)
        self._listener = pg_notify.Listener(dsn, _SETTINGS, self._own_pids)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Each mailbox's last deposit submitted and not yet done (enqueue).
        self._enqueues: dict[int, asyncio.Future[int]] = {}
        self.pending = 0
        self._pending_by: dict[object | None, int] = {}
        self.full = False
        self._full_since = 0.0
        self._logged = 0.0
        #: Set when the listening connection was lost and made again: notifications between
        #: the two were missed (the relay then re-reads every subscribed queue).
        self.relistened = False
        self._node = _random_key()  # this process's row in relay_nodes

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, server_settings=_SETTINGS,
                connection_class=_Connection,
                init=self._init_connection, timeout=10)
            async with self._pool.acquire() as con, con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK + 1)
                await con.execute(_SCHEMA)
                # Looked up first: ALTER TABLE takes ACCESS EXCLUSIVE even when the column
                # exists, so every node start would queue behind any open transaction on
                # mailboxes and stall every other query on it meanwhile.
                if not await con.fetchval(_HAS_DEL_PUB):
                    await con.execute("ALTER TABLE mailboxes ADD COLUMN IF NOT EXISTS"
                                      " del_pub bytea")
                row = await con.fetchrow("SELECT version FROM relay_schema")
                if row is None:
                    await con.execute("INSERT INTO relay_schema VALUES ($1)", SCHEMA_VERSION)
                elif row[0] == 1:
                    # Schema-1 nodes still running would write clear blocks into schema 2.
                    if await con.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                            " current_database() AND application_name LIKE 'aegis-relay%'"
                            " AND pid <> ALL($1::int[])", list(self._own_pids)):
                        raise StorageError("other relay nodes use this database: stop them"
                                           " all before its schema is upgraded")
                    await _migrate_1_2(con)
                elif row[0] != SCHEMA_VERSION:
                    raise StorageError("unsupported relay database schema version")
            await self._rewrite_pending()
            await self._listener.listen()
        except (asyncpg.PostgresError, *_AWAY) as exc:
            raise StorageError(type(exc).__name__) from None

    async def _rewrite_pending(self) -> None:
        """Finish a migration from schema 1: its blocks in the clear are dead rows, written
        out of the table files by a rewrite (VACUUM FULL). The migration's own transaction set
        `rewrite`; it is cleared only once both rewrites are done, so a rewrite interrupted (a
        node killed, the database away) runs again at the next open, of any node. On a
        connection of its own without statement_timeout: a large table takes long."""
        con = await asyncpg.connect(
            self._dsn, server_settings={**_SETTINGS, "statement_timeout": "0"}, timeout=10)
        try:
            if not await con.fetchval("SELECT rewrite FROM relay_schema"):
                return
            # One node at a time (the others wait, then find it done).
            await con.execute("SELECT pg_advisory_lock($1)", _CREATE_LOCK + 1)
            if await con.fetchval("SELECT rewrite FROM relay_schema"):
                await con.execute("VACUUM FULL messages")
                await con.execute("VACUUM FULL blobs")
                await con.execute("UPDATE relay_schema SET rewrite = false")
        finally:
            with contextlib.suppress(Exception):
                await con.close(timeout=5)  # the session's advisory lock goes with it

    async def _init_connection(self, con: asyncpg.Connection) -> None:
        pid = con.get_server_pid()
        self._own_pids.add(pid)
        con.add_termination_listener(lambda _c: self._own_pids.discard(pid))

    async def close(self) -> None:
        await self._announcer.close()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._listener.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    def watch(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(kind, mailbox)` for every notification of another node."""
        self._listener.watch(callback)

    def announce(self, kind: str, mailbox: int) -> None:
        """Tell the other nodes (`s`: this node took the mailbox's subscription)."""
        async def op(con: asyncpg.Connection) -> None:
            await pg_notify.notify(con, kind, mailbox)
        fut = self._submit(op)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def recover(self) -> bool:
        # The server's disk filled: try again every 10 s (a write meeting it again sets it).
        if time.monotonic() - self._full_since < 10:
            return False
        self.full = False
        return True

    async def check_listener(self) -> str | None:
        """Make the listening connection again if it was lost ("resumed"), or say that another
        node's listening connection went away ("node_gone"): pg_notify.Listener.check."""
        return await self._listener.check()

    async def holding(self, mailboxes: list[int]) -> set[int]:
        """Which of these mailboxes hold queued blocks: one index lookup each, in one query."""
        rows = await self._run(lambda con: con.fetch(
            "SELECT u.box FROM unnest($1::bigint[]) AS u(box) WHERE EXISTS"
            " (SELECT 1 FROM messages m WHERE m.mailbox = u.box)", mailboxes), tx=False)
        return {int(r[0]) for r in rows}

    async def heartbeat(self, ttl: int, announce: bool = False) -> int:
        """Mark this node live for `ttl` seconds and count the live nodes, this one included
        (pg_notify.heartbeat)."""
        return await self._run(lambda con: pg_notify.heartbeat(con, self._node, ttl, announce))

    async def retire(self) -> None:
        """This node stops: the others count again without waiting for its row to expire."""
        await self._run(lambda con: pg_notify.retire(con, self._node))

    # --- running operations ----------------------------------------------------------------------

    def _submit(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, tx: bool = True,
                grows: bool = False, after: asyncio.Future[Any] | None = None
                ) -> asyncio.Future[T]:
        if self._pool is None:
            raise StorageError("storage closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if grows and self.full:
            fut.set_exception(StorageFull("storage full"))
            return fut
        owner = WRITER_OWNER.get()
        self.pending += 1
        self._pending_by[owner] = self._pending_by.get(owner, 0) + 1
        # A task of its own: a caller that is cancelled does not cancel the operation (as with
        # SQLiteStorage, what counts it follows the operation, not the caller).
        task = loop.create_task(self._op(fn, tx, after))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, owner, fut))
        return fut

    async def _op(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], tx: bool,
                  after: asyncio.Future[Any] | None = None) -> T:
        if after is not None:
            await asyncio.wait({after})
        pool = self._pool
        if pool is None:
            raise StorageError("storage closed")
        try:
            async with pool.acquire(timeout=10) as con:
                if not tx:
                    return await fn(con)
                async with con.transaction():
                    return await fn(con)
        except StorageError:
            raise
        except asyncpg.DiskFullError:
            self._went_full()
            raise StorageFull("storage full") from None
        except (asyncpg.PostgresError, *_AWAY) as exc:
            # The transaction did not commit (or its outcome is unknown): never an OK.
            raise StorageError(type(exc).__name__) from None

    def _went_full(self) -> None:
        self.full = True
        self._full_since = time.monotonic()
        if time.monotonic() - self._logged >= 60:
            self._logged = time.monotonic()
            log.warning("storage full: storing refused until there is room")

    def _finished(self, owner: object | None, fut: asyncio.Future[Any],
                  task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.pending -= 1
        left = self._pending_by[owner] - 1
        if left:
            self._pending_by[owner] = left
        else:
            del self._pending_by[owner]
        if fut.done():
            return
        if task.cancelled():
            fut.cancel()
        elif task.exception() is not None:
            fut.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            fut.set_result(task.result())

    def pending_of(self, owner: object | None) -> int:
        return self._pending_by.get(owner, 0)

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, tx: bool = True,
                   grows: bool = False) -> T:
        return await asyncio.shield(self._submit(fn, tx=tx, grows=grows))

    # --- mailboxes -------------------------------------------------------------------------------

    async def mailbox_count(self) -> int:
        return await self._run(lambda con: con.fetchval("SELECT count(*) FROM mailboxes"))

    def create_mailbox(self, okey: bytes, dkey: bytes, sig_pub: bytes, box_secret: bytes,
                       owner_box_pub: bytes, public: bool, used: int = 0,
                       del_pub: bytes | None = None) -> asyncio.Future[int]:
        async def op(con: asyncpg.Connection) -> int:
            if self._max_mailboxes > 0:
                await con.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK)
                if await con.fetchval("SELECT count(*) FROM mailboxes") >= self._max_mailboxes:
                    raise TooMany("mailboxes")
            while True:
                key = _random_key()
                done = await con.fetchval(
                    "INSERT INTO mailboxes (id, owner_key, deposit_key, sig_pub, box_secret,"
                    " owner_box_pub, public, tokens, used, del_pub)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, '', $8, $9)"
                    " ON CONFLICT (id) DO NOTHING RETURNING id",
                    key, okey, dkey, sig_pub, box_secret, owner_box_pub, public, used, del_pub)
                if done is not None:
                    return key
        return self._submit(op, grows=True)

    async def load_mailbox(self, *, okey: bytes | None = None,
                           dkey: bytes | None = None) -> MailboxRow | None:
        async def op(con: asyncpg.Connection) -> MailboxRow | None:
            row = await con.fetchrow(
                _LOAD_BY_OWNER if okey is not None else _LOAD_BY_DEPOSIT,
                okey if okey is not None else dkey)
            if row is None:
                return None
            tok = bytes(row[7])
            tokens = tuple(tok[i:i + 32] for i in range(0, len(tok), 32))
            return MailboxRow(row[0], bytes(row[1]), bytes(row[2]), bytes(row[3]),
                              bytes(row[4]), bytes(row[5]), bool(row[6]), tokens, int(row[9]),
                              int(row[8]), None if row[10] is None else bytes(row[10]))
        return await self._run(op, tx=False)

    def delete_mailbox(self, mailbox: int) -> asyncio.Future[int]:
        return self._submit(lambda con: _delete_mailbox(con, mailbox))

    async def touch_mailboxes(self, mailboxes: list[int], used: int) -> None:
        async def op(con: asyncpg.Connection) -> None:
            await con.execute("UPDATE mailboxes SET used = $1 WHERE id = ANY($2::bigint[])"
                              " AND used < $1", used, mailboxes)
        await self._run(op)

    async def expire_mailboxes(self, before: int,
                               max_blocks: int) -> tuple[list[int], int, bool]:
        async def op(con: asyncpg.Connection) -> tuple[list[int], int, bool]:
            found = [int(r[0]) for r in await con.fetch(
                "SELECT id FROM mailboxes WHERE used < $1 LIMIT 1000", before)]
            ids: list[int] = []
            removed = 0
            for m in found:
                if removed >= max_blocks:
                    return ids, removed, True
                removed += await _delete_mailbox(con, m)
                ids.append(m)
            return ids, removed, len(found) == 1000
        return await self._run(op)

    async def queued_count(self) -> int:
        return await self._run(lambda con: con.fetchval("SELECT count(*) FROM messages"))

    async def set_tokens(self, mailbox: int, tokens: tuple[bytes, ...]) -> None:
        async def op(con: asyncpg.Connection) -> None:
            await con.execute("UPDATE mailboxes SET tokens = $1 WHERE id = $2",
                              b"".join(sorted(tokens)), mailbox)
            await pg_notify.notify(con, "m", mailbox)
        await self._run(op)

    # --- queued blocks ---------------------------------------------------------------------------

    def enqueue(self, mailbox: int, expiry: int, sealed: bytes,
                limit: int = 0) -> asyncio.Future[int]:
        """Queue a block under the mailbox's row lock: its order key follows the mailbox's last
        one, and the queue's limit (`limit`, else the configured queue_limit) holds across
        nodes (QueueFull). Other nodes hear of it once committed."""
        cap = limit or self._queue_limit
        secret = secrets.token_bytes(32)
        stored = seal(secret, sealed)

        async def op(con: asyncpg.Connection) -> int:
            while True:
                key = _random_key()
                got = await con.fetchval(
                    "SELECT relay_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9)", mailbox, key,
                    secrets.randbelow(SEQ_START), secrets.randbelow(SEQ_STEP) + 1, expiry,
                    stored, cap, secret, not self._batch)
                if got == key:
                    if self._batch:
                        self._announcer.deposit(mailbox)  # committed: announced after
                    return key
                if got == -1:
                    raise QueueFull("mailbox gone")  # deleted on another node meanwhile
                if got == -2:
                    raise QueueFull("queue full")
                if got == -3:  # some 2^30 blocks without the queue ever emptying
                    async with con.transaction():
                        await con.execute("SELECT 1 FROM mailboxes WHERE id = $1 FOR UPDATE",
                                          mailbox)
                        await _renumber(con, mailbox)
                # 0: the key was taken; -3: renumbered. Again.
        # After this node's previous deposit to the mailbox: the pool's connections would
        # commit pipelined deposits in any order, and a mailbox's blocks must keep the order
        # they were sent in (the daemon's outbox pipelines them; tests/relay/
        # test_pipelined_order.py).
        before = self._enqueues.get(mailbox)
        fut = self._submit(op, tx=False, grows=True, after=before)
        self._enqueues[mailbox] = fut
        fut.add_done_callback(functools.partial(self._enqueued, mailbox))
        return fut

    def _enqueued(self, mailbox: int, fut: asyncio.Future[Any]) -> None:
        if self._enqueues.get(mailbox) is fut:
            del self._enqueues[mailbox]

    async def queued(self, mailbox: int, skip: Collection[int],
                     limit: int) -> list[tuple[int, bytes]]:
        skip = frozenset(skip)

        async def op(con: asyncpg.Connection) -> list[tuple[int, bytes]]:
            rows = await con.fetch(
                "SELECT m.id, m.block, k.secret FROM messages m JOIN message_keys k"
                " ON k.id = m.id WHERE m.mailbox = $1 ORDER BY m.seq LIMIT $2",
                mailbox, limit + len(skip))
            return [(int(r[0]), unseal(bytes(r[2]), bytes(r[1])))
                    for r in rows if r[0] not in skip][:limit]
        return await self._run(op, tx=False)

    def remove(self, mailbox: int, ids: list[int]) -> asyncio.Future[int]:
        async def op(con: asyncpg.Connection) -> int:
            # The block and its key in one statement.
            status = await con.execute(
                "WITH gone AS (DELETE FROM messages WHERE mailbox = $1"
                " AND id = ANY($2::bigint[]) RETURNING id)"
                " DELETE FROM message_keys WHERE id IN (SELECT id FROM gone)", mailbox, ids)
            return int(status.split()[-1])
        return self._submit(op, tx=False)  # one statement: a transaction of its own

    async def expire(self, now: int) -> tuple[dict[int, int], int]:
        async def op(con: asyncpg.Connection) -> tuple[dict[int, int], int]:
            rows = await con.fetch(
                "WITH gone AS (DELETE FROM messages WHERE expiry <= $1 RETURNING id, mailbox),"
                " k AS (DELETE FROM message_keys WHERE id IN (SELECT id FROM gone))"
                " SELECT mailbox, count(*) FROM gone GROUP BY mailbox", now)
            status = await con.execute(
                "WITH gone AS (DELETE FROM blobs WHERE expiry <= $1 RETURNING id)"
                " DELETE FROM blob_keys WHERE id IN (SELECT id FROM gone)", now)
            return {int(r[0]): int(r[1]) for r in rows}, int(status.split()[-1])
        return await self._run(op)

    # --- prekey bundles --------------------------------------------------------------------------

    async def set_bundle_base(self, mailbox: int, base: bytes) -> None:
        async def op(con: asyncpg.Connection) -> None:
            if base:
                await con.execute(
                    "INSERT INTO bundles (mailbox, base) VALUES ($1, $2)"
                    " ON CONFLICT (mailbox) DO UPDATE SET base = excluded.base", mailbox, base)
            else:
                await con.execute("DELETE FROM bundles WHERE mailbox = $1", mailbox)
                await con.execute("DELETE FROM bundle_items WHERE mailbox = $1", mailbox)
        await self._run(op, grows=bool(base))

    @staticmethod
    async def _counts(con: asyncpg.Connection, mailbox: int) -> tuple[int, int]:
        counts = {int(r[0]): int(r[1]) for r in await con.fetch(
            "SELECT kind, count(*) FROM bundle_items WHERE mailbox = $1 GROUP BY kind",
            mailbox)}
        return counts.get(1, 0), counts.get(2, 0)

    async def add_bundle_items(self, mailbox: int, kind: int, items: list[bytes],
                               cap: int) -> tuple[int, int] | None:
        async def op(con: asyncpg.Connection) -> tuple[int, int] | None:
            # The mailbox's row lock: two nodes adding at once cannot both pass the cap.
            await con.execute("SELECT 1 FROM mailboxes WHERE id = $1 FOR UPDATE", mailbox)
            counts = await self._counts(con, mailbox)
            if counts[kind - 1] + len(items) > cap:
                return None
            for item in items:
                while await con.fetchval(
                        "INSERT INTO bundle_items (id, mailbox, kind, item)"
                        " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING id",
                        _random_key(), mailbox, kind, item) is None:
                    pass
            return await self._counts(con, mailbox)
        return await self._run(op, grows=True)

    async def bundle_counts(self, mailbox: int) -> tuple[int, int]:
        return await self._run(lambda con: self._counts(con, mailbox), tx=False)

    async def take_bundle(self, mailbox: int, kinds: tuple[int, ...]
                          ) -> tuple[bytes, bytes | None, bytes | None] | None:
        async def op(con: asyncpg.Connection
                     ) -> tuple[bytes, bytes | None, bytes | None] | None:
            base = await con.fetchval("SELECT base FROM bundles WHERE mailbox = $1", mailbox)
            if base is None:
                return None
            taken: list[bytes | None] = []
            for kind in kinds:
                # SKIP LOCKED: two nodes handing out one-time items at once take different ones.
                item = await con.fetchval(
                    "DELETE FROM bundle_items WHERE id = (SELECT id FROM bundle_items"
                    " WHERE mailbox = $1 AND kind = $2 ORDER BY id LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) RETURNING item", mailbox, kind)
                taken.append(None if item is None else bytes(item))
            taken += [None, None]
            return bytes(base), taken[0], taken[1]
        return await self._run(op)

    # --- blobs -----------------------------------------------------------------------------------

    async def blob_count(self) -> int:
        return await self._run(lambda con: con.fetchval("SELECT count(*) FROM blobs"))

    def put_blob(self, bkey: bytes, cap_hash: bytes, expiry: int,
                 block: bytes) -> asyncio.Future[bool]:
        secret = secrets.token_bytes(32)
        stored = seal(secret, block)

        async def op(con: asyncpg.Connection) -> bool:
            while True:
                try:
                    async with con.transaction():  # a savepoint: a taken key is drawn again
                        await con.execute(
                            "WITH b AS (INSERT INTO blobs (id, key, cap_hash, expiry, block)"
                            " VALUES ($1, $2, $3, $4, $5) RETURNING id)"
                            " INSERT INTO blob_keys (id, secret) SELECT id, $6 FROM b",
                            _random_key(), bkey, cap_hash, expiry, stored, secret)
                    return True
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name == "blobs_key_key":
                        return False
        return self._submit(op, grows=True)

    async def get_blob(self, bkey: bytes) -> tuple[bytes, bytes] | None:
        async def op(con: asyncpg.Connection) -> tuple[bytes, bytes] | None:
            row = await con.fetchrow(
                "SELECT b.cap_hash, b.block, k.secret FROM blobs b JOIN blob_keys k"
                " ON k.id = b.id WHERE b.key = $1", bkey)
            return None if row is None else (bytes(row[0]), unseal(bytes(row[2]),
                                                                   bytes(row[1])))
        return await self._run(op, tx=False)

    def delete_blob(self, bkey: bytes) -> asyncio.Future[bool]:
        async def op(con: asyncpg.Connection) -> bool:
            status = await con.execute(
                "WITH gone AS (DELETE FROM blobs WHERE key = $1 RETURNING id)"
                " DELETE FROM blob_keys WHERE id IN (SELECT id FROM gone)", bkey)
            return bool(int(status.split()[-1]))
        return self._submit(op)

    # --- maintenance -----------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Rewrite the blocks' key tables whatever their size (VACUUM FULL: a deleted block's
        key leaves the files, so its ciphertext, wherever it stays, is unreadable); make
        deleted blocks' space free (VACUUM), rewriting a table of at most `rewrite_rows` rows
        (VACUUM FULL) so that no deleted row's bytes stay in its files; then, where the
        relay's role may (superuser, or pg_checkpoint and pg_switch_wal granted), end the WAL
        segment and checkpoint, so the segments holding deleted blocks are removed (with
        wal_recycle=off; recycled otherwise) (docs/threat-model.md: PostgreSQL)."""
        if not self._vacuum:
            return

        async def op(con: asyncpg.Connection) -> None:
            await self._warn_old_snapshot(con)
            for table in ("message_keys", "blob_keys"):
                # About 80 bytes a live row: cheap at any size (docs/relay-protocol.md §8.1).
                await con.execute(f"VACUUM FULL {table}")
            for table in ("messages", "bundle_items", "blobs"):
                # VACUUM frees a dead row's space but leaves its bytes in the page until a new
                # row reuses it; a small table is rewritten instead (VACUUM FULL: new files,
                # the old ones unlinked), holding its lock for as long as copying its few live
                # rows takes (deposits wait meanwhile, they do not fail).
                rows = await con.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
                full = "FULL " if rows <= self._rewrite_rows else ""
                await con.execute(f"VACUUM {full}{table}")
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await con.execute("SELECT pg_switch_wal()")
                await con.execute("CHECKPOINT")
        await self._run(op, tx=False)

    async def _warn_old_snapshot(self, con: asyncpg.Connection) -> None:
        """VACUUM FULL copies the row versions that a snapshot still open anywhere on the
        server may see (its `backend_xmin`, whatever the database), deleted keys included: the
        rewrite removes a deleted block's key only once every older snapshot ended (docs/
        threat-model.md §4.11). Say so when one is older than the interval. pg_stat_activity
        shows another role's backend_xmin only to a role with pg_read_all_stats (or superuser);
        prepared transactions and replication slots hold the horizon too, unseen here."""
        age = await con.fetchval(
            "SELECT extract(epoch FROM now() - min(coalesce(xact_start, query_start)))::bigint"
            " FROM pg_stat_activity WHERE backend_xmin IS NOT NULL"
            " AND pid <> pg_backend_pid() AND backend_type <> 'autovacuum worker'")
        if age is not None and age > self._interval:
            log.warning("storage: a snapshot open for %d s keeps deleted blocks' keys in the"
                        " rewritten key tables until it ends", age)


async def _delete_mailbox(con: asyncpg.Connection, mailbox: int) -> int:
    status = await con.execute(
        "WITH gone AS (DELETE FROM messages WHERE mailbox = $1 RETURNING id)"
        " DELETE FROM message_keys WHERE id IN (SELECT id FROM gone)", mailbox)
    await con.execute("DELETE FROM bundle_items WHERE mailbox = $1", mailbox)
    await con.execute("DELETE FROM bundles WHERE mailbox = $1", mailbox)
    await con.execute("DELETE FROM mailboxes WHERE id = $1", mailbox)
    await pg_notify.notify(con, "m", mailbox)
    return int(status.split()[-1])


async def _renumber(con: asyncpg.Connection, mailbox: int) -> None:
    rows = [r[0] for r in await con.fetch(
        "SELECT id FROM messages WHERE mailbox = $1 ORDER BY seq", mailbox)]
    await con.executemany("UPDATE messages SET seq = $1 WHERE id = $2",
                          [(-1 - i, rid) for i, rid in enumerate(rows)])
    await con.executemany("UPDATE messages SET seq = $1 WHERE id = $2",
                          [(i + 1, rid) for i, rid in enumerate(rows)])


async def _migrate_1_2(con: asyncpg.Connection) -> None:
    """Schema 1 to 2: every stored block encrypted under a key of its own (message_keys,
    blob_keys, made by _SCHEMA); relay_enqueue's schema-1 form dropped."""
    await con.execute("DROP FUNCTION IF EXISTS relay_enqueue(bigint, bigint, bigint, bigint,"
                      " bigint, bytea, bigint)")
    for table, keys in (("messages", "message_keys"), ("blobs", "blob_keys")):
        after = 0
        while True:  # 256 blocks (4 MiB) at a time, in the one transaction
            rows = await con.fetch(f"SELECT id, block FROM {table} WHERE id > $1"  # noqa: S608
                                   " ORDER BY id LIMIT 256", after)
            if not rows:
                break
            after = int(rows[-1][0])
            sealed = []
            for r in rows:
                secret = secrets.token_bytes(32)
                sealed.append((int(r[0]), seal(secret, bytes(r[1])), secret))
            await con.executemany(f"UPDATE {table} SET block = $2 WHERE id = $1",  # noqa: S608
                                  [(i, b) for i, b, _ in sealed])
            await con.executemany(f"INSERT INTO {keys} (id, secret)"  # noqa: S608
                                  " VALUES ($1, $2)", [(i, k) for i, _, k in sealed])
    # In the same transaction: the rewrite that removes the clear blocks is owed until done.
    await con.execute("UPDATE relay_schema SET version = $1, rewrite = true", SCHEMA_VERSION)
