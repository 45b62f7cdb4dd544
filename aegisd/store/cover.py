"""Store access for cover slots (services/cover.py; docs/protocol.md §24): outbox blocks that
wait for their contact's next slot, receipts waiting to ride one, and the pool of mailboxes
made ahead."""

from __future__ import annotations

import time

from .db import MailboxRow, Store

#: not_before of an outbox block that waits for its contact's next cover slot. Below the
#: messenger's NEVER (blocks for a contact who has not answered yet), far above any clock.
SLOT_WAIT = 2**61


def release_one(store: Store, contact_id: int, now: int, destination: bytes) -> bool:
    """Make the oldest block waiting for a slot of this contact to ``destination`` (its
    mailbox, or one of its devices') due now; False if none."""
    row = store.query(
        "SELECT id FROM outbox WHERE contact_id = ? AND destination = ? AND not_before = ? "
        "ORDER BY id LIMIT 1",
        (contact_id, bytes(destination), SLOT_WAIT),
    ).fetchone()
    if row is None:
        return False
    store.query("UPDATE outbox SET not_before = ? WHERE id = ?", (now, row[0]))
    return True


def release_stray(store: Store, contact_id: int, now: int, scheduled: list[bytes]) -> bool:
    """Make due the oldest block waiting for a slot of this contact to a destination its slots
    no longer serve (a device that left the contact's list meanwhile), so it does not wait
    for ever; False if none."""
    marks = ", ".join("?" for _ in scheduled) or "NULL"
    row = store.query(
        f"SELECT id FROM outbox WHERE contact_id = ? AND not_before = ? "  # noqa: S608 - marks
        f"AND destination NOT IN ({marks}) ORDER BY id LIMIT 1",
        (contact_id, SLOT_WAIT, *(bytes(d) for d in scheduled)),
    ).fetchone()
    if row is None:
        return False
    store.query("UPDATE outbox SET not_before = ? WHERE id = ?", (now, row[0]))
    return True


def release_all(store: Store) -> int:
    """Every block waiting for a slot becomes due (cover turned off)."""
    return int(
        store.query("UPDATE outbox SET not_before = 0 WHERE not_before = ?", (SLOT_WAIT,)).rowcount
    )


def add_receipts(store: Store, contact_id: int, kind: int, message_ids: list[bytes]) -> None:
    with store.transaction():
        for mid in message_ids:
            store.query(
                "INSERT OR IGNORE INTO pending_receipts (contact_id, kind, message_id) "
                "VALUES (?, ?, ?)",
                (contact_id, kind, mid),
            )


def take_receipts(store: Store, contact_id: int, limit: int) -> tuple[int, list[bytes]] | None:
    """Up to ``limit`` waiting receipts of one kind for this contact (read ones first: they
    say more), removed from the table; None if none wait. Call inside the transaction that
    queues the block carrying them."""
    for kind in (2, 1):
        rows = store.query(
            "SELECT message_id FROM pending_receipts WHERE contact_id = ? AND kind = ? LIMIT ?",
            (contact_id, kind, limit),
        ).fetchall()
        if rows:
            ids = [bytes(r[0]) for r in rows]
            for mid in ids:
                store.query(
                    "DELETE FROM pending_receipts WHERE contact_id = ? AND kind = ? "
                    "AND message_id = ?",
                    (contact_id, kind, mid),
                )
            return kind, ids
    return None


def receipt_contacts(store: Store) -> list[int]:
    """Contacts with receipts waiting."""
    rows = store.query("SELECT DISTINCT contact_id FROM pending_receipts").fetchall()
    return [int(r[0]) for r in rows]


#: A pool mailbox as a MailboxRow (role "pool", never a row of the mailboxes table: its id is
#: the pool row's, negated, so the two never collide).
POOL_ROLE = "pool"


def pool_rows(store: Store) -> list[MailboxRow]:
    rows = store.query("SELECT id, descriptor, created_at FROM mailbox_pool ORDER BY id").fetchall()
    return [MailboxRow(-int(r[0]), POOL_ROLE, None, bytes(r[1]), None, None, int(r[2]))
            for r in rows]  # fmt: skip


def pool_add(store: Store, descriptor: bytes) -> None:
    store.query(
        "INSERT INTO mailbox_pool (descriptor, created_at) VALUES (?, ?)",
        (descriptor, int(time.time())),
    )


def pool_take(store: Store) -> bytes | None:
    """The oldest pool mailbox, removed from the pool (inside the caller's transaction)."""
    row = store.query("SELECT id, descriptor FROM mailbox_pool ORDER BY id LIMIT 1").fetchone()
    if row is None:
        return None
    store.query("DELETE FROM mailbox_pool WHERE id = ?", (row[0],))
    return bytes(row[1])


def pool_remove(store: Store, pool_row_id: int) -> None:
    store.query("DELETE FROM mailbox_pool WHERE id = ?", (-pool_row_id,))
