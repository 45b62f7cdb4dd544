"""Store access for groups (services/groups.py; docs/protocol.md §25): each group's log and
its head's members, invitations sent and received, held group payloads, group contacts and
group history. Everything here lives in the SQLCipher database, encrypted at rest like the
rest; the log is the core's record, opaque to the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .db import Store

#: Per member, outgoing: queued -> delivered -> read (a status never moves back); or, from
#: the send on, unreachable (no session) or blocked: not sent to that member.
_RANK = {"queued": 0, "unreachable": 0, "blocked": 0, "delivered": 1, "read": 2}


def _ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class GroupRow:
    id: int
    group_id: bytes
    log: bytes
    created_at: int


@dataclass(frozen=True)
class GroupInvitationRow:
    id: int
    contact_id: int
    payload: bytes
    created_at: int


@dataclass(frozen=True)
class HeldRow:
    id: int
    contact_id: int
    payload: bytes


@dataclass(frozen=True)
class GroupMessageRow:
    seq: int
    id: str  # the API's (api_id)
    sender_key: bytes | None  # None: our own
    wire_id: bytes
    direction: str
    body: str
    sent_at: int | None
    created_at: int
    read: bool  # incoming: read by the user (group.read)


def _group(row: tuple[object, ...]) -> GroupRow:
    return GroupRow(int(row[0]), bytes(row[1]), bytes(row[2]), int(row[3]))  # type: ignore[call-overload]


# --- groups and members -------------------------------------------------------------------


def add_group(
    store: Store, group_id: bytes, log: bytes, members: Iterable[tuple[bytes, int]],
    created_at: int | None = None,
) -> int:
    now = _ms()
    with store.transaction():
        cur = store.query(
            "INSERT INTO groups (group_id, log, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (group_id, log, now if created_at is None else created_at, now),
        )
        ref = int(cur.lastrowid)
        _set_members(store, ref, members)
    return ref


def put_log(store: Store, ref: int, log: bytes, members: Iterable[tuple[bytes, int]]) -> None:
    """The group's new log and its head's members, together."""
    with store.transaction():
        store.query("UPDATE groups SET log = ?, updated_at = ? WHERE id = ?", (log, _ms(), ref))
        _set_members(store, ref, members)


def _set_members(store: Store, ref: int, members: Iterable[tuple[bytes, int]]) -> None:
    store.query("DELETE FROM group_members WHERE group_ref = ?", (ref,))
    for key, role in members:
        store.query(
            "INSERT INTO group_members (group_ref, member_key, role) VALUES (?, ?, ?)",
            (ref, key, role),
        )


def get_group(store: Store, ref: int) -> GroupRow | None:
    row = store.query(
        "SELECT id, group_id, log, created_at FROM groups WHERE id = ?", (ref,)
    ).fetchone()
    return None if row is None else _group(row)


def group_by_id(store: Store, group_id: bytes) -> GroupRow | None:
    row = store.query(
        "SELECT id, group_id, log, created_at FROM groups WHERE group_id = ?", (group_id,)
    ).fetchone()
    return None if row is None else _group(row)


def list_groups(store: Store) -> list[GroupRow]:
    rows = store.query("SELECT id, group_id, log, created_at FROM groups ORDER BY id").fetchall()
    return [_group(r) for r in rows]


def delete_group(store: Store, ref: int) -> None:
    store.query("DELETE FROM groups WHERE id = ?", (ref,))


def groups_with_member(store: Store, member_key: bytes) -> list[int]:
    rows = store.query(
        "SELECT group_ref FROM group_members WHERE member_key = ?", (member_key,)
    ).fetchall()
    return [int(r[0]) for r in rows]


def groups_with_both(store: Store, me: bytes, member_key: bytes) -> list[int]:
    """The groups here whose head lists both keys."""
    rows = store.query(
        "SELECT a.group_ref FROM group_members a JOIN group_members b"
        " ON a.group_ref = b.group_ref WHERE a.member_key = ? AND b.member_key = ?",
        (me, member_key),
    ).fetchall()
    return [int(r[0]) for r in rows]


def shares_group(store: Store, me: bytes, member_key: bytes) -> bool:
    """Whether some group here has both keys among its head's members."""
    return store.query(
        "SELECT 1 FROM group_members a JOIN group_members b ON a.group_ref = b.group_ref "
        "WHERE a.member_key = ? AND b.member_key = ? LIMIT 1",
        (me, member_key),
    ).fetchone() is not None


# --- invitations ----------------------------------------------------------------------------


def add_invitation(store: Store, contact_id: int, payload: bytes) -> int:
    cur = store.query(
        "INSERT INTO group_invitations (contact_id, payload, created_at) VALUES (?, ?, ?)",
        (contact_id, payload, _ms()),
    )
    return int(cur.lastrowid)


def list_invitations(store: Store) -> list[GroupInvitationRow]:
    rows = store.query(
        "SELECT id, contact_id, payload, created_at FROM group_invitations ORDER BY id"
    ).fetchall()
    return [GroupInvitationRow(int(r[0]), int(r[1]), bytes(r[2]), int(r[3])) for r in rows]


def get_invitation(store: Store, inv: int) -> GroupInvitationRow | None:
    return next((r for r in list_invitations(store) if r.id == inv), None)


def delete_invitation(store: Store, inv: int) -> bool:
    return bool(store.query("DELETE FROM group_invitations WHERE id = ?", (inv,)).rowcount)


def invitations_of(store: Store, contact_id: int) -> list[int]:
    """A contact's waiting invitations, oldest first."""
    rows = store.query(
        "SELECT id FROM group_invitations WHERE contact_id = ? ORDER BY id", (contact_id,)
    ).fetchall()
    return [int(r[0]) for r in rows]


def drop_invitations_before(store: Store, before_ms: int) -> int:
    return int(
        store.query("DELETE FROM group_invitations WHERE created_at < ?", (before_ms,)).rowcount
    )


def count_invitations(store: Store) -> int:
    return int(store.query("SELECT COUNT(*) FROM group_invitations").fetchone()[0])


def add_sent_invite(
    store: Store, invite_id: bytes, ref: int, contact_id: int, version: int,
    base_version: int, chain: Iterable[bytes],
) -> None:  # fmt: skip
    """``chain``: the hashes of the changes the invitation carried after its base."""
    store.query(
        "INSERT OR REPLACE INTO group_invites_sent (invite_id, group_ref, contact_id, version, "
        "created_at, base_version, chain) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (invite_id, ref, contact_id, version, _ms(), base_version, b"".join(chain)),
    )


@dataclass(frozen=True)
class SentInvite:
    group_ref: int
    base_version: int
    chain: frozenset[bytes]  # hashes of the changes it carried


def take_sent_invite(store: Store, invite_id: bytes, contact_id: int) -> SentInvite | None:
    """The invitation we sent this contact with this ID (removed: one answer each)."""
    row = store.query(
        "SELECT group_ref, base_version, chain FROM group_invites_sent "
        "WHERE invite_id = ? AND contact_id = ?",
        (invite_id, contact_id),
    ).fetchone()
    if row is None:
        return None
    store.query("DELETE FROM group_invites_sent WHERE invite_id = ?", (invite_id,))
    blob = bytes(row[2])
    hashes = frozenset(blob[i : i + 32] for i in range(0, len(blob) - 31, 32))
    return SentInvite(int(row[0]), int(row[1]), hashes)


# --- held payloads --------------------------------------------------------------------------


def hold(store: Store, ref: int, contact_id: int, payload: bytes) -> None:
    store.query(
        "INSERT INTO group_held (group_ref, contact_id, payload, created_at) VALUES (?, ?, ?, ?)",
        (ref, contact_id, payload, _ms()),
    )


def held(store: Store, ref: int) -> list[HeldRow]:
    rows = store.query(
        "SELECT id, contact_id, payload FROM group_held WHERE group_ref = ? ORDER BY id", (ref,)
    ).fetchall()
    return [HeldRow(int(r[0]), int(r[1]), bytes(r[2])) for r in rows]


def count_held_from(store: Store, ref: int, contact_id: int) -> int:
    return int(store.query(
        "SELECT COUNT(*) FROM group_held WHERE group_ref = ? AND contact_id = ?", (ref, contact_id)
    ).fetchone()[0])  # fmt: skip


def drop_held(store: Store, held_id: int) -> None:
    store.query("DELETE FROM group_held WHERE id = ?", (held_id,))


def hold_unknown(store: Store, group_id: bytes, contact_id: int, payload: bytes, now_ms: int, *,
                 per_sender: int, sender_bytes: int, total: int, max_bytes: int,
                 max_age_ms: int) -> bool:  # fmt: skip
    """A member's change or message for a group not held here (its state on its way from
    another device of ours). False: not kept. A sender holds at most ``per_sender`` rows and
    ``sender_bytes`` bytes. Past ``total`` rows or ``max_bytes`` the sender
    holding the most bytes loses its oldest, but only while it holds more than this sender
    would with this payload: else this one is refused (no contact flushes another's rows
    by holding more itself). Past ``max_age_ms`` any goes."""
    store.query("DELETE FROM group_unknown_held WHERE created_at < ?", (now_ms - max_age_ms,))
    held: dict[int, list[tuple[int, int]]] = {}  # sender: [(row, bytes)], oldest first
    for row_id, sender, size in store.query(
            "SELECT id, contact_id, length(payload) FROM group_unknown_held ORDER BY id"):
        held.setdefault(int(sender), []).append((int(row_id), int(size)))
    mine = held.get(contact_id, [])
    after = sum(size for _, size in mine) + len(payload)
    if len(mine) >= per_sender or after > sender_bytes:
        return False
    rows = sum(len(v) for v in held.values())
    used = sum(size for v in held.values() for _, size in v)
    while rows + 1 > total or used + len(payload) > max_bytes:
        most = max((s for s in held if s != contact_id and held[s]), default=None,
                   key=lambda s: (sum(size for _, size in held[s]), len(held[s])))  # fmt: skip
        if most is None or sum(size for _, size in held[most]) <= after:
            return False
        row_id, size = held[most].pop(0)
        store.query("DELETE FROM group_unknown_held WHERE id = ?", (row_id,))
        rows, used = rows - 1, used - size
    store.query("INSERT INTO group_unknown_held (group_id, contact_id, payload, created_at) "
                "VALUES (?, ?, ?, ?)", (group_id, contact_id, payload, now_ms))  # fmt: skip
    return True


def drop_held_of(store: Store, contact_id: int, keep: Callable[[bytes], bool]) -> None:
    """A contact blocked (inside its transaction): what it sent that waits for a group's
    state or a change goes, save what ``keep`` says a blocked contact's payload may still be
    (a group change, taken from a blocked contact as live)."""
    store.query("DELETE FROM group_held WHERE contact_id = ?", (contact_id,))
    for row_id, payload in store.query(
            "SELECT id, payload FROM group_unknown_held WHERE contact_id = ?", (contact_id,)
    ).fetchall():  # fmt: skip
        if not keep(bytes(payload)):
            store.query("DELETE FROM group_unknown_held WHERE id = ?", (row_id,))


def take_unknown(store: Store, group_id: bytes, since_ms: int) -> list[tuple[int, bytes]]:
    """What was held for the group (contact, payload), oldest first, forgotten."""
    rows = store.query(
        "SELECT contact_id, payload FROM group_unknown_held WHERE group_id = ? AND "
        "created_at >= ? ORDER BY id", (group_id, since_ms),
    ).fetchall()  # fmt: skip
    store.query("DELETE FROM group_unknown_held WHERE group_id = ?", (group_id,))
    return [(int(r[0]), bytes(r[1])) for r in rows]


def drop_held_before(store: Store, ref: int, before_ms: int) -> None:
    store.query("DELETE FROM group_held WHERE group_ref = ? AND created_at < ?", (ref, before_ms))


# --- group contacts (hidden from the contact list) ------------------------------------------


def mark_group_contact(store: Store, contact_id: int) -> None:
    store.query("INSERT OR IGNORE INTO group_contacts (contact_id) VALUES (?)", (contact_id,))


def is_group_contact(store: Store, contact_id: int) -> bool:
    return (
        store.query("SELECT 1 FROM group_contacts WHERE contact_id = ?", (contact_id,)).fetchone()
        is not None
    )


def group_contact_ids(store: Store) -> set[int]:
    return {int(r[0]) for r in store.query("SELECT contact_id FROM group_contacts").fetchall()}


def mark_departed(store: Store, contact_id: int, at: int, remove_at: int) -> None:
    """A group contact shares no group with us any more (since ``at``): it goes past
    ``remove_at``. Each departure overwrites the last one's mark."""
    store.query(
        "UPDATE group_contacts SET departed_at = ?, remove_at = ? WHERE contact_id = ?",
        (at, remove_at, contact_id),
    )


def clear_departed(store: Store, contact_id: int) -> None:
    """A member again (its removal undone, or met in another group): no deadline."""
    store.query(
        "UPDATE group_contacts SET departed_at = NULL, remove_at = NULL WHERE contact_id = ?",
        (contact_id,),
    )


def departed(store: Store, contact_id: int) -> tuple[int, int] | None:
    """(departed_at, remove_at) of a departed group contact, None if it is not one."""
    row = store.query(
        "SELECT departed_at, remove_at FROM group_contacts WHERE contact_id = ? "
        "AND remove_at IS NOT NULL",
        (contact_id,),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


# --- introductions waiting for their first contact ----------------------------------------


@dataclass(frozen=True)
class PendingIntro:
    id: int
    group_ref: int
    name: str
    link: str
    tries: int


def add_pending_intro(store: Store, ref: int, name: str, link: str) -> int:
    cur = store.query(
        "INSERT INTO group_intros_pending (group_ref, name, link, tries, created_at) "
        "VALUES (?, ?, ?, 0, ?)",
        (ref, name, link, _ms()),
    )
    return int(cur.lastrowid)


def pending_intros(store: Store) -> list[PendingIntro]:
    rows = store.query(
        "SELECT id, group_ref, name, link, tries FROM group_intros_pending ORDER BY id"
    ).fetchall()
    return [PendingIntro(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in rows]


def get_pending_intro(store: Store, intro_id: int) -> PendingIntro | None:
    return next((p for p in pending_intros(store) if p.id == intro_id), None)


def count_pending_intros(store: Store, ref: int) -> int:
    return int(store.query(
        "SELECT COUNT(*) FROM group_intros_pending WHERE group_ref = ?", (ref,)
    ).fetchone()[0])  # fmt: skip


def tried_pending_intro(store: Store, intro_id: int) -> None:
    store.query("UPDATE group_intros_pending SET tries = tries + 1 WHERE id = ?", (intro_id,))


def drop_pending_intro(store: Store, intro_id: int) -> None:
    store.query("DELETE FROM group_intros_pending WHERE id = ?", (intro_id,))


# --- history ----------------------------------------------------------------------------------
# A group message is named by (group, author, wire id): the wire id is the author's choice, so
# two authors may use one (a hostile member may copy another's on purpose). ``seq`` is its
# local key; the API's id is ``api_id``'s.


def api_id(author: bytes, wire_id: bytes) -> str:
    """The id the API shows: our own message's wire id in hex (32 digits, as for a text);
    an incoming one's author key and wire id in hex, joined by ':' (97 characters)."""
    return wire_id.hex() if not author else f"{author.hex()}:{wire_id.hex()}"


def parse_api_id(message_id: str) -> tuple[bytes, bytes] | None:
    """(author, wire id) from ``api_id``'s form, None if it is not one."""
    author, _, wire_hex = message_id.rpartition(":")
    try:
        return bytes.fromhex(author), bytes.fromhex(wire_hex)
    except ValueError:
        return None


#: Ahead of a text id that is not a wire id's hex: a byte UTF-8 never uses.
_TEXT_TAG = b"\xff"


def wire_id_of(message_id: str) -> bytes:
    """The stored wire id for a backup's message id (docs/backup.md §2): 32 lowercase hex
    digits, as the daemon writes them, their 16 bytes; any other text 0xFF, its UTF-8, then
    0xFF up to 17 bytes. One to one: UTF-8 never holds 0xFF, and a text's form is never 16
    bytes long, so "abcdefghijklmnop" and "6162...70" (its hex) stay two messages."""
    if len(message_id) == 32 and all(ch in "0123456789abcdef" for ch in message_id):
        return bytes.fromhex(message_id)
    return (_TEXT_TAG + message_id.encode()).ljust(17, _TEXT_TAG)


def text_id_of(wire_id: bytes) -> str:
    """``wire_id_of``'s inverse: the backup's message id of a stored wire id."""
    if len(wire_id) == 16:
        return wire_id.hex()
    if wire_id.startswith(_TEXT_TAG):
        return wire_id.rstrip(_TEXT_TAG)[1:].decode()
    return wire_id.decode(errors="replace")  # not written since: plain UTF-8 of a text id


def add_message(
    store: Store, ref: int, wire_id: bytes, direction: str, body: str, *,
    sender_key: bytes | None = None, sent_at: int | None = None, read_at: int | None = None,
    created_at: int | None = None,
) -> int | None:  # fmt: skip
    """The message's ``seq``; None if this author's message with this id is here already.
    The group's timer as it is now applies to it (§25.11): one's own runs from now, an
    incoming one from when it is marked read."""
    now = _ms() if created_at is None else created_at
    row = store.query("SELECT timer_s FROM groups WHERE id = ?", (ref,)).fetchone()
    timer = int(row[0]) if row is not None else 0
    cur = store.query(
        "INSERT OR IGNORE INTO group_messages (group_ref, author, wire_id, direction, body, "
        "sent_at, created_at, read_at, timer_s, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (ref, sender_key or b"", wire_id, direction, body, sent_at, now, read_at, timer,
         now + timer * 1000 if timer and direction == "out" else None),
    )  # fmt: skip
    return int(cur.lastrowid) if cur.rowcount else None


def find_message(store: Store, ref: int, message_id: str) -> int | None:
    """The ``seq`` of the group's message with this API id."""
    key = parse_api_id(message_id)
    if key is None:
        return None
    row = store.query(
        "SELECT seq FROM group_messages WHERE group_ref = ? AND author = ? AND wire_id = ?",
        (ref, *key),
    ).fetchone()
    return None if row is None else int(row[0])


def own_message_to(store: Store, wire_id: bytes, contact_id: int) -> tuple[int, str] | None:
    """Our own message with this wire id that was counted for this contact (a receipt's
    match: we drew the id, and the receipt came through the contact's session), as its
    ``seq`` and API id."""
    row = store.query(
        "SELECT m.seq FROM group_messages m JOIN group_message_status s ON s.seq = m.seq "
        "WHERE m.author = x'' AND m.wire_id = ? AND s.contact_id = ?",
        (wire_id, contact_id),
    ).fetchone()
    return None if row is None else (int(row[0]), wire_id.hex())


def history(store: Store, ref: int, *, before_seq: int | None, limit: int) -> list[GroupMessageRow]:
    rows = store.query(
        "SELECT seq, author, wire_id, direction, body, sent_at, created_at, read_at "
        "FROM group_messages WHERE group_ref = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        (ref, before_seq if before_seq is not None else 2**62, limit),
    ).fetchall()
    return [_message(r) for r in reversed(rows)]


def message_at(store: Store, seq: int) -> tuple[int, GroupMessageRow] | None:
    """A group message by its ``seq`` (the search index's key), with its group's reference."""
    row = store.query(
        "SELECT group_ref, seq, author, wire_id, direction, body, sent_at, created_at, read_at "
        "FROM group_messages WHERE seq = ?",
        (seq,),
    ).fetchone()
    return None if row is None else (int(row[0]), _message(row[1:]))


def _message(r: Any) -> GroupMessageRow:
    seq, author, wire_id, direction, body, sent_at, created_at, read_at = r
    author, wire_id = bytes(author), bytes(wire_id)
    return GroupMessageRow(int(seq), api_id(author, wire_id), author or None, wire_id,
                           direction, body, sent_at, int(created_at), read_at is not None)


def unread(store: Store, ref: int, up_to_seq: int | None = None) -> list[GroupMessageRow]:
    """The group's incoming messages not read yet, up to ``up_to_seq`` (all: None)."""
    rows = store.query(
        "SELECT seq, author, wire_id, direction, body, sent_at, created_at, read_at "
        "FROM group_messages WHERE group_ref = ? AND direction = 'in' AND read_at IS NULL "
        "AND seq <= ? ORDER BY seq",
        (ref, up_to_seq if up_to_seq is not None else 2**62),
    ).fetchall()
    return [_message(r) for r in rows]


def set_read(store: Store, seqs: Iterable[int]) -> None:
    now = _ms()
    for seq in seqs:
        store.query(
            "UPDATE group_messages SET read_at = ?, expires_at = CASE WHEN timer_s > 0 "
            "AND expires_at IS NULL THEN ? + timer_s * 1000 ELSE expires_at END WHERE seq = ?",
            (now, now, seq),
        )


def set_statuses(store: Store, seq: int, contact_ids: Iterable[int], status: str) -> None:
    now = _ms()
    for cid in contact_ids:
        store.query(
            "INSERT OR REPLACE INTO group_message_status (seq, contact_id, status, status_at) "
            "VALUES (?, ?, ?, ?)",
            (seq, cid, status, now),
        )


def advance_status(store: Store, seq: int, contact_id: int, status: str) -> bool:
    """A receipt from one member: its status moves forward only. False if unknown or not."""
    row = store.query(
        "SELECT status FROM group_message_status WHERE seq = ? AND contact_id = ?",
        (seq, contact_id),
    ).fetchone()
    if row is None or row[0] not in ("queued", "delivered") or _RANK[status] <= _RANK[row[0]]:
        return False  # never sent to that member (unreachable, blocked): no receipt counts
    store.query(
        "UPDATE group_message_status SET status = ?, status_at = ? WHERE seq = ? "
        "AND contact_id = ?",
        (status, _ms(), seq, contact_id),
    )
    return True


def add_unsent(store: Store, seq: int, member_keys: Iterable[bytes]) -> None:
    for key in member_keys:
        store.query(
            "INSERT OR IGNORE INTO group_message_unsent (seq, member_key) VALUES (?, ?)",
            (seq, key),
        )


def unsent(store: Store, seq: int) -> list[bytes]:
    rows = store.query(
        "SELECT member_key FROM group_message_unsent WHERE seq = ?", (seq,)
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def statuses(store: Store, seq: int) -> dict[int, str]:
    rows = store.query(
        "SELECT contact_id, status FROM group_message_status WHERE seq = ?", (seq,)
    ).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


# --- long partial messages (group invitations and answers, services/inbox.py) -------------


def long_partials(store: Store, contact_id: int, over: int) -> list[bytes]:
    """Message IDs of a contact's incomplete messages of more than ``over`` blocks, oldest
    first."""
    rows = store.query(
        "SELECT msg_id FROM fragments WHERE contact_id = ? AND count > ? "
        "GROUP BY msg_id ORDER BY min(created_at)",
        (contact_id, over),
    ).fetchall()
    return [bytes(r[0]) for r in rows]
