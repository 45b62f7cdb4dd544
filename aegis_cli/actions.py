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

    def in_group(ctx: Ctx, group: str | None) -> dict[str, Any]:
        """The `group` param for --group GROUP (a name or #N), or nothing."""
        if group is None:
            return {}
        from .groups import resolve_group

        return {"group": resolve_group(ctx, group, Fail)}

    group_option = click.option(
        "--group", metavar="GROUP", help="The message is one of GROUP's (a name or #N)."
    )

    @cli.command(short_help="Reply to a message of NAME's (or a group's), quoting it.")
    @common
    @click.argument("words", nargs=-1, required=True, metavar="[NAME] MESSAGE_ID MESSAGE")
    @click.option("--group", metavar="GROUP", help="Reply in GROUP (then give no NAME).")
    def reply(ctx: Ctx, words: tuple[str, ...], group: str | None) -> None:
        """Send MESSAGE to NAME quoting the message MESSAGE_ID of the conversation (the ids are
        in `aegis messages NAME --ids`); with --group GROUP and no NAME, to the group, quoting
        one of its messages (`aegis messages --group GROUP --ids`). '-' reads MESSAGE from
        standard input."""
        if len(words) != (2 if group is not None else 3):
            raise click.UsageError("give NAME MESSAGE_ID MESSAGE, or --group GROUP "
                                   "MESSAGE_ID MESSAGE")  # fmt: skip
        params = {"message_id": words[-2], "text": read_text(words[-1], Fail),
                  **in_group(ctx, group)}  # fmt: skip
        if group is None:
            params["contact"] = words[0]
        result = ctx.call("messages.reply", params)
        ctx.out(result, str(result["message_id"]))

    @cli.command(short_help="React to a message with an emoji (--remove: take it back).")
    @common
    @click.argument("message_id")
    @click.argument("emoji", required=False)
    @click.option("--remove", is_flag=True, help="Remove your reaction.")
    @group_option
    def react(ctx: Ctx, message_id: str, emoji: str | None, remove: bool,
              group: str | None) -> None:  # fmt: skip
        """Set your one reaction to MESSAGE_ID (replacing your earlier one), or --remove it."""
        if remove == (emoji is not None):
            raise click.UsageError("give an EMOJI or --remove")
        result = ctx.call("messages.react", {"message_id": message_id, "emoji": emoji or "",
                                             **in_group(ctx, group)})  # fmt: skip
        ctx.out(result, "reaction removed" if remove else "reaction sent")

    @cli.command(short_help="Edit one of your messages (for 24 hours after sending).")
    @common
    @click.argument("message_id")
    @click.argument("message")
    @group_option
    def edit(ctx: Ctx, message_id: str, message: str, group: str | None) -> None:
        """Replace the text of your message MESSAGE_ID with MESSAGE ('-': standard input), here
        and at the contact's (every member's), who sees it marked edited. Earlier versions
        are not kept."""
        result = ctx.call("messages.edit", {"message_id": message_id,
                                            "text": read_text(message, Fail),
                                            **in_group(ctx, group)})  # fmt: skip
        ctx.out(result, "edited")

    @cli.command(short_help="Delete a message here (--everyone: at the contact's too).")
    @common
    @click.argument("message_id")
    @click.option("--everyone", is_flag=True,
                  help="Your own message: ask the contact's client to delete it too.")
    @group_option
    def delete(ctx: Ctx, message_id: str, everyone: bool, group: str | None) -> None:
        """Delete the message MESSAGE_ID from this profile. With --everyone (your own messages),
        the contact's client is asked to delete it too and both keep a "deleted" mark; a
        modified client can ignore the request."""
        result = ctx.call("messages.delete", {"message_id": message_id,
                                              "for_everyone": everyone,
                                              **in_group(ctx, group)})  # fmt: skip
        ctx.out(result, "deleted for everyone" if everyone else "deleted here")
