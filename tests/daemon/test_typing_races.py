"""Typing indicators (aegisd/services/typing_indicators.py) in-process, against a real
SQLCipher store, the real delivery layer and real ratchet sessions: the orderings a real
daemon makes rare (two calls queued on the messenger lock) made certain by holding the lock,
and a peer's blocks handed in one after another (review of issue 17, findings 1 and 2)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.rpc.events import EventBus
from aegisd.services.typing_indicators import SETTING_ENABLED, Typing
from aegisd.store import Store, create_profile
from aegisd.store import typing_state as ts
from aegisd.store.db import Contact
from tests.daemon.test_delivery import _contact, _delivery, _open
from tests.support.parties import make_pair


class Host:
    def __init__(self, store: Store) -> None:
        # The daemon's real event bus on the real store; ``live`` is what one subscriber
        # (events.subscribe, from now, every type) was sent.
        self.events = EventBus()
        self.events.attach(store)
        self.live: list[dict[str, Any]] = []
        self.sent = asyncio.Event()  # set at each event sent to the subscriber
        self.ctx = SimpleNamespace(events=self.events, store=store)
        self.store = store
        self.lock = asyncio.Lock()
        self.delivery = _delivery(store)
        self.contacts = SimpleNamespace(by_name=self._by_name)

    def subscribe(self) -> None:
        async def send(note: dict[str, Any]) -> None:
            self.live.append(note["params"])
            self.sent.set()

        self.events.subscribe(self, send, None, None).ready.set()

    async def until_sent(self, type: str) -> None:
        """Until an event of ``type`` was sent to the subscriber (no sleep: each send wakes)."""
        while not any(e["type"] == type for e in self.live):
            self.sent.clear()
            await self.sent.wait()

    async def all_sent(self) -> None:
        """Until every live event queued so far was sent: a stored event emitted now comes
        after them (a subscription sends what is queued before what is stored)."""
        self.events.emit("debug.marker")
        await self.until_sent("debug.marker")

    def _by_name(self, name: str) -> Contact:
        c = self.store.contact_by_name(name)
        assert c is not None
        return c

    def check_usable(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = create_profile(tmp_path / "p", None)
    yield s
    s.close()


def _both_on(store: Store) -> tuple[Contact, Session]:
    """Bob, with whom each side has told the other its indicators are on; Bob's session."""
    bob, _ = _contact(store, "bob", 1)
    pair = make_pair()
    store.put_session(bob.id, pair.a.to_bytes())
    store.set_setting(SETTING_ENABLED, True)
    ts.put(store, bob.id, True, True)
    return bob, pair.b


def _sent(store: Store, peer: Session) -> list[wire.Payload]:
    """What left for Bob, each block as his session opens it."""
    return [_open(peer, [i.block]) for i in store.pending_blocks(now=2**62, limit=100)]


def test_a_typing_queued_behind_switching_off_does_not_go(store: Store) -> None:
    bob, peer = _both_on(store)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        host = Host(store)
        t = Typing(host)
        async with host.lock:  # both calls queue on the lock: switching off first
            off = asyncio.ensure_future(t.configure(False))
            while not host.lock._waiters:
                await asyncio.sleep(0)
            typing = asyncio.ensure_future(t.send("bob", True))
            while len(host.lock._waiters) < 2:
                await asyncio.sleep(0)
        return await off, await typing

    described, result = asyncio.run(go())
    assert described["enabled"] is False
    assert result == {"sent": False, "reason": "off"}
    assert ts.get(store, bob.id) == (True, False)  # not told "on" again while off
    assert _sent(store, peer) == [wire.TypingPayload(False, False)]  # the "off", nothing else


def test_switching_off_and_on_does_not_restart_the_senders_rate_limit(store: Store) -> None:
    _both_on(store)

    async def go() -> list[dict[str, Any]]:
        t = Typing(Host(store))
        first = await t.send("bob", True)
        await t.configure(False)
        await t.configure(True)
        return [first, await t.send("bob", True)]

    first, again = asyncio.run(go())
    assert first["sent"] is True
    # Called within INTERVAL of the first (microseconds apart, in-process).
    assert again == {"sent": False, "reason": "rate_limited"}


def test_alternating_typing_and_stopped_shows_one_typing_per_interval(store: Store) -> None:
    bob, _ = _both_on(store)
    host = Host(store)

    async def go() -> None:
        host.subscribe()
        t = Typing(host)
        session = Session.from_bytes(store.get_session(bob.id) or b"")
        for _ in range(5):  # what a hostile peer can send: "typing", "stopped", ...
            t.on_payload(bob, session, wire.TypingPayload(True, True))
            t.on_payload(bob, session, wire.TypingPayload(True, False))
        await host.all_sent()
        await host.events.close()

    before = store.last_event_seq()
    asyncio.run(go())
    live = [e for e in host.live if e["type"] == "contact.typing"]
    # Handed in microseconds apart: within one INTERVAL, one "typing" and its end.
    assert [e["data"] for e in live] == [{"contact": "bob", "typing": True},
                                         {"contact": "bob", "typing": False}]  # fmt: skip
    assert all(e["live"] is True and e["seq"] == before for e in live)
    assert [e["type"] for e in host.live] == ["contact.typing"] * 2 + ["debug.marker"]


def test_typing_events_reach_live_subscribers_and_never_the_store(store: Store) -> None:
    """contact.typing says when a contact typed: only subscriptions open at that moment get
    it; the events table (events.list, the replay after a reconnect, the disk) never does."""
    bob, _ = _both_on(store)
    host = Host(store)
    before = store.last_event_seq()

    async def go() -> None:
        t = Typing(host)
        session = Session.from_bytes(store.get_session(bob.id) or b"")
        t.on_payload(bob, session, wire.TypingPayload(True, True))  # no one listens: lost
        host.subscribe()
        t.on_payload(bob, session, wire.TypingPayload(True, False))  # ends the shown one
        await host.until_sent("contact.typing")
        await host.events.close()

    asyncio.run(go())
    assert [e["data"] for e in host.live] == [{"contact": "bob", "typing": False}]
    assert store.last_event_seq() == before and store.events_after(0) == []
