"""A relay move goes on past a contact that cannot move now (review finding 5): only an
unreachable relay stops it until the next connection."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from aegisd.relayurl import SETTING_URL
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.services.mailbox import ContactState, OwnedMailbox
from aegisd.services.mailboxes import SETTING_MOVE
from aegisd.services.rotation import Rotation

OLD = "ws://127.0.0.1:1/v1/ws"
NEW = "ws://127.0.0.1:2/v1/ws"


def _mover(errors: dict[str, Any]) -> tuple[Rotation, list[str]]:
    contacts = [
        SimpleNamespace(id=i, name=n, blocked=False, state=ContactState(None, True).to_bytes())
        for i, n in enumerate(["bob", "carol", "dave"])
    ]
    mb = OwnedMailbox(OLD, b"\1" * 32, b"\2" * 32, b"o" * 16, b"d" * 16, b"r" * 32, b"")
    settings = {SETTING_MOVE: {"from": OLD, "at": time.time_ns() // 1_000_000},
                SETTING_URL: NEW}  # fmt: skip
    store = SimpleNamespace(
        get_setting=lambda key, default=None: settings.get(key, default),
        list_contacts=lambda: contacts,
        mailbox_for_contact=lambda cid: SimpleNamespace(descriptor=mb.to_bytes()),
    )
    host = SimpleNamespace(
        ctx=SimpleNamespace(store=store),
        store=store,
        cover=SimpleNamespace(active=lambda: False),
        mailboxes=SimpleNamespace(relay_url=lambda: NEW),
    )
    r = Rotation(host)  # type: ignore[arg-type]
    tried: list[str] = []

    async def rotate(name: str) -> dict[str, Any]:
        tried.append(name)
        if name in errors:
            raise errors[name]
        return {"contact": name, "rotating": True}

    r.rotate = rotate  # type: ignore[method-assign]
    r.move_progress = lambda: None  # type: ignore[method-assign]
    return r, tried


def test_a_contact_that_is_not_ready_does_not_stall_the_others() -> None:
    not_ready = AppError(E.NOT_READY, "not_ready", "this contact cannot be reached yet")
    m, tried = _mover({"bob": not_ready})
    asyncio.run(m.continue_move())
    assert tried == ["bob", "carol", "dave"]


def test_an_unreachable_relay_stops_the_move_until_the_next_connection() -> None:
    m, tried = _mover({"carol": E.relay_unavailable()})
    asyncio.run(m.continue_move())
    assert tried == ["bob", "carol"]
