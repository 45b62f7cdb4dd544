"""`aegis export`'s text form renders whatever a message object carries: the fields other
features add (an edit, reactions, a reply, a caption) appear, generically, after the text,
neutralised like the text itself."""

from __future__ import annotations

from aegis_cli.export import message_text, render_text


def test_extra_fields_are_rendered_and_neutralised() -> None:
    m = {"message_id": "ab" * 16, "seq": 3, "direction": "in", "text": "hi\x1b[2J",
         "status": "read", "sent_at": None, "created_at": 1_795_000_000_000,
         "status_at": 1_795_000_000_000, "edited_at": 1_795_000_060_000, "edits": 1,
         "deleted": False,
         "reactions": [{"emoji": "\U0001f44d", "count": 2, "mine": True}],
         "reply_to": {"message_id": "cd" * 16, "text": "quoted\x1b]0;x\x07"},
         "future_field": {"k": "v\x1b[1m"}}  # fmt: skip
    line = message_text(m, "bob")
    assert "bob: [reply to \u201cquoted\u241b]0;x\u2407\u201d] hi\u241b[2J  (edited " in line
    assert "[\U0001f44d 2*]" in line
    assert "[future_field: k: v\u241b[1m]" in line  # a field unknown here: generic, neutralised
    assert "\x1b" not in line and "\x07" not in line
    deleted = message_text({**m, "text": "", "deleted": True, "reactions": [], "reply_to": None},
                           "bob")  # fmt: skip
    assert "(deleted)" in deleted and "(edited" not in deleted


def test_days_get_headers_and_empty_conversations_say_so() -> None:
    day = 86_400_000
    msgs = [{"message_id": str(i), "seq": i, "direction": "out", "text": f"t{i}",
             "status": "sent", "sent_at": None, "created_at": 1_795_000_000_000 + i * day,
             "status_at": 0} for i in range(2)]  # fmt: skip
    text = render_text([{"kind": "contact", "contact": "bob", "messages": msgs},
                        {"kind": "group", "group": 2, "name": "G", "messages": []}], 0)
    assert text.count("\n--- ") == 2 and "me: t1  [sent]" in text
    assert "== Group #2 G ==\n(no messages)" in text
