"""Delete keys between own devices on a real SQLCipher store (services/device_caps.py,
docs/devices.md §6, §7): this device's mailboxes' capabilities go as 0x47, all of them to a
session just answered and then only what changed; a listed device's 0x47 is kept (bounded),
one from a removed device changes nothing; a removal queues every capability held for the
device and the sync mailbox made here for it."""

from __future__ import annotations

import types
from typing import Any

from aegisd.core import sync as sy
from aegisd.relayurl import SETTING_URL
from aegisd.services import device_caps as dc
from aegisd.services import own_sync as so
from aegisd.services.mailbox import DeleteCap, OwnedMailbox
from aegisd.store import Store
from aegisd.store import device_caps as held
from aegisd.store import own_sync as rows
from tests.daemon.test_own_sync_rows import A2, _open_row, _sync

URL = "ws://127.0.0.1:9/v1/ws"


def _caps(tmp_path: Any) -> tuple[Store, so.OwnSync, dc.DeviceCaps]:
    store, sync, _, _ = _sync(tmp_path)
    host = types.SimpleNamespace(ctx=sync.m.ctx, store=store, lock=sync.m.lock,
                                 mailboxes=types.SimpleNamespace(on_change=None, owned={}),
                                 own_sync=sync, spawn=sync.m.spawn)  # fmt: skip
    return store, sync, dc.DeviceCaps(host)


def _mailbox(store: Store, n: int, *, delete_key: bool = True) -> OwnedMailbox:
    mb = OwnedMailbox(URL, bytes([n]) * 32, bytes(32), bytes([n]) * 16, bytes([n]) * 16,
                      bytes(32), b"", bytes([n + 100]) * 32 if delete_key else b"")  # fmt: skip
    store.add_mailbox("contact", mb.to_bytes())
    return mb


def _waiting(store: Store) -> list[sy.DeleteKeys]:
    out = []
    for data in rows.take_waiting(store, A2):
        p = sy.decode_sync_payload(data)
        assert isinstance(p, sy.DeleteKeys)
        out.append(p)
    return out


def test_only_what_changed_goes_and_an_answer_gets_everything(tmp_path):
    store, _, caps = _caps(tmp_path)
    try:
        one, two = _mailbox(store, 1), _mailbox(store, 2)
        _mailbox(store, 3, delete_key=False)  # made before delete keys: nothing to give
        assert caps.check() == 1
        [first] = _waiting(store)  # A2 has no answered session: it waits for one
        assert sorted(c.owner_id for c in first.added) == [one.owner_id, two.owner_id]
        assert first.added[0].delete_seed == one.delete_seed and first.removed == ()
        assert caps.check() == 0  # nothing changed: nothing sent
        store.delete_mailbox(store.list_mailboxes()[0].id)  # `one` gone
        three = _mailbox(store, 4)
        assert caps.check() == 1
        [diff] = _waiting(store)
        assert [c.owner_id for c in diff.added] == [three.owner_id]
        assert diff.removed == (one.owner_id,)
        with store.transaction():
            caps.answered(A2)  # all of them, for that device alone
        [full] = _waiting(store)
        assert sorted(c.owner_id for c in full.added) == [two.owner_id, three.owner_id]
        for n in range(5, 5 + sy.MAX_CAPS_PER_PAYLOAD + 1):  # more than one payload holds
            _mailbox(store, n)
        assert caps.check() == 2 and len(_waiting(store)) == 2
    finally:
        store.close()


def test_a_listed_devices_keys_are_kept_bounded_and_a_removed_ones_change_nothing(tmp_path):
    store, sync, _caps_service = _caps(tmp_path)
    try:
        _open_row(store, so._now())
        row, own = rows.get(store, A2), sync.own()
        assert row is not None and own is not None and row.mailbox_id is not None
        cap = sy.MailboxCap(URL, b"o" * 16, b"k" * 32)
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(sy.DeleteKeys((cap,), ())))
        assert held.held(store, A2) == [(URL, b"o" * 16, b"k" * 32)]
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(sy.DeleteKeys((), (b"o" * 16,))))
        assert held.held(store, A2) == []
        with store.transaction():
            held.keep(store, A2, [(URL, i.to_bytes(16, "big"), b"k" * 32)
                                  for i in range(held.HELD_PER_DEVICE + 3)], so._now())  # fmt: skip
        assert held.count(store, A2) == held.HELD_PER_DEVICE
        before = held.held(store, A2)
        # A2 removed: its 0x47 (any block of its) is refused before it is even decrypted,
        # counted and reported, and nothing held changes.
        rows.mark_removed(store, A2, so._now())
        other = sy.DeleteKeys((sy.MailboxCap(URL, b"n" * 16, b"k" * 32),), (before[0][1],))
        sync.receive(row.mailbox_id, sy.encode_sync_payload(other))
        assert held.held(store, A2) == before
        assert ("devices.sync", {"device": A2.hex(), "state": "refused"}) in sync.m.ctx.emitted
    finally:
        store.close()


def test_a_removal_queues_the_held_keys_and_our_sync_mailbox(tmp_path):
    store, _, caps = _caps(tmp_path)
    try:
        _open_row(store, so._now())  # the sync mailbox made here for A2
        row = rows.get(store, A2)
        assert row is not None and row.mailbox_id is not None
        ours = OwnedMailbox(URL, b"s" * 32, bytes(32), b"m" * 16, b"d" * 16, bytes(32), b"")
        store.query("UPDATE mailboxes SET descriptor = ? WHERE id = ?",
                    (ours.to_bytes(), row.mailbox_id))  # fmt: skip
        store.set_setting(SETTING_URL, URL.upper().replace("/V1/WS", "/v1/ws"))  # spelled otherwise
        elsewhere = "ws://192.0.2.1:9/v1/ws"  # a relay the removed device named
        with store.transaction():
            held.keep(store, A2, [(URL, b"a" * 16, b"k" * 32), (elsewhere, b"0" * 16, b"k" * 32),
                                  (URL, b"b" * 16, b"k" * 32)], so._now())  # fmt: skip
        with store.transaction():
            queued = caps.on_removed(A2, [DeleteCap(URL, b"a" * 16, b"k" * 32)])  # from the link
        owners = [OwnedMailbox.from_bytes(d).owner_id for _, d in queued]
        # Ours first, then the profile's relay, the other relay last (a relay away stops the
        # deletions done at once); the link's capability is not queued twice.
        assert owners == [b"m" * 16, b"b" * 16, b"0" * 16]
        assert OwnedMailbox.from_bytes(queued[0][1]).sign_seed == b"s" * 32  # the owner key
        assert held.held(store, A2) == [] and store.get_mailbox(row.mailbox_id) is None
        assert store.query("SELECT COUNT(*) FROM retired_mailboxes").fetchone()[0] == 3
    finally:
        store.close()
