"""Store access for typing indicators' per-contact state (schema migration
`_file_captions_and_typing`; docs/protocol.md §22.6)."""

from __future__ import annotations

from .db import Store


def get(store: Store, contact_id: int) -> tuple[bool, bool]:
    """(the contact told us its indicators are on, we told it ours are on)."""
    r = store.query(
        "SELECT peer_on, told_on FROM typing_state WHERE contact_id = ?", (contact_id,)
    ).fetchone()
    return (False, False) if r is None else (bool(r[0]), bool(r[1]))


def put(store: Store, contact_id: int, peer_on: bool, told_on: bool) -> None:
    with store.transaction():
        store.query(
            "INSERT OR REPLACE INTO typing_state (contact_id, peer_on, told_on) VALUES (?, ?, ?)",
            (contact_id, int(peer_on), int(told_on)),
        )


def told(store: Store) -> list[int]:
    """Contacts we told our indicators are on."""
    return [int(r[0]) for r in store.query(
        "SELECT contact_id FROM typing_state WHERE told_on = 1"
    ).fetchall()]  # fmt: skip


def peers_on(store: Store) -> list[int]:
    """Contacts whose last word was that their indicators are on."""
    return [int(r[0]) for r in store.query(
        "SELECT contact_id FROM typing_state WHERE peer_on = 1"
    ).fetchall()]  # fmt: skip
