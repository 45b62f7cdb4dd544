"""The conversations list (docs/api.md `conversations.list`): per contact and per group, the
unread count and the last message, read from the message tables (their indexes by contact
and by group make each a short range scan)."""

from __future__ import annotations

from dataclasses import dataclass

from .db import Message, Store


@dataclass(frozen=True)
class ContactSummary:
    contact_id: int
    name: str
    created_at: int
    unread: int
    last: Message | None


def contact_summaries(store: Store) -> list[ContactSummary]:
    """Every contact but those hidden for their groups, with its unread count (incoming
    messages not marked read) and its newest message."""
    rows = store.query(
        "SELECT c.id, c.name, c.created_at, "
        "(SELECT count(*) FROM messages m WHERE m.contact_id = c.id AND m.direction = 'in' "
        "AND m.status = 'received'), "
        "(SELECT max(seq) FROM messages m WHERE m.contact_id = c.id) "
        "FROM contacts c WHERE c.id NOT IN (SELECT contact_id FROM group_contacts)"
    ).fetchall()
    return [
        ContactSummary(int(r[0]), str(r[1]), int(r[2]), int(r[3]),
                       None if r[4] is None else store.message_by_seq(int(r[4])))
        for r in rows
    ]  # fmt: skip


def group_unread(store: Store, ref: int) -> int:
    """The group's incoming messages not marked read (group.read)."""
    row = store.query(
        "SELECT count(*) FROM group_messages WHERE group_ref = ? AND direction = 'in' "
        "AND read_at IS NULL",
        (ref,),
    ).fetchone()
    return int(row[0])

