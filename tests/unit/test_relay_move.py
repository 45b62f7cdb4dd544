"""A relay move goes on past a contact that cannot move now (review finding 5): only an
unreachable relay stops it until the next connection."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from aegisd.relayurl import SETTING_URL
from aegisd.services import messenger as msg
from aegisd.services.mailbox import ContactState, OwnedMailbox

OLD = "ws://127.0.0.1:1/v1/ws"
NEW = "ws://127.0.0.1:2/v1/ws"


def _mover(errors: dict[str, Any]) -> tuple[msg.Messenger, list[str]]:
    contacts = [
        SimpleNamespace(id=i, name=n, blocked=False, state=ContactState(None, True).to_bytes())
        for i, n in enumerate(["bob", "carol", "dave"])
    ]
    mb = OwnedMailbox(OLD, b"\1" * 32, b"\2" * 32, b"o" * 16, b"d" * 16, b"r" * 32, b"")
    settings = {msg.SETTING_MOVE: {"from": OLD, "at": time.time_ns() // 1_000_000},
                SETTING_URL: NEW}  # fmt: skip
    store = SimpleNamespace(
        get_setting=lambda key, default=None: settings.get(key, default),
        list_contacts=lambda: contacts,
        mailbox_for_contact=lambda cid: SimpleNamespace(descriptor=mb.to_bytes()),
    )
    m = msg.Messenger.__new__(msg.Messenger)
    tried: list[str] = []

    async def rotate(name: str) -> dict[str, Any]:
        tried.append(name)
        if name in errors:
            raise errors[name]
        return {"contact": name, "rotating": True}

    m.daemon = SimpleNamespace(store=store)  # type: ignore[assignment]
    m._moving = asyncio.Lock()
    m.cover = SimpleNamespace(active=lambda: False)  # type: ignore[assignment]
    m.rotate_mailbox = rotate  # type: ignore[method-assign]
    m._move_progress = lambda: None  # type: ignore[method-assign]
    return m, tried


def test_a_contact_that_is_not_ready_does_not_stall_the_others() -> None:
    not_ready = msg.AppError(msg.E_NOT_READY, "not_ready", "this contact cannot be reached yet")
    m, tried = _mover({"bob": not_ready})
    asyncio.run(m.continue_move())
    assert tried == ["bob", "carol", "dave"]


def test_an_unreachable_relay_stops_the_move_until_the_next_connection() -> None:
    m, tried = _mover({"carol": msg.relay_unavailable()})
    asyncio.run(m.continue_move())
    assert tried == ["bob", "carol"]
