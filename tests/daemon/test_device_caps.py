"""Delete keys between own devices on a real SQLCipher store (services/device_caps.py,
docs/devices.md §6, §7): this device's mailboxes' capabilities go as 0x47, all of them to a
session just answered and then only what changed; a listed device's 0x47 is kept (bounded),
one from a removed device changes nothing, nor one naming a mailbox of ours or another
device's, a relay the peer-URL policy refuses or one relay too many, nor an "added" after its
"removed"; a device leaving the list (removed here or elsewhere) has every capability held
for it and the sync mailbox made here for it queued for deletion, never only forgotten."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import sync as sy
from aegisd.relayurl import SETTING_URL, RelayUrlError, check_peer_relay_url
from aegisd.services import device_caps as dc
from aegisd.services import own_sync as so
from aegisd.services.mailbox import DeleteCap, OwnedMailbox
from aegisd.store import Store
from aegisd.store import device_caps as held
from aegisd.store import own_sync as rows
from aegisd.store.devices import SETTING_DELETE_KEYS
from tests.daemon.test_own_sync_rows import A1, A2, _open_row, _sync
from tests.unit.test_core_backup import ALICE, MAILBOX

URL = "ws://127.0.0.1:9/v1/ws"
A3 = bytes([3]) * 16


def _peer_ok(url: str) -> bool:
    try:
        check_peer_relay_url(url, URL)
    except RelayUrlError:
        return False
    return True


def _caps(tmp_path: Any) -> tuple[Store, so.OwnSync, dc.DeviceCaps]:
    store, sync, _, _ = _sync(tmp_path)
    store.set_setting(SETTING_URL, URL)
    mailboxes = types.SimpleNamespace(change_listeners=[], owned={}, peer_url_ok=_peer_ok,
                                      reload=lambda: None)  # fmt: skip
    host = types.SimpleNamespace(ctx=sync.m.ctx, store=store, lock=sync.m.lock,
                                 mailboxes=mailboxes, own_sync=sync, spawn=sync.m.spawn,
                                 renewals=None)  # fmt: skip
    return store, sync, dc.DeviceCaps(host)


def _only(*devices: bytes) -> dv.DeviceList:
    entries = [dv.DeviceEntry(d, MAILBOX, b"b" * 16, 5, d * 2) for d in devices]
    return dv.DeviceList.sign(ALICE, 1_700_000_000_001, entries)


def _queued(store: Store) -> list[bytes]:
    return [OwnedMailbox.from_bytes(bytes(r[0])).owner_id for r in store.query(
        "SELECT descriptor FROM retired_mailboxes ORDER BY id").fetchall()]  # fmt: skip


def _take(sync: so.OwnSync, store: Store, *added: sy.MailboxCap,
          removed: tuple[bytes, ...] = (), seq: int = 1) -> None:  # fmt: skip
    row, own = rows.get(store, A2), sync.own()
    assert row is not None and own is not None
    with store.transaction():
        sync._on_content(row, own, sy.encode_sync_payload(sy.DeleteKeys(added, removed, seq)))


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
        assert 0 < first.seq < diff.seq < full.seq  # each payload numbered after the last
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
            many = [(URL, i.to_bytes(16, "big"), b"k" * 32)
                    for i in range(held.HELD_PER_DEVICE + 3)]  # fmt: skip
            held.keep(store, A2, many, 1, so._now())
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
    store, sync, caps = _caps(tmp_path)
    try:
        _open_row(store, so._now())  # the sync mailbox made here for A2
        row = rows.get(store, A2)
        assert row is not None and row.mailbox_id is not None
        ours = OwnedMailbox(URL, b"s" * 32, bytes(32), b"m" * 16, b"d" * 16, bytes(32), b"")
        store.query("UPDATE mailboxes SET descriptor = ? WHERE id = ?",
                    (ours.to_bytes(), row.mailbox_id))  # fmt: skip
        store.set_setting(SETTING_URL, URL.upper().replace("/V1/WS", "/v1/ws"))  # spelled otherwise
        elsewhere = "ws://192.0.2.1:9/v1/ws"  # a relay the removed device named
        link = [DeleteCap(elsewhere, b"1" * 16, b"k" * 32), DeleteCap(URL, b"a" * 16, b"k" * 32)]
        store.set_setting(SETTING_DELETE_KEYS, {A2.hex(): [c.to_json() for c in link]})
        with store.transaction():
            held.keep(store, A2, [(URL, b"a" * 16, b"k" * 32), (elsewhere, b"0" * 16, b"k" * 32),
                                  (URL, b"b" * 16, b"k" * 32)], 1, so._now())  # fmt: skip
        with store.transaction():
            queued = caps.retire_device(A2)
            sync.list_changed(_only(A1), send=False)  # as devices.remove: nothing left for A2
        owners = [OwnedMailbox.from_bytes(d).owner_id for _, d in queued]
        # Ours first, then the profile's relay, the other relay last, the link's keys and the
        # synced in one list (a relay away stops the deletions done at once); the link's
        # capability also synced is queued once.
        assert owners == [b"m" * 16, b"a" * 16, b"b" * 16, b"0" * 16, b"1" * 16]
        assert OwnedMailbox.from_bytes(queued[0][1]).sign_seed == b"s" * 32  # the owner key
        assert held.held(store, A2) == [] and store.get_mailbox(row.mailbox_id) is None
        assert store.get_setting(SETTING_DELETE_KEYS) is None
        assert _queued(store) == owners
    finally:
        for coro in sync.m.spawn.__self__:
            coro.close()
        store.close()


def test_a_device_another_removed_has_everything_held_for_it_queued(tmp_path):
    # A3 was removed by A2, which may hold none of A3's keys: this device holds them, and its
    # own sync mailbox for A3. Learning the list (or a check after a list taken while this
    # code did not run) queues them all for deletion before forgetting them.
    store, sync, caps = _caps(tmp_path)
    try:
        _open_row(store, so._now())  # our sync mailbox for A2 (listed: kept)
        row = rows.get(store, A2)
        assert row is not None and row.mailbox_id is not None
        store.query("UPDATE mailboxes SET descriptor = ? WHERE id = ?", (OwnedMailbox(
            URL, b"s" * 32, bytes(32), b"m" * 16, b"d" * 16, bytes(32), b"").to_bytes(),
            row.mailbox_id))  # fmt: skip
        mb = store.add_mailbox("contact", OwnedMailbox(URL, b"t" * 32, bytes(32), b"n" * 16,
                                                       b"e" * 16, bytes(32), b"").to_bytes())
        rows.put(store, A3, b"the session", mb, None, b"e" * 32, so._now())
        store.set_setting(SETTING_DELETE_KEYS, {
            A3.hex(): [DeleteCap(URL, b"L" * 16, b"k" * 32).to_json()],
            A2.hex(): [DeleteCap(URL, b"K" * 16, b"k" * 32).to_json()]})
        with store.transaction():
            held.keep(store, A3, [(URL, b"c" * 16, b"k" * 32)], 1, so._now())
            held.keep(store, A2, [(URL, b"2" * 16, b"k" * 32)], 1, so._now())
        assert caps.check() >= 0  # A3 is not in the list held: queued, not forgotten
        assert _queued(store) == [b"n" * 16, b"L" * 16, b"c" * 16]
        assert held.held(store, A3) == [] and store.get_mailbox(mb) is None
        assert list(store.get_setting(SETTING_DELETE_KEYS)) == [A2.hex()]
        # Now a list without A2 arrives: the same for A2, its sync row refused from now on.
        with store.transaction():
            sync.list_changed(_only(A1), send=False)
        assert _queued(store)[3:] == [b"m" * 16, b"2" * 16, b"K" * 16]
        assert held.devices(store) == set() and store.get_setting(SETTING_DELETE_KEYS) is None
        with store.transaction():
            sync.list_changed(_only(A1), send=False)  # again: nothing more
        assert len(_queued(store)) == 6
    finally:
        for coro in sync.m.spawn.__self__:
            coro.close()
        store.close()


def test_keys_naming_our_mailboxes_or_a_relay_refused_are_not_kept(tmp_path):
    store, sync, caps = _caps(tmp_path)
    try:
        _open_row(store, so._now())
        mine = OwnedMailbox(URL, b"s" * 32, bytes(32), b"o" * 16, b"d" * 16, bytes(32), b"")
        caps.m.mailboxes.owned[mine.owner_id] = (None, mine)
        with store.transaction():
            held.keep(store, A3, [(URL, b"3" * 16, b"k" * 32)], 1, so._now())
        far = [sy.MailboxCap(f"wss://relay{i}.example.org/v1/ws", bytes([i]) * 16, b"k" * 32)
               for i in range(1, dc.MAX_RELAYS_PER_DEVICE + 2)]  # fmt: skip
        _take(sync, store,
              sy.MailboxCap(URL, b"o" * 16, b"k" * 32),  # a mailbox of this device's
              sy.MailboxCap(URL, b"3" * 16, b"k" * 32),  # held for A3
              sy.MailboxCap("ws://relay.example.org/v1/ws", b"p" * 16, b"k" * 32),  # not wss
              sy.MailboxCap("wss://10.1.2.3/v1/ws", b"q" * 16, b"k" * 32),  # a private address
              sy.MailboxCap(URL.replace(":9/", ":10/"), b"r" * 16, b"k" * 32),  # our host: ok
              *far[:-2],
              sy.MailboxCap(URL, b"u" * 16, b"k" * 32))  # fmt: skip
        _take(sync, store, *far[-2:])
        kept = {o for _, o, _ in held.held(store, A2)}
        # Our host on another port is a relay of its own: with it, MAX_RELAYS_PER_DEVICE.
        assert kept == {b"r" * 16, b"u" * 16, *(c.owner_id for c in far[:-2])}
        # A3's owner ID claimed by A2 too (a hostile listed device's seed, first or not):
        # contested, kept for neither, refused from both from then on, so neither removal
        # spends A3's mailbox on a false key.
        assert held.held(store, A3) == []
        assert (b"3" * 16).hex() in store.get_setting(dc.SETTING_CONTESTED)
        with store.transaction():
            caps.taken(A3, sy.DeleteKeys([sy.MailboxCap(URL, b"3" * 16, b"k" * 32)], [], 9))
        assert held.held(store, A3) == []
    finally:
        store.close()


def test_an_added_after_its_removed_is_not_kept_and_a_newer_one_is(tmp_path):
    store, sync, _caps_service = _caps(tmp_path)
    try:
        _open_row(store, so._now())
        cap = sy.MailboxCap(URL, b"x" * 16, b"k" * 32)
        _take(sync, store, removed=(b"x" * 16,), seq=2)  # delays swapped the two payloads
        _take(sync, store, cap, seq=1)
        assert held.held(store, A2) == []
        # Owned again later (a pool mailbox that became a contact's between two checks): kept.
        _take(sync, store, cap, seq=3)
        assert held.held(store, A2) == [(URL, b"x" * 16, b"k" * 32)]
        _take(sync, store, removed=(b"x" * 16,), seq=2)  # an older removal: nothing changes
        assert held.held(store, A2) == [(URL, b"x" * 16, b"k" * 32)]
        with store.transaction():
            held.drop(store, A2, [i.to_bytes(16, "big") for i in range(held.GONE_PER_DEVICE + 5)],
                      9, so._now() + 1)  # fmt: skip
        assert store.query("SELECT COUNT(*) FROM device_caps_gone").fetchone()[0] == \
            held.GONE_PER_DEVICE  # bounded
    finally:
        store.close()


def test_a_check_that_fails_does_not_end_the_loop(tmp_path, monkeypatch):
    store, _, caps = _caps(tmp_path)
    monkeypatch.setattr(dc, "DEBOUNCE", 0.0)
    calls: list[int] = []

    def check() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a store error")
        return 0

    async def body() -> None:
        caps.check = check  # type: ignore[method-assign]
        task = asyncio.create_task(caps.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if calls:
                caps.changed()
            if len(calls) >= 2:
                break
        assert not task.done()
        task.cancel()

    try:
        asyncio.run(body())
        assert len(calls) >= 2
    finally:
        store.close()
