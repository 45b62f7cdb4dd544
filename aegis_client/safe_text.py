"""Text a peer chose, made safe to show: on a terminal, in a log line, in a notification.

A contact chooses message texts, display names, file names and failure reasons; a terminal
obeys what they contain. Escape sequences (ESC, CSI, OSC: clipboard writes with OSC 52, title
changes, screen clears), a carriage return that overwrites the line with a forged
``me -> ...`` and bidi overrides that reorder what is shown must reach no frontend as they
are. Every frontend that shows peer-supplied text (the CLI, ``aegis listen``, the bridge, the
echo bot's log) goes through this module. Standard library only: the CLI, the bridge and
bots import it without any cryptography.

What is shown instead of each character (readable, and never a control itself):

* C0 controls and DEL: their Unicode control pictures (``\\x1b`` -> ``␛``, ``\\r`` -> ``␍``);
* C1 controls, lone surrogates, line and paragraph separators and the bidi embedding,
  override and isolate controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C):
  ``<U+XXXX>``, so that a reordering attempt is visible rather than silently dropped.

* invisible format characters (zero-width space U+200B, word joiner and invisible operators
  U+2060-U+2064, U+FEFF, soft hyphen U+00AD, the deprecated U+206A-U+206F, the interlinear
  annotations U+FFF9-U+FFFB, U+180E), private-use and unassigned code points: ``<U+XXXX>``;
* combining marks past MAX_MARKS on one base character: dropped (no "Zalgo" text that
  covers the lines above and below);
* when the output's encoding is not UTF-8 (``ascii_only``): every non-ASCII character as
  ``<U+XXXX>``, so that no byte 0x80-0x9F (a C1 control on an 8-bit terminal) is written;
* in a message body, a run of more than MAX_BLANKS spaces or tabs: MAX_BLANKS spaces.

Other format characters (the zero-width joiner of emoji sequences, flag tags, variation
selectors) stay: they move nothing on a terminal. On a terminal, ``fit`` wraps a line to its
width itself, indenting each continuation, so that the terminal's own soft wrap never starts a
row at column 0 where a forged header could sit.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
import unicodedata

#: Characters that reorder the text around them (Unicode bidi controls).
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
#: Format characters that show nothing and may hide or join text: shown as <U+XXXX>.
INVISIBLE = frozenset(
    "\u00ad\u180e\u200b\u2060\u2061\u2062\u2063\u2064\ufeff\ufff9\ufffa\ufffb"
    + "".join(chr(c) for c in range(0x206A, 0x2070))
)
#: Combining marks kept on one base character (a keycap or an accented letter needs 2 or 3).
MAX_MARKS = 4
#: A run of spaces or tabs in a message body longer than this is shortened to it.
MAX_BLANKS = 8

#: Continuation lines of a multi-line text start with this, so no line of a message can pass
#: for the header of another one ("2026-12-03 14:05  me -> bob: ...").
INDENT = "    "


def _utf8_output() -> bool:
    enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    return enc in ("utf8", "utf8sig")


def _code(ch: str) -> str:
    return f"<U+{ord(ch):04X}>"


def _shown(ch: str, ascii_only: bool = False) -> str:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code) if not ascii_only else _code(ch)  # ␀ ... ␟
    if code == 0x7F:
        return "\u2421" if not ascii_only else _code(ch)  # ␡
    if code < 0x7F:
        return ch
    if ascii_only or ch in BIDI_CONTROLS or ch in INVISIBLE:
        return _code(ch)
    if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp", "Co", "Cn"):
        return _code(ch)
    return ch


def _units(text: str, ascii_only: bool | None) -> list[str]:
    """What each character of ``text`` is shown as (excess combining marks: nothing)."""
    if ascii_only is None:
        ascii_only = not _utf8_output()
    out: list[str] = []
    marks = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me"):
            marks += 1
            if marks > MAX_MARKS:
                continue
        else:
            marks = 0
        out.append(_shown(ch, ascii_only))
    return out


def one_line(text: object, limit: int | None = None, ascii_only: bool | None = None) -> str:
    """``text`` on one line with nothing a terminal obeys: every control (newlines and tabs
    too) shown as a visible character. ``limit``: at most that many characters (then "…"),
    never cutting a ``<U+XXXX>`` in half. ``ascii_only``: None asks stdout's encoding."""
    if ascii_only is None:
        ascii_only = not _utf8_output()
    units = _units(str(text), ascii_only)
    if limit is not None and sum(len(u) for u in units) > limit:
        kept: list[str] = []
        room = limit - 1
        for u in units:
            if len(u) > room:
                break
            kept.append(u)
            room -= len(u)
        return "".join(kept) + ("..." if ascii_only else "…")
    return "".join(units)


def lines(text: object, ascii_only: bool | None = None) -> str:
    """``text`` with its newlines and tabs kept and every other control shown as in
    ``one_line`` (for output the program composed itself, as a last guard)."""
    return "\n".join(
        "\t".join(one_line(part, ascii_only=ascii_only) for part in line.split("\t"))
        for line in str(text).split("\n")
    )


def _short_blanks(line: str) -> str:
    out: list[str] = []
    run = 0
    for ch in line:
        run = run + 1 if ch in " \t" else 0
        if run <= MAX_BLANKS:
            out.append(ch)
    return "".join(out)


def body(text: object, indent: str = INDENT, ascii_only: bool | None = None) -> str:
    """A multi-line text (a message): its lines kept, every line after the first starting
    with ``indent`` (a forged header on a line of its own stays visibly inside the message),
    runs of blanks longer than MAX_BLANKS shortened, tabs kept (they only move right, within
    the indented line), every other control shown as in ``one_line``. A CR LF line ending
    counts as a newline. (On a terminal, pass the composed output through ``fit`` too.)"""
    kept = "\n".join(_short_blanks(x) for x in str(text).replace("\r\n", "\n").split("\n"))
    return lines(kept, ascii_only).replace("\n", "\n" + indent)


def _columns(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def terminal_width() -> int | None:
    """The width of the terminal stdout writes to, or None when it is not one."""
    try:
        if not os.isatty(sys.stdout.fileno()):
            return None
    except (AttributeError, OSError, ValueError):
        return None
    return shutil.get_terminal_size().columns


def fit(text: str, width: int | None, indent: str = INDENT) -> str:
    """Already safe ``text`` (one or more lines) wrapped to ``width`` columns by us, each
    continuation starting with ``indent``, tabs expanded: the terminal never wraps a row
    itself, so no row of a message starts at column 0 (a long run of blanks or characters
    sized to the width could otherwise put a forged header there). None: as it is."""
    if width is None or width <= len(indent) + 1:
        return text
    rows: list[str] = []
    for line in text.split("\n"):
        row: list[str] = []
        col = 0
        for ch in line:
            if ch == "\t":
                w = 8 - col % 8
                ch = " " * w
            else:
                w = _columns(ch)
            if col + w > width:
                rows.append("".join(row))
                row, col = [indent], len(indent)
                if ch.startswith(" "):
                    continue  # a blank at the break: nothing to carry over
            row.append(ch)
            col += w
        rows.append("".join(row))
    return "\n".join(rows)


def cut(shown: str, limit: int) -> str:
    """Already rendered (and perhaps markup-escaped) text at most ``limit`` characters long,
    cut on a boundary: never inside a ``<U+XXXX>`` or an ``&...;`` entity (then "…")."""
    if len(shown) <= limit:
        return shown
    head = shown[: max(0, limit - 1)]
    for opener, closer in (("<U+", ">"), ("&", ";")):
        at = head.rfind(opener)
        if at != -1 and closer not in head[at:]:
            head = head[:at]
    return head + "…"


def markup_escaped(text: str) -> str:
    """For a notification server that reads markup in its body (the Desktop Notifications
    "body-markup" capability): ``&``, ``<`` and ``>`` as entities, so that a peer's
    ``<a href>`` or ``<img>`` is shown as the text it is, not followed or fetched."""
    return html.escape(text, quote=False)


def unsafe_characters(text: str) -> list[str]:
    """The characters of ``text`` that this module would not let through (for tests and
    checks): controls, surrogates, line separators, bidi controls."""
    return [ch for ch in text if ch not in "\n\t" and _shown(ch) != ch]
