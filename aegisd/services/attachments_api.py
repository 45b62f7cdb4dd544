"""The attachment methods of the JSON-RPC API (docs/api.md, "Attachments")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aegisd.rpc import CallContext, InvalidParamsError, Registry

from .attachments import MAX_PATH

if TYPE_CHECKING:
    from .messenger import Messenger


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or "\x00" in value:
        raise InvalidParamsError("path", "must be an absolute file path")
    return value


def register(registry: Registry, m: Messenger) -> None:
    a = m.attachments

    # The paths, their count and the caption are checked once, by the service (send_many).
    @registry.method("attachments.send", unlocked=True)
    async def attachments_send(
        ctx: CallContext, contact: str, path: str, caption: str | None = None
    ) -> dict[str, Any]:
        result = await a.send(contact, path, caption)
        m.disappearing.wake()  # its deadline, if the conversation has a timer
        return result

    @registry.method("attachments.send_batch", unlocked=True)
    async def attachments_send_batch(
        ctx: CallContext, contact: str, paths: list[str], caption: str | None = None
    ) -> dict[str, Any]:
        result = await a.send_many(contact, paths, caption)
        m.disappearing.wake()
        return result

    @registry.method("attachments.list", unlocked=True)
    async def attachments_list(ctx: CallContext, contact: str | None = None) -> dict[str, Any]:
        return {"attachments": a.listing(contact)}

    @registry.method("attachments.get", unlocked=True)
    async def attachments_get(ctx: CallContext, attachment_id: str) -> dict[str, Any]:
        return a.describe(a.get(attachment_id))

    @registry.method("attachments.save", unlocked=True)
    async def attachments_save(
        ctx: CallContext, attachment_id: str, path: str, overwrite: bool = False
    ) -> dict[str, Any]:
        if not isinstance(overwrite, bool):
            raise InvalidParamsError("overwrite", "must be true or false")
        return await a.save(attachment_id, _path(path), overwrite)

    @registry.method("attachments.retry", unlocked=True)
    async def attachments_retry(ctx: CallContext, attachment_id: str) -> dict[str, Any]:
        return await a.retry(attachment_id)

    @registry.method("attachments.delete", unlocked=True)
    async def attachments_delete(ctx: CallContext, attachment_id: str) -> dict[str, Any]:
        await a.delete(attachment_id)
        return {"deleted": True}

    @registry.method("attachments.config", unlocked=True)
    async def attachments_config(ctx: CallContext, max_size: int | None = None) -> dict[str, Any]:
        return a.config(max_size)
