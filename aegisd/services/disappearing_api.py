"""The JSON-RPC methods of disappearing messages (docs/api.md, "Disappearing messages")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aegisd.rpc import REQUIRED, CallContext, InvalidParamsError, Registry

from .disappearing import check_seconds

if TYPE_CHECKING:
    from .messenger import Messenger


def register(registry: Registry, m: Messenger) -> None:
    d = m.disappearing

    @registry.method("conversations.set_timer", unlocked=True)
    async def conversations_set_timer(
        ctx: CallContext, contact: str | None = None, seconds: int = REQUIRED,
        group: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        # (contact, seconds) was the positional order before groups: kept
        target = one_conversation(contact, group)
        if isinstance(target, int):
            return await m.groups.actions.set_timer(target, check_seconds("seconds", seconds))
        return await d.set(target, seconds)

    @registry.method("conversations.get_timer", unlocked=True)
    async def conversations_get_timer(
        ctx: CallContext, contact: str | None = None, group: int | None = None
    ) -> dict[str, Any]:
        target = one_conversation(contact, group)
        if isinstance(target, int):
            return m.groups.actions.describe_timer(target)
        return d.describe(m.contacts.by_name(target))


def one_conversation(contact: str | None, group: int | None) -> str | int:
    """A conversation is a contact's (its name) or a group's (its reference): exactly one of
    the two is given."""
    if contact is not None and group is None:
        return contact
    if contact is None and group is not None:
        return group
    raise InvalidParamsError("contact", "give a contact or a group (not both)")
