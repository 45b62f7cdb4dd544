"""The group methods of the JSON-RPC API (docs/api.md, "Groups"). A group is named by its
local reference (``group``, an integer this daemon gave it: the group ID never leaves the
daemon); members by their identity key (hex, as ``group.get`` shows it) or a contact's name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aegisd.rpc import CallContext, InvalidParamsError, Registry

if TYPE_CHECKING:
    from .messenger import Messenger

MAX_HISTORY_PAGE = 500


def register(registry: Registry, m: Messenger) -> None:
    g = m.groups

    @registry.method("group.create", unlocked=True)
    async def group_create(ctx: CallContext, name: str, description: str = "") -> dict[str, Any]:
        return await g.create(name, description)

    @registry.method("group.invite", unlocked=True)
    async def group_invite(ctx: CallContext, group: int, contact: str) -> dict[str, Any]:
        return await g.invite(group, contact)

    @registry.method("group.invitations", unlocked=True)
    async def group_invitations(ctx: CallContext) -> dict[str, Any]:
        return {"invitations": g.invitations()}

    @registry.method("group.accept", unlocked=True)
    async def group_accept(ctx: CallContext, invitation: int) -> dict[str, Any]:
        return await g.accept(invitation)

    @registry.method("group.decline", unlocked=True)
    async def group_decline(ctx: CallContext, invitation: int) -> dict[str, Any]:
        return await g.decline(invitation)

    @registry.method("group.list", unlocked=True)
    async def group_list(ctx: CallContext) -> dict[str, Any]:
        return {"groups": g.list_groups()}

    @registry.method("group.get", unlocked=True)
    async def group_get(ctx: CallContext, group: int) -> dict[str, Any]:
        return g.describe(group)

    @registry.method("group.remove", unlocked=True)
    async def group_remove(ctx: CallContext, group: int, member: str) -> dict[str, Any]:
        return await g.remove(group, member)

    @registry.method("group.role", unlocked=True)
    async def group_role(ctx: CallContext, group: int, member: str, role: str) -> dict[str, Any]:
        return await g.set_role(group, member, role)

    @registry.method("group.rename", unlocked=True)
    async def group_rename(
        ctx: CallContext, group: int, name: str, description: str | None = None
    ) -> dict[str, Any]:
        return await g.rename(group, name, description)

    @registry.method("group.leave", unlocked=True)
    async def group_leave(ctx: CallContext, group: int) -> dict[str, Any]:
        return await g.leave(group)

    @registry.method("group.send", unlocked=True)
    async def group_send(ctx: CallContext, group: int, text: str) -> dict[str, Any]:
        result = await g.send(group, text)
        m.disappearing.wake()  # its deadline, if the group has a timer (§25.11)
        return result

    @registry.method("group.send_file", unlocked=True)
    async def group_send_file(
        ctx: CallContext, group: int, path: str, caption: str | None = None
    ) -> dict[str, Any]:
        result = await g.send_file(group, path, caption)
        m.disappearing.wake()
        return result

    @registry.method("group.read", unlocked=True)
    async def group_read(
        ctx: CallContext, group: int, up_to: str | None = None,
        message_ids: list[str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        result = await g.read(group, up_to, message_ids)
        m.disappearing.wake()  # read: an incoming message's deadline starts
        return result

    @registry.method("group.history", unlocked=True)
    async def group_history(
        ctx: CallContext, group: int, before: int | None = None, limit: int = 50
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_HISTORY_PAGE:
            raise InvalidParamsError("limit", f"must be between 1 and {MAX_HISTORY_PAGE}")
        return g.history(group, before, limit)
