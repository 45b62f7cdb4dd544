"""Store access for cover slots (services/cover.py; docs/protocol.md §24): outbox blocks that
wait for their contact's next slot, and receipts waiting to ride one."""

from __future__ import annotations

from .db import Store

#: not_before of an outbox block that waits for its contact's next cover slot. Below the
#: messenger's NEVER (blocks for a contact who has not answered yet), far above any clock.
SLOT_WAIT = 2**61


def release_one(store: Store, contact_id: int, now: int) -> bool:
    """Make the oldest block waiting for a slot of this contact due now; False if none."""
    row = store._q(
        "SELECT id FROM outbox WHERE contact_id = ? AND not_before = ? ORDER BY id LIMIT 1",
        (contact_id, SLOT_WAIT),
    ).fetchone()
    if row is None:
        return False
    store._q("UPDATE outbox SET not_before = ? WHERE id = ?", (now, row[0]))
    return True


def release_all(store: Store) -> int:
    """Every block waiting for a slot becomes due (cover turned off)."""
    return int(
        store._q("UPDATE outbox SET not_before = 0 WHERE not_before = ?", (SLOT_WAIT,)).rowcount
    )


def add_receipts(store: Store, contact_id: int, kind: int, message_ids: list[bytes]) -> None:
    with store.transaction():
        for mid in message_ids:
            store._q(
                "INSERT OR IGNORE INTO pending_receipts (contact_id, kind, message_id) "
                "VALUES (?, ?, ?)",
                (contact_id, kind, mid),
            )


def take_receipts(store: Store, contact_id: int, limit: int) -> tuple[int, list[bytes]] | None:
    """Up to ``limit`` waiting receipts of one kind for this contact (read ones first: they
    say more), removed from the table; None if none wait. Call inside the transaction that
    queues the block carrying them."""
    for kind in (2, 1):
        rows = store._q(
            "SELECT message_id FROM pending_receipts WHERE contact_id = ? AND kind = ? LIMIT ?",
            (contact_id, kind, limit),
        ).fetchall()
        if rows:
            ids = [bytes(r[0]) for r in rows]
            for mid in ids:
                store._q(
                    "DELETE FROM pending_receipts WHERE contact_id = ? AND kind = ? "
                    "AND message_id = ?",
                    (contact_id, kind, mid),
                )
            return kind, ids
    return None


def receipt_contacts(store: Store) -> list[int]:
    """Contacts with receipts waiting."""
    rows = store._q("SELECT DISTINCT contact_id FROM pending_receipts").fetchall()
    return [int(r[0]) for r in rows]
