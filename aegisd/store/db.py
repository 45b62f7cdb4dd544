"""The SQLCipher store: one encrypted database per profile, a small synchronous API.

Every public write runs in a transaction; ``with store.transaction():`` groups several writes
into one (for example the advanced ratchet state and the received message, or the advanced
sending chain and the outbox blocks), committed together or not at all. Nested
``transaction()`` blocks join the outermost one.

The store is used from one thread (the daemon's event loop). It is not thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlcipher3

from .errors import NoProfile, SchemaError, StoreError
from .schema import (
    MESSAGE_STATUSES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SEARCHED,
    ensure_search_triggers,
)

SEARCHED_INDEXES = frozenset(fts for _, fts in SEARCHED)

Clock = Callable[[], int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Outgoing status order; a status never moves backwards (a read receipt may arrive before the
#: delivery receipt, and a late "delivered" must not undo "read").
_OUT_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3, "failed": 4, "expired": 4}
_IN_RANK = {"received": 0, "read": 1}


@dataclass(frozen=True)
class Contact:
    id: int
    name: str
    identity_key: bytes | None
    verified: bool
    blocked: bool
    state: bytes | None
    created_at: int


@dataclass(frozen=True)
class Message:
    seq: int
    id: str
    contact_id: int
    direction: str
    body: str
    status: str
    sent_at: int | None
    created_at: int
    status_at: int
    #: Disappearing messages (docs/protocol.md §27): the message's timer in seconds (0: none),
    #: its deadline in ms (None: not running yet, or no timer), and for a line recording a
    #: change of the conversation's timer, the new value.
    timer_s: int = 0
    expires_at: int | None = None
    timer_change: int | None = None


_MESSAGE_SELECT = (
    "SELECT seq, id, contact_id, direction, body, status, sent_at, created_at, status_at, "
    "timer_s, expires_at, timer_change "
)


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    created_at: int
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "time_ms": self.created_at, "data": self.data}


@dataclass(frozen=True)
class MailboxRow:
    id: int
    role: str
    contact_id: int | None
    descriptor: bytes
    invitation_id: bytes | None
    expires_at: int | None
    created_at: int


@dataclass(frozen=True)
class RequestRow:
    id: int
    identity_key: bytes
    display_name: str
    session: bytes
    reply_to: bytes
    created_at: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    message_id: str | None
    contact_id: int | None
    destination: bytes
    block: bytes
    created_at: int
    not_before: int
    attempts: int


#: FTS5's secure-delete option, which the search index relies on (store/schema.py
#: `_message_search_index`), came with SQLite 3.44.
MIN_SQLITE = (3, 44, 0)


def _check_sqlite(conn: Any) -> None:
    """Refuse an SQLCipher whose SQLite is too old or lacks FTS5, before any migration: the
    search index would fail, or keep deleted words (docs/threat-model.md §4.8)."""
    text = str(conn.execute("SELECT sqlite_version()").fetchone()[0])
    version = tuple(int(p) for p in text.split(".")[:3] if p.isdigit())
    if version < MIN_SQLITE:
        raise StoreError(
            f"this SQLCipher has SQLite {text}; AegisLink needs SQLite "
            f"{'.'.join(map(str, MIN_SQLITE))} or later (for FTS5's secure-delete)"
        )
    try:
        conn.execute("SELECT fts5_source_id()").fetchone()  # a function FTS5 registers
    except sqlcipher3.OperationalError:
        raise StoreError(
            "this SQLCipher was built without FTS5, which AegisLink's search needs"
        ) from None


class Store:
    """An open, unlocked SQLCipher database."""

    def __init__(self, conn: Any, path: Path, clock: Clock) -> None:
        self._db = conn
        self.path = path
        self._clock = clock
        self._depth = 0

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, key: bytes, *, create: bool = False, clock: Clock | None = None
    ) -> Store:
        """Open (or, with ``create=True``, create) the database under the raw 32-byte ``key``.

        Brings the schema up to date. Raises NoProfile when the file is missing and
        ``create`` is false, StoreError when the key does not open the file.
        """
        if len(key) != 32:
            raise ValueError("the database key must be 32 bytes")
        if not create and not path.exists():
            raise NoProfile(f"no database in {path.parent}")
        if create and path.exists():
            raise StoreError(f"a database already exists in {path.parent}")
        conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA cipher_log_level = NONE")
            # A raw key (x'..'): SQLCipher uses it as is, no PBKDF2 of its own; Argon2id
            # already stands between the passphrase and this key.
            conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlcipher3.DatabaseError:
                raise StoreError("the database key does not open the database") from None
            _check_sqlite(conn)
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA temp_store = MEMORY")  # no plaintext temp files
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            if create:
                path.chmod(0o600)
            store = cls(conn, path, clock or _now_ms)
            store._migrate()
            store.rebuild_dirty_search()  # marked before a crash: the last run did not
            # A kill between a rebuild's (or an erasure's) commit and its checkpoint leaves the
            # old page images in the -wal: emptied here, before anything else runs.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlcipher3.Error):
                # before the WAL is emptied: what a rebuild overwrites must not stay there
                self.rebuild_dirty_search(checkpoint=False)
            with contextlib.suppress(sqlcipher3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    @property
    def closed(self) -> bool:
        return self._db is None

    def _migrate(self) -> None:
        db = self._db
        with self.transaction():
            has_table = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if not has_table:
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database has schema version {version}; this aegisd knows up to "
                f"{SCHEMA_VERSION}: upgrade AegisLink"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                MIGRATIONS[target - 1](db)
                db.execute("UPDATE schema_version SET version = ?", (target,))
        with self.transaction():
            ensure_search_triggers(db)

    def search_dirty(self) -> bool:
        """Whether a search index has had a row deleted or edited since its last rebuild."""
        if not self._has_dirty_mark():
            return False
        return self._q("SELECT 1 FROM fts_dirty LIMIT 1").fetchone() is not None

    def _has_dirty_mark(self) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fts_dirty'"
        return self._q(sql).fetchone() is not None

    def rebuild_dirty_search(self, *, checkpoint: bool = True) -> int:
        """Rebuild each search index a deletion or an edit has touched (store/schema.py
        `_search_index_dirty`: the only way to drop a deleted word from FTS5's ``%_idx``),
        then, with ``checkpoint``, empty the WAL, where the old pages' copies were. The
        number of indexes rebuilt."""
        if not self._has_dirty_mark():
            return 0  # a schema before the mark (only while migrating, in tests)
        with self.transaction():
            names = [str(r[0]) for r in self._q("SELECT fts FROM fts_dirty").fetchall()]
            for fts in names:
                if fts not in SEARCHED_INDEXES:
                    raise StoreError("an unknown search index is marked for rebuilding")
            rebuilt = [fts for fts in names if self.search_leaks(fts)]
            for fts in rebuilt:
                self._q(f"INSERT INTO {fts} ({fts}) VALUES ('rebuild')")  # noqa: S608
            self._q("DELETE FROM fts_dirty")
        # Even with no rebuild: the deletion's own old pages (its text) go from the WAL.
        if names and checkpoint:
            self._q("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(rebuilt)

    def search_leaks(self, fts: str) -> bool:
        """Whether the index's ``%_idx`` keeps a term (the first term of a leaf page, or a
        prefix of it) that is no longer a prefix of any term of a live row: a deleted or
        edited-away word, or a part of it that no message has. Only then is a rebuild
        needed; the leaf pages themselves are overwritten by secure-delete. Reads the
        index's terms through a temporary fts5vocab table (memory: temp_store)."""
        if fts not in SEARCHED_INDEXES:
            raise StoreError("an unknown search index")
        vocab = f"{fts}_vocab"
        self._q(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{vocab} "
                f"USING fts5vocab(main, {fts}, row)")  # fmt: skip
        idx = self._q(f"SELECT DISTINCT term FROM {fts}_idx").fetchall()  # noqa: S608
        for (term,) in idx:
            prefix = bytes(term)[1:]  # the first byte names FTS5's index (0: the main one)
            if not prefix:
                continue
            # Terms compare as bytes: every term starting with the prefix is in [p, p||ff).
            live = self._q(
                f"SELECT 1 FROM temp.{vocab} WHERE term >= CAST(? AS TEXT) "  # noqa: S608
                "AND term < CAST(? AS TEXT) LIMIT 1",
                (prefix, prefix + b"\xff"),
            ).fetchone()
            if live is None:
                return True
        return False

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: all commit together at the end of the outermost block, or none."""
        if self._db is None:
            raise StoreError("the store is closed")
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            if self._db.in_transaction:  # SQLite may already have rolled back
                self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """Run one SQL statement on the open store (its cursor). For the store's table
        modules (conversations.py, search.py, cover.py, ...: aegisd/store/__init__.py), which
        keep their tables' SQL out of this file; code outside aegisd/store calls their
        functions or this class's methods, never SQL. StoreError when the store is closed."""
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db.execute(sql, args)

    _q = query  # the short name this class's own methods use

    def query_in(self, sql: str, keys: Sequence[Any]) -> list[Any]:
        """The rows of ``sql``, whose ``{marks}`` is the placeholder list of an ``IN``, over
        every key of ``keys``: run in chunks of 500 keys, under SQLite's bound on parameters."""
        rows: list[Any] = []
        for i in range(0, len(keys), 500):
            chunk = tuple(keys[i : i + 500])
            rows += self.query(sql.format(marks=",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    # -- identity and settings ----------------------------------------------------------

    def get_identity(self) -> bytes | None:
        """The identity and prekey store, as the opaque blob the core serialised."""
        row = self._q("SELECT state FROM identity WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    def put_identity(self, state: bytes) -> None:
        with self.transaction():
            self._q(
                "INSERT INTO identity (id, state, updated_at) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "updated_at = excluded.updated_at",
                (bytes(state), self._clock()),
            )

    def get_setting(self, name: str, default: Any = None) -> Any:
        row = self._q("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, name: str, value: Any) -> None:
        """``None`` deletes the setting (get_setting then answers its default): per-contact,
        per-copy and per-invitation entries must not outlive what they describe."""
        with self.transaction():
            if value is None:
                self._q("DELETE FROM settings WHERE name = ?", (name,))
                return
            self._q(
                "INSERT INTO settings (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value)),
            )

    # -- contacts and sessions ----------------------------------------------------------

    @staticmethod
    def _contact(row: Any) -> Contact:
        return Contact(
            id=row[0],
            name=row[1],
            identity_key=None if row[2] is None else bytes(row[2]),
            verified=bool(row[3]),
            blocked=bool(row[4]),
            state=None if row[5] is None else bytes(row[5]),
            created_at=row[6],
        )

    def add_contact(
        self, name: str, *, identity_key: bytes | None = None, state: bytes | None = None
    ) -> Contact:
        with self.transaction():
            if self.contact_by_name(name) is not None:
                raise StoreError("a contact with that name already exists")
            cur = self._q(
                "INSERT INTO contacts (name, identity_key, state, created_at) VALUES (?, ?, ?, ?)",
                (name, identity_key, state, self._clock()),
            )
            contact = self.get_contact(int(cur.lastrowid))
        assert contact is not None
        return contact

    def get_contact(self, contact_id: int) -> Contact | None:
        row = self._q(
            "SELECT id, name, identity_key, verified, blocked, state, created_at "
            "FROM contacts WHERE id = ?",
            (contact_id,),
        ).fetchone()
        return None if row is None else self._contact(row)

    def contact_by_name(self, name: str) -> Contact | None:
        row = self._q(
            "SELECT id, name, identity_key, verified, blocked, state, created_at "
            "FROM contacts WHERE name = ?",
            (name,),
        ).fetchone()
        return None if row is None else self._contact(row)

    def list_contacts(self) -> list[Contact]:
        rows = self._q(
            "SELECT id, name, identity_key, verified, blocked, state, created_at "
            "FROM contacts ORDER BY name"
        ).fetchall()
        return [self._contact(r) for r in rows]

    _CONTACT_FIELDS = frozenset({"name", "identity_key", "verified", "blocked", "state"})

    def update_contact(self, contact_id: int, **fields: Any) -> None:
        """Set some of: name, identity_key, verified, blocked, state."""
        unknown = set(fields) - self._CONTACT_FIELDS
        if unknown:
            raise ValueError(f"unknown contact field(s): {', '.join(sorted(unknown))}")
        if not fields:
            return
        names = sorted(fields)
        assignments = ", ".join(f"{n} = ?" for n in names)  # names are from a fixed set
        with self.transaction():
            cur = self._q(
                f"UPDATE contacts SET {assignments} WHERE id = ?",  # noqa: S608
                (*(fields[n] for n in names), contact_id),
            )
            if cur.rowcount != 1:
                raise StoreError("no such contact")

    def remove_contact(self, contact_id: int) -> None:
        """Remove a contact with its session, messages (and their events) and queued blocks."""
        with self.transaction():
            self._forget_events_of(contact_id)
            self._q("DELETE FROM contacts WHERE id = ?", (contact_id,))

    def get_session(self, contact_id: int) -> bytes | None:
        row = self._q("SELECT state FROM sessions WHERE contact_id = ?", (contact_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_session(self, contact_id: int, state: bytes) -> None:
        with self.transaction():
            self._q(
                "INSERT INTO sessions (contact_id, state, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (contact_id) DO UPDATE SET state = excluded.state, "
                "updated_at = excluded.updated_at",
                (contact_id, bytes(state), self._clock()),
            )

    def delete_session(self, contact_id: int) -> None:
        with self.transaction():
            self._q("DELETE FROM sessions WHERE contact_id = ?", (contact_id,))

    # -- messages -----------------------------------------------------------------------

    @staticmethod
    def _message(row: Any) -> Message:
        return Message(*row)

    def add_message(
        self,
        contact_id: int,
        direction: str,
        body: str,
        *,
        status: str | None = None,
        message_id: str | None = None,
        sent_at: int | None = None,
        timer_change: int | None = None,
    ) -> Message:
        """Store a message; ``message_id`` defaults to a new random id (hex, 128 bits)."""
        if direction not in ("in", "out"):
            raise ValueError("direction must be 'in' or 'out'")
        status = status or ("queued" if direction == "out" else "received")
        ranks = _OUT_RANK if direction == "out" else _IN_RANK
        if status not in ranks:
            raise ValueError(f"status {status!r} does not apply to direction {direction!r}")
        mid = message_id or secrets.token_hex(16)
        now = self._clock()
        with self.transaction():
            # The conversation's timer as it is now applies to the message (§27): one's own
            # runs from now (queued), an incoming one from when it is marked read.
            timer = 0 if timer_change is not None else self.get_timer(contact_id)[0]
            expires = now + timer * 1000 if timer and direction == "out" else None
            self._q(
                "INSERT INTO messages (id, contact_id, direction, body, status, sent_at, "
                "created_at, status_at, timer_s, expires_at, timer_change) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, contact_id, direction, body, status, sent_at, now, now, timer, expires,
                 timer_change),
            )
            msg = self.get_message(mid)
        assert msg is not None
        return msg

    def merge_timer_line(
        self, contact_id: int, direction: str, body: str, status: str, seconds: int
    ) -> Message | None:
        """The conversation's last message, if it is a timer line of the same side, rewritten
        to record this change instead (consecutive changes by one side with no message between
        them make one line, §27.2: a contact changing the timer over and over cannot fill the
        history); None if the last message is not such a line."""
        with self.transaction():
            row = self._q(
                "SELECT id, timer_change, direction FROM messages WHERE contact_id = ? "
                "ORDER BY seq DESC LIMIT 1", (contact_id,),
            ).fetchone()  # fmt: skip
            if row is None or row[1] is None or row[2] != direction:
                return None
            now = self._clock()
            self._q(
                "UPDATE messages SET body = ?, status = ?, timer_change = ?, "
                "created_at = ?, status_at = ? WHERE id = ?",
                (body, status, seconds, now, now, row[0]),
            )
            return self.get_message(str(row[0]))

    def get_message(self, message_id: str) -> Message | None:
        row = self._q(
            _MESSAGE_SELECT
            + "FROM messages WHERE id = ?",
            (message_id,),
        ).fetchone()
        return None if row is None else self._message(row)

    def message_by_seq(self, seq: int) -> Message | None:
        """A message by its ``seq`` (the search index's and the conversations list's key)."""
        row = self._q(
            "SELECT seq, id, contact_id, direction, body, status, sent_at, created_at, status_at "
            "FROM messages WHERE seq = ?",
            (seq,),
        ).fetchone()
        return None if row is None else self._message(row)

    def set_message_status(self, message_id: str, status: str) -> bool:
        """Advance a message's status. Returns False (and changes nothing) when the message
        already has this status or a later one, so duplicate receipts are harmless."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self.transaction():
            msg = self.get_message(message_id)
            if msg is None:
                raise StoreError("no such message")
            ranks = _OUT_RANK if msg.direction == "out" else _IN_RANK
            if status not in ranks:
                raise ValueError(f"status {status!r} does not apply to this message")
            if ranks[status] <= ranks[msg.status]:
                return False
            now = self._clock()
            # An incoming message's timer runs from when it is read (§27).
            self._q(
                "UPDATE messages SET status = ?, status_at = ?, expires_at = CASE "
                "WHEN ? = 'read' AND direction = 'in' AND timer_s > 0 AND expires_at IS NULL "
                "THEN ? + timer_s * 1000 ELSE expires_at END WHERE id = ?",
                (status, now, status, now, message_id),
            )
        return True

    def unread(self, contact_id: int) -> list[Message]:
        """Incoming messages from the contact not yet marked read, oldest first."""
        rows = self._q(
            _MESSAGE_SELECT
            + "FROM messages WHERE contact_id = ? AND direction = 'in' AND status = 'received' "
            "ORDER BY seq",
            (contact_id,),
        ).fetchall()
        return [self._message(r) for r in rows]

    def delete_stale_fragments(self, before_ms: int) -> int:
        with self.transaction():
            cur = self._q("DELETE FROM fragments WHERE created_at < ?", (before_ms,))
        return int(cur.rowcount)

    def sent_before(self, cutoff_ms: int, *, limit: int = 500) -> list[Message]:
        """Outgoing messages deposited (status 'sent') before ``cutoff_ms`` and never confirmed."""
        rows = self._q(
            _MESSAGE_SELECT
            + "FROM messages WHERE direction = 'out' AND status = 'sent' AND status_at < ? "
            "ORDER BY seq LIMIT ?",
            (cutoff_ms, limit),
        ).fetchall()
        return [self._message(r) for r in rows]

    def history(
        self, contact_id: int, *, before_seq: int | None = None, limit: int = 50
    ) -> list[Message]:
        """Up to ``limit`` messages with the contact, newest last, older than ``before_seq``."""
        rows = self._q(
            _MESSAGE_SELECT
            + "FROM messages WHERE contact_id = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (contact_id, before_seq if before_seq is not None else 2**62, limit),
        ).fetchall()
        return [self._message(r) for r in reversed(rows)]

    def delete_message(self, message_id: str) -> bool:
        """Delete a message and the events that carry it (a deleted text must not live on in
        the event log)."""
        with self.transaction():
            self._forget_events(message_id)
            cur = self._q("DELETE FROM messages WHERE id = ?", (message_id,))
            # Actions held for it (§26.5) would otherwise wait for it; they go with it.
            self._q("DELETE FROM pending_actions WHERE target = ?", (message_id,))
        return bool(cur.rowcount)

    def expired_messages(self, now_ms: int, *, limit: int = 500) -> list[Message]:
        """Messages whose disappearing timer ran out by ``now_ms``, soonest first."""
        rows = self._q(
            _MESSAGE_SELECT + "FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY expires_at LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [self._message(r) for r in rows]

    def next_expiry(self) -> int | None:
        """The earliest running deadline (ms), or None."""
        row = self._q("SELECT min(expires_at) FROM messages").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file and empty it: after an erasure, the earlier
        versions of the erased pages (with their text) must not live on in the WAL, nor the
        erased page's old copy in the file. False if it could not finish (busy: a reader or
        writer held it back; the caller tries again)."""
        if self._db is None:
            raise StoreError("the store is closed")
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlcipher3.Error:
            return False
        # (busy, frames in the WAL, frames copied): busy 1 means it did not run to the end.
        return row is None or int(row[0]) == 0

    def get_timer(self, contact_id: int) -> tuple[int, int]:
        """A conversation's disappearing timer: (seconds, 0 off; the sender's time of its last
        change in ms)."""
        row = self._q(
            "SELECT timer_s, timer_changed_at FROM contacts WHERE id = ?", (contact_id,)
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def set_timer(self, contact_id: int, seconds: int, changed_at: int) -> None:
        with self.transaction():
            self._q(
                "UPDATE contacts SET timer_s = ?, timer_changed_at = ? WHERE id = ?",
                (seconds, changed_at, contact_id),
            )

    def delete_conversation(self, contact_id: int) -> int:
        with self.transaction():
            self._forget_events_of(contact_id)
            cur = self._q("DELETE FROM messages WHERE contact_id = ?", (contact_id,))
            self._q("DELETE FROM pending_actions WHERE contact_id = ?", (contact_id,))
        return int(cur.rowcount)

    def _forget_events(self, message_id: str) -> None:
        # A file's message id is also its attachment id; its events carry the file name.
        self._q(
            "DELETE FROM events WHERE (type LIKE 'message.%' "
            "AND json_extract(data, '$.message_id') = ?) OR (type LIKE 'attachment.%' "
            "AND json_extract(data, '$.attachment_id') = ?)",
            (message_id, message_id),
        )

    def _forget_events_of(self, contact_id: int) -> None:
        ids = self._q("SELECT id FROM messages WHERE contact_id = ?", (contact_id,)).fetchall()
        for (message_id,) in ids:
            self._forget_events(message_id)

    # -- events -------------------------------------------------------------------------

    def append_event(self, type: str, data: dict[str, Any]) -> Event:
        """Persist an event; its sequence number is strictly greater than every earlier one,
        deleted ones included (AUTOINCREMENT)."""
        payload = json.dumps(data, separators=(",", ":"))
        now = self._clock()
        with self.transaction():
            cur = self._q(
                "INSERT INTO events (type, created_at, data) VALUES (?, ?, ?)",
                (type, now, payload),
            )
        return Event(seq=int(cur.lastrowid), type=type, created_at=now, data=data)

    def events_after(self, seq: int, *, limit: int = 256) -> list[Event]:
        rows = self._q(
            "SELECT seq, type, created_at, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def last_event_seq(self) -> int:
        """The highest sequence number ever given (0 if none), even if that event was pruned."""
        row = self._q("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return 0 if row is None else int(row[0])

    def first_event_seq(self) -> int | None:
        row = self._q("SELECT min(seq) FROM events").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def prune_events(self, keep_after_seq: int) -> int:
        """Delete events with seq <= keep_after_seq; returns how many went."""
        with self.transaction():
            cur = self._q("DELETE FROM events WHERE seq <= ?", (keep_after_seq,))
        return int(cur.rowcount)

    def prune_events_before(self, before_ms: int) -> int:
        """Delete events created before ``before_ms``, always keeping the newest one (so the
        sequence numbering and `last_event_seq` stay); returns how many went."""
        with self.transaction():
            cur = self._q(
                "DELETE FROM events WHERE created_at < ? AND seq < (SELECT max(seq) FROM events)",
                (before_ms,),
            )
        return int(cur.rowcount)

    # -- outbox -------------------------------------------------------------------------

    def enqueue_blocks(
        self,
        destination: bytes,
        blocks: list[bytes],
        *,
        message_id: str | None = None,
        contact_id: int | None = None,
        not_before: int = 0,
    ) -> list[int]:
        """Store the exact ciphertext blocks to deposit, before the first attempt. Call this
        in the same transaction as the session update that produced them."""
        now = self._clock()
        ids = []
        with self.transaction():
            for block in blocks:
                cur = self._q(
                    "INSERT INTO outbox (message_id, contact_id, destination, block, "
                    "created_at, not_before) VALUES (?, ?, ?, ?, ?, ?)",
                    (message_id, contact_id, bytes(destination), bytes(block), now, not_before),
                )
                ids.append(int(cur.lastrowid))
        return ids

    def last_not_before(self, contact_id: int | None, destination: bytes, below: int) -> int:
        """The latest not_before (under ``below``: the outbox's sentinels) of the blocks queued
        to this contact and destination and not tried yet, 0 if none: a later block is due
        no earlier, so a contact receives payloads in the order they were queued (a timer
        change before the texts sent under it, §27.3). ``contact_id`` None: an own device's
        sync mailbox (its blocks name no contact)."""
        row = self._q(
            "SELECT max(not_before) FROM outbox WHERE contact_id IS ? AND destination = ? "
            "AND attempts = 0 AND not_before < ?",
            (contact_id, bytes(destination), below),
        ).fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def pending_blocks(self, *, now: int | None = None, limit: int = 100) -> list[OutboxItem]:
        """Blocks due for deposit (not_before <= now), oldest first."""
        rows = self._q(
            "SELECT id, message_id, contact_id, destination, block, created_at, not_before, "
            "attempts FROM outbox WHERE not_before <= ? ORDER BY id LIMIT ?",
            (self._clock() if now is None else now, limit),
        ).fetchall()
        return [
            OutboxItem(r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), r[5], r[6], r[7]) for r in rows
        ]

    def block_attempted(self, item_id: int, *, retry_at: int) -> None:
        with self.transaction():
            self._q(
                "UPDATE outbox SET attempts = attempts + 1, not_before = ? WHERE id = ?",
                (retry_at, item_id),
            )

    def block_deposited(self, item_id: int) -> None:
        """The relay acknowledged the block: forget it."""
        with self.transaction():
            self._q("DELETE FROM outbox WHERE id = ?", (item_id,))

    def blocks_deposited(self, item_ids: list[int]) -> None:
        """The relay acknowledged these blocks: forget them (one transaction)."""
        with self.transaction():
            if self._db is None:
                raise StoreError("the store is closed")
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in item_ids])

    def readdress_outbox(self, contact_id: int, old: bytes, new: bytes, due: int = 0) -> None:
        """Blocks queued for ``old`` go to ``new``, due at ``due``; a block waiting for a
        cover slot (store/cover.py) keeps waiting for one."""
        from .cover import SLOT_WAIT

        with self.transaction():
            self._q(
                "UPDATE outbox SET destination = ?, "
                "not_before = CASE WHEN not_before = ? THEN ? ELSE ? END "
                "WHERE contact_id = ? AND destination = ?",
                (new, SLOT_WAIT, SLOT_WAIT, due, contact_id, old),
            )

    def outbox_holds_message(self, message_id: str) -> bool:
        row = self._q("SELECT 1 FROM outbox WHERE message_id = ? LIMIT 1", (message_id,))
        return row.fetchone() is not None

    def outbox_holds_contact(self, contact_id: int, unaddressed: bytes | None = None) -> bool:
        """Whether blocks for the contact wait, not counting those addressed ``unaddressed``
        (delivery.py's PENDING_DESTINATION: they leave only if the contact ever answers)."""
        row = self._q(
            "SELECT 1 FROM outbox WHERE contact_id = ? AND destination IS NOT ? LIMIT 1",
            (contact_id, unaddressed),
        )
        return row.fetchone() is not None

    def retry_failed_now(self) -> None:
        """Make every block that failed before due again (the relay is back)."""
        with self.transaction():
            self._q("UPDATE outbox SET not_before = 0 WHERE attempts > 0")

    def outbox_size(self) -> int:
        return int(self._q("SELECT count(*) FROM outbox").fetchone()[0])

    # -- mailboxes the profile owns -------------------------------------------------------

    _MAILBOX_SELECT = (
        "SELECT id, role, contact_id, descriptor, invitation_id, expires_at, created_at "
        "FROM mailboxes"
    )

    @staticmethod
    def _mailbox(r: Any) -> MailboxRow:
        return MailboxRow(
            r[0], r[1], r[2], bytes(r[3]), None if r[4] is None else bytes(r[4]), r[5], r[6]
        )

    def add_mailbox(
        self,
        role: str,
        descriptor: bytes,
        *,
        contact_id: int | None = None,
        invitation_id: bytes | None = None,
        expires_at: int | None = None,
    ) -> int:
        with self.transaction():
            cur = self._q(
                "INSERT INTO mailboxes (role, contact_id, descriptor, invitation_id, expires_at, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (role, contact_id, bytes(descriptor), invitation_id, expires_at, self._clock()),
            )
        return int(cur.lastrowid)

    def list_mailboxes(self, role: str | None = None) -> list[MailboxRow]:
        rows = (
            self._q(self._MAILBOX_SELECT + " ORDER BY id").fetchall()
            if role is None
            else self._q(self._MAILBOX_SELECT + " WHERE role = ? ORDER BY id", (role,)).fetchall()
        )
        return [self._mailbox(r) for r in rows]

    def get_mailbox(self, mailbox_id: int) -> MailboxRow | None:
        r = self._q(self._MAILBOX_SELECT + " WHERE id = ?", (mailbox_id,)).fetchone()
        return None if r is None else self._mailbox(r)

    def mailbox_for_contact(self, contact_id: int) -> MailboxRow | None:
        r = self._q(
            self._MAILBOX_SELECT + " WHERE role = 'contact' AND contact_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (contact_id,),
        ).fetchone()
        return None if r is None else self._mailbox(r)

    def set_mailbox_contact(self, mailbox_id: int, contact_id: int) -> None:
        with self.transaction():
            self._q("UPDATE mailboxes SET contact_id = ? WHERE id = ?", (contact_id, mailbox_id))

    def delete_mailbox(self, mailbox_id: int) -> None:
        with self.transaction():
            self._q("DELETE FROM mailboxes WHERE id = ?", (mailbox_id,))

    # -- contact requests -----------------------------------------------------------------

    def add_request(
        self, identity_key: bytes, display_name: str, session: bytes, reply_to: bytes
    ) -> int:
        with self.transaction():
            cur = self._q(
                "INSERT INTO requests (identity_key, display_name, session, reply_to, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (identity_key, display_name, session, reply_to, self._clock()),
            )
        return int(cur.lastrowid)

    def replace_request(
        self, request_id: int, display_name: str, session: bytes, reply_to: bytes
    ) -> None:
        """A newer first contact of the same identity: its name, session and reply address
        replace the request's (its id stays, its time becomes now)."""
        with self.transaction():
            self._q(
                "UPDATE requests SET display_name = ?, session = ?, reply_to = ?, created_at = ? "
                "WHERE id = ?",
                (display_name, session, reply_to, self._clock(), request_id),
            )

    def list_requests(self) -> list[RequestRow]:
        rows = self._q(
            "SELECT id, identity_key, display_name, session, reply_to, created_at FROM requests "
            "ORDER BY id"
        ).fetchall()
        return [RequestRow(r[0], bytes(r[1]), r[2], bytes(r[3]), bytes(r[4]), r[5]) for r in rows]

    def get_request(self, request_id: int) -> RequestRow | None:
        return next((r for r in self.list_requests() if r.id == request_id), None)

    def delete_request(self, request_id: int) -> bool:
        with self.transaction():
            cur = self._q("DELETE FROM requests WHERE id = ?", (request_id,))
        return bool(cur.rowcount)

    # -- partial multi-block messages -----------------------------------------------------

    def partial_messages(self, contact_id: int | None = None) -> list[tuple[int, bytes]]:
        """(contact id, message id) of the incomplete multi-block messages kept, oldest first
        (of one contact, or of all)."""
        group = "GROUP BY contact_id, msg_id ORDER BY min(created_at)"
        if contact_id is None:
            rows = self._q(f"SELECT contact_id, msg_id FROM fragments {group}").fetchall()  # noqa: S608
        else:
            rows = self._q(
                f"SELECT contact_id, msg_id FROM fragments WHERE contact_id = ? {group}",  # noqa: S608
                (contact_id,),
            ).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def delete_fragments(self, contact_id: int, msg_id: bytes | None = None) -> int:
        """Drop one incomplete message of a contact, or all of them."""
        with self.transaction():
            if msg_id is None:
                cur = self._q("DELETE FROM fragments WHERE contact_id = ?", (contact_id,))
            else:
                cur = self._q(
                    "DELETE FROM fragments WHERE contact_id = ? AND msg_id = ?",
                    (contact_id, msg_id),
                )
        return int(cur.rowcount)

    def put_fragment(
        self, contact_id: int, msg_id: bytes, index: int, count: int, data: bytes
    ) -> list[bytes] | None:
        """Keep one fragment; when all ``count`` are in, delete them and return them in order."""
        with self.transaction():
            self._q(
                "INSERT OR IGNORE INTO fragments (contact_id, msg_id, idx, count, data, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (contact_id, msg_id, index, count, data, self._clock()),
            )
            rows = self._q(
                "SELECT idx, data FROM fragments WHERE contact_id = ? AND msg_id = ? "
                "AND count = ? ORDER BY idx",
                (contact_id, msg_id, count),
            ).fetchall()
            if len(rows) < count:
                return None
            self._q(
                "DELETE FROM fragments WHERE contact_id = ? AND msg_id = ?", (contact_id, msg_id)
            )
        return [bytes(r[1]) for r in rows]
