"""Live events (aegisd/rpc/events.py, docs/api.md "Live events") against a real EventBus on a
real SQLCipher store: a live event never carries a seq ahead of a stored event the client
has not been sent yet (review of the i17small merge, finding M1); stored ones from before
are deleted (L4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from aegisd.rpc.events import EventBus
from aegisd.store import Keyring, create_profile, open_profile
from aegisd.store import schema as schema_mod
from tests.sqlcipher_pages import holds


def test_a_live_event_queued_before_a_lock_carries_no_seq_ahead_of_what_was_sent(
    tmp_path: Path,
) -> None:
    store = create_profile(tmp_path / "p", None)
    got: list[dict[str, Any]] = []

    async def go() -> None:
        bus = EventBus()
        bus.attach(store)
        gate = asyncio.Event()

        async def send(note: dict[str, Any]) -> None:
            got.append(note["params"])
            await gate.wait()  # a slow client: the first event stays in flight

        bus.subscribe(object(), send, None, None).ready.set()
        bus.emit("message.received", {"n": 1})
        while not got:
            await asyncio.sleep(0)
        # While message 1 is in flight: message 2 is stored, a contact types (live), the
        # profile locks (daemon.locked, then detach() flushes 2 and 3 behind the live one).
        bus.emit("message.received", {"n": 2})
        bus.emit_live("contact.typing", {"contact": "bob", "typing": True})
        bus.emit("daemon.locked")
        bus.detach()
        gate.set()
        while len(got) < 4:
            await asyncio.sleep(0)
        await bus.close()

    try:
        asyncio.run(go())
    finally:
        store.close()
    assert [(e["type"], e.get("live", False)) for e in got] == [
        ("message.received", False), ("contact.typing", True),
        ("message.received", False), ("daemon.locked", False)]  # fmt: skip
    first, live, second, locked = got
    # The live one carries the last stored seq sent before it (1), not the cursor detach()
    # moved to 3: a client keeping the highest seq seen (or deduping by seq) still takes 2.
    assert live["seq"] == first["seq"] < second["seq"] < locked["seq"]
    seen = 0
    kept = []
    for e in got:  # a client that drops what is not above the highest seq seen
        if e["seq"] > seen or e.get("live"):
            kept.append(e["type"])
        seen = max(seen, e["seq"])
    assert kept == ["message.received", "contact.typing", "message.received", "daemon.locked"]


def test_the_migration_deletes_stored_typing_events_down_to_the_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before contact.typing became live, each was stored: a profile of then loses them (and
    only them) when it opens, in the database file and its WAL alike (finding L4)."""
    home = tmp_path / "p"
    migrations = schema_mod.MIGRATIONS
    old = migrations[: migrations.index(schema_mod._drop_stored_typing_events)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, None)
    kept = store.append_event("message.received", {"contact": "bob", "text": "hello"})
    for _ in range(3):
        store.append_event("contact.typing", {"contact": "qzxtypist", "typing": True})
    store.close()
    key = Keyring.load(home / "keyring.json").unlock(None)
    assert holds(home / "aegis.db", key, b"qzxtypist"), "the checker must see them first"
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, None)
    try:
        assert store.schema_version == schema_mod.SCHEMA_VERSION
        assert [e.seq for e in store.events_after(0)] == [kept.seq]
    finally:
        store.close()
    assert not holds(home / "aegis.db", key, b"qzxtypist")
