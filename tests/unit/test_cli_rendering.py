"""The CLI's own rendering of what a peer chose (issue 15 review, finding 9): tested on the
frontend's functions directly, with text the daemon would have cleaned already, so that the
test fails if a frontend shows a field without aegis_client.safe_text."""

from __future__ import annotations

from aegis_cli.listen import describe
from aegis_cli.main import attachment_line, message_line
from aegis_client.safe_text import unsafe_characters

EVIL = "a\x1b]0;t\x07\u202egpj.exe\r\x9b2J\u200b\ue000"


def _bad(out: str) -> list[str]:
    return unsafe_characters(out.replace("\n", " "))


def test_attachment_lines_show_peer_fields_safely() -> None:
    a = {"attachment_id": 7, "direction": "in", "state": "failed", "done": 0, "blocks": 1,
         "error": EVIL, "created_at": 1_700_000_000_000, "contact": EVIL, "name": EVIL,
         "size": 100}  # fmt: skip
    out = attachment_line(a)
    assert _bad(out) == [], out
    assert "<U+202E>" in out and "␛]0;t␇" in out


def test_a_hidden_group_members_file_has_no_name() -> None:
    """attachments.list gives null for a group member never added as a contact."""
    a = {"attachment_id": "ab", "direction": "in", "state": "complete", "done": 1,
         "blocks": 1, "error": None, "created_at": 1_700_000_000_000, "contact": None,
         "name": "f.bin", "size": 100}  # fmt: skip
    out = attachment_line(a)
    assert "<- (a group member)  f.bin" in out and "None" not in out
    ev = {"type": "attachment.received", "time_ms": 1,
          "data": {"contact": None, "name": "f.bin", "attachment_id": "ab", "size": 100}}
    assert "None" not in describe(ev)
    # A file another device of ours sent: shown as ours, not as the contact's.
    ev = {"type": "attachment.received", "time_ms": 1,
          "data": {"contact": "bob", "name": "f.bin", "attachment_id": "ab", "size": 100,
                   "direction": "out"}}  # fmt: skip
    line = describe(ev)
    assert "me -> bob: file f.bin" in line and "arriving" not in line, line


def test_message_lines_show_peer_text_safely() -> None:
    m = {"direction": "in", "text": EVIL + "\n2026-12-03 14:05  me -> bob: x", "sent_at": 1,
         "created_at": 1, "status": "received"}  # fmt: skip
    out = message_line(m, "bob")
    assert _bad(out) == [], out
    assert "\n    2026-12-03 14:05  me -> bob: x" in out


def test_listen_shows_peer_fields_safely() -> None:
    for ev in (
        {"type": "message.received", "time_ms": 1, "data": {"contact": EVIL, "text": EVIL}},
        {"type": "contact.request", "time_ms": 1, "data": {"name": EVIL, "request": 1}},
        {"type": "attachment.received", "time_ms": 1, "data": {"contact": EVIL, "name": EVIL}},
        {"type": "some.future_event", "time_ms": 1, "data": {"x": EVIL}},
        {"type": "group.message", "time_ms": 1,
         "data": {"group": 1, "from_contact": EVIL, "text": EVIL}},
        {"type": "group.message", "time_ms": 1, "data": {"group": 1, "from": EVIL, "text": "x"}},
        {"type": "group.invitation", "time_ms": 1,
         "data": {"invitation": 1, "name": EVIL, "from": EVIL}},
        {"type": "group.changed", "time_ms": 1,
         "data": {"group": 1, "change": "declined", "contact": EVIL}},
    ):
        out = describe(ev)
        assert _bad(out) == [], (ev["type"], out)


def test_quotes_reactions_and_marks_show_peer_fields_safely() -> None:
    """Replies, reactions, edits and deletions (aegis_cli/actions.py): the quoted text and the
    emoji are the contact's choice, shown through safe_text on the message's one line."""
    m = {"direction": "in", "text": "answer", "sent_at": 1, "created_at": 1,
         "status": "received", "reply_to": {"message_id": "ab", "text": EVIL + "\nforged"},
         "edited_at": 2, "deleted": False,
         "reactions": [{"emoji": EVIL, "count": 1, "mine": False},
                       {"emoji": "x", "count": 2, "mine": True}]}  # fmt: skip
    out = message_line(m, "bob")
    assert _bad(out) == [], out
    assert "\n" not in out.split("answer")[0]  # the quote stays on the header's line
    assert "(edited " in out and "x 2*" in out
    gone = {**m, "deleted": True, "text": "", "reply_to": None, "reactions": []}
    assert message_line(gone, "bob").endswith("bob: (deleted)")
    missing = {**m, "reply_to": {"message_id": "ab", "text": None}}
    assert "[reply to a message not found or deleted] answer" in message_line(missing, "bob")
    for ev in (
        {"type": "message.edited", "time_ms": 1, "data": {"contact": EVIL, "text": EVIL}},
        {"type": "message.reaction", "time_ms": 1, "data": {"contact": EVIL, "emoji": EVIL}},
        {"type": "message.deleted", "time_ms": 1, "data": {"contact": EVIL}},
    ):
        assert _bad(describe(ev)) == [], ev
