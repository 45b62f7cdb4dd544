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

Other format characters (zero-width joiners in emoji sequences, flag tags) stay: they move
nothing on a terminal.
"""

from __future__ import annotations

import html
import unicodedata

#: Characters that reorder the text around them (Unicode bidi controls).
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

#: Continuation lines of a multi-line text start with this, so no line of a message can pass
#: for the header of another one ("2026-12-03 14:05  me -> bob: ...").
INDENT = "    "


def _shown(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the control pictures block: ␀ ... ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    if ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
        return f"<U+{code:04X}>"
    return ch


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` on one line with nothing a terminal obeys: every control (newlines and tabs
    too) shown as a visible character. ``limit``: at most that many characters (then "…")."""
    s = str(text)
    out = "".join(_shown(ch) for ch in s)
    if limit is not None and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


def lines(text: object) -> str:
    """``text`` with its newlines and tabs kept and every other control shown as in
    ``one_line`` (for output the program composed itself, as a last guard)."""
    return "\n".join(
        "\t".join(one_line(part) for part in line.split("\t"))
        for line in str(text).split("\n")
    )


def body(text: object, indent: str = INDENT) -> str:
    """A multi-line text (a message): its lines kept, every line after the first starting
    with ``indent`` (a forged header on a line of its own stays visibly inside the message),
    tabs kept (they only move right, within the indented line), every other control shown
    as in ``one_line``. A CR LF line ending counts as a newline."""
    return lines(str(text).replace("\r\n", "\n")).replace("\n", "\n" + indent)


def markup_escaped(text: str) -> str:
    """For a notification server that reads markup in its body (the Desktop Notifications
    "body-markup" capability): ``&``, ``<`` and ``>`` as entities, so that a peer's
    ``<a href>`` or ``<img>`` is shown as the text it is, not followed or fetched."""
    return html.escape(text, quote=False)


def unsafe_characters(text: str) -> list[str]:
    """The characters of ``text`` that this module would not let through (for tests and
    checks): controls, surrogates, line separators, bidi controls."""
    return [ch for ch in text if ch not in "\n\t" and _shown(ch) != ch]
