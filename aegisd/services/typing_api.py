"""The typing-indicator methods of the JSON-RPC API (docs/api.md, "Typing indicators")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aegisd.rpc import CallContext, Registry

if TYPE_CHECKING:
    from .messenger import Messenger


def register(registry: Registry, m: Messenger) -> None:
    t = m.typing

    @registry.method("messages.typing", unlocked=True)
    async def messages_typing(ctx: CallContext, contact: str, typing: bool) -> dict[str, Any]:
        return await t.send(contact, typing)

    @registry.method("typing.config", unlocked=True)
    async def typing_config(ctx: CallContext, enabled: bool | None = None) -> dict[str, Any]:
        return await t.configure(enabled)
