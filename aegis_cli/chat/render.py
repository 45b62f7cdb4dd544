"""Peer-supplied text (names, message texts, file names, reasons) made inert for the screen.

Every such string reaches a widget as a ``textual.content.Content`` built from plain text: it
is never parsed as markup, so ``[bold]`` or ``[link=...]`` from a contact is shown as typed.
Before that, aegis_client.safe_text shows controls, escape sequences and bidi overrides as
visible characters. A preview is cut to one short line first, so a 100 KB text costs the
list nothing; a message body longer than BODY_MAX is cut too (with a note saying how much),
so that wrapping one never stalls the screen.
"""

from __future__ import annotations

import time

from textual.content import Content

from aegis_client import safe_text

#: Characters of a message shown in the conversation view (the rest: "N more characters").
BODY_MAX = 20_000
#: Characters of the last message shown in the conversation list.
PREVIEW_MAX = 60
#: Marks of an outgoing message's status.
MARKS = {
    "queued": "…", "sent": "✓", "delivered": "✓✓", "read": "✓✓ read", "failed": "✗ failed",
    "expired": "✗ expired",
}  # fmt: skip


def name(text: object, limit: int = 40) -> str:
    return safe_text.one_line(text, limit=limit, ascii_only=False)


def preview(text: object) -> str:
    # Cut before making it safe: safe_text walks every character of what it is given.
    raw = str(text)[: PREVIEW_MAX * 2]
    return safe_text.one_line(raw, limit=PREVIEW_MAX, ascii_only=False)


def body(text: object) -> str:
    raw = str(text)
    more = len(raw) - BODY_MAX
    shown = safe_text.lines(raw[:BODY_MAX], ascii_only=False)
    if more > 0:
        shown += f"\n… ({more} more characters)"
    return shown


def plain(text: str) -> Content:
    """Already safe text as a renderable that never reads markup."""
    return Content(text)


def clock(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000)) if ms else ""


def day(ms: int) -> str:
    return time.strftime("%A %d %B %Y", time.localtime(ms / 1000))


def when(ms: int) -> str:
    """A list's time: the hour today, else the date."""
    if not ms:
        return ""
    if day(ms) == day(int(time.time() * 1000)):
        return clock(ms)
    return time.strftime("%d %b", time.localtime(ms / 1000))


def mark(status: str) -> str:
    return MARKS.get(status, name(status, 12))


_UNITS = ((7 * 86_400, "week"), (86_400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))
#: The disappearing timers one key cycles through (seconds; 0 off).
TIMERS = (0, 300, 3600, 86_400, 604_800)


def timer(seconds: int) -> str:
    """A disappearing timer for people: "off", "5 minutes", "1 hour"..."""
    if seconds <= 0:
        return "off"
    for size, unit in _UNITS:
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"  # not reached: every whole number of seconds fits "second"


def deadline(ms: int) -> str:
    """When a disappearing message goes: the hour today, else the date and hour."""
    if day(ms) == day(int(time.time() * 1000)):
        return clock(ms)
    return time.strftime("%d %b %H:%M", time.localtime(ms / 1000))


def reactions(items: object) -> str:
    """``[{"emoji", "count", "mine"}]`` as one line: "👍 2 · ❤ 1 (you)". Each emoji is the
    reactor's text: shown through safe_text like any other."""
    if not isinstance(items, list):
        return ""
    parts = []
    for r in items[:20]:  # the daemon bounds them; so does the screen
        if isinstance(r, dict) and int(r.get("count") or 0) > 0:
            mine = " (you)" if r.get("mine") else ""
            parts.append(f"{name(r.get('emoji') or '', 12)} {int(r['count'])}{mine}")
    return " · ".join(parts)
