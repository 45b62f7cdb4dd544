"""``aegis typing-indicators [on|off]`` and ``aegis typing NAME [--stopped]`` (docs/api.md,
"Typing indicators"). What typing indicators show the relay: docs/threat-model.md."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import click

from aegis_client.safe_text import one_line

if TYPE_CHECKING:
    from .main import Ctx

REASONS = {
    "off": "typing indicators are off (aegis typing-indicators on)",
    "contact_off": "the contact has typing indicators off",
    "rate_limited": "one went less than 5 s ago",
    "not_typing": "no 'typing' went to stop",
}


def register(main: ModuleType) -> None:
    """Add the typing commands to the CLI (given the main module, as aegis_cli/calls.py
    explains)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common

    @cli.command("typing-indicators")
    @common
    @click.argument("state", required=False, type=click.Choice(["on", "off"]))
    def typing_indicators(ctx: Ctx, state: str | None) -> None:
        """Show, or switch on or off, typing indicators (off by default).

        When on, and on at the contact's too, the contact sees when you type (a frontend
        calls messages.typing) and `aegis listen` shows when they do. Each indicator is an
        extra block the relay sees at that moment, cover traffic or not (docs/threat-model.md).
        """
        params = {} if state is None else {"enabled": state == "on"}
        r = ctx.call("typing.config", params)
        ctx.out(r, f"typing indicators {'on' if r['enabled'] else 'off'}")

    @cli.command("typing")
    @common
    @click.argument("name")
    @click.option("--stopped", is_flag=True, help="Say you stopped typing instead.")
    def typing(ctx: Ctx, name: str, stopped: bool) -> None:
        """Tell NAME you are typing (for scripts and tests; frontends call messages.typing)."""
        r = ctx.call("messages.typing", {"contact": name, "typing": not stopped})
        what = "stopped" if stopped else "typing"
        text = (f"{what} sent to {one_line(name)}" if r["sent"]
                else f"not sent: {REASONS.get(str(r['reason']), str(r['reason']))}")  # fmt: skip
        ctx.out(r, text)
