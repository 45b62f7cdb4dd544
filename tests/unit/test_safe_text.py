"""aegis_client.safe_text: what a peer chose, shown without anything a terminal obeys."""

from __future__ import annotations

from aegis_client.safe_text import body, markup_escaped, one_line, unsafe_characters


def test_controls_are_shown_visibly() -> None:
    assert one_line("a\x1b]52;c;eA==\x07b") == "a␛]52;c;eA==␇b"
    assert one_line("x\ry\n\tz\x7f") == "x␍y␊␉z␡"
    assert one_line("\x9b2J\x85") == "<U+009B>2J<U+0085>"
    assert one_line("\u202eevil\u2066\u2069\u200e\u061c") == (
        "<U+202E>evil<U+2066><U+2069><U+200E><U+061C>"
    )
    assert one_line("l\u2028p\u2029") == "l<U+2028>p<U+2029>"
    assert one_line("\ud800") == "<U+D800>"


def test_ordinary_text_passes() -> None:
    for text in ("héllo wörld", "日本語", "👨\u200d👩\u200d👧", "🏴\U000e0067\U000e0062\U000e007f",
                 "a\u00a0b"):  # fmt: skip
        assert one_line(text) == text
        assert unsafe_characters(text) == []


def test_body_indents_every_line_after_the_first() -> None:
    shown = body("hi\r\n2026-12-03 14:05  me -> bob: x\n\tt\x1b[2J")
    assert shown == "hi\n    2026-12-03 14:05  me -> bob: x\n    \tt␛[2J"
    assert body("a\rb") == "a␍b"


def test_limit_and_markup() -> None:
    assert one_line("abcdef", limit=4) == "abc…"
    assert markup_escaped('<a href="x">&<img src=y>') == '&lt;a href="x"&gt;&amp;&lt;img src=y&gt;'
