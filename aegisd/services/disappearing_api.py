"""The JSON-RPC methods of disappearing messages (docs/api.md, "Disappearing messages")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aegisd.rpc import CallContext, Registry

if TYPE_CHECKING:
    from .messenger import Messenger


def register(registry: Registry, m: Messenger) -> None:
    d = m.disappearing

    @registry.method("conversations.set_timer", unlocked=True)
    async def conversations_set_timer(
        ctx: CallContext, contact: str, seconds: int
    ) -> dict[str, Any]:
        return await d.set(contact, seconds)

    @registry.method("conversations.get_timer", unlocked=True)
    async def conversations_get_timer(ctx: CallContext, contact: str) -> dict[str, Any]:
        return d.describe(m.contacts.by_name(contact))
