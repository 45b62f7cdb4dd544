"""`aegis reply`, `aegis react`, `aegis edit`, `aegis delete` (docs/api.md, the CLI table), and
how `aegis messages` shows a message's quote, reactions, edit and deletion marks. Everything
the contact chose (quoted text, emoji) goes through aegis_client.safe_text."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import one_line

if TYPE_CHECKING:
    from .main import Ctx

QUOTE_CHARS = 60  # of the quoted text, on the message's line


def quote(m: dict[str, Any]) -> str:
    """The reply's quote as a prefix, or ""."""
    reply = m.get("reply_to")
    if not isinstance(reply, dict):
        return ""
    text = reply.get("text")
    if text is None:
        return "[reply to a message not found or deleted] "
    return f"[reply to \u201c{one_line(text, QUOTE_CHARS)}\u201d] "


def marks(m: dict[str, Any], when: Callable[[int], str]) -> str:
    """The edit mark and the reactions with counts, as a suffix, or ""."""
    out = ""
    if m.get("edited_at") and not m.get("deleted"):
        out += f"  (edited {when(int(m['edited_at']))})"
    reactions = m.get("reactions") or []
    if reactions:
        shown = ", ".join(
            f"{one_line(r['emoji'], 12)} {int(r['count'])}{'*' if r.get('mine') else ''}"
            for r in reactions
        )
        out += f"  [{shown}]"
    return out


def read_text(text: str, Fail: type[Exception]) -> str:
    """A message given as an argument, or `-`: standard input (one trailing newline dropped);
    never empty."""
    if text == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise Fail("standard input is not UTF-8 text") from None
        text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise Fail("the message is empty")
    return text


def register(main: ModuleType) -> None:
    """Add the commands to the CLI (given the main module, as aegis_cli/calls.py)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common
    Fail: type[Exception] = main.Fail

    @cli.command(short_help="Reply to a message of NAME's, quoting it.")
    @common
    @click.argument("name")
    @click.argument("message_id")
    @click.argument("message")
    def reply(ctx: Ctx, name: str, message_id: str, message: str) -> None:
        """Send MESSAGE to NAME quoting the message MESSAGE_ID of the conversation (the ids are
        in `aegis messages NAME --ids`); '-' reads MESSAGE from standard input."""
        result = ctx.call("messages.reply", {"contact": name, "message_id": message_id,
                                             "text": read_text(message, Fail)})  # fmt: skip
        ctx.out(result, str(result["message_id"]))

    @cli.command(short_help="React to a message with an emoji (--remove: take it back).")
    @common
    @click.argument("message_id")
    @click.argument("emoji", required=False)
    @click.option("--remove", is_flag=True, help="Remove your reaction.")
    def react(ctx: Ctx, message_id: str, emoji: str | None, remove: bool) -> None:
        """Set your one reaction to MESSAGE_ID (replacing your earlier one), or --remove it."""
        if remove == (emoji is not None):
            raise click.UsageError("give an EMOJI or --remove")
        result = ctx.call("messages.react", {"message_id": message_id, "emoji": emoji or ""})
        ctx.out(result, "reaction removed" if remove else "reaction sent")

    @cli.command(short_help="Edit one of your messages (for 24 hours after sending).")
    @common
    @click.argument("message_id")
    @click.argument("message")
    def edit(ctx: Ctx, message_id: str, message: str) -> None:
        """Replace the text of your message MESSAGE_ID with MESSAGE ('-': standard input), here
        and at the contact's, who sees it marked edited. Earlier versions are not kept."""
        result = ctx.call("messages.edit", {"message_id": message_id,
                                            "text": read_text(message, Fail)})  # fmt: skip
        ctx.out(result, "edited")

    @cli.command(short_help="Delete a message here (--everyone: at the contact's too).")
    @common
    @click.argument("message_id")
    @click.option("--everyone", is_flag=True,
                  help="Your own message: ask the contact's client to delete it too.")
    def delete(ctx: Ctx, message_id: str, everyone: bool) -> None:
        """Delete the message MESSAGE_ID from this profile. With --everyone (your own messages),
        the contact's client is asked to delete it too and both keep a "deleted" mark; a
        modified client can ignore the request."""
        result = ctx.call("messages.delete", {"message_id": message_id,
                                              "for_everyone": everyone})  # fmt: skip
        ctx.out(result, "deleted for everyone" if everyone else "deleted here")
