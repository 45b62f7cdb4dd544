"""``aegis disappear``: a conversation's disappearing-message timer, and the default of new
conversations (docs/api.md, "Disappearing messages"). Thin: JSON-RPC only."""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import one_line

if TYPE_CHECKING:
    from .main import Ctx

_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_UNITS = ((7 * 86_400, "week"), (86_400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def parse_timer(text: str) -> int:
    """'off', '5m', '1h', '1d', '1w', '90s' or a number of seconds."""
    text = text.strip().lower()
    if text in ("off", "0"):
        return 0
    match = re.fullmatch(r"(\d{1,9})\s*(s|m|min|h|d|w)?", text)
    if match is None:
        raise click.BadParameter("give off, or a duration such as 5m, 1h, 1d, 1w or 90s")
    return int(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def timer_text(seconds: int) -> str:
    if not seconds:
        return "off"
    for size, unit in _UNITS:
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


def register(main: ModuleType) -> None:
    """Add the command to the CLI (given the main module, as aegis_cli/calls.py explains)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common

    @cli.command(short_help="Show or set a conversation's disappearing-message timer.")
    @common
    @click.argument("name", required=False)
    @click.argument("duration", required=False)
    @click.option("--default", "default", metavar="DURATION",
                  help="Set the timer new conversations start with (off by default).")
    @click.option("--group", metavar="GROUP",
                  help="GROUP's timer (a name or #N), instead of NAME's: any member sets it.")
    def disappear(ctx: Ctx, name: str | None, duration: str | None,
                  default: str | None, group: str | None) -> None:  # fmt: skip
        """Show or set the disappearing-message timer of the conversation with NAME (or of a
        group: `aegis disappear --group GROUP [DURATION]`).

        DURATION: off, 5m, 1h, 1d, 1w, or seconds (1 s to 4 weeks). Both sides (every member)
        see the change; a message disappears that long after it was sent (yours) or read
        (theirs).
        """
        if group is not None:
            if default is not None or duration is not None:
                raise click.UsageError("with --group give at most a DURATION")
            from .groups import resolve_group

            params: dict[str, Any] = {"group": resolve_group(ctx, group, main.Fail)}
            got: dict[str, Any]
            if name is None:
                got = ctx.call("conversations.get_timer", params)
            else:
                got = ctx.call("conversations.set_timer",
                               {**params, "seconds": parse_timer(name)})  # fmt: skip
            ctx.out(got, f"disappearing messages in {one_line(group)}: "
                         f"{timer_text(int(got['seconds']))}")  # fmt: skip
            return
        if default is not None:
            if name is not None:
                raise click.UsageError("--default applies to new conversations: give no NAME")
            result = ctx.call("settings.set", {"disappearing_default": parse_timer(default)})
            seconds = int(result["disappearing_default"])
            ctx.out(result, f"new conversations: disappearing messages {timer_text(seconds)}")
            return
        if name is None:
            result = ctx.call("settings.get")
            seconds = int(result.get("disappearing_default", 0))
            ctx.out(result, f"new conversations: disappearing messages {timer_text(seconds)}")
            return
        who = one_line(name)
        if duration is None:
            got = ctx.call("conversations.get_timer", {"contact": name})
        else:
            got = ctx.call("conversations.set_timer",
                           {"contact": name, "seconds": parse_timer(duration)})  # fmt: skip
        ctx.out(got, f"disappearing messages with {who}: {timer_text(int(got['seconds']))}")
