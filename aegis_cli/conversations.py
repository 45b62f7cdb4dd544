"""``aegis conversations`` (alias ``aegis chats``) and ``aegis search``: every conversation
with its unread count and last message (`conversations.list`), and full-text search across
them (`messages.search`). Both are newest first. What a peer chose (names, texts) is shown
through aegis_client.safe_text."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import one_line

from . import units

if TYPE_CHECKING:
    from .main import Ctx

#: A search hit's text is shown cut to this many characters.
HIT_CHARS = 120


def page_back_hint(ctx: Ctx, command: str, before: int, limit: int) -> None:
    """On stderr (stdout keeps the messages alone): the command that shows the page before
    the oldest message shown (``command`` already shell-quoted)."""
    more = f" --limit {limit}" if limit != 50 else ""
    click.echo(
        one_line(f"older messages: aegis {command} --before {before}{more}"
                 f"{ctx.paths.home_option()}"), err=True,
    )  # fmt: skip


def conversation_line(c: dict[str, Any]) -> str:
    title = one_line(c["name"])
    if c["kind"] == "group":
        title = f"#{c['group']} {title}"
    unread = f"  ({c['unread']} unread)" if c["unread"] else ""
    last = c["last_message"]
    if last is None:
        return f"{units.when(c['last_activity'])}  {title}{unread}  (no messages)"
    if last["direction"] == "out":
        who = "me"
    elif c["kind"] == "contact":
        who = one_line(c["name"])
    else:
        who = one_line(last.get("from_contact") or str(last.get("from", ""))[:12])
    return (f"{units.when(last['created_at'])}  {title}{unread}  "
            f"{who}: {one_line(last['preview'], 80)}")  # fmt: skip


def hit_line(h: dict[str, Any]) -> str:
    m = h["message"]
    if h["kind"] == "contact":
        where = one_line(h["contact"])
        who = "me" if m["direction"] == "out" else where
    else:
        where = f"#{h['group']} {one_line(h['group_name'] or '')}".rstrip()
        who = "me" if m["direction"] == "out" else one_line(
            m.get("from_contact") or str(m.get("from", ""))[:12])  # fmt: skip
    when = units.when(m["sent_at"] or m["created_at"])
    return f"{when}  [{where}]  {who}: {one_line(m['text'], HIT_CHARS)}"


def register(main: ModuleType) -> None:
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common

    def conversations(ctx: Ctx) -> None:
        """List every conversation, contacts and groups, the most recently active first,
        with its unread count and its last message."""
        r = ctx.call("conversations.list")
        lines = [conversation_line(c) for c in r["conversations"]]
        ctx.out(r, "\n".join(lines) if lines else "no conversations yet")

    for name in ("conversations", "chats"):
        cli.command(name, short_help="List conversations with unread counts, newest first.")(
            common(conversations))  # fmt: skip

    @cli.command("search", short_help="Search every conversation's messages, newest first.")
    @common
    @click.argument("query", nargs=-1, required=True)
    @click.option("--contact", metavar="NAME", help="Only the conversation with NAME.")
    @click.option("--group", metavar="GROUP", help="Only this group's messages.")
    @click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True,
                  metavar="N", help="Show at most N hits.")  # fmt: skip
    @click.option("--offset", type=click.IntRange(0), default=0, metavar="N",
                  help="Skip the N newest hits (paging).")  # fmt: skip
    def search(ctx: Ctx, query: tuple[str, ...], contact: str | None, group: str | None,
               limit: int, offset: int) -> None:  # fmt: skip
        """Find messages holding every word of QUERY ("quoted phrases" as phrases; a word
        ending in * as a prefix), newest first, each with its conversation."""
        params: dict[str, Any] = {"query": " ".join(query), "limit": limit, "offset": offset}
        if contact is not None:
            params["contact"] = contact
        if group is not None:
            from .groups import resolve_group

            params["group"] = resolve_group(ctx, group, main.Fail)
        r = ctx.call("messages.search", params)
        lines = [hit_line(h) for h in r["results"]]
        ctx.out(r, "\n".join(lines) if lines else "no messages found")
        if r["next_offset"] is not None and not ctx.as_json:
            words = " ".join(shlex.quote(q) for q in query)
            scope = "".join(f" --{k} {shlex.quote(v)}" for k, v in
                            (("contact", contact), ("group", group)) if v is not None)
            more = f" --limit {limit}" if limit != 20 else ""
            click.echo(one_line(f"more: aegis search {words}{scope}{more} --offset "
                                f"{r['next_offset']}{ctx.paths.home_option()}"),
                       err=True)  # fmt: skip

    from . import export

    export.register(main)

