"""Store access for replies, reactions, edits, deletions and timers in groups
(services/group_actions.py; docs/protocol.md §25.11), as store/actions.py for one-to-one
messages. A group message is its ``seq`` here; its API id is (author, wire id), author empty
for ours. Plain UPDATE/DELETE of group_messages rows: the search index follows them through
its triggers (store/schema.py ``_search_triggers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Store


@dataclass(frozen=True)
class GroupExtras:
    """What a group message carries besides its text (group.history)."""

    reply_to: str | None
    quoted: str | None
    edited_at: int | None
    edits: int
    deleted: bool
    edit_sent_at: int | None
    timer_s: int
    expires_at: int | None
    timer_change: int | None


def extras(store: Store, seqs: list[int]) -> dict[int, GroupExtras]:
    rows = store.query_in(
        "SELECT seq, reply_to, quoted, edited_at, edits, deleted, edit_sent_at, "
        "timer_s, expires_at, timer_change FROM group_messages WHERE seq IN ({marks})",
        seqs,
    )
    return {
        int(seq): GroupExtras(reply_to, quoted, edited_at, int(edits), bool(deleted), sent,
                              int(timer), exp, change)
        for seq, reply_to, quoted, edited_at, edits, deleted, sent, timer, exp, change in rows
    }  # fmt: skip


def reactions(store: Store, seqs: list[int]) -> dict[int, dict[bytes, str]]:
    """Per message: member key (empty: ours) -> emoji."""
    out: dict[int, dict[bytes, str]] = {}
    rows = store.query_in(
        "SELECT seq, member, emoji FROM group_reactions WHERE seq IN ({marks})", seqs
    )
    for seq, member, emoji in rows:
        out.setdefault(int(seq), {})[bytes(member)] = emoji
    return out


def set_reply(store: Store, seq: int, reply_to: str, quoted: str | None,
              quoted_author: bytes | None) -> None:  # fmt: skip
    """``quoted_author``: the quoted message's author (empty: ours; None: not found)."""
    store.query(
        "UPDATE group_messages SET reply_to = ?, quoted = ?, quoted_author = ? WHERE seq = ?",
        (reply_to, quoted, quoted_author, seq),
    )


def set_reaction(store: Store, seq: int, member: bytes, emoji: str, now: int) -> bool:
    """Set (or, empty, remove) one member's reaction. False: nothing changed."""
    if not emoji:
        cur = store.query("DELETE FROM group_reactions WHERE seq = ? AND member = ?", (seq, member))
        return bool(cur.rowcount)
    row = store.query(
        "SELECT emoji FROM group_reactions WHERE seq = ? AND member = ?", (seq, member)
    ).fetchone()
    if row is not None and row[0] == emoji:
        return False
    store.query(
        "INSERT OR REPLACE INTO group_reactions (seq, member, emoji, created_at) "
        "VALUES (?, ?, ?, ?)",
        (seq, member, emoji, now),
    )
    return True


def _forget_events(store: Store, ref: int, api_id: str, types: str = "%") -> None:
    """The events of the group's message ``api_id`` (its own, its reactions', edits' and
    deletion's: each names the group and the message), of ``types`` (a LIKE pattern)."""
    store.query(
        "DELETE FROM events WHERE type LIKE ? AND json_extract(data, '$.group') = ? "
        "AND json_extract(data, '$.message_id') = ?",
        (types, ref, api_id),
    )


def edit(store: Store, ref: int, seq: int, api_id: str, text: str, now: int,
         sent_at: int | None) -> None:  # fmt: skip
    """The latest text replaces the message's (no earlier version kept); its event and the
    quotes of it in the group follow, earlier edits' events go (as store/actions.py)."""
    store.query(
        "UPDATE group_messages SET body = ?, edited_at = ?, edit_sent_at = ?, "
        "edits = edits + 1 WHERE seq = ?",
        (text, now, sent_at, seq),
    )
    store.query(
        "UPDATE group_messages SET quoted = ? WHERE group_ref = ? AND reply_to = ? "
        "AND quoted IS NOT NULL",
        (text, ref, api_id),
    )
    store.query(
        "UPDATE events SET data = json_set(data, '$.text', ?) WHERE type = 'group.message' "
        "AND json_extract(data, '$.group') = ? AND json_extract(data, '$.message_id') = ?",
        (text, ref, api_id),
    )
    _forget_events(store, ref, api_id, "message.edited")


def mark_deleted(store: Store, ref: int, seq: int, api_id: str) -> None:
    """Delete for everyone: the text, its quote, its reactions and every event that carried
    it go; the row stays as the "deleted" mark; replies quoting it lose their copy."""
    _forget_events(store, ref, api_id)
    store.query(
        "UPDATE group_messages SET body = '', quoted = NULL, deleted = 1, edited_at = NULL, "
        "edit_sent_at = NULL, edits = 0 WHERE seq = ?",
        (seq,),
    )
    store.query("DELETE FROM group_reactions WHERE seq = ?", (seq,))
    forget_quotes(store, ref, api_id)


def forget_quotes(store: Store, ref: int, api_id: str) -> None:
    store.query(
        "UPDATE group_messages SET quoted = NULL WHERE group_ref = ? AND reply_to = ?",
        (ref, api_id),
    )


# -- actions waiting for their message (§25.11, as §26.5) ---------------------------------------


def hold(store: Store, ref: int, contact_id: int, author: bytes, target: bytes, payload: bytes,
         now: int, *, per_group: int, per_sender: int, max_age_ms: int) -> int:  # fmt: skip
    """Keep an action for a message not here yet. Past ``per_sender`` the sender's own oldest
    go (one member cannot push out the others' held actions), past ``per_group`` the group's
    oldest, and any older than ``max_age_ms``. Returns how many were dropped to make room."""
    store.query(
        "DELETE FROM group_pending_actions WHERE group_ref = ? AND created_at < ?",
        (ref, now - max_age_ms),
    )
    own = [
        r[0]
        for r in store.query(
            "SELECT id FROM group_pending_actions WHERE group_ref = ? AND contact_id = ? "
            "ORDER BY id", (ref, contact_id),
        ).fetchall()
    ]  # fmt: skip
    excess = own[: max(0, len(own) - per_sender + 1)]
    ids = [
        r[0]
        for r in store.query(
            "SELECT id FROM group_pending_actions WHERE group_ref = ? ORDER BY id", (ref,)
        ).fetchall()
        if r[0] not in excess
    ]
    excess += ids[: max(0, len(ids) - per_group + 1)]
    for old in excess:
        store.query("DELETE FROM group_pending_actions WHERE id = ?", (old,))
    store.query(
        "INSERT INTO group_pending_actions (group_ref, contact_id, author, target, payload, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (ref, contact_id, author, target, payload, now),
    )
    return len(excess)


def take_pending(
    store: Store, ref: int, author: bytes, target: bytes, *, since: int
) -> list[tuple[int, bytes]]:
    """The actions held for (``author``, ``target``) at or after ``since``, as (contact id,
    payload), oldest first; they are removed, and so are older ones."""
    where = "WHERE group_ref = ? AND author = ? AND target = ?"
    rows: list[Any] = store.query(
        f"SELECT contact_id, payload FROM group_pending_actions {where} "  # noqa: S608
        "AND created_at >= ? ORDER BY id",
        (ref, author, target, since),
    ).fetchall()
    store.query(f"DELETE FROM group_pending_actions {where}", (ref, author, target))  # noqa: S608
    return [(int(cid), bytes(p)) for cid, p in rows]


def prune_pending(store: Store, before: int) -> int:
    return int(
        store.query("DELETE FROM group_pending_actions WHERE created_at < ?", (before,)).rowcount
    )


# -- disappearing messages (§25.11, as §27) -----------------------------------------------------


def get_timer(store: Store, ref: int) -> tuple[int, int]:
    """A group's timer: (seconds, 0 off; the stamp of its last change in ms)."""
    row = store.query(
        "SELECT timer_s, timer_changed_at FROM groups WHERE id = ?", (ref,)
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def set_timer(store: Store, ref: int, seconds: int, changed_at: int) -> None:
    store.query(
        "UPDATE groups SET timer_s = ?, timer_changed_at = ? WHERE id = ?",
        (seconds, changed_at, ref),
    )


def mark_timer_line(store: Store, seq: int, seconds: int) -> None:
    """A history line recording a timer change: it carries no timer of its own."""
    store.query(
        "UPDATE group_messages SET timer_change = ?, timer_s = 0, expires_at = NULL "
        "WHERE seq = ?",
        (seconds, seq),
    )


def merge_timer_line(store: Store, ref: int, author: bytes, body: str, seconds: int,
                     now: int) -> int | None:  # fmt: skip
    """The group's last message, if it is a timer line of the same member (``author``, empty:
    ours), rewritten to record this change instead (as store/db.py ``merge_timer_line``: one
    member's consecutive changes make one line); its ``seq``, or None if it is not such a line."""
    row = store.query(
        "SELECT seq, timer_change, author FROM group_messages WHERE group_ref = ? "
        "ORDER BY seq DESC LIMIT 1", (ref,),
    ).fetchone()  # fmt: skip
    if row is None or row[1] is None or bytes(row[2]) != author:
        return None
    store.query(
        "UPDATE group_messages SET body = ?, timer_change = ?, created_at = ? WHERE seq = ?",
        (body, seconds, now, row[0]),
    )
    return int(row[0])


def expired(store: Store, now_ms: int, *, limit: int) -> list[tuple[int, int, str]]:
    """Group messages whose timer ran out by ``now_ms``: (group, seq, API id), soonest first."""
    rows = store.query(
        "SELECT group_ref, seq, author, wire_id FROM group_messages WHERE expires_at IS NOT NULL "
        "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        (now_ms, limit),
    ).fetchall()
    out = []
    for ref, seq, author, wire_id in rows:
        a, w = bytes(author), bytes(wire_id)
        out.append((int(ref), int(seq), w.hex() if not a else f"{a.hex()}:{w.hex()}"))
    return out


def wait_for_uploads(store: Store, seq: int, now: int, *, grace_ms: int, recheck_ms: int) -> bool:
    """Our file at its deadline whose copies are still uploading to members: its deadline
    moves ``recheck_ms`` on (the copies would go with it, never reaching them), up to
    ``grace_ms`` past the one it took. Whether it was put off."""
    return bool(store.query(
        "UPDATE group_messages SET expires_at = ? WHERE seq = ? AND direction = 'out' "
        "AND created_at + timer_s * 1000 + ? > ? AND EXISTS (SELECT 1 FROM attachments "
        "WHERE group_seq = ? AND direction = 'out' AND state = 'uploading')",
        (now + recheck_ms, seq, grace_ms, now, seq),
    ).rowcount)  # fmt: skip


def next_expiry(store: Store) -> int | None:
    row = store.query("SELECT min(expires_at) FROM group_messages").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def erase(store: Store, ref: int, seq: int, api_id: str, attachments: list[str]) -> bool:
    """A message at its deadline (or deleted for me): its row (reactions and statuses
    cascade), every event that carried it (its file's ``attachments``' too: they carry the
    file's name and caption), the quotes of it and the actions held for it."""
    _forget_events(store, ref, api_id)
    for aid in attachments:
        store.query(
            "DELETE FROM events WHERE type LIKE 'attachment.%' "
            "AND json_extract(data, '$.attachment_id') = ?",
            (aid,),
        )
    forget_quotes(store, ref, api_id)
    row = store.query("SELECT author, wire_id FROM group_messages WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        store.query(
            "DELETE FROM group_pending_actions WHERE group_ref = ? AND author = ? AND target = ?",
            (ref, bytes(row[0]), bytes(row[1])),
        )
    return bool(store.query("DELETE FROM group_messages WHERE seq = ?", (seq,)).rowcount)
