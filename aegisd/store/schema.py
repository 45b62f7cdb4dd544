"""The database schema, as an ordered list of migrations.

``MIGRATIONS[i]`` takes a database at schema version ``i`` to version ``i + 1``. A new schema
change is a new function appended to the list, never an edit of an old one. Each migration
runs in the same transaction as the update of ``schema_version``, so a crash mid-migration
leaves the database at the old version.

Protocol state (identity, prekeys, ratchet sessions, mailbox descriptors) is stored as opaque
blobs: the store does not know their format, the protocol core does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

Migration = Callable[[Any], None]

#: Outgoing: queued -> sent -> delivered -> read, or failed / expired (at the relay,
#: undelivered). Incoming: received -> read.
MESSAGE_STATUSES = ("queued", "sent", "delivered", "read", "failed", "expired", "received")


def _run(db: Any, script: str) -> None:
    # Not executescript(): it COMMITs the open transaction first, and a migration must commit
    # together with its schema_version update. The scripts here hold no ';' inside literals.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _v0_to_v1(db: Any) -> None:
    statuses = ", ".join(f"'{s}'" for s in MESSAGE_STATUSES)
    _run(
        db,
        f"""
        CREATE TABLE identity (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            state       BLOB NOT NULL,          -- identity + prekey store, opaque
            updated_at  INTEGER NOT NULL
        );
        CREATE TABLE settings (
            name        TEXT PRIMARY KEY,
            value       TEXT NOT NULL           -- JSON
        ) WITHOUT ROWID;
        CREATE TABLE contacts (
            id           INTEGER PRIMARY KEY,
            name         TEXT NOT NULL UNIQUE,
            identity_key BLOB,                  -- public identity key, opaque
            verified     INTEGER NOT NULL DEFAULT 0,
            blocked      INTEGER NOT NULL DEFAULT 0,
            state        BLOB,                  -- mailboxes etc., opaque
            created_at   INTEGER NOT NULL
        );
        CREATE TABLE sessions (
            contact_id  INTEGER PRIMARY KEY REFERENCES contacts(id) ON DELETE CASCADE,
            state       BLOB NOT NULL,          -- ratchet state, opaque
            updated_at  INTEGER NOT NULL
        );
        CREATE TABLE messages (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            id          TEXT NOT NULL UNIQUE,   -- stable message id given to clients
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            direction   TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            body        TEXT NOT NULL,
            status      TEXT NOT NULL CHECK (status IN ({statuses})),
            sent_at     INTEGER,                -- sender's clock, incoming only
            created_at  INTEGER NOT NULL,
            status_at   INTEGER NOT NULL
        );
        CREATE INDEX messages_by_contact ON messages (contact_id, seq);
        CREATE TABLE events (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
            type        TEXT NOT NULL,
            created_at  INTEGER NOT NULL,
            data        TEXT NOT NULL           -- JSON object
        );
        CREATE TABLE outbox (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id  TEXT REFERENCES messages(id) ON DELETE SET NULL,
            contact_id  INTEGER REFERENCES contacts(id) ON DELETE CASCADE,
            destination BLOB NOT NULL,          -- mailbox descriptor, opaque
            block       BLOB NOT NULL,          -- the exact ciphertext block to deposit
            created_at  INTEGER NOT NULL,
            not_before  INTEGER NOT NULL DEFAULT 0,
            attempts    INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX outbox_due ON outbox (not_before, id);
        """,
    )


def _v1_to_v2(db: Any) -> None:
    """Mailboxes the profile owns, pending contact requests, and partial multi-block messages."""
    _run(
        db,
        """
        CREATE TABLE mailboxes (
            id            INTEGER PRIMARY KEY,
            role          TEXT NOT NULL CHECK (role IN ('address', 'invitation', 'contact')),
            contact_id    INTEGER REFERENCES contacts(id) ON DELETE CASCADE,
            descriptor    BLOB NOT NULL,        -- relay, keys and ids, opaque
            invitation_id BLOB UNIQUE,
            expires_at    INTEGER,
            created_at    INTEGER NOT NULL
        );
        CREATE TABLE requests (
            id            INTEGER PRIMARY KEY,
            identity_key  BLOB NOT NULL,
            display_name  TEXT NOT NULL,
            session       BLOB NOT NULL,        -- ratchet session opened by the request, opaque
            reply_to      BLOB NOT NULL,        -- where to answer, opaque
            created_at    INTEGER NOT NULL
        );
        CREATE TABLE fragments (
            contact_id    INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            msg_id        BLOB NOT NULL,
            idx           INTEGER NOT NULL,
            count         INTEGER NOT NULL,
            data          BLOB NOT NULL,
            created_at    INTEGER NOT NULL,
            PRIMARY KEY (contact_id, msg_id, idx)
        ) WITHOUT ROWID
        """,
    )


def _attachments(db: Any) -> None:
    """File attachments (docs/protocol.md §22): one row per file sent or received, with its
    transfer progress, so that an interrupted upload or download resumes."""
    _run(
        db,
        """
        CREATE TABLE attachments (
            id          TEXT PRIMARY KEY,       -- the message id of its descriptor
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            direction   TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            name        TEXT NOT NULL,          -- cleaned file name
            size        INTEGER NOT NULL,       -- plaintext bytes
            blocks      INTEGER NOT NULL,       -- padded block count
            digest      BLOB NOT NULL,          -- SHA-256 of the plaintext
            seed        BLOB NOT NULL,          -- the file's key material
            relay_url   TEXT NOT NULL,
            state       TEXT NOT NULL CHECK (state IN
                          ('uploading', 'uploaded', 'downloading', 'complete', 'failed')),
            done        INTEGER NOT NULL DEFAULT 0,  -- blocks confirmed, in order
            error       TEXT,
            sent_at     INTEGER,
            created_at  INTEGER NOT NULL,
            updated_at  INTEGER NOT NULL
        );
        CREATE INDEX attachments_by_contact ON attachments (contact_id, created_at)
        """,
    )


def _backup_renewals(db: Any) -> None:
    """Session renewal after a backup import (docs/protocol.md §23): one row per contact and
    side ('restored': we were restored and asked; 'peer': the contact was restored and asked
    us), and the restored-from profile's mailboxes, deleted at the relay once renewed."""
    _run(
        db,
        """
        CREATE TABLE renewals (
            contact_id   INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            side         TEXT NOT NULL CHECK (side IN ('restored', 'peer')),
            renew_id     BLOB,                 -- NULL until the request is built
            requested_at INTEGER NOT NULL,     -- ms, the request's own time (replay bound)
            new_mailbox  INTEGER,              -- mailboxes.id of our new receiving mailbox
            done         INTEGER NOT NULL DEFAULT 0,  -- 0 under way, 1 done, 2 failed
            PRIMARY KEY (contact_id, side)
        ) WITHOUT ROWID;
        CREATE TABLE retired_mailboxes (
            id           INTEGER PRIMARY KEY,
            contact_id   INTEGER REFERENCES contacts(id) ON DELETE CASCADE,  -- NULL: at once
            descriptor   BLOB NOT NULL         -- an old profile's mailbox, opaque
        )
        """,
    )


def _calls_history(db: Any) -> None:
    """Call history (aegisd/calls): who, which way, when, how it ended. Never SDP, keys or
    addresses: those live only in the daemon's memory for the length of a call."""
    _run(
        db,
        """
        CREATE TABLE calls (
            id           TEXT PRIMARY KEY,      -- call id, hex
            contact_id   INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            direction    TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            video        INTEGER NOT NULL DEFAULT 0,
            state        TEXT NOT NULL,         -- the last state, 'ended' once over
            end_reason   TEXT,
            created_at   INTEGER NOT NULL,      -- ms
            answered_at  INTEGER,
            ended_at     INTEGER
        );
        CREATE INDEX calls_by_time ON calls (created_at)
        """,
    )


def _network_mode(db: Any) -> None:
    """Network modes (issue 12): a profile without ``network.mode`` uses the managed Tor for
    a relay that is not on loopback. Profiles made before keep what they did: a proxy if they
    had one, else direct connections. A new, empty database gets nothing (its init decides)."""
    had_relay = db.execute(
        "SELECT 1 FROM settings WHERE name IN ('relay.url', 'network.proxy') "
        "AND value != 'null'"
    ).fetchone()
    if had_relay is None or db.execute(
        "SELECT 1 FROM settings WHERE name = 'network.mode'"
    ).fetchone():
        return
    proxy = db.execute(
        "SELECT 1 FROM settings WHERE name = 'network.proxy' AND value != 'null'"
    ).fetchone()
    db.execute(
        "INSERT INTO settings (name, value) VALUES ('network.mode', ?)",
        ('"proxy"' if proxy else '"direct"',),
    )


def _cover_receipts(db: Any) -> None:
    """Receipts waiting for a cover slot (services/cover.py, docs/protocol.md §24): sent
    batched in the next slot of their contact, not one block per message."""
    _run(
        db,
        """
        CREATE TABLE pending_receipts (
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            kind        INTEGER NOT NULL,       -- 1 delivered, 2 read
            message_id  BLOB NOT NULL,          -- the sender's wire message id
            PRIMARY KEY (contact_id, kind, message_id)
        ) WITHOUT ROWID
        """,
    )


def _mailbox_pool(db: Any) -> None:
    """Mailboxes made ahead, at random times, for contacts to come (services/cover.py): a new
    contact's mailbox is taken from here, so it was not born the moment the contact was."""
    _run(
        db,
        """
        CREATE TABLE mailbox_pool (
            id          INTEGER PRIMARY KEY,
            descriptor  BLOB NOT NULL,          -- an owned mailbox, opaque
            created_at  INTEGER NOT NULL
        )
        """,
    )


def _groups(db: Any) -> None:
    """Groups (issue 16, docs/protocol.md §25): each group's log (the core's stored record:
    final base, canonical chain, held-back changes) and its head's members; invitations we
    sent (to match answers) and received (waiting for the user, bounded by the service);
    group messages held for a version not reached yet; group contacts (pairwise sessions
    opened by an introduction, hidden from the contact list).

    Group history has tables of its own rather than a nullable reference in ``messages``:
    a message there belongs to one contact and has one status, while an outgoing group
    message goes to N members with a status each (``group_message_status``), and an
    incoming one is the sender's, who may be a group contact only."""
    _run(
        db,
        """
        CREATE TABLE groups (
            id          INTEGER PRIMARY KEY,
            group_id    BLOB NOT NULL UNIQUE,   -- 32 random bytes, never outside the store
            log         BLOB NOT NULL,          -- the core's GroupLogRecord, opaque
            created_at  INTEGER NOT NULL,
            updated_at  INTEGER NOT NULL
        );
        CREATE TABLE group_members (
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            member_key  BLOB NOT NULL,          -- Ed25519 identity key
            role        INTEGER NOT NULL,       -- 1 member, 2 admin, 3 owner
            PRIMARY KEY (group_ref, member_key)
        ) WITHOUT ROWID;
        CREATE TABLE group_invitations (
            id          INTEGER PRIMARY KEY,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            payload     BLOB NOT NULL,          -- the invitation payload as received
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE group_invites_sent (
            invite_id   BLOB PRIMARY KEY,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            version     INTEGER NOT NULL,       -- of the state the invitation carried
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE group_held (
            id          INTEGER PRIMARY KEY,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            payload     BLOB NOT NULL,          -- a message or introduction, encoded
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE group_contacts (
            contact_id  INTEGER PRIMARY KEY REFERENCES contacts(id) ON DELETE CASCADE
        );
        CREATE TABLE group_messages (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            id          TEXT NOT NULL UNIQUE,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            sender_key  BLOB,                   -- NULL: our own
            direction   TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            body        TEXT NOT NULL,
            sent_at     INTEGER,
            created_at  INTEGER NOT NULL
        );
        CREATE INDEX group_messages_by_group ON group_messages (group_ref, seq);
        CREATE TABLE group_message_status (
            message_id  TEXT NOT NULL REFERENCES group_messages(id) ON DELETE CASCADE,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            status      TEXT NOT NULL,          -- queued, delivered, read
            status_at   INTEGER NOT NULL,
            PRIMARY KEY (message_id, contact_id)
        ) WITHOUT ROWID
        """,
    )


def _group_invites_and_intros(db: Any) -> None:
    """Groups after review: an invitation we sent remembers its base's version and the
    hashes of the chain it carried (the answer sends the invitee every change of the chain
    it lacks, docs/protocol.md §25.7 step 3); introductions whose first contact failed wait
    to be tried again (bounded, services/groups_inbound.py); a group message counts every
    other member at send, the ones it was not sent to included ("delivered to 3 of 5"):
    those with a contact have a status row (`unreachable`, `blocked`), the others a row
    here."""
    _run(
        db,
        """
        ALTER TABLE group_invites_sent ADD COLUMN base_version INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE group_invites_sent ADD COLUMN chain BLOB NOT NULL DEFAULT x'';
        CREATE TABLE group_intros_pending (
            id          INTEGER PRIMARY KEY,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            name        TEXT NOT NULL,          -- the hidden contact's name to be
            link        TEXT NOT NULL,          -- the newcomer's introduction link
            tries       INTEGER NOT NULL,
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE group_message_unsent (
            message_id  TEXT NOT NULL REFERENCES group_messages(id) ON DELETE CASCADE,
            member_key  BLOB NOT NULL,          -- a member with no contact here yet
            PRIMARY KEY (message_id, member_key)
        ) WITHOUT ROWID
        """,
    )


def _group_message_keys(db: Any) -> None:
    """A group message is named by (group, author, wire message id), no longer by its wire id
    alone: a member who sent another member's message id first would have had the other's
    message dropped as a duplicate (docs/protocol.md §25.9). ``author`` is the author's
    Ed25519 key, empty for our own; incoming messages gain ``read_at`` (group.read; those
    stored before count as read: no read receipts for history). Per-member status and the
    members not sent to are keyed by the message's ``seq``. SQLite cannot change a key in
    place: new tables, copy, drop the old ones (children first: a dropped parent deletes
    its rows' children), rename (which rewrites the references), in this one transaction."""
    _run(
        db,
        """
        CREATE TABLE group_messages_new (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            author      BLOB NOT NULL,          -- Ed25519 key, x'' for our own
            wire_id     BLOB NOT NULL,          -- the message id in the payload (16 bytes)
            direction   TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            body        TEXT NOT NULL,
            sent_at     INTEGER,
            created_at  INTEGER NOT NULL,
            read_at     INTEGER,                -- incoming: when the user read it
            -- the key, in this order so that a receipt's lookup (author x'', wire id) uses it
            UNIQUE (author, wire_id, group_ref)
        );
        CREATE TABLE group_message_status_new (
            seq         INTEGER NOT NULL REFERENCES group_messages_new(seq) ON DELETE CASCADE,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            status      TEXT NOT NULL,          -- queued, delivered, read, unreachable, blocked
            status_at   INTEGER NOT NULL,
            PRIMARY KEY (seq, contact_id)
        ) WITHOUT ROWID;
        CREATE TABLE group_message_unsent_new (
            seq         INTEGER NOT NULL REFERENCES group_messages_new(seq) ON DELETE CASCADE,
            member_key  BLOB NOT NULL,          -- a member with no contact here yet
            PRIMARY KEY (seq, member_key)
        ) WITHOUT ROWID
        """,
    )
    rows = db.execute(
        "SELECT seq, id, group_ref, sender_key, direction, body, sent_at, created_at "
        "FROM group_messages ORDER BY seq"
    ).fetchall()
    skipped = 0
    for seq, mid, ref, sender, direction, body, sent_at, created_at in rows:
        # OR IGNORE: a row whose new key is taken already is skipped (counted), never an
        # error that would fail this migration on every open
        cur = db.execute(
            "INSERT OR IGNORE INTO group_messages_new (seq, group_ref, author, wire_id, "
            "direction, body, sent_at, created_at, read_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, ref, b"" if sender is None else bytes(sender), _wire_id_v11(mid), direction,
             body, sent_at, created_at, created_at if direction == "in" else None),
        )  # fmt: skip
        skipped += cur.rowcount == 0
    if skipped:
        logging.getLogger("aegisd").warning(
            "schema migration: %d repeated group messages skipped", skipped)  # fmt: skip
    # AUTOINCREMENT's high-water mark: dropping the old table drops it, and a seq handed out
    # once (to a message deleted since) must not be handed out again
    mark = db.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'group_messages'"
    ).fetchone()
    _run(
        db,
        """
        INSERT INTO group_message_status_new (seq, contact_id, status, status_at)
            SELECT m.seq, s.contact_id, s.status, s.status_at
            FROM group_message_status s JOIN group_messages m ON m.id = s.message_id
            WHERE m.seq IN (SELECT seq FROM group_messages_new);
        INSERT INTO group_message_unsent_new (seq, member_key)
            SELECT m.seq, u.member_key
            FROM group_message_unsent u JOIN group_messages m ON m.id = u.message_id
            WHERE m.seq IN (SELECT seq FROM group_messages_new);
        DROP TABLE group_message_status;
        DROP TABLE group_message_unsent;
        DROP TABLE group_messages;
        ALTER TABLE group_messages_new RENAME TO group_messages;
        ALTER TABLE group_message_status_new RENAME TO group_message_status;
        ALTER TABLE group_message_unsent_new RENAME TO group_message_unsent;
        CREATE INDEX group_messages_by_group ON group_messages (group_ref, seq)
        """,
    )
    if mark is not None:
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'group_messages'")
        db.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'group_messages', "
            "max(?, coalesce((SELECT max(seq) FROM group_messages), 0))",
            (int(mark[0]),),
        )


def _wire_id_v11(message_id: str) -> bytes:
    """Frozen copy of store/groups.py's ``wire_id_of`` as of this migration (migrations never
    change with the code): 32 lowercase hex digits their 16 bytes; any other text (a backup's
    id is any short UTF-8 text) 0xFF, its UTF-8, then 0xFF up to 17 bytes. One to one: UTF-8
    never holds 0xFF and the text form is never 16 bytes long."""
    if len(message_id) == 32 and all(ch in "0123456789abcdef" for ch in message_id):
        return bytes.fromhex(message_id)
    return (b"\xff" + message_id.encode()).ljust(17, b"\xff")


def _group_file_links(db: Any) -> None:
    """A received group file's attachment row names its group message (``group_seq``): the
    history marks that message alone as a file (another message, in another group, may carry
    the same author and id), and a member's pending files are counted (services/
    group_files.py). Settings set to null are deleted (`Store.set_setting` deletes them now:
    per-contact and per-copy entries must not outlive what they describe), and so are the
    entries of group file copies whose row went with a removed contact."""
    _run(
        db,
        """
        ALTER TABLE attachments ADD COLUMN
            group_seq INTEGER REFERENCES group_messages(seq) ON DELETE SET NULL;
        CREATE INDEX attachments_by_group_seq ON attachments (group_seq);
        DELETE FROM settings WHERE value = 'null';
        DELETE FROM settings WHERE name LIKE 'group.file.%'
            AND substr(name, 12) NOT IN (SELECT id FROM attachments)
        """,
    )


def _group_contact_departures(db: Any) -> None:
    """A group contact that shares no group with us any more carries its departure here, in
    its own row (services/groups_state.py): it dies with the contact (a later contact that
    reuses the id starts with none), each departure overwrites it and a return clears it.
    ``departed_at``: when we applied the departure; ``remove_at``: the deadline past which it
    goes (the grace plus a random spread, docs/threat-model.md "Leaving a group")."""
    _run(
        db,
        """
        ALTER TABLE group_contacts ADD COLUMN departed_at INTEGER;
        ALTER TABLE group_contacts ADD COLUMN remove_at INTEGER
        """,
    )
    # Marks kept as settings before: the next sweep marks those contacts again (a new grace).
    db.execute("DELETE FROM settings WHERE name LIKE 'group.departed.%'")


def _message_search_index(db: Any) -> None:
    """Full-text search (issue 17): an FTS5 index of each message table, kept in step by
    triggers on it: an INSERT indexes the text, a DELETE (a cascade included) drops it, an
    UPDATE of the text (an edit, or a text blanked) indexes the new one in its place. Other
    code never writes to the index: it changes the message rows with plain SQL. Existing
    messages are indexed here. (Trigger bodies hold ';', hence no _run.)

    One FTS5 table per message table, inside the encrypted store (docs/threat-model.md
    "Search"), over the table's ``body`` by its ``seq`` (external content: the text is kept in
    the message table only). FTS5's secure-delete option (SQLite 3.44 or later; the bundled
    SQLCipher has 3.53) removes a deleted row's tokens from the index pages at once, where
    FTS5 would otherwise keep them beside a delete marker until segments happen to merge.
    (A contentless_delete table would not do: it marks deleted rowids in a tombstone and
    leaves their tokens in place.) A deletion gives FTS5 the old text, exactly as indexed."""
    for table, fts in SEARCHED:
        db.execute(
            f"CREATE VIRTUAL TABLE {fts} USING fts5(body, content='{table}', "
            "content_rowid='seq', tokenize='unicode61 remove_diacritics 2')"
        )
        db.execute(f"INSERT INTO {fts} ({fts}, rank) VALUES ('secure-delete', 1)")  # noqa: S608
        _search_triggers(db, table, fts)
        db.execute(f"INSERT INTO {fts} ({fts}) VALUES ('rebuild')")  # noqa: S608


#: The message tables and their FTS5 indexes (names fixed here, never from input).
SEARCHED = (("messages", "messages_fts"), ("group_messages", "group_messages_fts"))


def _search_triggers(db: Any, table: str, fts: str) -> None:
    index = f"INSERT INTO {fts} (rowid, body) VALUES (new.seq, new.body)"  # noqa: S608
    forget = f"INSERT INTO {fts} ({fts}, rowid, body) VALUES ('delete', old.seq, old.body)"  # noqa: S608
    db.execute(f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN {index}; END")
    db.execute(f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN {forget}; END")
    db.execute(f"CREATE TRIGGER {fts}_update AFTER UPDATE OF body, seq ON {table} "
               f"BEGIN {forget}; {index}; END")  # fmt: skip


def ensure_search_triggers(db: Any) -> None:
    """Run at every open, after the migrations: a migration that rebuilds a message table
    (new table, copy, drop, rename: how SQLite changes a CHECK or a key) drops the table's
    triggers with it, and the index would silently fall out of step. Missing triggers are
    made again and that index rebuilt from the table (a delete-all first: what it held of
    the old rows goes with secure-delete)."""
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master").fetchall()}
    for table, fts in SEARCHED:
        wanted = {f"{fts}_insert", f"{fts}_delete", f"{fts}_update"}
        if fts not in names or wanted <= names:
            continue  # before the index's migration, or intact
        for trigger in wanted & names:
            db.execute(f"DROP TRIGGER {trigger}")
        _search_triggers(db, table, fts)
        db.execute(f"INSERT INTO {fts} ({fts}) VALUES ('delete-all')")  # noqa: S608
        db.execute(f"INSERT INTO {fts} ({fts}) VALUES ('rebuild')")  # noqa: S608
    if "fts_dirty" not in names:
        return  # before the dirty mark's migration
    for table, fts in SEARCHED:
        wanted = {f"{fts}_dirty_delete", f"{fts}_dirty_update"}
        if wanted <= names:
            continue
        for trigger in wanted & names:
            db.execute(f"DROP TRIGGER {trigger}")
        _dirty_triggers(db, table, fts)
        db.execute("INSERT OR IGNORE INTO fts_dirty (fts) VALUES (?)", (fts,))


def _dirty_triggers(db: Any, table: str, fts: str) -> None:
    mark = f"INSERT OR IGNORE INTO fts_dirty (fts) VALUES ('{fts}')"  # noqa: S608
    db.execute(f"CREATE TRIGGER {fts}_dirty_delete AFTER DELETE ON {table} BEGIN {mark}; END")
    db.execute(f"CREATE TRIGGER {fts}_dirty_update AFTER UPDATE OF body, seq ON {table} "
               f"BEGIN {mark}; END")  # fmt: skip


def _search_index_dirty(db: Any) -> None:
    """What secure-delete misses (docs/threat-model.md §4.8): FTS5 keeps, for each leaf page
    of its index, the page's first term (or the shortest prefix that tells it from the last
    term of the page before) in the ``%_idx`` table, and a deletion never updates it, so a
    deleted word can stay there whole. ``fts_dirty`` names each index a deletion or an edit
    of its table has touched since its last rebuild: triggers set it in the transaction of
    the change itself, so a crash cannot lose it; the store rebuilds the index named there
    (Store.rebuild_dirty_search) and then clears the row."""
    db.execute("CREATE TABLE fts_dirty (fts TEXT PRIMARY KEY) WITHOUT ROWID")
    for table, fts in SEARCHED:
        _dirty_triggers(db, table, fts)


def _message_actions(db: Any) -> None:
    """Replies, reactions, edits and deletions of one-to-one messages (docs/protocol.md §26):
    a message may quote another (``reply_to``, its id, and ``quoted``, its text as we had it
    when the reply was stored or sent; NULL: not found or deleted since by its author), be
    edited (``body`` is the latest text only, no earlier version is kept; ``edits`` counts
    them, ``edited_at`` is our clock when the last one was applied, ``edit_sent_at`` the
    sender's clock in it, used only to apply reordered edits in order), or deleted for
    everyone (``deleted``: the text is blanked, the row stays as a mark). ``reactions``: one per
    side per message. ``pending_actions``: a reaction, edit or deletion whose message has not
    arrived yet (bounded per contact, services/actions.py)."""
    _run(
        db,
        """
        ALTER TABLE messages ADD COLUMN reply_to TEXT;
        ALTER TABLE messages ADD COLUMN quoted TEXT;
        ALTER TABLE messages ADD COLUMN edited_at INTEGER;
        ALTER TABLE messages ADD COLUMN edit_sent_at INTEGER;
        ALTER TABLE messages ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_by_reply_to ON messages (reply_to);
        CREATE TABLE reactions (
            message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            direction   TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            emoji       TEXT NOT NULL,
            created_at  INTEGER NOT NULL,
            PRIMARY KEY (message_id, direction)
        ) WITHOUT ROWID;
        CREATE TABLE pending_actions (
            id          INTEGER PRIMARY KEY,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            target      TEXT NOT NULL,          -- the wire id (hex) it waits for
            payload     BLOB NOT NULL,          -- the payload, encoded
            created_at  INTEGER NOT NULL
        );
        CREATE INDEX pending_actions_by_target ON pending_actions (contact_id, target)
        """,
    )


def _file_captions_and_typing(db: Any) -> None:
    """Issue 17 (files): a file's caption and its place among files sent together
    (docs/protocol.md §22.3), one row per attachment that has either, gone with it; and per
    contact, typing indicators' state (§22.6): whether the contact told us it has them on, and
    whether we told it ours are on. Both die with their attachment or contact."""
    _run(
        db,
        """
        CREATE TABLE attachment_extras (
            attachment_id TEXT PRIMARY KEY REFERENCES attachments(id) ON DELETE CASCADE,
            caption       TEXT NOT NULL DEFAULT '',
            batch_id      TEXT,               -- hex, NULL when not part of a batch
            batch_index   INTEGER NOT NULL DEFAULT 0,
            batch_count   INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE typing_state (
            contact_id  INTEGER PRIMARY KEY REFERENCES contacts(id) ON DELETE CASCADE,
            peer_on     INTEGER NOT NULL DEFAULT 0,  -- the contact's last word: on
            told_on     INTEGER NOT NULL DEFAULT 0   -- we told the contact ours are on
        )
        """,
    )


def _disappearing_messages(db: Any) -> None:
    """Disappearing messages (docs/protocol.md §27): a contact's conversation timer (seconds,
    0 off) with the sender's time of its last change (orders concurrent changes); a message's
    timer, fixed when it is stored, its deadline (ms, set when it is sent or read) and, for a
    line recording a timer change, the new value."""
    _run(
        db,
        """
        ALTER TABLE contacts ADD COLUMN timer_s INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE contacts ADD COLUMN timer_changed_at INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN timer_s INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN expires_at INTEGER;
        ALTER TABLE messages ADD COLUMN timer_change INTEGER;
        CREATE INDEX messages_by_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL
        """,
    )


def _quoted_direction(db: Any) -> None:
    """Whose message a reply's quote copies (``quoted_dir``, 'in' or 'out', NULL when unknown):
    a contact's deletion for everyone or edit of a message we no longer have (deleted for me)
    still reaches the copies of it, but only of the contact's own messages (protocol §26.4).
    Existing replies take it from the quoted message when it is still there."""
    _run(
        db,
        """
        ALTER TABLE messages ADD COLUMN quoted_dir TEXT;
        UPDATE messages SET quoted_dir = (SELECT q.direction FROM messages q
                                          WHERE q.id = messages.reply_to)
            WHERE reply_to IS NOT NULL
        """,
    )


def _group_message_actions(db: Any) -> None:
    """Replies, reactions, edits, deletions and timers in groups (docs/protocol.md §25.11),
    as ``_message_actions`` and ``_disappearing_messages`` for one-to-one messages: a group
    message may quote another of its group (``reply_to``: its API id; ``quoted``: its text as
    we had it; ``quoted_author``: its author's key, empty for ours), be edited or deleted for
    everyone, carry a timer and a deadline. ``group_reactions``: one per member per message
    (``member`` empty: ours). ``group_pending_actions``: an action whose message has not come
    yet (bounded per group, services/group_actions.py). A group's timer and its change's
    stamp are columns of ``groups``."""
    _run(
        db,
        """
        ALTER TABLE group_messages ADD COLUMN reply_to TEXT;
        ALTER TABLE group_messages ADD COLUMN quoted TEXT;
        ALTER TABLE group_messages ADD COLUMN quoted_author BLOB;
        ALTER TABLE group_messages ADD COLUMN edited_at INTEGER;
        ALTER TABLE group_messages ADD COLUMN edit_sent_at INTEGER;
        ALTER TABLE group_messages ADD COLUMN edits INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE group_messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE group_messages ADD COLUMN timer_s INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE group_messages ADD COLUMN expires_at INTEGER;
        ALTER TABLE group_messages ADD COLUMN timer_change INTEGER;
        CREATE INDEX group_messages_by_expiry ON group_messages (expires_at)
            WHERE expires_at IS NOT NULL;
        ALTER TABLE groups ADD COLUMN timer_s INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE groups ADD COLUMN timer_changed_at INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE group_reactions (
            seq         INTEGER NOT NULL REFERENCES group_messages(seq) ON DELETE CASCADE,
            member      BLOB NOT NULL,
            emoji       TEXT NOT NULL,
            created_at  INTEGER NOT NULL,
            PRIMARY KEY (seq, member)
        ) WITHOUT ROWID;
        CREATE TABLE group_pending_actions (
            id          INTEGER PRIMARY KEY,
            group_ref   INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            author      BLOB NOT NULL,          -- the awaited message's author (empty: ours)
            target      BLOB NOT NULL,          -- its wire id
            payload     BLOB NOT NULL,          -- the group action, encoded
            created_at  INTEGER NOT NULL
        );
        CREATE INDEX group_pending_by_target ON group_pending_actions (group_ref, author, target)
        """,
    )


def _drop_stored_typing_events(db: Any) -> None:
    """contact.typing became a live event, never stored (docs/api.md "Live events"): the ones
    stored before (each says when a contact typed) go. secure_delete is on, and opening the
    store empties the WAL after the migrations: no page keeps them."""
    _run(db, "DELETE FROM events WHERE type = 'contact.typing'")


def _contact_devices(db: Any) -> None:
    """Several devices per person (docs/devices.md §5): the device list each contact holds
    (its signed bytes and version; a contact without a row is one device, as before), and a
    ratchet session per (contact, device) besides the contact's row in ``sessions``, with the
    mailbox of that device (its reply mailbox for us) that the contact's messages to it go to.
    ``session_device`` names the listed device the ``sessions`` row is with (NULL: not known
    yet, or no list); the rows of ``device_sessions`` never name that one."""
    _run(
        db,
        """
        CREATE TABLE contact_devices (
            contact_id     INTEGER PRIMARY KEY REFERENCES contacts(id) ON DELETE CASCADE,
            list           BLOB NOT NULL,       -- signed device list, docs/protocol.md §28.1
            version        INTEGER NOT NULL,
            session_device BLOB,                -- device ID of the sessions row, or NULL
            updated_at     INTEGER NOT NULL
        );
        CREATE TABLE device_sessions (
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            device_id   BLOB NOT NULL,
            state       BLOB NOT NULL,          -- ratchet session with that device, opaque
            send_to     BLOB,                   -- its mailbox for us (NULL: not answered yet)
            updated_at  INTEGER NOT NULL,
            PRIMARY KEY (contact_id, device_id)
        ) WITHOUT ROWID
        """,
    )


def _own_sync(db: Any) -> None:
    """Sync between one's own devices (docs/devices.md §6): one ratchet session per other
    device of the profile (opened by the device with the lower ID), the mailbox of ours it
    deposits into (a row of ``mailboxes``, role 'contact' with no contact), its mailbox for us,
    the opener's ``EK_A.pub`` (the answer's hello binds it), and whether the device was
    removed (its session erased; what still arrives is refused and counted). Fragments of
    multi-block sync payloads wait in ``sync_fragments``; payloads for a listed device with no
    session yet in ``sync_waiting``; read marks for messages not received yet in
    ``sync_reads``. ``sync_contacts``: the newest change of each contact made or taken (last
    writer wins by ``(changed_at_ms, device_id)``)."""
    _run(
        db,
        """
        CREATE TABLE own_sync (
            device_id   BLOB PRIMARY KEY,
            state       BLOB,                   -- ratchet session, opaque, NULL once removed
            mailbox_id  INTEGER REFERENCES mailboxes(id) ON DELETE SET NULL,
            send_to     BLOB,                   -- its sync mailbox for us (NULL: not answered)
            session_ek  BLOB NOT NULL,          -- EK_A.pub of the session's first message
            removed     INTEGER NOT NULL DEFAULT 0,
            updated_at  INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE sync_fragments (
            device_id   BLOB NOT NULL,
            msg_id      BLOB NOT NULL,
            idx         INTEGER NOT NULL,
            count       INTEGER NOT NULL,
            data        BLOB NOT NULL,
            created_at  INTEGER NOT NULL,
            PRIMARY KEY (device_id, msg_id, idx)
        ) WITHOUT ROWID;
        CREATE TABLE sync_waiting (
            id          INTEGER PRIMARY KEY,
            device_id   BLOB NOT NULL,          -- a listed device with no sync session yet
            data        BLOB NOT NULL,          -- the sync payload, sealed once one opens
            created_at  INTEGER NOT NULL
        );
        CREATE TABLE sync_reads (
            message_id  TEXT PRIMARY KEY,       -- read elsewhere, not received here yet
            contact     BLOB NOT NULL,          -- its contact's keys
            created_at  INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE sync_contacts (
            identity      BLOB PRIMARY KEY,     -- the contact's keys, Encode(IK)
            changed_at_ms INTEGER NOT NULL,     -- the newest change taken, and its device
            device_id     BLOB NOT NULL
        ) WITHOUT ROWID
        """,
    )


def _sync_held_actions(db: Any) -> None:
    """Message actions (0x48: a reaction, an edit, a deletion) another own device made on a
    message this device does not hold yet (services/own_sync_actions.py): kept, the sync
    payload as it came, until the message arrives; the oldest go past a bound, and any past
    an age (docs/devices.md §6)."""
    _run(
        db,
        """
        CREATE TABLE sync_held (
            id          INTEGER PRIMARY KEY,
            target      TEXT NOT NULL,          -- the message ID it acts on (hex)
            data        BLOB NOT NULL,          -- the 0x48 sync payload
            created_at  INTEGER NOT NULL
        );
        CREATE INDEX sync_held_target ON sync_held (target)
        """,
    )


def _sync_group_sent(db: Any) -> None:
    """Sent group transcripts (payload 0x4A) from another device of the profile for a group
    this device does not hold yet (its state is on its way): applied when the state comes,
    bounded in count, bytes and age (store/own_sync.py). ``group_unknown_held``: members'
    changes and messages for such a group, likewise (store/groups.py)."""
    _run(
        db,
        """
        CREATE TABLE sync_group_sent (
            id          INTEGER PRIMARY KEY,
            group_id    BLOB NOT NULL,
            data        BLOB NOT NULL,          -- the 0x4A sent item as it came
            created_at  INTEGER NOT NULL        -- ms, when it came
        );
        CREATE INDEX sync_group_sent_group ON sync_group_sent (group_id);
        CREATE TABLE group_unknown_held (
            id          INTEGER PRIMARY KEY,
            group_id    BLOB NOT NULL,
            contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
            payload     BLOB NOT NULL,          -- a change or message, encoded
            created_at  INTEGER NOT NULL        -- ms, when it came
        );
        CREATE INDEX group_unknown_held_group ON group_unknown_held (group_id)
        """,
    )


def _device_caps(db: Any) -> None:
    """Delete capabilities of other own devices' mailboxes, taken over sync (0x47, docs/devices.md
    §6): per device, what a removal of that device deletes at the relay. ``device_caps_sent``:
    the owner IDs of this device's mailboxes whose capabilities it sent, so that only what
    changed goes, across restarts. ``device_caps_gone``: owner IDs a device said it no longer
    owns (bounded), so that an "added" arriving after its "removed" is not kept (``seq``: the
    sender's number of the payload, which orders them). A queued
    deletion counts its failed tries (``attempts``): a relay never reachable does not hold a
    row, key and all, for ever."""
    _run(
        db,
        """
        CREATE TABLE device_caps (
            device_id   BLOB NOT NULL,          -- the own device that owns the mailbox
            owner_id    BLOB NOT NULL,
            relay_url   TEXT NOT NULL,
            delete_seed BLOB NOT NULL,          -- a DELETE only (relay-protocol.md §4.1)
            seq         INTEGER NOT NULL,       -- of the 0x47 that gave it (the sender's)
            taken_at    INTEGER NOT NULL,
            PRIMARY KEY (device_id, owner_id)
        ) WITHOUT ROWID;
        CREATE TABLE device_caps_sent (
            owner_id    BLOB PRIMARY KEY
        ) WITHOUT ROWID;
        CREATE TABLE device_caps_gone (
            device_id   BLOB NOT NULL,
            owner_id    BLOB NOT NULL,
            seq         INTEGER NOT NULL,       -- of the 0x47 that removed it
            gone_at     INTEGER NOT NULL,
            PRIMARY KEY (device_id, owner_id)
        ) WITHOUT ROWID;
        ALTER TABLE retired_mailboxes ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE retired_mailboxes ADD COLUMN last_try INTEGER NOT NULL DEFAULT 0
        """,
    )


MIGRATIONS: list[Migration] = [
    _v0_to_v1, _v1_to_v2, _attachments, _backup_renewals, _calls_history, _network_mode,
    _cover_receipts, _mailbox_pool, _groups, _group_invites_and_intros, _group_message_keys,
    _group_file_links, _group_contact_departures, _message_search_index, _message_actions,
    _file_captions_and_typing, _disappearing_messages, _search_index_dirty, _quoted_direction,
    _group_message_actions,
    _drop_stored_typing_events, _contact_devices, _own_sync, _sync_held_actions,
    _sync_group_sent, _device_caps,
]  # fmt: skip
SCHEMA_VERSION = len(MIGRATIONS)
