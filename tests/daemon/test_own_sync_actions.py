"""Transcripts of actions (0x48) and the profile's settings (0x49) applied on a real SQLCipher
store (services/own_sync_actions.py, own_sync_settings.py, docs/protocol.md §28.6): a
duplicate reply and an edit sent again change nothing; an action on a message not held, or
an edit of the contact's message, is dropped and counted; settings follow the newest change by
(changed_at_ms, device_id), and one from another device or dated far ahead is refused."""

from __future__ import annotations

import types
from typing import Any

from aegisd import droplog
from aegisd.core import sync as sy
from aegisd.core import sync_actions as sa
from aegisd.core import wire
from aegisd.services import own_sync as so
from aegisd.services import own_sync_settings as oss
from aegisd.services.contacts import SETTING_NAME
from aegisd.services.cover import SETTING_LEVEL
from aegisd.services.own_sync_actions import OwnSyncActions
from aegisd.services.own_sync_settings import OwnSyncSettings
from aegisd.store import Store, create_profile
from aegisd.store import actions as actions_store
from aegisd.store import own_sync as rows
from tests.daemon.test_own_sync_rows import A1, A2, FAST, _bob, _Contacts
from tests.unit.test_core_backup import ALICE, BOB


def _host(store: Store) -> tuple[Any, list[tuple[str, Any]], list[Any]]:
    emitted: list[tuple[str, Any]] = []
    spawned: list[Any] = []
    host = types.SimpleNamespace(
        ctx=types.SimpleNamespace(store=store, events=types.SimpleNamespace(
            emit=lambda kind, data: emitted.append((kind, data)))),
        store=store, contacts=_Contacts(store), spawn=spawned.append,
        disappearing=types.SimpleNamespace(wake=lambda: None, synced=lambda c, p: None),
        attachments=types.SimpleNamespace(take_sent=lambda c, p: False),
        cover=types.SimpleNamespace(level_changed=lambda: None),
    )  # fmt: skip
    return host, emitted, spawned


def _store(tmp_path: Any) -> Store:
    return create_profile(tmp_path / "p", None, FAST)


def _action(p: Any) -> sa.ActionTranscript:
    # Through the bytes, as a sync session delivers it.
    got = sa.decode(sa.encode(sa.ActionTranscript(BOB.public.to_bytes(), p)))
    assert isinstance(got, sa.ActionTranscript)
    return got


def test_actions_apply_once_and_a_missing_target_is_dropped(tmp_path: Any) -> None:
    store = _store(tmp_path)
    try:
        host, emitted, _ = _host(store)
        sync = OwnSyncActions(host, lambda data: None)
        c = _bob(store)
        theirs = store.add_message(c.id, "in", "lunch?", status="received",
                                   message_id=(b"t" * 16).hex())  # fmt: skip
        reply = wire.ReplyPayload(b"r" * 16, 1_700_000_000_000, b"t" * 16, "yes")
        with store.transaction():
            for _ in range(2):  # the second: a duplicate
                sync.on_payload(A2, _action(reply))
        ours = [m for m in store.history(c.id) if m.direction == "out"]
        assert [(m.id, m.body, m.status) for m in ours] == [((b"r" * 16).hex(), "yes", "sent")]
        assert actions_store.extras(store, [ours[0].id])[ours[0].id].quoted == "lunch?"
        assert [k for k, _ in emitted] == ["message.transcript"]

        edit = wire.EditPayload(b"r" * 16, 1_700_000_000_001, "yes, at noon")
        with store.transaction():
            sync.on_payload(A2, _action(edit))
            sync.on_payload(A2, _action(edit))  # sent again: the same stamp, ignored
        assert store.get_message(ours[0].id).body == "yes, at noon"  # type: ignore[union-attr]
        assert [k for k, _ in emitted].count("message.edited") == 1
        assert emitted[-1][1]["by"] == "self"

        before = droplog.pending()
        with store.transaction():
            # The contact's message deleted for everyone as if ours: dropped and counted.
            sync.on_payload(A2, _action(wire.DeletePayload(b"t" * 16)))
        after = droplog.pending()
        assert after.get("dropped a synced edit or deletion of a message not ours", 0) == \
            before.get("dropped a synced edit or deletion of a message not ours", 0) + 1
        assert store.get_message(theirs.id).body == "lunch?"  # type: ignore[union-attr]

        with store.transaction():  # our reaction to their message, then our deletion
            sync.on_payload(A2, _action(wire.ReactionPayload(b"t" * 16, "👍")))
            sync.on_payload(A2, _action(wire.DeletePayload(b"r" * 16)))
            sync.on_payload(A2, _action(wire.DeletePayload(b"r" * 16)))  # again: nothing
        assert actions_store.reactions(store, [theirs.id]) == {theirs.id: {"out": "👍"}}
        assert actions_store.extras(store, [ours[0].id])[ours[0].id].deleted
        assert [k for k, _ in emitted].count("message.deleted") == 1
    finally:
        store.close()


def test_actions_on_a_message_not_here_yet_wait_for_it(tmp_path: Any) -> None:
    store = _store(tmp_path)
    try:
        host, emitted, _ = _host(store)
        sync = OwnSyncActions(host, lambda data: None)
        host.sync_actions, host.identity = sync, lambda: ALICE
        c = _bob(store)
        x = b"x" * 16
        with store.transaction():  # two edits (the newer first) before their message
            sync.on_payload(A2, _action(wire.EditPayload(x, 1_700_000_000_003, "third")))
            sync.on_payload(A2, _action(wire.EditPayload(x, 1_700_000_000_002, "second")))
            sync.on_payload(A2, _action(wire.ReactionPayload(b"y" * 16, "👍")))
        assert not emitted
        # The text's transcript comes (own_sync.py): the edits apply, the newest wins.
        own = so.OwnSync(host)
        row = types.SimpleNamespace(device_id=A2)
        with store.transaction():
            own._on_content(row, (None, A1, b""), sy.encode_sync_payload(  # type: ignore[arg-type]
                sy.SentTranscript(BOB.public.to_bytes(), x, 1_700_000_000_000, "first")))
        assert store.get_message(x.hex()).body == "third"  # type: ignore[union-attr]
        assert [k for k, _ in emitted] == ["message.transcript", "message.edited"]
        # The contact's text comes: our reaction made on A2 applies.
        theirs = store.add_message(c.id, "in", "hi", status="received",
                                   message_id=(b"y" * 16).hex())  # fmt: skip
        with store.transaction():
            own.received(c, theirs.id)
        assert actions_store.reactions(store, [theirs.id]) == {theirs.id: {"out": "👍"}}
        # Held no more: arriving again applies nothing twice.
        with store.transaction():
            sync.arrived(x.hex())
        assert [k for k, _ in emitted].count("message.edited") == 1
        # Bounded: the oldest go past HELD_KEPT, and none past HELD_FOR.
        now = so._now()
        with store.transaction():
            for i in range(rows.HELD_KEPT + 1):
                rows.hold_action(store, f"{i:032x}", b"data", now)
        assert rows.take_held(store, f"{0:032x}", now) == []
        assert rows.take_held(store, f"{1:032x}", now) == [b"data"]
        assert rows.take_held(store, f"{2:032x}", now + rows.HELD_FOR + 1) == []
    finally:
        store.close()


def _item(at: int, device: bytes = A2, name: str = "Alice", level: str = "strong") -> Any:
    return sa.SettingsItem(((at, device), name), ((at, device), level), ((at, device), False),
                           ((at, device), 3600))  # fmt: skip


def test_settings_take_the_newest_change_of_each_and_refuse_the_rest(tmp_path: Any) -> None:
    store = _store(tmp_path)
    try:
        host, emitted, spawned = _host(store)
        sync = OwnSyncSettings(host, lambda data: None, lambda: A1)
        now_ms = so._now() * 1000
        with store.transaction():
            sync.on_payload(A2, _item(now_ms + 2 * 86_400_000))  # dated two days ahead
        assert store.get_setting(SETTING_NAME) is None and not emitted
        with store.transaction():
            sync.on_payload(A2, _item(now_ms))
        assert store.get_setting(SETTING_NAME) == "Alice"
        assert store.get_setting(SETTING_LEVEL) == "strong" and len(spawned) == 1
        assert emitted == [("settings.synced", {"display_name": "Alice", "privacy_level": "strong",
                                                "read_receipts": False,
                                                "disappearing_default": 3600})]  # fmt: skip
        with store.transaction():
            sync.on_payload(A2, _item(now_ms - 1, name="Older"))  # older: ignored
            sync.on_payload(A2, _item(now_ms, name="Same stamp"))  # the same pair: ignored
        assert store.get_setting(SETTING_NAME) == "Alice"
        with store.transaction():  # newer, with a level this device does not know
            sync.on_payload(A2, _item(now_ms + 1, name="Alice B", level="paranoid"))
        assert store.get_setting(SETTING_NAME) == "Alice B"
        assert store.get_setting(SETTING_LEVEL) is None  # not chosen: the default applies

        # A change made here stamps only its setting, after the newest held even with a clock
        # behind; every setting with a clock goes, each with its own.
        sent: list[bytes] = []
        mine = OwnSyncSettings(host, sent.append, lambda: A1)
        held = oss.clocks(store)
        store.set_setting(oss.SETTING_CLOCKS, {**{f: [c[0], c[1].hex()] for f, c in held.items()},
                                               "display_name": [now_ms + 10**9, A2.hex()]})
        mine.changed("display_name")
        got = sa.decode(sent[-1])
        assert isinstance(got, sa.SettingsItem)
        assert got.display_name == ((now_ms + 10**9 + 1, A1), "Alice B")
        assert got.privacy_level == ((now_ms + 1, A2), "")

        # A setting no device changed is not sent, and one absent changes nothing here.
        fresh = _store(tmp_path / "fresh")
        try:
            fresh.set_setting(SETTING_LEVEL, "strong")  # chosen before the link: no clock
            host2, _, _ = _host(fresh)
            sent2: list[bytes] = []
            other = OwnSyncSettings(host2, sent2.append, lambda: A1)
            other.changed("display_name")
            got = sa.decode(sent2[-1])
            assert isinstance(got, sa.SettingsItem) and got.privacy_level is None
            assert got.read_receipts is None and got.display_name is not None
            with fresh.transaction():  # a name change from A2: the level stays
                other.on_payload(A2, sa.SettingsItem(
                    display_name=((now_ms + 60_000, A2), "Laptop")))  # fmt: skip
            assert fresh.get_setting(SETTING_LEVEL) == "strong"
            assert fresh.get_setting(SETTING_NAME) == "Laptop"
            # Two devices, two settings: each keeps both (the newer clock of each).
            with fresh.transaction():
                other.on_payload(A2, sa.SettingsItem(
                    display_name=((now_ms + 60_000, A2), "Laptop"),
                    read_receipts=((now_ms + 60_001, A2), False)))  # fmt: skip
            other.changed("privacy_level")
            assert fresh.get_setting("privacy.read_receipts") is False
            got = sa.decode(sent2[-1])
            assert isinstance(got, sa.SettingsItem)
            assert got.read_receipts == ((now_ms + 60_001, A2), False)
            assert got.privacy_level is not None and got.privacy_level[1] == "strong"
        finally:
            fresh.close()
    finally:
        store.close()
