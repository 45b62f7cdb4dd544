"""Sync between own devices on a real SQLCipher store (services/own_sync.py, docs/devices.md
§6): a session this device opened and the other never answered is opened again, and what
waits for it stays bounded; a synced contact change is recorded as applied only in the
transaction that applies it; a change from the wrong device or dated far ahead is refused;
a request from the contact, accepted over sync, takes the change's flags; a group's member
is not made a second contact; a removed device's blocks are each counted but reported once;
a backup's import leaves no sync session behind."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core import sync as sy
from aegisd.core.identity import PublicIdentity, keys_of
from aegisd.rpc import AppError
from aegisd.services import device_reset
from aegisd.services import own_sync as so
from aegisd.services.mailbox import ContactState
from aegisd.store import KdfParams, Store, create_profile
from aegisd.store import groups as group_store
from aegisd.store import own_sync as rows
from aegisd.store.db import Contact
from tests.unit.test_core_backup import ALICE, BOB, MAILBOX, E

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
A1, A2 = bytes([1]) * 16, bytes([2]) * 16
BOB_KEYS = keys_of(BOB.public.to_bytes())


class _Contacts:
    """The contacts service's part own_sync uses, on the store (remove_locked as contacts.py:
    ``then`` inside the removal's transaction)."""

    def __init__(self, store: Store) -> None:
        self.store, self.fail = store, False

    def with_identity(self, identity: PublicIdentity) -> Contact | None:
        return next((c for c in self.store.list_contacts()
                     if c.identity_key == identity.to_bytes()), None)  # fmt: skip

    def unique_name(self, wanted: str) -> str:
        return wanted

    async def accept_request(self, request_id: int, name: str | None) -> dict[str, Any]:
        row = self.store.get_request(request_id)
        if self.fail or row is None:
            raise AppError(1000, "gone", "no such request")
        with self.store.transaction():
            self.store.delete_request(request_id)
            self.store.add_contact(name or "x", identity_key=row.identity_key)
        return {}

    async def remove_locked(self, c: Contact, then: Any = None) -> None:
        if self.fail:
            raise AppError(1000, "gone", "the relay refused")  # as stop_contact may
        with self.store.transaction():
            self.store.remove_contact(c.id)
            if then is not None:
                then()


def _sync(tmp_path: Any) -> tuple[Store, so.OwnSync, list[Any], _Contacts]:
    store = create_profile(tmp_path / "p", None, FAST)
    entries = [dv.DeviceEntry(d, MAILBOX, b"b" * 16, 5, d * 2) for d in (A1, A2)]
    listed = dv.DeviceList.sign(ALICE, 1_700_000_000_000, entries)
    store.set_setting(so.SETTING_OWN_LIST, listed.to_bytes().hex())
    store.set_setting(so.SETTING_SELF, A1.hex())
    store.set_setting(so.SETTING_KEY, (b"k" * 32).hex())
    spawned: list[Any] = []
    contacts = _Contacts(store)
    emitted: list[tuple[str, Any]] = []
    events = types.SimpleNamespace(emit=lambda kind, data: emitted.append((kind, data)))
    host = types.SimpleNamespace(
        ctx=types.SimpleNamespace(store=store, events=events, emitted=emitted), store=store,
        identity=lambda: ALICE, entropy=E, lock=asyncio.Lock(), contacts=contacts,
        delivery=types.SimpleNamespace(wake=lambda: None, receipt_delay=lambda: 0.0,
                                       drop_outbox_of=lambda *a: None),
        spawn=spawned.append,
        disappearing=types.SimpleNamespace(woken=0, wake=lambda: _woken(host)),
        sync_actions=types.SimpleNamespace(arrived=lambda message_id: None),
    )  # fmt: skip
    return store, so.OwnSync(host), spawned, contacts


def _woken(host: Any) -> None:
    host.disappearing.woken += 1


def _open_row(store: Store, opened_at: int) -> None:
    mb = store.add_mailbox("contact", b"descriptor")
    rows.put(store, A2, b"the session", mb, None, b"e" * 32, opened_at)


def test_an_unanswered_session_is_opened_again_and_its_payloads_wait_bounded(tmp_path):
    store, sync, _, _ = _sync(tmp_path)
    try:
        _open_row(store, so._now())
        assert sync._to_open() == []  # just opened: the answer may still come
        with store.transaction():
            for i in range(rows.WAITING_PER_DEVICE + 5):
                sync._send(b"payload %d" % i)
        # Not sealed into the outbox for ever: kept, the oldest going past the bound.
        assert store.outbox_size() == 0
        waiting = store.query("SELECT COUNT(*) FROM sync_waiting WHERE device_id = ?",
                              (A2,)).fetchone()[0]  # fmt: skip
        assert waiting == rows.WAITING_PER_DEVICE
        _open_row(store, so._now() - so.OPEN_TIMEOUT)  # never answered (hello lost)
        assert [e.device_id for e in sync._to_open()] == [A2]
        sync._reopens[A2] = 1  # reopened once already: the next waits twice as long
        assert sync._to_open() == []
    finally:
        store.close()


def _bob(store: Store) -> Contact:
    return store.add_contact("bob", identity_key=BOB.public.to_bytes(),
                             state=ContactState(None, False).to_bytes())  # fmt: skip


def _item(at: int, *, removed: bool = False, blocked: bool = False,
          device: bytes = A2) -> sy.ContactItem:  # fmt: skip
    return sy.ContactItem(BOB.public.to_bytes(), at, device, "bob", True, blocked, removed)


def test_a_synced_removal_is_recorded_only_with_the_removal(tmp_path):
    store, sync, spawned, contacts = _sync(tmp_path)
    try:
        c = _bob(store)
        now_ms = so._now() * 1000
        with store.transaction():
            sync._contact(_item(now_ms, removed=True), c)
        assert rows.contact_clock(store, BOB_KEYS) is None  # not yet applied: not recorded
        contacts.fail = True
        with pytest.raises(AppError):
            asyncio.run(spawned.pop())
        assert rows.contact_clock(store, BOB_KEYS) is None and store.get_contact(c.id)
        # Sent again (or a newer removal): applied and recorded together.
        contacts.fail = False
        with store.transaction():
            sync._contact(_item(now_ms, removed=True), c)
        asyncio.run(spawned.pop())
        assert store.get_contact(c.id) is None
        assert rows.contact_clock(store, BOB_KEYS) == (now_ms, A2)
    finally:
        store.close()


def test_a_late_removal_spares_a_newer_change(tmp_path):
    store, sync, spawned, _ = _sync(tmp_path)
    try:
        c = _bob(store)
        now_ms = so._now() * 1000
        with store.transaction():
            sync._contact(_item(now_ms, removed=True), c)
            sync._contact(_item(now_ms + 1, blocked=True), c)  # newer: blocked, kept
        asyncio.run(spawned.pop())
        kept = store.get_contact(c.id)
        assert kept is not None and kept.blocked and kept.verified
        assert rows.contact_clock(store, BOB_KEYS) == (now_ms + 1, A2)
    finally:
        store.close()


def test_a_change_from_another_device_or_far_ahead_is_refused(tmp_path):
    store, sync, _, _ = _sync(tmp_path)
    try:
        c = _bob(store)
        _open_row(store, so._now())
        row = rows.get(store, A2)
        own = sync._own()
        assert row is not None and own is not None
        for item in (_item(2**63 - 1, blocked=True), _item(so._now() * 1000, blocked=True,
                                                          device=A1)):  # fmt: skip
            with store.transaction():
                sync._on_content(row, own, sy.encode_sync_payload(item))
            assert rows.contact_clock(store, BOB_KEYS) is None
            assert not store.get_contact(c.id).blocked
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(_item(so._now() * 1000,
                                                                    blocked=True)))
        assert store.get_contact(c.id).blocked
    finally:
        store.close()


def test_a_request_accepted_over_sync_takes_the_flags_and_records_once_applied(tmp_path):
    store, sync, spawned, contacts = _sync(tmp_path)
    try:
        store.add_request(BOB.public.to_bytes(), "bob", b"session", b"reply")
        now_ms = so._now() * 1000
        contacts.fail = True  # the accept fails (no mailbox at the relay, say)
        with store.transaction():
            sync._contact(_item(now_ms), None)
        asyncio.run(spawned.pop())
        assert store.list_contacts() == [] and rows.contact_clock(store, BOB_KEYS) is None
        contacts.fail = False
        with store.transaction():  # sent again, and a newer change before the accept runs
            sync._contact(_item(now_ms), None)
            sync._contact(_item(now_ms + 1, blocked=True), None)
        first, second = spawned
        asyncio.run(second)  # the newer one's accept runs first
        asyncio.run(first)  # finds no request; older: ignored
        [bob] = store.list_contacts()
        assert bob.verified and bob.blocked
        assert rows.contact_clock(store, BOB_KEYS) == (now_ms + 1, A2)
    finally:
        store.close()


def test_a_request_rejected_on_another_device_goes_here_too(tmp_path):
    """requests.reject on A2 is sent as the identity removed (0x46): A1's request of that
    identity goes, and nothing is added; a request of someone else stays."""
    store, sync, spawned, _ = _sync(tmp_path)
    try:
        store.add_request(BOB.public.to_bytes(), "bob", b"session", b"reply")
        other = store.add_request(ALICE.public.to_bytes(), "alice", b"session", b"reply")
        with store.transaction():
            sync._contact(_item(so._now() * 1000, removed=True), None)
        assert [r.id for r in store.list_requests()] == [other]
        assert store.list_contacts() == [] and spawned == []
    finally:
        store.close()


def test_a_groups_member_is_not_made_a_second_contact(tmp_path):
    store, sync, _, _ = _sync(tmp_path)
    try:
        c = _bob(store)
        group_store.mark_group_contact(store, c.id)
        _open_row(store, so._now())
        row, own = rows.get(store, A2), sync._own()
        assert row is not None and own is not None
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(_item(so._now() * 1000)))
        assert [x.id for x in store.list_contacts()] == [c.id]
    finally:
        store.close()


def test_a_removed_devices_blocks_are_reported_once(tmp_path):
    store, sync, _, _ = _sync(tmp_path)
    try:
        _open_row(store, so._now())
        row = rows.get(store, A2)
        assert row is not None and row.mailbox_id is not None
        rows.mark_removed(store, A2, so._now())
        for _ in range(5):
            sync.receive(row.mailbox_id, b"a block from the removed device")
        refused = [d for k, d in sync.m.ctx.emitted
                   if k == "devices.sync" and d["state"] == "refused"]  # fmt: skip
        assert refused == [{"device": A2.hex(), "state": "refused"}]
    finally:
        store.close()


def test_an_import_leaves_no_sync_session_of_the_discarded_identity(tmp_path):
    store, _, _, _ = _sync(tmp_path)
    try:
        _open_row(store, so._now())
        with store.transaction():
            rows.wait_for_session(store, A2, b"waits for the answer", so._now())
            store.enqueue_blocks(rows.pending_destination(A2), [b"sealed by an older daemon"],
                                 not_before=2**62)  # fmt: skip
            rows.set_contact_clock(store, BOB_KEYS, 1, A2)
        host = types.SimpleNamespace(store=store, entropy=E)
        with store.transaction():
            device_reset.restore(host, fmt.BackupDevices(), None)
        assert rows.rows(store) == [] and store.outbox_size() == 0
        assert rows.take_waiting(store, A2) == [] and rows.contact_clock(store, BOB_KEYS) is None
    finally:
        store.close()


def test_a_synced_transcript_or_read_mark_wakes_the_disappearing_runner(tmp_path):
    store, sync, _, _ = _sync(tmp_path)
    try:
        c = _bob(store)
        _open_row(store, so._now())
        row, own = rows.get(store, A2), sync._own()
        assert row is not None and own is not None
        sent = sy.SentTranscript(BOB.public.to_bytes(), b"m" * 16, so._now() * 1000, "hi")
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(sent))
        assert sync.m.disappearing.woken == 1  # the transcript's deadline, if a timer runs
        got = store.add_message(c.id, "in", "read me", status="received", message_id="ab" * 16)
        with store.transaction():
            sync._on_content(row, own, sy.encode_sync_payload(
                sy.ReadUpTo(BOB.public.to_bytes(), bytes.fromhex(got.id))))
        assert sync.m.disappearing.woken == 2  # read: its timer runs from now
    finally:
        store.close()
