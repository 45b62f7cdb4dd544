"""aegis_client.safe_text: what a peer chose, shown without anything a terminal obeys."""

from __future__ import annotations

from aegis_client.safe_text import (
    INDENT,
    MAX_BLANKS,
    MAX_MARKS,
    body,
    fit,
    markup_escaped,
    one_line,
    unsafe_characters,
)


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


def test_invisible_private_and_unassigned_characters_are_shown() -> None:
    """Review of issue 15: these passed as they were."""
    for ch in ("\u200b", "\u2060", "\ufeff", "\u00ad", "\u206a", "\u206f", "\ufff9", "\ufffb",
               "\ue000", "\U000f0000", "\u0378"):  # fmt: skip
        assert one_line(f"a{ch}b", ascii_only=False) == f"a<U+{ord(ch):04X}>b"
        assert unsafe_characters(ch) == [ch]
    # The joiner of emoji sequences and variation selectors still pass.
    for text in ("👩\u200d👩\u200d👧", "1\ufe0f\u20e3", "e\u0301"):
        assert one_line(text, ascii_only=False) == text


def test_combining_marks_are_capped_per_base_character() -> None:
    zalgo = "a" + "\u0301" * 50 + "b" + "\u0300" * 3
    assert one_line(zalgo, ascii_only=False) == "a" + "\u0301" * MAX_MARKS + "b" + "\u0300" * 3


def test_non_utf8_output_shows_no_byte_an_8bit_terminal_obeys() -> None:
    shown = one_line("é€\u0085x", ascii_only=True)
    assert shown == "<U+00E9><U+20AC><U+0085>x" and shown.isascii()
    assert body("a\nb€", ascii_only=True).isascii()


def test_limit_never_cuts_a_code_in_half() -> None:
    for limit in range(2, 20):
        shown = one_line("ab\u202ecd\u200bef", limit=limit, ascii_only=False)
        assert len(shown) <= limit
        assert shown.count("<") == shown.count(">")


def test_a_line_sized_to_the_terminal_cannot_start_a_row_with_a_forged_header() -> None:
    """Review of issue 15, finding 4: blanks (or any characters) sized so that the terminal's
    soft wrap puts `me -> alice: ...` at column 0. `fit` wraps by itself, indenting."""
    header = "2026-12-03 14:05  bob: "
    for filler in (" " * 200, "\t" * 20, "x" * (80 - len(header))):
        text = body(filler + "2026-12-03 14:06  me -> alice: send the key", ascii_only=False)
        rows = fit(header + text, 80).split("\n")
        assert all(len(r.expandtabs()) <= 80 for r in rows)
        assert rows[0].startswith(header)
        assert all(r.startswith(INDENT) for r in rows[1:])
    # A run of blanks is shortened in any case (output that is not a terminal).
    assert body("a" + " " * 100 + "b", ascii_only=False) == "a" + " " * MAX_BLANKS + "b"
    assert fit("short", None) == "short"


def test_cut_keeps_codes_and_entities_whole() -> None:
    from aegis_client.safe_text import cut

    shown = markup_escaped(one_line("ab\u202e<&>" * 40, ascii_only=False))
    for limit in range(1, 60):
        c = cut(shown, limit)
        assert len(c) <= limit
        assert c.count("<U+") == c.count(">")
        assert c.count("&") == c.count(";")


def test_bridge_bodies_are_bounded_after_rendering() -> None:
    """Review of issue 15: the bridge cut the text before rendering, so a body of C1 controls
    grew about ten times past MAX_BODY."""
    from aegis_bridge.notify import MAX_BODY, _clean

    assert len(_clean("\x85" * 5000)) <= MAX_BODY
    assert len(_clean("é" * 5000)) == MAX_BODY
