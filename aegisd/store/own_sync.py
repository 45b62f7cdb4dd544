"""Sync sessions with this profile's other devices (docs/devices.md §6): one row per device,
the ratchet session (opaque), the mailbox of ours its payloads arrive in, its mailbox for us,
and the fragments of multi-block payloads. services/own_sync.py decides; this only stores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Store

#: Incomplete multi-block sync payloads kept per device (its oldest goes past this).
FRAGMENTS_PER_DEVICE = 8
#: Sync payloads kept for a listed device until a session with it opens (its oldest go).
WAITING_PER_DEVICE = 500
#: Read marks kept for messages not received yet (the oldest go past this).
READS_KEPT = 256
#: Message actions kept for messages not held yet (the oldest go past this), and for at most
#: HELD_FOR seconds (a message that never comes: lost, or deleted before it was sent here).
HELD_KEPT = 256
HELD_FOR = 7 * 86_400
#: Sent group transcripts kept for groups not held yet: at most this many, this many bytes
#: in all (the oldest go), and for this long (past the longest sync delay, an hour).
GROUP_SENT_KEPT = 64
GROUP_SENT_BYTES = 1 << 20
GROUP_SENT_MAX_AGE_MS = 2 * 3600 * 1000


@dataclass(frozen=True)
class SyncRow:
    device_id: bytes
    state: bytes | None  # None once the device was removed
    mailbox_id: int | None
    send_to: bytes | None
    session_ek: bytes
    removed: bool
    updated_at: int  # seconds: when the session was opened, until its first use


_SELECT = ("SELECT device_id, state, mailbox_id, send_to, session_ek, removed, updated_at "
           "FROM own_sync")


def _row(r: Any) -> SyncRow:
    return SyncRow(bytes(r[0]), None if r[1] is None else bytes(r[1]),
                   None if r[2] is None else int(r[2]), None if r[3] is None else bytes(r[3]),
                   bytes(r[4]), bool(r[5]), int(r[6]))  # fmt: skip


def rows(store: Store) -> list[SyncRow]:
    return [_row(r) for r in store.query(_SELECT + " ORDER BY device_id").fetchall()]


def get(store: Store, device_id: bytes) -> SyncRow | None:
    r = store.query(_SELECT + " WHERE device_id = ?", (device_id,)).fetchone()
    return None if r is None else _row(r)


def by_mailbox(store: Store, mailbox_id: int) -> SyncRow | None:
    r = store.query(_SELECT + " WHERE mailbox_id = ?", (mailbox_id,)).fetchone()
    return None if r is None else _row(r)


def put(store: Store, device_id: bytes, state: bytes, mailbox_id: int, send_to: bytes | None,
        session_ek: bytes, now: int) -> None:  # fmt: skip
    """A new sync session with the device (a newer one replaces the older)."""
    store.query(
        "INSERT INTO own_sync (device_id, state, mailbox_id, send_to, session_ek, removed, "
        "updated_at) VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (device_id) DO UPDATE SET "
        "state = excluded.state, mailbox_id = excluded.mailbox_id, send_to = excluded.send_to, "
        "session_ek = excluded.session_ek, removed = 0, updated_at = excluded.updated_at",
        (device_id, state, mailbox_id, send_to, session_ek, now),
    )


def set_state(store: Store, device_id: bytes, state: bytes, now: int) -> None:
    store.query("UPDATE own_sync SET state = ?, updated_at = ? WHERE device_id = ?",
                (state, now, device_id))  # fmt: skip


def set_send_to(store: Store, device_id: bytes, send_to: bytes) -> None:
    store.query("UPDATE own_sync SET send_to = ? WHERE device_id = ?", (send_to, device_id))


def mark_removed(store: Store, device_id: bytes, now: int) -> None:
    """The device left the list: its session is erased, its row kept so that what it still
    deposits into our mailbox for it is recognised, refused and counted."""
    store.query(
        "UPDATE own_sync SET state = NULL, send_to = NULL, removed = 1, updated_at = ? "
        "WHERE device_id = ?",
        (now, device_id),
    )
    store.query("DELETE FROM sync_fragments WHERE device_id = ?", (device_id,))
    store.query("DELETE FROM sync_waiting WHERE device_id = ?", (device_id,))
    drop_pending(store, device_id)


def put_fragment(store: Store, device_id: bytes, msg_id: bytes, index: int, count: int,
                 data: bytes, now: int) -> list[bytes] | None:  # fmt: skip
    """Keep one fragment; the whole payload's parts once every one is here (then forgotten)."""
    partial = store.query(
        "SELECT msg_id FROM sync_fragments WHERE device_id = ? GROUP BY msg_id "
        "ORDER BY MIN(created_at), msg_id",
        (device_id,),
    ).fetchall()
    known = [bytes(r[0]) for r in partial]
    if msg_id not in known:
        for old in known[: max(0, len(known) - FRAGMENTS_PER_DEVICE + 1)]:
            store.query("DELETE FROM sync_fragments WHERE device_id = ? AND msg_id = ?",
                        (device_id, old))  # fmt: skip
    store.query(
        "INSERT OR IGNORE INTO sync_fragments (device_id, msg_id, idx, count, data, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (device_id, msg_id, index, count, data, now),
    )
    parts = store.query(
        "SELECT idx, count, data FROM sync_fragments WHERE device_id = ? AND msg_id = ? "
        "ORDER BY idx",
        (device_id, msg_id),
    ).fetchall()
    if len(parts) != count or any(int(p[1]) != count for p in parts):
        return None
    store.query("DELETE FROM sync_fragments WHERE device_id = ? AND msg_id = ?",
                (device_id, msg_id))  # fmt: skip
    return [bytes(p[2]) for p in parts]


def contact_clock(store: Store, keys: bytes) -> tuple[int, bytes] | None:
    """The newest change of a contact (by its keys) this device made or took."""
    r = store.query("SELECT changed_at_ms, device_id FROM sync_contacts WHERE identity = ?",
                    (keys,)).fetchone()  # fmt: skip
    return None if r is None else (int(r[0]), bytes(r[1]))


def set_contact_clock(store: Store, keys: bytes, changed_at_ms: int, device_id: bytes) -> None:
    store.query(
        "INSERT INTO sync_contacts (identity, changed_at_ms, device_id) VALUES (?, ?, ?) "
        "ON CONFLICT (identity) DO UPDATE SET changed_at_ms = excluded.changed_at_ms, "
        "device_id = excluded.device_id",
        (keys, changed_at_ms, device_id),
    )


def pending_destination(device_id: bytes) -> bytes:
    """Where sync blocks for a device that has not answered yet wait in the outbox (never due
    until its answer readdresses them, as a contact's first blocks: delivery.py)."""
    return b"sync-pending:" + device_id


def release_pending(store: Store, device_id: bytes, send_to: bytes, due_ms: int) -> None:
    store.query(
        "UPDATE outbox SET destination = ?, not_before = ? "
        "WHERE contact_id IS NULL AND destination = ?",
        (send_to, due_ms, pending_destination(device_id)),
    )


def drop_pending(store: Store, device_id: bytes) -> None:
    store.query("DELETE FROM outbox WHERE contact_id IS NULL AND destination = ?",
                (pending_destination(device_id),))  # fmt: skip


def wait_for_session(store: Store, device_id: bytes, data: bytes, now: int) -> None:
    """A payload for a listed device this device holds no session with yet."""
    store.query("INSERT INTO sync_waiting (device_id, data, created_at) VALUES (?, ?, ?)",
                (device_id, data, now))  # fmt: skip
    store.query(
        "DELETE FROM sync_waiting WHERE device_id = ? AND id NOT IN (SELECT id FROM "
        "sync_waiting WHERE device_id = ? ORDER BY id DESC LIMIT ?)",
        (device_id, device_id, WAITING_PER_DEVICE),
    )


def take_waiting(store: Store, device_id: bytes) -> list[bytes]:
    """The payloads waiting for the device, oldest first, forgotten."""
    out = [bytes(r[0]) for r in store.query(
        "SELECT data FROM sync_waiting WHERE device_id = ? ORDER BY id", (device_id,)
    ).fetchall()]  # fmt: skip
    store.query("DELETE FROM sync_waiting WHERE device_id = ?", (device_id,))
    return out


def keep_read(store: Store, message_id: str, contact: bytes, now: int) -> None:
    """A read mark for a message this device has not received yet (it comes later)."""
    store.query("INSERT OR REPLACE INTO sync_reads (message_id, contact, created_at) "
                "VALUES (?, ?, ?)", (message_id, contact, now))  # fmt: skip
    store.query(
        "DELETE FROM sync_reads WHERE message_id NOT IN (SELECT message_id FROM sync_reads "
        "ORDER BY created_at DESC, message_id LIMIT ?)",
        (READS_KEPT,),
    )


def take_read(store: Store, message_id: str) -> bytes | None:
    """The contact's keys of a read mark kept for ``message_id``, forgotten; None: none."""
    r = store.query("SELECT contact FROM sync_reads WHERE message_id = ?",
                    (message_id,)).fetchone()  # fmt: skip
    if r is None:
        return None
    store.query("DELETE FROM sync_reads WHERE message_id = ?", (message_id,))
    return bytes(r[0])


def hold_action(store: Store, target: str, data: bytes, now: int) -> None:
    """A message action (its sync payload) on a message this device does not hold yet."""
    store.query("DELETE FROM sync_held WHERE created_at < ?", (now - HELD_FOR,))
    store.query("INSERT INTO sync_held (target, data, created_at) VALUES (?, ?, ?)",
                (target, data, now))  # fmt: skip
    store.query(
        "DELETE FROM sync_held WHERE id NOT IN (SELECT id FROM sync_held ORDER BY id DESC "
        "LIMIT ?)",
        (HELD_KEPT,),
    )


def take_held(store: Store, target: str, now: int) -> list[bytes]:
    """The actions held for ``target`` (not past HELD_FOR), in the order they came,
    forgotten."""
    out = [bytes(r[0]) for r in store.query(
        "SELECT data FROM sync_held WHERE target = ? AND created_at >= ? ORDER BY id",
        (target, now - HELD_FOR),
    ).fetchall()]  # fmt: skip
    store.query("DELETE FROM sync_held WHERE target = ?", (target,))
    return out


def keep_group_sent(store: Store, group_id: bytes, data: bytes, now_ms: int) -> None:
    """A sent group transcript (0x4A) for a group this device does not hold yet."""
    store.query("DELETE FROM sync_group_sent WHERE created_at < ?",
                (now_ms - GROUP_SENT_MAX_AGE_MS,))  # fmt: skip
    store.query("INSERT INTO sync_group_sent (group_id, data, created_at) VALUES (?, ?, ?)",
                (group_id, data, now_ms))  # fmt: skip
    rows = store.query("SELECT id, length(data) FROM sync_group_sent ORDER BY id DESC").fetchall()
    total = 0
    for n, (row_id, size) in enumerate(rows):
        total += int(size)
        if n >= GROUP_SENT_KEPT or total > GROUP_SENT_BYTES:
            store.query("DELETE FROM sync_group_sent WHERE id <= ?", (row_id,))
            break


def take_group_sent(store: Store, group_id: bytes, now_ms: int) -> list[bytes]:
    """The transcripts kept for the group (not too old), oldest first, forgotten."""
    out = [bytes(r[0]) for r in store.query(
        "SELECT data FROM sync_group_sent WHERE group_id = ? AND created_at >= ? ORDER BY id",
        (group_id, now_ms - GROUP_SENT_MAX_AGE_MS),
    ).fetchall()]  # fmt: skip
    store.query("DELETE FROM sync_group_sent WHERE group_id = ?", (group_id,))
    return out


def clear(store: Store) -> None:
    """Every sync session and what waits for one: a backup's import made this a new device of
    another identity (services/device_reset.py), whose sessions they were not."""
    for table in ("own_sync", "sync_fragments", "sync_waiting", "sync_contacts", "sync_reads",
                  "sync_held", "sync_group_sent"):  # fmt: skip
        store.query(f"DELETE FROM {table}")  # noqa: S608 (fixed names)
    prefix = pending_destination(b"")
    store.query("DELETE FROM outbox WHERE contact_id IS NULL AND substr(destination, 1, ?) = ?",
                (len(prefix), prefix))  # fmt: skip
