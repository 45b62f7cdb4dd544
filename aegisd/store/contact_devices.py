"""Contacts with several devices (docs/devices.md §5): the device list held for a contact and
the ratchet sessions with its devices besides the contact's own row in ``sessions`` (the one
session every contact has had: with a contact that has no list, its only device). Opaque
bytes: the core parses and checks lists and sessions."""

from __future__ import annotations

from dataclasses import dataclass

from .db import Store

#: The contact's ``sessions`` row named as a device (where a payload came in, or is to go: call
#: signaling, docs/devices.md §9); its other devices are named by their IDs (16 bytes).
ROW_DEVICE = b""


@dataclass(frozen=True)
class HeldList:
    data: bytes  # the signed list, docs/protocol.md §28.1
    version: int
    session_device: bytes | None  # the device the ``sessions`` row is with, when known


@dataclass(frozen=True)
class DeviceSession:
    device_id: bytes
    state: bytes
    send_to: bytes | None  # the device's mailbox for us, opaque; None until it answered


def held_list(store: Store, contact_id: int) -> HeldList | None:
    row = store.query(
        "SELECT list, version, session_device FROM contact_devices WHERE contact_id = ?",
        (contact_id,),
    ).fetchone()
    if row is None:
        return None
    return HeldList(bytes(row[0]), int(row[1]), None if row[2] is None else bytes(row[2]))


def put_list(store: Store, contact_id: int, data: bytes, version: int, now: int) -> None:
    store.query(
        "INSERT INTO contact_devices (contact_id, list, version, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (contact_id) DO UPDATE SET list = excluded.list, "
        "version = excluded.version, updated_at = excluded.updated_at",
        (contact_id, data, version, now),
    )


def set_session_device(store: Store, contact_id: int, device_id: bytes | None) -> None:
    store.query(
        "UPDATE contact_devices SET session_device = ? WHERE contact_id = ?",
        (device_id, contact_id),
    )


def device_sessions(store: Store, contact_id: int) -> list[DeviceSession]:
    rows = store.query(
        "SELECT device_id, state, send_to FROM device_sessions WHERE contact_id = ? "
        "ORDER BY device_id",
        (contact_id,),
    ).fetchall()
    return [DeviceSession(bytes(r[0]), bytes(r[1]), None if r[2] is None else bytes(r[2]))
            for r in rows]  # fmt: skip


def put_device_session(
    store: Store, contact_id: int, device_id: bytes, state: bytes, now: int
) -> None:
    """Store a device's session (a new one keeps no mailbox: it has not answered yet)."""
    store.query(
        "INSERT INTO device_sessions (contact_id, device_id, state, updated_at) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (contact_id, device_id) DO UPDATE SET "
        "state = excluded.state, updated_at = excluded.updated_at",
        (contact_id, device_id, state, now),
    )


def set_device_send_to(
    store: Store, contact_id: int, device_id: bytes, send_to: bytes | None
) -> None:
    """The device's mailbox for us; None: nothing goes to it (its mailbox was refused)."""
    store.query(
        "UPDATE device_sessions SET send_to = ? WHERE contact_id = ? AND device_id = ?",
        (send_to, contact_id, device_id),
    )


def drop_device_sessions(store: Store, contact_id: int, keep: frozenset[bytes]) -> int:
    """Delete the sessions with the contact's devices not in ``keep``; how many went."""
    gone = [s.device_id for s in device_sessions(store, contact_id) if s.device_id not in keep]
    for device_id in gone:
        store.query(
            "DELETE FROM device_sessions WHERE contact_id = ? AND device_id = ?",
            (contact_id, device_id),
        )
    return len(gone)
