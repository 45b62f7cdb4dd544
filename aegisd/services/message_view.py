"""A stored one-to-one message as the API shows it (docs/api.md, "A message"): one builder
for `messages.history`, `messages.search` and `conversations.list`, so that a field added to
messages appears in all of them (and in `aegis export`, which writes these objects)."""

from __future__ import annotations

from typing import Any

from aegisd.store import Message, Store
from aegisd.store import actions as actions_store
from aegisd.store.actions import Extras
from aegisd.store.group_actions import GroupExtras

#: A conversation's last message is shown as at most this many characters of its text.
PREVIEW_CHARS = 80


def message_object(msg: Message) -> dict[str, Any]:
    return {
        "message_id": msg.id,
        "seq": msg.seq,
        "direction": msg.direction,
        "text": msg.body,
        "status": msg.status,
        "sent_at": msg.sent_at,
        "created_at": msg.created_at,
        "status_at": msg.status_at,
        # Disappearing messages (docs/protocol.md §27): when it goes (ms; None: no deadline yet).
        "expires_at": msg.expires_at,
        "timer": msg.timer_s,
        **({} if msg.timer_change is None else {"timer_change": msg.timer_change}),
    }


def message_objects(store: Store, msgs: list[Message]) -> list[dict[str, Any]]:
    """`message_object` with each message's reply, edit, deletion and reactions."""
    ids = [msg.id for msg in msgs]
    extras = actions_store.extras(store, ids)
    reactions = actions_store.reactions(store, ids)
    return [{**message_object(msg), **action_fields(extras.get(msg.id), reactions.get(msg.id, {}))}
            for msg in msgs]  # fmt: skip


def action_fields(extras: Extras | None, reactions: dict[str, str]) -> dict[str, Any]:
    """A message's reply, edit, deletion and reactions (docs/api.md, messages.history)."""
    counts: dict[str, int] = {}
    for emoji in reactions.values():
        counts[emoji] = counts.get(emoji, 0) + 1
    reply = None
    if extras is not None and extras.reply_to is not None:
        reply = {"message_id": extras.reply_to, "text": extras.quoted}
    return {
        "reply_to": reply,
        "edited_at": None if extras is None else extras.edited_at,
        "edits": 0 if extras is None else extras.edits,
        "deleted": False if extras is None else extras.deleted,
        "reactions": [
            {"emoji": e, "count": n, "mine": reactions.get("out") == e}
            for e, n in sorted(counts.items())
        ],
    }


def group_action_fields(extras: GroupExtras | None, reactions: dict[bytes, str]
                        ) -> dict[str, Any]:  # fmt: skip
    """A group message's reply, edit, deletion, reactions and timer, as ``action_fields`` and
    ``message_object`` show them for a one-to-one message (docs/api.md, group.history)."""
    mine = {("out" if member == b"" else member.hex()): e for member, e in reactions.items()}
    fields = action_fields(None if extras is None else Extras(
        extras.reply_to, extras.quoted, extras.edited_at, extras.edits, extras.deleted), mine)
    fields["expires_at"] = None if extras is None else extras.expires_at
    fields["timer"] = 0 if extras is None else extras.timer_s
    if extras is not None and extras.timer_change is not None:
        fields["timer_change"] = extras.timer_change
    return fields


def preview(text: str) -> str:
    """A short one-line form of a text: its whitespace (newlines too) collapsed, cut after
    PREVIEW_CHARS characters with "…". Still the sender's characters: shown like a text."""
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
