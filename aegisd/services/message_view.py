"""A stored one-to-one message as the API shows it (docs/api.md, "A message"): one builder
for `messages.history`, `messages.search` and `conversations.list`, so that a field added to
messages appears in all of them (and in `aegis export`, which writes these objects)."""

from __future__ import annotations

from typing import Any

from aegisd.store import Message

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
    }


def preview(text: str) -> str:
    """A short one-line form of a text: its whitespace (newlines too) collapsed, cut after
    PREVIEW_CHARS characters with "…". Still the sender's characters: shown like a text."""
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
