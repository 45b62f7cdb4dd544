"""Delete capabilities of other own devices' mailboxes taken over sync (0x47), and the owner IDs
of this device's mailboxes whose capabilities it sent (docs/devices.md §6, §7).
services/device_caps.py decides; this only stores."""

from __future__ import annotations

from .db import Store

#: Capabilities held per device: a device owns at most mailboxes.MAX_OWN_MAILBOXES (950);
#: past this those taken (or sent again in a full set) longest ago go: most likely of
#: mailboxes gone since, whose removal was lost.
HELD_PER_DEVICE = 1024
#: Owner IDs a device said it no longer owns, kept per device (the newest) with the number of
#: the payload that said so, so that an older "added" arriving after its "removed"
#: (independent delays) is not held for ever.
GONE_PER_DEVICE = 1024


_SEQ = {
    "held": "SELECT seq FROM device_caps WHERE device_id = ? AND owner_id = ?",
    "gone": "SELECT seq FROM device_caps_gone WHERE device_id = ? AND owner_id = ?",
}


def _seq(store: Store, table: str, device_id: bytes, owner_id: bytes) -> int | None:
    row = store.query(_SEQ[table], (device_id, owner_id)).fetchone()
    return None if row is None else int(row[0])


def keep(store: Store, device_id: bytes, caps: list[tuple[str, bytes, bytes]], seq: int,
         now: int) -> None:  # fmt: skip
    """``caps`` (relay URL, owner ID, delete seed) from ``device_id``'s payload number ``seq``,
    each replacing the one held for that owner ID, but where a payload of that device at
    least as new removed it, or a newer one gave it; past HELD_PER_DEVICE those taken longest
    ago go (a full set, sent again at each sync session's answer, takes them anew)."""
    for url, owner_id, seed in caps:
        gone = _seq(store, "gone", device_id, owner_id)
        held = _seq(store, "held", device_id, owner_id)
        if (gone is not None and gone >= seq) or (held is not None and held > seq):
            continue
        store.query(
            "INSERT INTO device_caps (device_id, owner_id, relay_url, delete_seed, seq, taken_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, owner_id) DO UPDATE SET "
            "relay_url = excluded.relay_url, delete_seed = excluded.delete_seed, "
            "seq = excluded.seq, taken_at = excluded.taken_at",
            (device_id, owner_id, url, seed, seq, now),
        )
        store.query("DELETE FROM device_caps_gone WHERE device_id = ? AND owner_id = ?",
                    (device_id, owner_id))  # fmt: skip
    store.query(
        "DELETE FROM device_caps WHERE device_id = ? AND owner_id NOT IN (SELECT owner_id FROM "
        "device_caps WHERE device_id = ? ORDER BY taken_at DESC, owner_id LIMIT ?)",
        (device_id, device_id, HELD_PER_DEVICE),
    )


def drop(store: Store, device_id: bytes, owner_ids: list[bytes], seq: int, now: int) -> None:
    """Owner IDs ``device_id``'s payload number ``seq`` says it no longer owns: dropped (but
    one a newer payload gave) and remembered with ``seq`` (bounded, the newest kept)."""
    for owner_id in owner_ids:
        held = _seq(store, "held", device_id, owner_id)
        if held is not None and held > seq:
            continue
        gone = _seq(store, "gone", device_id, owner_id)
        store.query("DELETE FROM device_caps WHERE device_id = ? AND owner_id = ?",
                    (device_id, owner_id))  # fmt: skip
        store.query(
            "INSERT OR REPLACE INTO device_caps_gone (device_id, owner_id, seq, gone_at) "
            "VALUES (?, ?, ?, ?)", (device_id, owner_id, max(seq, gone or 0), now))
    store.query(
        "DELETE FROM device_caps_gone WHERE device_id = ? AND owner_id NOT IN (SELECT owner_id "
        "FROM device_caps_gone WHERE device_id = ? ORDER BY gone_at DESC, owner_id LIMIT ?)",
        (device_id, device_id, GONE_PER_DEVICE),
    )


def forget(store: Store, device_id: bytes, owner_id: bytes) -> None:
    """The key held for ``owner_id`` from ``device_id`` dropped (another device claimed it
    too: services/device_caps.py), nothing remembered as removed."""
    store.query("DELETE FROM device_caps WHERE device_id = ? AND owner_id = ?",
                (device_id, owner_id))  # fmt: skip


def held(store: Store, device_id: bytes) -> list[tuple[str, bytes, bytes]]:
    return [(str(r[0]), bytes(r[1]), bytes(r[2])) for r in store.query(
        "SELECT relay_url, owner_id, delete_seed FROM device_caps WHERE device_id = ? "
        "ORDER BY owner_id", (device_id,)).fetchall()]  # fmt: skip


def take(store: Store, device_id: bytes) -> list[tuple[str, bytes, bytes]]:
    """The capabilities held for ``device_id``, dropped with what it said it no longer owns
    (in the caller's transaction: the caller queues them for deletion)."""
    out = held(store, device_id)
    store.query("DELETE FROM device_caps WHERE device_id = ?", (device_id,))
    store.query("DELETE FROM device_caps_gone WHERE device_id = ?", (device_id,))
    return out


def devices(store: Store) -> set[bytes]:
    """The devices anything is held for."""
    return {bytes(r[0]) for r in store.query(
        "SELECT device_id FROM device_caps UNION SELECT device_id FROM device_caps_gone"
    ).fetchall()}  # fmt: skip


def owners_held(store: Store) -> set[bytes]:
    return {bytes(r[0]) for r in store.query("SELECT owner_id FROM device_caps").fetchall()}


def relays_held(store: Store, device_id: bytes) -> list[str]:
    return [str(r[0]) for r in store.query(
        "SELECT DISTINCT relay_url FROM device_caps WHERE device_id = ?", (device_id,)
    ).fetchall()]  # fmt: skip


def every(store: Store) -> list[tuple[str, bytes, bytes]]:
    return [(str(r[0]), bytes(r[1]), bytes(r[2])) for r in store.query(
        "SELECT relay_url, owner_id, delete_seed FROM device_caps").fetchall()]  # fmt: skip


def count(store: Store, device_id: bytes) -> int:
    return int(store.query("SELECT COUNT(*) FROM device_caps WHERE device_id = ?",
                           (device_id,)).fetchone()[0])  # fmt: skip


def sent(store: Store) -> set[bytes]:
    return {bytes(r[0]) for r in store.query("SELECT owner_id FROM device_caps_sent").fetchall()}


def set_sent(store: Store, added: list[bytes], removed: list[bytes]) -> None:
    for owner_id in added:
        store.query("INSERT OR IGNORE INTO device_caps_sent (owner_id) VALUES (?)", (owner_id,))
    for owner_id in removed:
        store.query("DELETE FROM device_caps_sent WHERE owner_id = ?", (owner_id,))


def clear(store: Store) -> None:
    """A backup's import (device_reset.py): the discarded identity's devices and mailboxes."""
    store.query("DELETE FROM device_caps")
    store.query("DELETE FROM device_caps_gone")
    store.query("DELETE FROM device_caps_sent")
