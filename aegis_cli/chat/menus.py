"""The text of the chat's one-line dialogs that manage things (a group, the files to save,
the settings) and how their answers are read. Pure: the app asks the daemon and shows these
through ``screens.AskScreen``; every peer-supplied string goes through ``render`` here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import render

#: Members, contacts and files listed in a dialog (the rest: "… and N more"); it fits 80x24.
LISTED = 10


@dataclass
class Command:
    verb: str  # "invite", "remove", "admin", "member", "owner", "rename", "leave", "new"
    arg: str


GROUP_VERBS = ("invite", "remove", "admin", "member", "owner", "rename", "leave", "new")


def member_label(m: dict[str, Any]) -> str:
    if m.get("you"):
        return "me"
    if m.get("contact"):
        return render.name(m["contact"], 24)
    return render.name(str(m.get("key") or "?")[:12], 12) + "…"


def group_prompt(g: dict[str, Any], invitable: list[str], note: str = "") -> str:
    """A group's members (numbered: a command names one by number or contact name), your role
    and the commands."""
    members = list(g.get("members") or [])
    lines = [f"Group “{render.name(g.get('name') or '?', 40)}” · you: {g.get('role') or 'left'}"]
    for i, m in enumerate(members[:LISTED], 1):
        reach = "" if m.get("reachable", True) else " (not reachable yet)"
        lines.append(f" {i:>2} {member_label(m)} ({render.name(m.get('role') or '?', 8)}){reach}")
    if len(members) > LISTED:
        lines.append(f"    … and {len(members) - LISTED} more")
    if invitable:
        names = ", ".join(render.name(n, 20) for n in invitable[:LISTED])
        more = f" … and {len(invitable) - LISTED} more" if len(invitable) > LISTED else ""
        lines.append(f"Contacts to invite: {names}{more}")
    lines.append(
        "invite NAME · remove N · admin N · member N · owner N · rename NAME · leave ·"
        " new NAME (another group) · Esc closes"
    )
    if note:
        lines.append(render.name(note, 200))
    return "\n".join(lines)


def parse(answer: str, verbs: tuple[str, ...] = GROUP_VERBS) -> Command | None:
    verb, _, arg = answer.strip().partition(" ")
    verb = verb.lower()
    if verb not in verbs:
        return None
    return Command(verb, arg.strip())


def number(answer: str) -> int | None:
    """An answer that is a number in ASCII digits (``str.isdigit`` also takes ``²`` and ``①``,
    which ``int`` rejects), else None."""
    a = answer.strip()
    return int(a) if a.isascii() and a.isdigit() else None


def member_ref(g: dict[str, Any], arg: str) -> tuple[str, str] | None:
    """A command's member, as (the reference the daemon takes, its label for a question): its
    number in the list (only those listed: a member the user cannot see is not acted on), else
    a contact's name as typed."""
    members = list(g.get("members") or [])
    i = number(arg)
    if i is not None:
        if not 1 <= i <= min(len(members), LISTED):
            return None
        return str(members[i - 1]["key"]), member_label(members[i - 1])
    if not arg.strip() or arg.strip().isdigit():  # no member, or a number in other digits
        return None
    return arg.strip(), render.name(arg.strip(), 24)


def size(n: int) -> str:
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def file_state(a: dict[str, Any]) -> str:
    state = str(a.get("state") or "")
    if state == "downloading":
        blocks = int(a.get("blocks") or 0)
        pct = 100 * int(a.get("done") or 0) // blocks if blocks else 0
        return f"downloading {pct}%"
    return render.name(state, 12)


def files_prompt(files: list[dict[str, Any]]) -> str:
    """The received files of a conversation, newest last, numbered from 1 (newest: the
    highest); only the newest LISTED are shown."""
    lines = ["Save which file? (newest last)"]
    first = max(0, len(files) - LISTED)
    if first:
        lines.append(f"    ({first} older ones not listed: type their number)")
    for i, a in enumerate(files[first:], first + 1):
        lines.append(
            f" {i:>3} {render.name(a.get('name') or '?', 36)}  {size(int(a.get('size') or 0))}"
            f"  {file_state(a)}  {render.when(int(a.get('created_at') or 0))}"
        )
    lines.append("A number (Enter: the newest; Esc: none).")
    return "\n".join(lines)


def pick(files: list[dict[str, Any]], answer: str) -> dict[str, Any] | None:
    if not answer.strip():
        return files[-1] if files else None
    i = number(answer)
    return files[i - 1] if i is not None and 1 <= i <= len(files) else None


def settings_prompt(typing_on: bool, default_timer: int, note: str = "") -> str:
    lines = [
        "Settings",
        f"  1  typing indicators: {'on' if typing_on else 'off'} (1 switches them)",
        f"  2  disappearing timer of new conversations: {render.timer(default_timer)}"
        " (2 chooses it)",
        "A number (Esc closes).",
    ]
    if note:
        lines.append(render.name(note, 200))
    return "\n".join(lines)


def timer_choices() -> str:
    return "  ".join(f"{i} {render.timer(v)}" for i, v in enumerate(render.TIMERS))


DEVICE_VERBS = ("link", "remove")


def device_label(d: dict[str, Any]) -> str:
    """A device as a person tells it apart: its ID's start, when it was added, its relay."""
    label = render.name(str(d.get("id") or "?")[:12], 12)
    if d.get("added_at"):
        label += f" added {render.when(int(d['added_at']))}"
    if d.get("relay"):
        label += f" on {render.name(d['relay'], 40)}"
    return label + (" (this device)" if d.get("this_device") else "")


def devices_prompt(listed: dict[str, Any], note: str = "") -> str:
    """The profile's devices (numbered: remove names one by number) and the commands."""
    devices = list(listed.get("devices") or [])
    lines = [f"This profile's devices (list version {int(listed.get('version') or 0)})"]
    for i, d in enumerate(devices[:LISTED], 1):
        lines.append(f" {i:>2} {'*' if d.get('this_device') else ' '} {device_label(d)}")
    lines.append(
        "link (a new device: its link and QR code) · remove N · Esc closes\n"
        "Today a linked device gets the identity, contacts and settings; contacts do not learn"
        " of it yet (their messages reach the first device only) and nothing syncs."
    )
    if note:
        lines.append(render.name(note, 200))
    return "\n".join(lines)


def device_ref(listed: dict[str, Any], arg: str) -> dict[str, Any] | None:
    """The device numbered ``arg`` in the list shown, else None."""
    devices = list(listed.get("devices") or [])
    i = number(arg)
    if i is None or not 1 <= i <= min(len(devices), LISTED):
        return None
    return dict(devices[i - 1])
