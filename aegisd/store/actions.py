"""Store access for replies, reactions, edits and deletions of one-to-one messages
(services/actions.py; docs/protocol.md §26). Plain UPDATE/DELETE of message rows: the search
index follows them through its triggers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Store


@dataclass(frozen=True)
class Extras:
    """What a message carries besides its text (messages.history)."""

    reply_to: str | None
    quoted: str | None
    edited_at: int | None
    edits: int
    deleted: bool
    edit_sent_at: int | None = None


def extras(store: Store, message_ids: list[str]) -> dict[str, Extras]:
    rows = store.query_in(
        "SELECT id, reply_to, quoted, edited_at, edits, deleted, edit_sent_at "
        "FROM messages WHERE id IN ({marks})",
        message_ids,
    )
    return {
        mid: Extras(reply_to, quoted, edited_at, int(edits), bool(deleted), sent)
        for mid, reply_to, quoted, edited_at, edits, deleted, sent in rows
    }


def reactions(store: Store, message_ids: list[str]) -> dict[str, dict[str, str]]:
    """Per message: direction ('in': the contact's, 'out': ours) -> emoji."""
    out: dict[str, dict[str, str]] = {}
    rows = store.query_in(
        "SELECT message_id, direction, emoji FROM reactions WHERE message_id IN ({marks})",
        message_ids,
    )
    for mid, direction, emoji in rows:
        out.setdefault(mid, {})[direction] = emoji
    return out


def set_reply(
    store: Store, message_id: str, reply_to: str, quoted: str | None, quoted_dir: str | None
) -> None:
    """``quoted_dir``: the quoted message's direction (None: not found)."""
    store.query(
        "UPDATE messages SET reply_to = ?, quoted = ?, quoted_dir = ? WHERE id = ?",
        (reply_to, quoted, quoted_dir, message_id),
    )


def set_reaction(store: Store, message_id: str, direction: str, emoji: str, now: int) -> bool:
    """Set (or, empty, remove) one side's reaction. False: nothing changed."""
    if not emoji:
        cur = store.query(
            "DELETE FROM reactions WHERE message_id = ? AND direction = ?", (message_id, direction)
        )
        return bool(cur.rowcount)
    row = store.query(
        "SELECT emoji FROM reactions WHERE message_id = ? AND direction = ?",
        (message_id, direction),
    ).fetchone()
    if row is not None and row[0] == emoji:
        return False
    store.query(
        "INSERT OR REPLACE INTO reactions (message_id, direction, emoji, created_at) "
        "VALUES (?, ?, ?, ?)",
        (message_id, direction, emoji, now),
    )
    return True


def edit(store: Store, message_id: str, text: str, now: int, sent_at: int | None) -> None:
    """The latest text replaces the message's (no earlier version is kept). Events that carried
    the text follow: a received message's event gets the new text, earlier edits' go; so do
    the copies kept by replies quoting it (they then show the latest text)."""
    store.query(
        "UPDATE messages SET body = ?, edited_at = ?, edit_sent_at = ?, edits = edits + 1 "
        "WHERE id = ?",
        (text, now, sent_at, message_id),
    )
    # Only copies that exist: a reply stored before its quoted message keeps "not found".
    store.query(
        "UPDATE messages SET quoted = ? WHERE reply_to = ? AND quoted IS NOT NULL "
        "AND contact_id = (SELECT contact_id FROM messages WHERE id = ?)",
        (text, message_id, message_id),
    )
    store.query(
        "UPDATE events SET data = json_set(data, '$.text', ?) WHERE type = 'message.received' "
        "AND json_extract(data, '$.message_id') = ?",
        (text, message_id),
    )
    store.query(
        "DELETE FROM events WHERE type = 'message.edited' "
        "AND json_extract(data, '$.message_id') = ?",
        (message_id,),
    )


def mark_deleted(store: Store, message_id: str, contact_id: int) -> None:
    """Delete for everyone: the text, its quote, its reactions and every event that carried it
    go; the row stays as the "deleted" mark. Replies quoting it lose their copy of its text."""
    store.query(
        "DELETE FROM events WHERE (type LIKE 'message.%' "
        "AND json_extract(data, '$.message_id') = ?) OR (type LIKE 'attachment.%' "
        "AND json_extract(data, '$.attachment_id') = ?)",
        (message_id, message_id),
    )
    store.query(
        "UPDATE messages SET body = '', quoted = NULL, deleted = 1, edited_at = NULL, "
        "edit_sent_at = NULL, edits = 0 WHERE id = ?",
        (message_id,),
    )
    store.query("DELETE FROM reactions WHERE message_id = ?", (message_id,))
    forget_quotes(store, message_id, contact_id)


def forget_quotes(store: Store, message_id: str, contact_id: int) -> None:
    """Empty the copies of a message's text kept by the replies that quote it (deleted for
    everyone, or erased by its disappearing timer); the quotes then show as deleted."""
    store.query(
        "UPDATE messages SET quoted = NULL WHERE reply_to = ? AND contact_id = ?",
        (message_id, contact_id),
    )


def absent_target(store: Store, contact_id: int, target: str, text: str | None) -> None:
    """A contact's deletion for everyone (``text`` None) or edit of a message we no longer
    have (deleted for me): the copies of it kept by replies in its conversation follow, but
    only copies of the contact's own messages (a peer cannot touch quotes of ours)."""
    store.query(
        "UPDATE messages SET quoted = ? WHERE reply_to = ? AND contact_id = ? "
        "AND quoted_dir = 'in' AND quoted IS NOT NULL",
        (text, target, contact_id),
    )


# -- actions waiting for their message (docs/protocol.md §26.5) ---------------------------------


def hold(store: Store, contact_id: int, target: str, payload: bytes, now: int, *,
         per_contact: int, max_age_ms: int) -> int:  # fmt: skip
    """Keep an action for a message not here yet; the contact's oldest go past ``per_contact``
    and any older than ``max_age_ms``. Returns how many were dropped to make room."""
    store.query(
        "DELETE FROM pending_actions WHERE contact_id = ? AND created_at < ?",
        (contact_id, now - max_age_ms),
    )
    ids = [
        r[0]
        for r in store.query(
            "SELECT id FROM pending_actions WHERE contact_id = ? ORDER BY id", (contact_id,)
        ).fetchall()
    ]
    excess = ids[: max(0, len(ids) - per_contact + 1)]
    for old in excess:
        store.query("DELETE FROM pending_actions WHERE id = ?", (old,))
    store.query(
        "INSERT INTO pending_actions (contact_id, target, payload, created_at) VALUES (?, ?, ?, ?)",
        (contact_id, target, payload, now),
    )
    return len(excess)


def take_pending(
    store: Store, contact_id: int, target: str, *, since: int
) -> list[tuple[bytes, int]]:
    """The actions held for ``target`` (payload, when held) at or after ``since``, oldest
    first; they are removed, and so are older ones (past the age limit, never applied)."""
    rows: list[Any] = store.query(
        "SELECT id, payload, created_at FROM pending_actions WHERE contact_id = ? AND target = ? "
        "AND created_at >= ? ORDER BY id",
        (contact_id, target, since),
    ).fetchall()
    store.query(
        "DELETE FROM pending_actions WHERE contact_id = ? AND target = ?", (contact_id, target)
    )
    return [(bytes(p), int(at)) for _, p, at in rows]


def prune_pending(store: Store, before: int) -> int:
    """Held actions older than ``before`` go (the maintenance loop's; §26.5)."""
    return int(store.query("DELETE FROM pending_actions WHERE created_at < ?", (before,)).rowcount)


@dataclass(frozen=True)
class OwnAction:
    """One of our actions as the store has it now, to be sent again (session renewal, §23)."""

    message_id: str
    kind: str  # "delete" | "edit" | "react"
    text: str  # the edited text, or the emoji
    edit_sent_at: int | None


def own_actions(store: Store, contact_id: int, limit: int, deletions: int) -> list[OwnAction]:
    """Our deletions for everyone in one conversation, the newest ``deletions`` of them, oldest
    first; then our edits and reactions, from its newest ``limit`` messages that carry one
    (not deleted), oldest first. Deletions under their own larger bound: an older one left
    out would bring a text back on the restored side."""
    gone = store.query(
        "SELECT id FROM messages WHERE contact_id = ? AND direction = 'out' AND deleted = 1 "
        "ORDER BY seq DESC LIMIT ?",
        (contact_id, deletions),
    ).fetchall()
    out = [OwnAction(str(r[0]), "delete", "", None) for r in reversed(gone)]
    rows: list[Any] = store.query(
        "SELECT m.seq, m.id, m.direction, m.edits, m.body, m.edit_sent_at, r.emoji "
        "FROM messages m LEFT JOIN reactions r ON r.message_id = m.id AND r.direction = 'out' "
        "WHERE m.contact_id = ? AND m.deleted = 0 AND ((m.direction = 'out' AND m.edits > 0) "
        "OR r.emoji IS NOT NULL) ORDER BY m.seq DESC LIMIT ?",
        (contact_id, limit),
    ).fetchall()
    for _, mid, direction, edits, body, sent_at, emoji in reversed(rows):
        if direction == "out" and edits:
            out.append(OwnAction(mid, "edit", body, sent_at))
        if emoji is not None:
            out.append(OwnAction(mid, "react", emoji, None))
    return out
