"""`aegis export`'s text form renders whatever a message object carries: the fields other
features add (an edit, reactions, a reply, a caption) appear, generically, after the text,
neutralised like the text itself."""

from __future__ import annotations

from aegis_cli.export import message_text, render_text


def test_extra_fields_are_rendered_and_neutralised() -> None:
    m = {"message_id": "ab" * 16, "seq": 3, "direction": "in", "text": "hi\x1b[2J",
         "status": "read", "sent_at": None, "created_at": 1_795_000_000_000,
         "status_at": 1_795_000_000_000, "edited": True,
         "reactions": {"\U0001f44d": 2}, "reply_to": {"text": "quoted\x1b]0;x\x07"}}  # fmt: skip
    line = message_text(m, "bob")
    assert "bob: hi␛[2J (edited)" in line
    assert "[reactions: \U0001f44d: 2]" in line
    assert "[reply_to: text: quoted␛]0;x␇]" in line
    assert "\x1b" not in line and "\x07" not in line


def test_days_get_headers_and_empty_conversations_say_so() -> None:
    day = 86_400_000
    msgs = [{"message_id": str(i), "seq": i, "direction": "out", "text": f"t{i}",
             "status": "sent", "sent_at": None, "created_at": 1_795_000_000_000 + i * day,
             "status_at": 0} for i in range(2)]  # fmt: skip
    text = render_text([{"kind": "contact", "contact": "bob", "messages": msgs},
                        {"kind": "group", "group": 2, "name": "G", "messages": []}], 0)
    assert text.count("\n--- ") == 2 and "me: t1  [sent]" in text
    assert "== Group #2 G ==\n(no messages)" in text
