"""Durable storage of the relay behind a small interface (`Storage`).

The embedded backend is SQLite in the data directory: WAL, synchronous=FULL, secure_delete, and
one writer thread that runs every queued operation of a batch in one transaction (group commit),
so a deposit is acknowledged only once durable while throughput stays high. A later backend
(several relay nodes) implements the same `Storage` protocol.

What is on disk is only what delivery needs: mailbox rows with SHA-256 of their IDs (the IDs
themselves are never written), queued blocks already re-encrypted for the owner, their mailbox,
their order within it and a coarse expiry; prekey bundles; blobs keyed by a hash of their ID.
Every row key is random and only one mailbox's blocks are ordered, so the database keeps no order
across mailboxes (docs/relay-protocol.md §8 says what the file still orders).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import errno
import functools
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from relay.checkpointer import Checkpointer

SCHEMA_VERSION = 4
log = logging.getLogger("aegis.relay")
T = TypeVar("T")


def owner_key(owner_id: bytes) -> bytes:
    return hashlib.sha256(b"aegis-relay owner\x00" + owner_id).digest()


def deposit_key(deposit_id: bytes) -> bytes:
    return hashlib.sha256(b"aegis-relay deposit\x00" + deposit_id).digest()


def blob_key(blob_id: bytes) -> bytes:
    return hashlib.sha256(b"aegis-relay blob\x00" + blob_id).digest()


class StorageError(Exception):
    """The backend failed; the operation did not happen (or its effect is unknown)."""


class StorageFull(StorageError):
    """The disk (or the database's size limit) is full: the operation did not happen. Deletes
    still run, on the space of the released reserve (`SQLiteStorage.full`)."""


class QueueFull(StorageError):
    """A shared store (several nodes) found the mailbox's queue at its limit, or the mailbox
    gone, inside the writing transaction: nothing was stored."""


class TooMany(StorageError):
    """A shared store found the relay-wide cap on mailboxes reached: nothing was stored."""


#: Whom a storage operation is for (the relay sets its connection here). The writer thread takes
#: operations round-robin by owner, so one client with many operations waiting cannot make
#: another's wait behind all of them (operations of no owner share one turn).
WRITER_OWNER: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "relay_writer_owner", default=None)

#: Free disk needed to store again after the disk filled, when there is no reserve.
NO_RESERVE_MARGIN = 4 * 1024 * 1024
#: The file of the disk reserve, in the data directory (`SQLiteStorage`).
RESERVE_NAME = "reserve"


@dataclass(frozen=True, slots=True)
class MailboxRow:
    id: int
    owner_key: bytes
    deposit_key: bytes
    sig_pub: bytes
    box_secret: bytes
    owner_box_pub: bytes
    public: bool
    tokens: tuple[bytes, ...]
    queued: int
    used: int = 0  # the owner's last use, rounded down to mailbox_use_granularity
    del_pub: bytes | None = None  # the delete-only key (relay-protocol.md §4.1), if any


class Storage(Protocol):
    #: Several relay nodes share the store (PostgreSQL): per-node counts are not the truth, the
    #: store checks queue limits and caps itself and reports other nodes' writes (`watch`).
    shared: bool
    #: Operations submitted and not yet finished (the relay refuses writes beyond a bound).
    pending: int
    #: The disk is full: operations that store more fail with StorageFull until `recover`.
    full: bool

    def pending_of(self, owner: object | None) -> int: ...
    async def recover(self) -> bool: ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def mailbox_count(self) -> int: ...
    # These return the operation's future: the relay counts on its outcome (_submit).
    def create_mailbox(self, okey: bytes, dkey: bytes, sig_pub: bytes, box_secret: bytes,
                       owner_box_pub: bytes, public: bool, used: int = 0,
                       del_pub: bytes | None = None) -> asyncio.Future[int]: ...
    async def load_mailbox(self, *, okey: bytes | None = None,
                           dkey: bytes | None = None) -> MailboxRow | None: ...
    def delete_mailbox(self, mailbox: int) -> asyncio.Future[int]: ...
    async def touch_mailboxes(self, mailboxes: list[int], used: int) -> None: ...
    async def expire_mailboxes(self, before: int,
                               max_blocks: int) -> tuple[list[int], int, bool]: ...
    async def queued_count(self) -> int: ...
    async def set_tokens(self, mailbox: int, tokens: tuple[bytes, ...]) -> None: ...
    # enqueue and remove return a future rather than being coroutines, so the hot paths can
    # attach a callback instead of running a task per frame.
    def enqueue(self, mailbox: int, expiry: int, sealed: bytes,
                limit: int = 0) -> asyncio.Future[int]: ...
    async def queued(self, mailbox: int, skip: Collection[int],
                     limit: int) -> list[tuple[int, bytes]]: ...
    def remove(self, mailbox: int, ids: list[int]) -> asyncio.Future[int]: ...
    async def expire(self, now: int) -> tuple[dict[int, int], int]: ...
    async def set_bundle_base(self, mailbox: int, base: bytes) -> None: ...
    async def add_bundle_items(self, mailbox: int, kind: int, items: list[bytes],
                               cap: int) -> tuple[int, int] | None: ...
    async def bundle_counts(self, mailbox: int) -> tuple[int, int]: ...
    async def take_bundle(self, mailbox: int,
                          kinds: tuple[int, ...]) -> tuple[bytes, bytes | None,
                                                           bytes | None] | None: ...
    async def blob_count(self) -> int: ...
    def put_blob(self, bkey: bytes, cap_hash: bytes, expiry: int,
                 block: bytes) -> asyncio.Future[bool]: ...
    async def get_blob(self, bkey: bytes) -> tuple[bytes, bytes] | None: ...
    def delete_blob(self, bkey: bytes) -> asyncio.Future[bool]: ...
    async def checkpoint(self) -> None: ...
    # Several nodes: `watch` hears the other nodes' deposits (`d`), mailbox changes (`m`) and
    # subscriptions (`s`) by mailbox row key; `announce` tells them of this node's.
    def watch(self, callback: Callable[[str, int], None]) -> None: ...
    def announce(self, kind: str, mailbox: int) -> None: ...
    # Why the subscribed queues must be read again: "resumed" (this node's listening
    # connection was lost and is back), "node_gone" (another node's went away), or None.
    async def check_listener(self) -> str | None: ...
    # Which of these mailboxes hold queued blocks (what a node re-reads when it may have missed
    # another node's announcements).
    async def holding(self, mailboxes: list[int]) -> set[int]: ...
    # Several nodes: `heartbeat` marks this node live for `ttl` seconds and returns how many
    # nodes are live (with `announce`, the others hear `n` and count again); `retire` says it
    # is gone.
    async def heartbeat(self, ttl: int, announce: bool = False) -> int: ...
    async def retire(self) -> None: ...


# Every row key is a random integer (`new_key`), never a sequence: the order of keys says
# nothing about the order of creation. `seq` orders the blocks of one mailbox only (delivery
# needs that); see `next_seq`.
_SCHEMA = """
CREATE TABLE mailboxes (
    id INTEGER PRIMARY KEY,
    owner_key BLOB NOT NULL UNIQUE,
    deposit_key BLOB NOT NULL UNIQUE,
    sig_pub BLOB NOT NULL,
    box_secret BLOB NOT NULL,
    owner_box_pub BLOB NOT NULL,
    public INTEGER NOT NULL,
    tokens BLOB NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    mailbox INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    expiry INTEGER NOT NULL,
    block BLOB NOT NULL
);
CREATE UNIQUE INDEX messages_mailbox ON messages(mailbox, seq);
CREATE INDEX messages_expiry ON messages(expiry);
CREATE TABLE bundles (mailbox INTEGER PRIMARY KEY, base BLOB NOT NULL);
CREATE TABLE bundle_items (
    id INTEGER PRIMARY KEY,
    mailbox INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    item BLOB NOT NULL
);
CREATE INDEX bundle_items_mailbox ON bundle_items(mailbox, kind, id);
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    cap_hash BLOB NOT NULL,
    expiry INTEGER NOT NULL,
    block BLOB NOT NULL
);
CREATE INDEX blobs_expiry ON blobs(expiry);
"""

# Schema 3 adds each mailbox's last use (rounded down to a month by the relay: coarse on
# purpose) so that mailboxes nobody uses expire, indexed so the sweep finds the stale ones
# without reading the table. A mailbox of schema 2 counts as used at the upgrade: the column's
# default, so SQLite rewrites no row (an UPDATE would rewrite them all).
def schema_3(used: int) -> str:
    return (f"ALTER TABLE mailboxes ADD COLUMN used INTEGER NOT NULL DEFAULT {int(used)};\n"
            f"{_USED_INDEX};")


_USED_INDEX = "CREATE INDEX IF NOT EXISTS mailboxes_used ON mailboxes(used)"

# Schema 4 adds each mailbox's delete-only key (NULL: none, as every mailbox of schema 3 and
# every one an older client creates). A nullable column without a default: no row rewritten.
SCHEMA_4 = "ALTER TABLE mailboxes ADD COLUMN del_pub BLOB"


def upgrade_from_3(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_USED_INDEX)  # a schema 3 made before the index was part of it
        db.execute(SCHEMA_4)
        db.execute("PRAGMA user_version=4")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise


def upgrade_from_2(db: sqlite3.Connection, used: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in schema_3(used).split(";\n"):
            if statement.strip():
                db.execute(statement)
        db.execute("PRAGMA user_version=3")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise


# Schema 1 as it was written to disk: what `upgrade_from_1` reads (and what the tests and
# bench/relay_disk.py make as the format being upgraded and as the baseline).
SCHEMA_1 = """
CREATE TABLE mailboxes (id INTEGER PRIMARY KEY, owner_key BLOB NOT NULL UNIQUE,
    deposit_key BLOB NOT NULL UNIQUE, sig_pub BLOB NOT NULL, box_secret BLOB NOT NULL,
    owner_box_pub BLOB NOT NULL, public INTEGER NOT NULL, tokens BLOB NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, mailbox INTEGER NOT NULL,
    expiry INTEGER NOT NULL, block BLOB NOT NULL);
CREATE INDEX messages_mailbox ON messages(mailbox, id);
CREATE INDEX messages_expiry ON messages(expiry);
CREATE TABLE bundles (mailbox INTEGER PRIMARY KEY, base BLOB NOT NULL);
CREATE TABLE bundle_items (id INTEGER PRIMARY KEY, mailbox INTEGER NOT NULL,
    kind INTEGER NOT NULL, item BLOB NOT NULL);
CREATE INDEX bundle_items_mailbox ON bundle_items(mailbox, kind, id);
CREATE TABLE blobs (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, cap_hash BLOB NOT NULL,
    expiry INTEGER NOT NULL, block BLOB NOT NULL);
CREATE INDEX blobs_expiry ON blobs(expiry);
PRAGMA user_version=1;
"""


KEY_MAX = 2**63 - 1
#: A mailbox's first queued block gets a random order key below SEQ_START; each next one the
#: last key plus a random step in [1, SEQ_STEP]. So the keys order one mailbox's blocks and say
#: neither how many came before (a queue that empties starts again at random) nor anything
#: across mailboxes.
SEQ_START = 2**62
SEQ_STEP = 2**32


def new_key(db: sqlite3.Connection, table: str) -> int:
    """A random row key in [1, 2^63 - 1] not used in `table` (a collision is drawn again)."""
    while True:
        key = secrets.randbelow(KEY_MAX) + 1
        if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (key,)).fetchone() is None:  # noqa: S608
            return key


def next_seq(db: sqlite3.Connection, mailbox: int) -> int:
    last = db.execute("SELECT max(seq) FROM messages WHERE mailbox = ?", (mailbox,)).fetchone()[0]
    if last is None:
        return secrets.randbelow(SEQ_START)
    step = secrets.randbelow(SEQ_STEP) + 1
    if last + step > KEY_MAX:  # some 2^30 blocks without the queue ever emptying
        _renumber(db, mailbox)
        return next_seq(db, mailbox)
    return int(last + step)


def _renumber(db: sqlite3.Connection, mailbox: int) -> None:
    rows = [r[0] for r in db.execute(
        "SELECT id FROM messages WHERE mailbox = ? ORDER BY seq", (mailbox,))]
    # Negative first, so the unique index never sees two rows with one key.
    db.executemany("UPDATE messages SET seq = ? WHERE id = ?",
                   [(-1 - i, rid) for i, rid in enumerate(rows)])
    db.executemany("UPDATE messages SET seq = ? WHERE id = ?",
                   [(i + 1, rid) for i, rid in enumerate(rows)])


_STOP = object()
#: The size of a queued block, as far as the writer's batches are concerned.
_BLOCK_BYTES = 16384


def upgrade_from_1(db: sqlite3.Connection) -> None:
    """Schema 1 (sequential row numbers, blocks in one `AUTOINCREMENT` order) to 2, in one
    transaction: every row gets a random key, each mailbox's blocks keep their order under
    fresh order keys. Rows are written in the order of their new keys, so neither their places
    in the file nor within a page keep the old order. The old-to-new maps (a few integers per
    row, not the blocks) live in memory only."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for name in ("messages_mailbox", "messages_expiry", "bundle_items_mailbox",
                     "blobs_expiry"):
            db.execute(f"DROP INDEX {name}")
        tables = ("mailboxes", "messages", "bundles", "bundle_items", "blobs")
        for name in tables:
            db.execute(f"ALTER TABLE {name} RENAME TO v1_{name}")
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)

        def fresh(old_ids: list[int]) -> dict[int, int]:
            new: dict[int, int] = {}
            taken: set[int] = set()
            for old in old_ids:
                key = secrets.randbelow(KEY_MAX) + 1
                while key in taken:
                    key = secrets.randbelow(KEY_MAX) + 1
                taken.add(key)
                new[old] = key
            return new

        def in_new_order(new: dict[int, int]) -> list[int]:
            return sorted(new, key=new.__getitem__)

        boxes = fresh([r[0] for r in db.execute("SELECT id FROM v1_mailboxes")])
        for old in in_new_order(boxes):
            db.execute("INSERT INTO mailboxes SELECT ?, owner_key, deposit_key, sig_pub,"
                       " box_secret, owner_box_pub, public, tokens FROM v1_mailboxes"
                       " WHERE id = ?", (boxes[old], old))
        seqs: dict[int, tuple[int, int]] = {}  # old block id -> (new mailbox key, order key)
        last: dict[int, int] = {}
        for old, box in db.execute("SELECT id, mailbox FROM v1_messages ORDER BY id"):
            if box not in boxes:
                continue  # a block of a deleted mailbox: dropped
            prev = last.get(box)
            last[box] = seq = (secrets.randbelow(SEQ_START) if prev is None
                               else prev + secrets.randbelow(SEQ_STEP) + 1)
            seqs[old] = (boxes[box], seq)
        msgs = fresh(list(seqs))
        for old in in_new_order(msgs):
            db.execute("INSERT INTO messages SELECT ?, ?, ?, expiry, block FROM v1_messages"
                       " WHERE id = ?", (msgs[old], *seqs[old], old))
        for old_box in in_new_order(boxes):
            new_box = boxes[old_box]
            db.execute("INSERT INTO bundles SELECT ?, base FROM v1_bundles WHERE mailbox = ?",
                       (new_box, old_box))
        items = {old: (box, kind) for old, box, kind in db.execute(
            "SELECT id, mailbox, kind FROM v1_bundle_items ORDER BY id") if box in boxes}
        item_keys = fresh(list(items))
        for old in in_new_order(item_keys):
            db.execute("INSERT INTO bundle_items SELECT ?, ?, kind, item FROM v1_bundle_items"
                       " WHERE id = ?", (item_keys[old], boxes[items[old][0]], old))
        blobs = fresh([r[0] for r in db.execute("SELECT id FROM v1_blobs")])
        for old in in_new_order(blobs):
            db.execute("INSERT INTO blobs SELECT ?, key, cap_hash, expiry, block FROM v1_blobs"
                       " WHERE id = ?", (blobs[old], old))
        for name in tables:
            db.execute(f"DROP TABLE v1_{name}")
        db.execute("PRAGMA user_version=2")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            db.execute("ROLLBACK")
        raise


class SQLiteStorage:
    """SQLite backend: one connection, one thread, group commit.

    Fair sharing: operations wait in one queue per owner (`WRITER_OWNER`) and each batch takes
    them round-robin, so a batch holds a flooder's operations beside, not before, everyone
    else's (issue 15, item 8).

    Disk reserve (issue 15, item 2): storing stops while less than `reserve_bytes` is free for
    the database (disk, and free pages inside it), checked before every batch, so owners can
    still acknowledge and delete (which need room in the WAL too) and drain their queues; the WAL
    is kept below half the reserve. An eighth of the reserve is also held in a file in the data
    directory, deleted when SQLite reports the disk (or `max_db_bytes`) full all the same
    (something else filled it). While `full`, every operation that stores more fails at once
    with StorageFull, until `recover` finds room again and puts the file back."""

    def __init__(self, data_dir: str, max_batch: int = 512,
                 clock: Callable[[], float] | None = None, use_granularity: int = 1, *,
                 reserve_bytes: int = 0, max_db_bytes: int = 0,
                 max_batch_bytes: int = 1 << 20, checkpoint_bytes: int = 4 << 20) -> None:
        # What an upgraded mailbox's last use is set to: now, rounded like every other.
        self._clock = clock or time.time
        self._use_granularity = max(1, use_granularity)
        self._path = os.path.join(data_dir, "relay.sqlite3")
        self._data_dir = data_dir
        self._reserve_path = os.path.join(data_dir, RESERVE_NAME)
        self._reserve_bytes = reserve_bytes
        # The file that keeps part of the reserve taken, should something else fill the disk.
        self._reserve_file_bytes = reserve_bytes // 8
        self._wal_bytes = 0
        self._max_db_bytes = max_db_bytes
        self._max_batch = max_batch
        # A batch also ends at this many bytes written: its commit is what every operation in
        # the next one waits for, so its length bounds everyone's wait under a flood.
        self._max_batch_bytes = max_batch_bytes
        # Background checkpoints every this many bytes committed (relay/checkpointer.py); 0: only
        # SQLite's own, inside a commit.
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpointer: Checkpointer | None = None
        self._queues: collections.OrderedDict[object | None, collections.deque[Any]] = (
            collections.OrderedDict())
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self.pending = 0
        self._pending_by: dict[object | None, int] = {}
        #: Set (by the writer thread) when the disk is full; cleared by `recover`.
        self.full = False
        self._full_logged: float | None = None
        self._space_logged: float | None = None

    shared = False

    def watch(self, callback: Callable[[str, int], None]) -> None:
        """One process: there are no other nodes to hear."""

    def announce(self, kind: str, mailbox: int) -> None:
        """One process: nobody to tell."""

    async def check_listener(self) -> str | None:
        return None

    async def holding(self, mailboxes: list[int]) -> set[int]:
        """One process: never asked (it misses no announcement); every one."""
        return set(mailboxes)

    async def heartbeat(self, ttl: int, announce: bool = False) -> int:
        return 1  # one process: this one

    async def retire(self) -> None:
        """One process: nobody to tell."""

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        os.makedirs(self._data_dir, mode=0o700, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._worker, args=(ready,), daemon=True,
                                        name="relay-storage")
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(StorageError):
            await self.checkpoint()
        self._put(None, _STOP)
        thread = self._thread
        self._thread = None
        await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        # SQLite's own checkpoint (every 16384 pages at most) is the fallback: the background
        # checkpointer copies the WAL every checkpoint_bytes, off the writer's commits. A block
        # inserted and deleted between two checkpoints reaches the database file as one zeroed
        # page write instead of several. Stale WAL frames are gone at the periodic TRUNCATE
        # checkpoint (checkpoint_interval) and at shutdown.
        # The WAL is kept below half the disk reserve, so a checkpoint (which may grow the
        # database by as much) always finds room once storing stopped at the reserve.
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._wal_bytes = 16384 * page
        if self._reserve_bytes > 0:
            self._wal_bytes = min(self._wal_bytes, max(64 * page, self._reserve_bytes // 2))
        db.execute(f"PRAGMA wal_autocheckpoint={self._wal_bytes // page}")
        db.execute(f"PRAGMA journal_size_limit={self._wal_bytes}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        used = int(self._clock()) // self._use_granularity * self._use_granularity
        if version == 0:
            db.executescript(
                f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{schema_3(0)}\n{SCHEMA_4};\n"
                f"PRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")
        elif version in (1, 2, 3):
            if version == 1:
                upgrade_from_1(db)
            if version < 3:
                upgrade_from_2(db, used)
            upgrade_from_3(db)
        elif version != SCHEMA_VERSION:
            raise StorageError("unsupported relay database schema version")
        if self._max_db_bytes > 0:
            # Reaching it is a full disk (SQLITE_FULL): an operator's cap, and how the tests
            # fill the "disk" without a small file system.
            db.execute(f"PRAGMA max_page_count={max(1, self._max_db_bytes // page)}")
        return db

    # --- the disk reserve (writer thread) ---------------------------------------------------------

    def _make_reserve(self) -> bool:
        """Write the reserve file; False (and no file) if the disk has no room for it.

        The file must hold real blocks: posix_fallocate where there is one; else random bytes
        (zeros, or a sparse file, are stored as nothing by compressing filesystems such as ZFS
        with lz4 or btrfs with compression). Checked by the blocks the file holds. (On a
        copy-on-write filesystem deleting it may free less than its size while snapshots hold
        it: docs/relay-protocol.md §9.)"""
        size = self._reserve_file_bytes
        if size <= 0:
            return True
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            if _held(fd) >= size:
                return True
            allocated = False
            if hasattr(os, "posix_fallocate"):  # not on macOS
                try:
                    os.posix_fallocate(fd, 0, size)
                    allocated = True
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            if not allocated or _held(fd) < size:
                # (Some filesystems count the blocks of what was written only once it is
                # committed, so what this writes is not checked the same way.)
                os.lseek(fd, 0, os.SEEK_SET)
                left = size
                while left > 0:
                    left -= os.write(fd, os.urandom(min(left, 1 << 20)))
            os.fsync(fd)
            return True
        except OSError:
            self._drop_reserve()
            return False
        finally:
            os.close(fd)

    def _drop_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._reserve_path)

    def _went_full(self, release: bool) -> None:
        """Refuse storing more from now on; `release`: SQLite hit the end of the disk, so give
        the reserve file's space to the deletions."""
        if release:
            self._drop_reserve()
        if not self.full:
            self.full = True
            # Once a minute at most: a disk at the edge must not fill the log (review, item 8).
            now = time.monotonic()
            if self._full_logged is None or now - self._full_logged >= 60:
                self._full_logged = now
                log.warning("storage full: storing refused until there is room")

    def _space(self, db: sqlite3.Connection) -> tuple[int, int]:
        """Free bytes of the disk, and free bytes inside the database (pages a new row reuses;
        a deletion does not give them back to the disk)."""
        st = os.statvfs(self._data_dir)
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        free_pages = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        return st.f_bavail * st.f_frsize, free_pages * page

    def _low(self, db: sqlite3.Connection) -> bool:
        """Too little room to store more (checked before every batch): the WAL needs disk of
        its own, up to `_wal_bytes`, and rows need disk or free pages, `reserve_bytes` in all
        being kept for the acknowledgements and deletions to come."""
        if self._reserve_bytes <= 0:
            return False
        disk, pages = self._space(db)
        return disk < self._wal_bytes or disk + pages < self._reserve_bytes

    def _checked_low(self, db: sqlite3.Connection) -> bool:
        """`_low`, where a failed look at the disk (statvfs, e.g. the data directory renamed
        away) counts as room: SQLite still reports a full disk by itself when it meets one."""
        try:
            return self._low(db)
        except (OSError, sqlite3.Error) as exc:
            now = time.monotonic()
            if self._space_logged is None or now - self._space_logged >= 60:
                self._space_logged = now
                log.warning("storage: free space unknown (%s)", type(exc).__name__)
            return False

    def _room(self, db: sqlite3.Connection) -> bool:
        """Room again (some margin above `_low`, so the relay does not flap at the edge)."""
        if self._reserve_bytes <= 0:
            # No reserve: SQLite found the disk full. Storing again at once would meet the
            # same end of the disk at the next write (full, then free, twice a second): wait
            # for a margin of free disk, for the WAL to grow into (review, item 8).
            disk, _ = self._space(db)
            if disk < NO_RESERVE_MARGIN:
                return False
        if self._reserve_bytes > 0:
            disk, pages = self._space(db)
            missing = 0 if os.path.exists(self._reserve_path) else self._reserve_file_bytes
            if (disk < self._wal_bytes + missing
                    or disk + pages < self._reserve_bytes * 3 // 2 + missing):
                return False
        if self._max_db_bytes > 0:
            page = int(db.execute("PRAGMA page_size").fetchone()[0])
            used = (int(db.execute("PRAGMA page_count").fetchone()[0])
                    - int(db.execute("PRAGMA freelist_count").fetchone()[0]))
            if self._max_db_bytes - used * page < self._max_db_bytes // 8:
                return False
        return True

    async def recover(self) -> bool:
        """While full: checkpoint (the WAL's disk space comes back), and if there is room again
        put the reserve file back and store again. True once no longer full."""
        def op(db: sqlite3.Connection) -> bool:
            if not self.full:
                return True
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if self._room(db) and self._make_reserve():
                self.full = False
            return not self.full
        return await self._run(op, own_tx=True)

    # --- the writer thread ------------------------------------------------------------------------

    def _worker(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            db = self._connect()
            if not self._make_reserve():
                self.full = True
        except Exception as exc:  # report to open(), never crash the thread silently
            err = StorageError(type(exc).__name__)
            loop.call_soon_threadsafe(_set_exc, ready, err)
            return
        self._db = db
        if self._checkpoint_bytes > 0:
            self._checkpointer = Checkpointer(self._path, self._checkpoint_bytes)
            self._checkpointer.start()
        loop.call_soon_threadsafe(_set_result, ready, None)
        stop = False
        while not stop:
            batch = self._take_batch()
            if any(item is _STOP for item in batch):
                stop = True
                # Everything submitted before the stop still runs (round-robin may have taken
                # the stop before other owners' operations).
                with self._cv:
                    batch += [item for waiting in self._queues.values() for item in waiting]
                    self._queues.clear()
                batch = [item for item in batch if item is not _STOP]
            if batch:
                try:
                    self._run_batch(db, loop, batch)
                except Exception as exc:
                    # Never let the writer thread die: every caller waiting on this batch would
                    # wait forever, and close() with them. The batch fails; the next one runs.
                    log.error("storage: a batch failed (%s)", type(exc).__name__)
                    err = StorageError(type(exc).__name__)
                    loop.call_soon_threadsafe(
                        _deliver, [(item[1], False, err) for item in batch])
        if self._checkpointer is not None:
            self._checkpointer.stop()
        db.close()

    def _put(self, owner: object | None, item: Any) -> None:
        with self._cv:
            waiting = self._queues.get(owner)
            if waiting is None:
                waiting = self._queues[owner] = collections.deque()
            waiting.append(item)
            self._cv.notify()

    def _take_batch(self) -> list[Any]:
        """Up to max_batch operations and about max_batch_bytes, one per owner in turn."""
        with self._cv:
            while not self._queues:
                self._cv.wait()
            batch: list[Any] = []
            size = 0
            queues = self._queues
            while queues and len(batch) < self._max_batch and size < self._max_batch_bytes:
                owner, waiting = next(iter(queues.items()))
                item = waiting.popleft()
                batch.append(item)
                if item is not _STOP:
                    size += item[4]
                if waiting:
                    queues.move_to_end(owner)  # its next turn comes after everyone else's
                else:
                    del queues[owner]
            return batch

    def _run_batch(self, db: sqlite3.Connection, loop: asyncio.AbstractEventLoop,
                   batch: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for fn, fut, own_tx, _, _ in batch:
            if own_tx:  # operations that manage their own transaction (checkpoint)
                results.append(self._call(fn, db, fut))
        if not self.full and self._checked_low(db):
            self._went_full(release=False)
        tx = []
        for item in batch:
            if item[2]:
                continue
            if item[3] and self.full:  # stores more: refused at once while full
                results.append((item[1], False, StorageFull("storage full")))
            else:
                tx.append(item)
        if tx:
            try:
                # Group commit: the whole batch in one transaction, one fsync.
                db.execute("BEGIN IMMEDIATE")
                values = [(fut, True, fn(db)) for fn, fut, _, _, _ in tx]
                db.execute("COMMIT")
                results.extend(values)
                if self._checkpointer is not None:
                    self._checkpointer.wrote(sum(item[4] for item in tx))
            except Exception as exc:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
                if _is_full(exc):
                    self._went_full(release=True)
                # Some operation failed: run each alone, so only the failing one fails.
                for fn, fut, _, grows, _ in tx:
                    if grows and self.full:
                        results.append((fut, False, StorageFull("storage full")))
                    else:
                        results.append(self._alone(db, fn, fut))
        loop.call_soon_threadsafe(_deliver, results)

    def _call(self, fn: Callable[[sqlite3.Connection], Any], db: sqlite3.Connection,
              fut: asyncio.Future[Any]) -> tuple[asyncio.Future[Any], bool, Any]:
        try:
            return fut, True, fn(db)
        except Exception as exc:
            return fut, False, self._error(exc)

    def _alone(self, db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any],
               fut: asyncio.Future[Any]) -> tuple[asyncio.Future[Any], bool, Any]:
        try:
            db.execute("BEGIN IMMEDIATE")
            value = fn(db)
            db.execute("COMMIT")
            return fut, True, value
        except Exception as exc:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            return fut, False, self._error(exc)

    def _error(self, exc: Exception) -> StorageError:
        if _is_full(exc):
            self._went_full(release=True)
            return StorageFull("storage full")
        return StorageError(type(exc).__name__)

    def _submit(self, fn: Callable[[sqlite3.Connection], T], own_tx: bool = False,
                grows: bool = False, size: int = 0) -> asyncio.Future[T]:
        """Queue an operation for the writer thread. `grows`: it stores more (refused while
        the disk is full); `size`: about the bytes it writes."""
        if self._thread is None or self._loop is None:
            raise StorageError("storage closed")
        # The writer completes `done`; callers get `fut`, a copy of its outcome. A caller that
        # is cancelled (its connection ended) cancels `fut` at most: the operation is queued
        # and runs all the same, so what counts it (pending here, the relay's counters on
        # `fut`'s callbacks) must follow `done`, never the caller (review of issue 15, item 1).
        done: asyncio.Future[T] = self._loop.create_future()
        fut: asyncio.Future[T] = self._loop.create_future()
        owner = WRITER_OWNER.get()
        self._put(owner, (fn, done, own_tx, grows, size))
        self.pending += 1
        self._pending_by[owner] = self._pending_by.get(owner, 0) + 1
        done.add_done_callback(functools.partial(self._finished, owner, fut))
        return fut

    def _finished(self, owner: object | None, fut: asyncio.Future[Any],
                  done: asyncio.Future[Any]) -> None:
        self.pending -= 1
        left = self._pending_by[owner] - 1
        if left:
            self._pending_by[owner] = left
        else:
            del self._pending_by[owner]
        if fut.done():
            return
        exc = None if done.cancelled() else done.exception()
        if done.cancelled():
            fut.cancel()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(done.result())

    def pending_of(self, owner: object | None) -> int:
        """Operations of `owner` submitted and not yet finished."""
        return self._pending_by.get(owner, 0)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], own_tx: bool = False,
                   grows: bool = False, size: int = 0) -> T:
        # Shielded: a cancelled caller leaves the result to nobody, and no warning behind.
        return await asyncio.shield(self._submit(fn, own_tx, grows, size))

    # --- mailboxes --------------------------------------------------------------------------------

    async def mailbox_count(self) -> int:
        return await self._run(lambda db: int(
            db.execute("SELECT count(*) FROM mailboxes").fetchone()[0]))

    def create_mailbox(self, okey: bytes, dkey: bytes, sig_pub: bytes, box_secret: bytes,
                       owner_box_pub: bytes, public: bool, used: int = 0,
                       del_pub: bytes | None = None) -> asyncio.Future[int]:
        def op(db: sqlite3.Connection) -> int:
            key = new_key(db, "mailboxes")
            db.execute(
                "INSERT INTO mailboxes (id, owner_key, deposit_key, sig_pub, box_secret,"
                " owner_box_pub, public, tokens, used, del_pub)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, x'', ?, ?)",
                (key, okey, dkey, sig_pub, box_secret, owner_box_pub, int(public), used,
                 del_pub))
            return key
        return self._submit(op, grows=True)

    async def load_mailbox(self, *, okey: bytes | None = None,
                           dkey: bytes | None = None) -> MailboxRow | None:
        def op(db: sqlite3.Connection) -> MailboxRow | None:
            cols = ("SELECT id, owner_key, deposit_key, sig_pub, box_secret, owner_box_pub,"
                    " public, tokens, used, del_pub FROM mailboxes WHERE ")
            if okey is not None:
                row = db.execute(cols + "owner_key = ?", (okey,)).fetchone()
            else:
                row = db.execute(cols + "deposit_key = ?", (dkey,)).fetchone()
            if row is None:
                return None
            queued = db.execute("SELECT count(*) FROM messages WHERE mailbox = ?",
                                (row[0],)).fetchone()[0]
            tokens = tuple(row[7][i:i + 32] for i in range(0, len(row[7]), 32))
            return MailboxRow(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]),
                              tokens, int(queued), int(row[8]),
                              None if row[9] is None else bytes(row[9]))
        return await self._run(op)

    def delete_mailbox(self, mailbox: int) -> asyncio.Future[int]:
        """Delete a mailbox and all it holds; the number of queued blocks deleted with it."""
        return self._submit(lambda db: _delete_mailbox(db, mailbox))

    async def touch_mailboxes(self, mailboxes: list[int], used: int) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE mailboxes SET used = ? WHERE id = ? AND used < ?",
                           [(used, m, used) for m in mailboxes])
        await self._run(op)

    async def expire_mailboxes(self, before: int,
                               max_blocks: int) -> tuple[list[int], int, bool]:
        """Delete mailboxes last used before `before`: their ids, the queued blocks deleted
        with them, and whether more are left. One call stops after 1000 mailboxes or once
        `max_blocks` blocks went with them, so it never holds the writer long; the index on
        `used` finds them without reading the table."""
        def op(db: sqlite3.Connection) -> tuple[list[int], int, bool]:
            found = [int(r[0]) for r in db.execute(
                "SELECT id FROM mailboxes WHERE used < ? LIMIT 1000", (before,))]
            ids: list[int] = []
            removed = 0
            for m in found:
                if removed >= max_blocks:
                    return ids, removed, True
                removed += _delete_mailbox(db, m)
                ids.append(m)
            return ids, removed, len(found) == 1000
        return await self._run(op)

    async def queued_count(self) -> int:
        return await self._run(lambda db: int(
            db.execute("SELECT count(*) FROM messages").fetchone()[0]))

    async def set_tokens(self, mailbox: int, tokens: tuple[bytes, ...]) -> None:
        # Sorted: not in the order they were added.
        await self._run(lambda db: db.execute(
            "UPDATE mailboxes SET tokens = ? WHERE id = ?", (b"".join(sorted(tokens)), mailbox)))

    # --- queued blocks ---------------------------------------------------------------------------

    def enqueue(self, mailbox: int, expiry: int, sealed: bytes,
                limit: int = 0) -> asyncio.Future[int]:
        """Queue a block; the result is its handle: its row key, never that of another block
        while it is queued (order keys can repeat once a block is gone: not handles). `limit`
        is for shared stores: one process's counts are exact here (the relay checks them)."""
        def op(db: sqlite3.Connection) -> int:
            key = new_key(db, "messages")
            db.execute("INSERT INTO messages (id, mailbox, seq, expiry, block)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (key, mailbox, next_seq(db, mailbox), expiry, sealed))
            return key
        return self._submit(op, grows=True, size=len(sealed))

    async def queued(self, mailbox: int, skip: Collection[int],
                     limit: int) -> list[tuple[int, bytes]]:
        """The `limit` oldest blocks of a mailbox whose handles are not in `skip`, oldest first."""
        skip = frozenset(skip)  # a copy: the caller's set changes on the event loop's thread

        def op(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
            rows = db.execute(
                "SELECT id, block FROM messages WHERE mailbox = ? ORDER BY seq LIMIT ?",
                (mailbox, limit + len(skip)))
            return [(int(r[0]), bytes(r[1])) for r in rows if r[0] not in skip][:limit]
        # Sized by what it reads into memory, so max_batch_bytes also ends a batch of reads
        # (512 reads of a window each were 256 MiB at once; issue 15 review, item 1).
        return await self._run(op, size=limit * _BLOCK_BYTES)

    def remove(self, mailbox: int, ids: list[int]) -> asyncio.Future[int]:
        def op(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(ids))
            sql = f"DELETE FROM messages WHERE mailbox = ? AND id IN ({marks})"  # noqa: S608
            return int(db.execute(sql, (mailbox, *ids)).rowcount)
        # secure_delete zeroes each block's pages: about a block written per id.
        return self._submit(op, size=len(ids) * _BLOCK_BYTES)

    async def expire(self, now: int) -> tuple[dict[int, int], int]:
        """Delete expired blocks and blobs: the blocks deleted per mailbox, the blobs deleted
        (counts of what went, never a fresh total: uploads in flight are not in the table yet)."""
        def op(db: sqlite3.Connection) -> tuple[dict[int, int], int]:
            counts = {int(m): int(c) for m, c in db.execute(
                "SELECT mailbox, count(*) FROM messages WHERE expiry <= ? GROUP BY mailbox",
                (now,))}
            db.execute("DELETE FROM messages WHERE expiry <= ?", (now,))
            blobs = int(db.execute("DELETE FROM blobs WHERE expiry <= ?", (now,)).rowcount)
            return counts, blobs
        return await self._run(op)

    # --- prekey bundles -------------------------------------------------------------------------

    async def set_bundle_base(self, mailbox: int, base: bytes) -> None:
        def op(db: sqlite3.Connection) -> None:
            if base:
                db.execute("INSERT OR REPLACE INTO bundles (mailbox, base) VALUES (?, ?)",
                           (mailbox, base))
            else:
                db.execute("DELETE FROM bundles WHERE mailbox = ?", (mailbox,))
                db.execute("DELETE FROM bundle_items WHERE mailbox = ?", (mailbox,))
        await self._run(op, grows=bool(base))

    @staticmethod
    def _counts(db: sqlite3.Connection, mailbox: int) -> tuple[int, int]:
        counts = dict(db.execute(
            "SELECT kind, count(*) FROM bundle_items WHERE mailbox = ? GROUP BY kind",
            (mailbox,)).fetchall())
        return int(counts.get(1, 0)), int(counts.get(2, 0))

    async def add_bundle_items(self, mailbox: int, kind: int, items: list[bytes],
                               cap: int) -> tuple[int, int] | None:
        def op(db: sqlite3.Connection) -> tuple[int, int] | None:
            counts = self._counts(db, mailbox)
            if counts[kind - 1] + len(items) > cap:
                return None
            for item in items:
                db.execute("INSERT INTO bundle_items (id, mailbox, kind, item) VALUES (?, ?, ?, ?)",
                           (new_key(db, "bundle_items"), mailbox, kind, item))
            return self._counts(db, mailbox)
        return await self._run(op, grows=True, size=sum(map(len, items)))

    async def bundle_counts(self, mailbox: int) -> tuple[int, int]:
        return await self._run(lambda db: self._counts(db, mailbox))

    async def take_bundle(self, mailbox: int, kinds: tuple[int, ...]
                          ) -> tuple[bytes, bytes | None, bytes | None] | None:
        """The base and one item of each of `kinds` (up to two; none: the base alone), each
        item deleted; None if the mailbox has no bundle."""
        def op(db: sqlite3.Connection) -> tuple[bytes, bytes | None, bytes | None] | None:
            row = db.execute("SELECT base FROM bundles WHERE mailbox = ?", (mailbox,)).fetchone()
            if row is None:
                return None
            taken: list[bytes | None] = []
            for kind in kinds:
                item = db.execute(
                    "SELECT id, item FROM bundle_items WHERE mailbox = ? AND kind = ?"
                    " ORDER BY id LIMIT 1", (mailbox, kind)).fetchone()
                if item is None:
                    taken.append(None)
                else:
                    db.execute("DELETE FROM bundle_items WHERE id = ?", (item[0],))
                    taken.append(bytes(item[1]))
            taken += [None, None]
            return bytes(row[0]), taken[0], taken[1]
        return await self._run(op)

    # --- blobs ----------------------------------------------------------------------------------

    async def blob_count(self) -> int:
        return await self._run(lambda db: int(
            db.execute("SELECT count(*) FROM blobs").fetchone()[0]))

    def put_blob(self, bkey: bytes, cap_hash: bytes, expiry: int,
                 block: bytes) -> asyncio.Future[bool]:
        def op(db: sqlite3.Connection) -> bool:
            try:
                db.execute("INSERT INTO blobs (id, key, cap_hash, expiry, block)"
                           " VALUES (?, ?, ?, ?, ?)",
                           (new_key(db, "blobs"), bkey, cap_hash, expiry, block))
            except sqlite3.IntegrityError:
                return False
            return True
        return self._submit(op, grows=True, size=len(block))

    async def get_blob(self, bkey: bytes) -> tuple[bytes, bytes] | None:
        def op(db: sqlite3.Connection) -> tuple[bytes, bytes] | None:
            row = db.execute("SELECT cap_hash, block FROM blobs WHERE key = ?", (bkey,)).fetchone()
            return None if row is None else (bytes(row[0]), bytes(row[1]))
        return await self._run(op)

    def delete_blob(self, bkey: bytes) -> asyncio.Future[bool]:
        return self._submit(lambda db: db.execute(
            "DELETE FROM blobs WHERE key = ?", (bkey,)).rowcount > 0)

    # --- maintenance ----------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so deleted rows leave no trace there."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await self._run(op, own_tx=True)


def _delete_mailbox(db: sqlite3.Connection, mailbox: int) -> int:
    n = int(db.execute("DELETE FROM messages WHERE mailbox = ?", (mailbox,)).rowcount)
    db.execute("DELETE FROM bundle_items WHERE mailbox = ?", (mailbox,))
    db.execute("DELETE FROM bundles WHERE mailbox = ?", (mailbox,))
    db.execute("DELETE FROM mailboxes WHERE id = ?", (mailbox,))
    return n



def _held(fd: int) -> int:
    """Bytes of disk a file holds (its blocks; its size where the system does not say)."""
    st = os.fstat(fd)
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else min(st.st_size, blocks * 512)


def _is_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL: the disk, or max_page_count, has no room."""
    return (isinstance(exc, sqlite3.Error)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _deliver(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if ok:
            _set_result(fut, value)
        else:
            _set_exc(fut, value)
