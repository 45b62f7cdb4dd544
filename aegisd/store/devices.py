"""The store's side of linking a device (aegisd/services/devices.py): what the new device's
install writes besides the Store's own methods. The device list and this device's ID and key
are settings (``devices.list``, ``devices.self``, ``devices.key``)."""

from __future__ import annotations

from .db import Store


def has_messages(store: Store) -> bool:
    return store.query("SELECT 1 FROM messages LIMIT 1").fetchone() is not None


def retire_mailbox(store: Store, descriptor: bytes) -> tuple[int, bytes]:
    """A mailbox of ours to delete at its relay (now or on a later connection): its row."""
    cur = store.query(
        "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)", (descriptor,)
    )
    return int(cur.lastrowid), descriptor


def unretire_mailbox(store: Store, row_id: int) -> None:
    """A queued mailbox deleted at its relay: out of the queue."""
    store.query("DELETE FROM retired_mailboxes WHERE id = ?", (row_id,))


def set_contact_flags(
    store: Store, contact_id: int, verified: bool, blocked: bool, created_at: int
) -> None:
    store.query(
        "UPDATE contacts SET verified = ?, blocked = ?, created_at = ? WHERE id = ?",
        (int(verified), int(blocked), created_at, contact_id),
    )
