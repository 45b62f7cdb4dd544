"""``aegis group ...``: private groups (docs/api.md "Groups"). A group is named on the command
line by its name (as ``aegis group list`` shows it) or by its number (``#3``); a member by a
contact's name or its key (``aegis group members`` shows both)::

    aegis group create NAME                  aegis group list
    aegis group invite GROUP CONTACT         aegis group invitations
    aegis group accept ID                    aegis group decline ID
    aegis group members GROUP                aegis group rename GROUP NEW_NAME
    aegis group remove GROUP MEMBER          aegis group role GROUP MEMBER member|admin|owner
    aegis group leave GROUP                  aegis group send GROUP MESSAGE
    aegis group messages GROUP [--limit N] [--before SEQ] [--no-mark-read]
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from aegis_client.safe_text import body, one_line

from . import units

if TYPE_CHECKING:
    from .main import Ctx


def resolve_group(ctx: Ctx, group: str, fail: type[Exception]) -> int:
    """A group's reference from its name or ``#N``."""
    groups = ctx.call("group.list")["groups"]
    if group.startswith("#") and group[1:].isdigit():
        wanted = int(group[1:])
        if any(g["group"] == wanted for g in groups):
            return wanted
    named = [g for g in groups if g["name"] == group]
    if len(named) == 1:
        return int(named[0]["group"])
    if named:
        raise fail(f"several groups are named {one_line(group)!r}: use its number (#N)")
    raise fail(f"no such group {one_line(group)!r} (aegis group list)")


def register(main: ModuleType) -> None:
    """Add the group commands to the CLI (given the main module, as aegis_cli/calls.py
    explains)."""
    cli: click.Group = main.cli
    common: Callable[[Callable[..., None]], Callable[..., None]] = main.common
    Fail: type[Exception] = main.Fail

    def ref(ctx: Ctx, group: str) -> int:
        return resolve_group(ctx, group, Fail)

    @cli.group(short_help="Private groups: create, invite, members, send.")
    def group() -> None:
        """Private groups: every member talks to every other over its own session."""

    @group.command("create")
    @common
    @click.argument("name")
    def group_create(ctx: Ctx, name: str) -> None:
        """Create a group named NAME (you are its owner)."""
        r = ctx.call("group.create", {"name": name})
        ctx.out(r, f"created group #{r['group']} {one_line(r['name'])}")

    @group.command("list")
    @common
    def group_list(ctx: Ctx) -> None:
        """List your groups."""
        r = ctx.call("group.list")
        lines = [f"#{g['group']}  {one_line(g['name'])}  ({g['members']} members, "
                 f"{g['role'] or 'no longer a member'})" for g in r["groups"]]  # fmt: skip
        ctx.out(r, "\n".join(lines) if lines else "no groups yet")

    @group.command("invite")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.argument("contact")
    def group_invite(ctx: Ctx, group_name: str, contact: str) -> None:
        """Invite CONTACT into GROUP (admins and owners)."""
        r = ctx.call("group.invite", {"group": ref(ctx, group_name), "contact": contact})
        ctx.out(r, f"invited {one_line(contact)}")

    @group.command("invitations")
    @common
    def group_invitations(ctx: Ctx) -> None:
        """List group invitations waiting for your answer."""
        r = ctx.call("group.invitations")
        lines = [f"{i['invitation']}  {one_line(i['name'])} from {one_line(i['from'] or '?')} "
                 f"({i['members']} members)" for i in r["invitations"]]  # fmt: skip
        ctx.out(r, "\n".join(lines) if lines else "no group invitations")

    @group.command("accept")
    @common
    @click.argument("invitation", metavar="ID", type=int)
    def group_accept(ctx: Ctx, invitation: int) -> None:
        """Accept a group invitation."""
        r = ctx.call("group.accept", {"invitation": invitation})
        ctx.out(
            r, f"joined #{r['group']} {one_line(r['name'])} (a member once the inviter adds you)"
        )

    @group.command("decline")
    @common
    @click.argument("invitation", metavar="ID", type=int)
    def group_decline(ctx: Ctx, invitation: int) -> None:
        """Decline a group invitation."""
        r = ctx.call("group.decline", {"invitation": invitation})
        ctx.out(r, "declined")

    @group.command("members")
    @common
    @click.argument("group_name", metavar="GROUP")
    def group_members(ctx: Ctx, group_name: str) -> None:
        """Show GROUP's members and their roles."""
        r = ctx.call("group.get", {"group": ref(ctx, group_name)})
        lines = [f"#{r['group']}  {one_line(r['name'])}"]
        for m in r["members"]:
            who = "you" if m["you"] else one_line(m["contact"]) if m["contact"] else m["key"]
            state = "" if m["reachable"] else ", no session yet"
            lines.append(f"  {who}  ({m['role']}{state})")
        ctx.out(r, "\n".join(lines))

    @group.command("remove")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.argument("member")
    def group_remove(ctx: Ctx, group_name: str, member: str) -> None:
        """Remove MEMBER (a contact's name or a key) from GROUP."""
        r = ctx.call("group.remove", {"group": ref(ctx, group_name), "member": member})
        ctx.out(r, f"removed {one_line(member)}")

    @group.command("role")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.argument("member")
    @click.argument("role", type=click.Choice(["member", "admin", "owner"]))
    def group_role(ctx: Ctx, group_name: str, member: str, role: str) -> None:
        """Give MEMBER of GROUP the role ROLE."""
        params = {"group": ref(ctx, group_name), "member": member, "role": role}
        r = ctx.call("group.role", params)
        ctx.out(r, f"{one_line(member)} is now {role}")

    @group.command("rename")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.argument("new_name")
    def group_rename(ctx: Ctx, group_name: str, new_name: str) -> None:
        """Rename GROUP (admins and owners)."""
        r = ctx.call("group.rename", {"group": ref(ctx, group_name), "name": new_name})
        ctx.out(r, f"renamed to {one_line(r['name'])}")

    @group.command("leave")
    @common
    @click.argument("group_name", metavar="GROUP")
    def group_leave(ctx: Ctx, group_name: str) -> None:
        """Leave GROUP (its only member deletes it)."""
        r = ctx.call("group.leave", {"group": ref(ctx, group_name)})
        ctx.out(r, "deleted the group" if r["deleted"] else "left the group")

    @group.command("send")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.argument("message")
    def group_send(ctx: Ctx, group_name: str, message: str) -> None:
        """Send MESSAGE to GROUP ('-': read it from standard input)."""
        send(ctx, group_name, message, Fail)

    @group.command("messages")
    @common
    @click.argument("group_name", metavar="GROUP")
    @click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True,
                  metavar="N", help="Show the last N messages.")  # fmt: skip
    @click.option("--before", type=int, metavar="SEQ",
                  help="Only messages older than SEQ (paging).")  # fmt: skip
    @click.option("--mark-read/--no-mark-read", default=True, show_default=True,
                  help="Mark the incoming messages shown read.")  # fmt: skip
    @click.option("--ids", is_flag=True,
                  help="Start each line with the message's id (for reply, react, edit, delete).")
    def group_messages(
        ctx: Ctx, group_name: str, limit: int, before: int | None, mark_read: bool, ids: bool
    ) -> None:
        """Show GROUP's messages, oldest first; the incoming ones shown are marked read."""
        show_messages(ctx, group_name, limit, before, Fail, mark_read=mark_read, ids=ids)


def send(ctx: Ctx, group: str, message: str, fail: type[Exception]) -> None:
    """`aegis group send GROUP MESSAGE`, `aegis send --group GROUP MESSAGE`."""
    if message == "-":
        message = sys.stdin.read().removesuffix("\n")
    if not message:
        raise fail("the message is empty")
    r = ctx.call("group.send", {"group": resolve_group(ctx, group, fail), "text": message})
    extra = f" ({r['unreachable']} without a session yet)" if r["unreachable"] else ""
    ctx.out(r, f"{r['message_id']}  to {r['recipients']} members{extra}")


def send_file(ctx: Ctx, group: str, path: str, fail: type[Exception],
              caption: str | None = None) -> None:  # fmt: skip
    """`aegis send --group GROUP --file PATH [--caption TEXT]` (path absolute: the daemon
    opens it)."""
    params: dict[str, Any] = {"group": resolve_group(ctx, group, fail), "path": path}
    if caption is not None:
        params["caption"] = caption
    r = ctx.call("group.send_file", params)
    extra = f" ({r['unreachable']} without a session yet)" if r["unreachable"] else ""
    ctx.out(r, f"{r['message_id']}  [file] {one_line(r['name'])} to {r['recipients']} "
               f"members{extra}")  # fmt: skip


def show_messages(
    ctx: Ctx, group: str, limit: int, before: int | None, fail: type[Exception], *,
    mark_read: bool = True, ids: bool = False,
) -> None:  # fmt: skip
    """`aegis group messages GROUP`, `aegis messages --group GROUP` (``mark_read``: exactly
    the unread incoming messages shown are marked read, by group.read's ``message_ids``: not
    an older one left out by ``--limit``, nor one that came in since)."""
    from .conversations import page_back_hint

    ref = resolve_group(ctx, group, fail)
    r = ctx.call("group.history", {"group": ref, "limit": limit, "before": before})
    unread = [m["message_id"] for m in r["messages"] if m["direction"] == "in" and not m["read"]]
    if mark_read and unread:
        ctx.call("group.read", {"group": ref, "message_ids": unread})
    lines = ((f"{m['message_id']}  " if ids else "") + _line(m, units.when) for m in r["messages"])
    ctx.out(r, "\n".join(lines) or "no messages yet")
    if r["next_before"] is not None and not ctx.as_json:
        page_back_hint(ctx, f"group messages {shlex.quote(f'#{ref}')}", r["next_before"], limit)


def _line(m: dict[str, Any], when: Callable[[int], str]) -> str:
    from .actions import marks, quote

    # a reply's quote, the deleted and edited marks and the reactions, as for a contact's
    text = "(deleted)" if m.get("deleted") else quote(m) + body(m["text"])
    extra = marks(m, when)
    if m["direction"] == "out":
        d = m.get("delivery") or {"read": 0, "delivered": 0, "recipients": 0}
        read = f", read by {d['read']} of {d['recipients']}" if d.get("read") else ""
        return (f"{when(m['created_at'])}  me: {text}{extra}  "
                f"[delivered to {d['delivered']} of {d['recipients']}{read}]")  # fmt: skip
    who = one_line(m["from_contact"]) if m.get("from_contact") else str(m["from"])[:12]
    saved = f"  (aegis attachment save {m['attachment_id']} DIR)" if m.get("attachment_id") else ""
    return f"{when(m['sent_at'] or m['created_at'])}  {who}: {text}{extra}{saved}"
