"""The bridge's notification of a timed group message (review of issue 17, M5): it expires
within the message's timer and is tracked by the message's id, so the message's
``message.expired`` closes it, as for a contact's message; one with no timer keeps the
server's default."""

from __future__ import annotations

from aegis_bridge.notify import render
from aegis_client.types import Event


def test_a_timed_group_message_notification_expires_and_is_tracked() -> None:
    mid = "ab" * 32 + ":" + "cd" * 16
    data = {"group": 3, "message_id": mid, "from": "ab" * 32, "from_contact": None,
            "text": "hi", "sent_at": 1, "timer": 300}  # fmt: skip
    for level in ("none", "sender", "text"):
        n = render(Event(1, "group.message", 1, data), level, "club")
        assert n is not None and n.expire_ms == 300_000 and n.message_id == mid, level
    n = render(Event(2, "group.message", 1, {**data, "timer": 0}), "text", "club")
    assert n is not None and n.expire_ms == -1 and n.message_id is None
