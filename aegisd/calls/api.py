"""The calls methods of the JSON-RPC API (docs/api.md, "Calls"). Thin: checks params, calls the
CallService. aiortc is not imported here: the service loads it when a call's media starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aegisd.rpc import CallContext, InvalidParamsError, Registry
from aegisd.rpc.methods import Handler
from aegisd.services.context import ServiceContext
from aegisd.services.messenger import Messenger

from .service import CallService


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParamsError(field, "must be true or false")
    return value


def register(
    registry: Registry, ctx: ServiceContext, m: Messenger, *, test_methods: bool = False
) -> CallService:
    service = CallService(ctx, m)
    m.calls = service  # the messenger hands signaling over
    ctx.on_unlock.append(service.on_unlock)
    ctx.on_lock.append(service.on_lock)

    def method(name: str) -> Callable[[Handler], Handler]:
        return registry.method(name, unlocked=True)

    @method("calls.start")
    async def calls_start(
        ctx: CallContext,
        contact: str,
        video: bool = False,
        play: str | None = None,
        record: str | None = None,
        reveal_ip: bool = False,
    ) -> dict[str, Any]:
        return await service.start(
            contact, _bool("video", video), play, record, _bool("reveal_ip", reveal_ip)
        )

    @method("calls.accept")
    async def calls_accept(
        ctx: CallContext,
        call_id: str | None = None,
        play: str | None = None,
        record: str | None = None,
        reveal_ip: bool = False,
    ) -> dict[str, Any]:
        return await service.accept(call_id, play, record, _bool("reveal_ip", reveal_ip))

    @method("calls.reject")
    async def calls_reject(ctx: CallContext, call_id: str | None = None) -> dict[str, Any]:
        return await service.reject(call_id)

    @method("calls.hangup")
    async def calls_hangup(ctx: CallContext, call_id: str | None = None) -> dict[str, Any]:
        return await service.hangup(call_id)

    @method("calls.list")
    async def calls_list(ctx: CallContext) -> dict[str, Any]:
        return {"calls": service.live()}

    @method("calls.history")
    async def calls_history(
        ctx: CallContext, contact: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        return {"calls": service.history(contact, limit)}

    @method("calls.settings")
    async def calls_settings(ctx: CallContext) -> dict[str, Any]:
        return service.settings()

    @method("calls.configure")
    async def calls_configure(
        ctx: CallContext,
        ring_timeout: float | int | None = None,
        host_candidates: str | None = None,
        hide_ip: bool | None = None,
        turn_url: str | None = None,
        turn_username: str | None = None,
        turn_password: str | None = None,
        input_device: str | None = None,
        output_device: str | None = None,
    ) -> dict[str, Any]:
        return service.configure(
            ring_timeout=ring_timeout,
            host_candidates=host_candidates,
            hide_ip=hide_ip,
            turn_url=turn_url,
            turn_username=turn_username,
            turn_password=turn_password,
            input_device=input_device,
            output_device=output_device,
        )

    if test_methods:
        # Test plumbing only (aegisd --test-methods): send bad signaling to the peer of a live
        # call, so tests can check that the peer's daemon rejects it. Returns nothing.
        @registry.method("debug.call_signal", unlocked=True)
        async def debug_call_signal(ctx: CallContext, call_id: str, mode: str) -> dict[str, Any]:
            if mode not in ("tamper", "replay", "unknown", "fingerprint"):
                raise InvalidParamsError("mode", "must be tamper, replay, unknown or fingerprint")
            await service.debug_signal(call_id, mode)
            return {"sent": True}

    return service
