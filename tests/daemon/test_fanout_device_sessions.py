"""Sessions with a contact's devices on a real SQLCipher store (services/fanout.py, inbox.py,
docs/devices.md §5.2): which session stands when a contact's device opens one while this device
holds one with it, and held sessions' bounds."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from aegisd.core import devices as dv
from aegisd.core import pqxdh, wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import accept_first_contact, initiate_session
from aegisd.rpc import AppError
from aegisd.services import fanout as sf
from aegisd.services import inbox as si
from aegisd.services import rotation as rot
from aegisd.services.mailbox import ContactState, OwnedMailbox, address_to_bytes
from aegisd.store import KdfParams, Store, create_profile
from aegisd.store import contact_devices as cd
from aegisd.store.devices import SETTING_OWN_LIST, SETTING_SELF
from tests.support.parties import bob_with_store, make_pair
from tests.unit.test_core_backup import ALICE, MAILBOX

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
LOW, HIGH = bytes(16), b"\xff" * 16  # this device's ID, low or high
A1, A2 = b"\x40" * 16, b"\x80" * 16  # the contact's devices
A2_BOX = wire.MailboxAddress("wss://relay.example/v1/ws", b"2" * 16, b"t" * 32)
A2_NEW_BOX = wire.MailboxAddress("wss://relay.example/v1/ws", b"3" * 16, b"t" * 32)
EK = b"e" * 32  # the EK_A.pub of the session a contact's device opened
ME = IdentityKeyPair.generate(SystemEntropy())  # this device's identity (Alice is the contact)


def _entry(device_id: bytes) -> dv.DeviceEntry:
    return dv.DeviceEntry(device_id, MAILBOX, b"b" * 16, 5, device_id * 2)


def _host(store: Store) -> Any:
    return types.SimpleNamespace(
        store=store, entropy=SystemEntropy(),
        mailboxes=types.SimpleNamespace(peer_url_ok=lambda url: True),
        ctx=types.SimpleNamespace(events=types.SimpleNamespace(emit=lambda *a: None)),
        delivery=types.SimpleNamespace(wake=lambda: None), identity=lambda: ME,
    )  # fmt: skip


def _contact(store: Store, me: bytes) -> Any:
    c = store.add_contact("alice", identity_key=ALICE.public.to_bytes(),
                          state=ContactState(MAILBOX, True).to_bytes())  # fmt: skip
    listed = dv.DeviceList.sign(ALICE, 1_700_000_000_000, [_entry(A1), _entry(A2)])
    cd.put_list(store, c.id, listed.to_bytes(), listed.version, 1)
    cd.set_session_device(store, c.id, A1)
    store.put_session(c.id, b"the row, with A1")
    ours = OwnedMailbox("wss://relay.example/v1/ws", b"\1" * 32, b"\2" * 32, b"o" * 16,
                        b"d" * 16, b"r" * 32, b"")  # fmt: skip
    store.add_mailbox("contact", ours.to_bytes(), contact_id=c.id)
    store.set_setting(SETTING_SELF, me.hex())
    return store.get_contact(c.id)


def _session_with_a2(store: Store, c: Any) -> cd.DeviceSession:
    return next(s for s in cd.device_sessions(store, c.id) if s.device_id == A2)


def _opened_by_us(store: Store, fanout: sf.Fanout, c: Any) -> bytes:
    """A session this device opened with A2 (fanout._open's bookkeeping), not answered."""
    with store.transaction():
        cd.put_device_session(store, c.id, A2, b"the session we opened", 1)
        fanout._mark_opened(c.id, A2, True)
    return b"the session we opened"


def test_the_lower_id_keeps_its_unanswered_session_the_higher_adopts(tmp_path):
    for me, kept_ours in ((LOW, True), (HIGH, False)):
        store = create_profile(tmp_path / me.hex()[:2], None, FAST)
        try:
            fanout = sf.Fanout(_host(store))
            c = _contact(store, me)
            ours = _opened_by_us(store, fanout, c)
            theirs = make_pair().a
            with store.transaction():
                fanout._adopt(c, theirs, A2, A2_BOX, EK)
            got = _session_with_a2(store, c)
            assert (got.state == ours) is kept_ours
            assert (got.send_to is None) is kept_ours  # adopted: answered, deposited to
        finally:
            store.close()


def test_a_new_first_contact_replaces_an_answered_or_adopted_session(tmp_path):
    """The lower ID does not keep a session the other device no longer has: one it adopted,
    or one it opened that was answered (the other device lost its state and opened anew)."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        fanout = sf.Fanout(_host(store))
        c = _contact(store, LOW)
        # Opened by us and answered by A2.
        _opened_by_us(store, fanout, c)
        with store.transaction():
            fanout._answered(c, A2, A2_BOX)  # answered and proven (test_device_answers.py)
        assert not fanout._opened_unanswered(c.id, A2)
        fresh = make_pair().a
        with store.transaction():
            fanout._adopt(c, fresh, A2, A2_NEW_BOX, EK)
        got = _session_with_a2(store, c)
        assert got.state == fresh.to_bytes() and got.send_to == address_to_bytes(A2_NEW_BOX)
        # Adopted (that one): A2 loses it again and opens another: that one stands.
        again = make_pair().a
        with store.transaction():
            fanout._adopt(c, again, A2, A2_BOX, EK)
        got = _session_with_a2(store, c)
        assert got.state == again.to_bytes() and got.send_to == address_to_bytes(A2_BOX)
    finally:
        store.close()


@pytest.mark.parametrize("linked", [True, False])
def test_a_first_session_of_a_linked_device_keeps_its_prekeys_until_the_row_commits(
    tmp_path, linked
):
    """H2: a linked device (its contacts came by the link, without sessions) takes a contact
    device's first contact as the contact's row; the relay failing before the row is stored
    must leave the burnt one-time prekeys unsaved, so that the block delivered again opens.
    A device with no list of its own (not linked) does not take it as the row: it goes on as
    a nameless hello (0x03) would, to the request path."""
    entropy = SystemEntropy()
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        if linked:
            store.set_setting(SETTING_OWN_LIST, "00")  # only its presence is read here
        _us, prekeys, xs, kems = bob_with_store(entropy)
        store.put_identity(prekeys.to_bytes())
        them = IdentityKeyPair.generate(entropy)
        c = store.add_contact("alice", identity_key=them.public.to_bytes(),
                              state=ContactState(None, True).to_bytes())  # fmt: skip
        bundle = pqxdh.verify_bundle(prekeys.bundle_base().to_bytes(), xs[0], kems[0])

        def hello(ek: bytes) -> bytes:
            signed = dv.DeviceHello.sign(b"k" * 32, them.public, A2, A2_BOX, 1, ek)
            return dv.encode_device_payload(signed)

        _, block = initiate_session(entropy, them, bundle, hello)
        fc = accept_first_contact(entropy, prekeys, block)  # burns the one-time keys
        payload = dv.decode_device_payload(fc.fragment.data)

        async def relay_gone(*_a: Any, **_k: Any) -> Any:
            raise AppError(1000, "relay_unavailable", "the relay went away")

        host = _host(store)
        host.prekeys = prekeys
        host.contacts = types.SimpleNamespace(with_identity=lambda _k: store.get_contact(c.id))
        host.mailboxes.create = relay_gone
        host.fanout = sf.Fanout(host)
        first = si.Inbox(host).first_contacts
        row = types.SimpleNamespace(role="address")
        if not linked:
            got = asyncio.run(first._first_contact_of_device(row, block, fc, payload))
            assert isinstance(got, wire.HelloPayload) and got.reply_to == A2_BOX
            return
        with pytest.raises(AppError):
            asyncio.run(first._first_contact_of_device(row, block, fc, payload))
        assert store.get_session(c.id) is None
        stored = store.get_identity()
        assert stored is not None
        again = accept_first_contact(entropy, PrekeyStore.from_bytes(stored), block)
        assert again.sender == fc.sender
    finally:
        store.close()


KEY_1 = dv.new_device_key(SystemEntropy())


def _full_host(store: Store) -> Any:
    host = _host(store)
    host.delivery = types.SimpleNamespace(wake=lambda: None, enqueue=lambda *a, **k: None,
                                          receipt_delay=lambda: 0.0)  # fmt: skip
    host.spawn = lambda coro: coro.close()  # no relay here: nothing is opened
    return host


def test_a_hello_before_its_list_is_held_and_taken_when_the_list_comes(tmp_path):
    """M1: the signer sends its list then its hello once; the hello arriving first must not be
    lost, or the row's device stays unknown and no session opens with the other devices."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        c = store.add_contact("alice", identity_key=ALICE.public.to_bytes(),
                              state=ContactState(MAILBOX, True).to_bytes())  # fmt: skip
        store.put_session(c.id, b"the row, a session from before the list")
        fanout = sf.Fanout(_full_host(store))
        e1 = dv.DeviceEntry(A1, MAILBOX, b"b" * 16, 5, KEY_1[1])
        listed = dv.DeviceList.sign(ALICE, sf._now() * 1000, [e1, _entry(A2)])
        hello = dv.DeviceHello.sign(KEY_1[0], ALICE.public, A1, A2_BOX, listed.version,
                                    sf.LEGACY_EK)  # fmt: skip
        # A made-up hello naming a list from the future is not kept.
        future = dv.DeviceHello.sign(KEY_1[0], ALICE.public, A1, A2_BOX, 2**63 - 1, sf.LEGACY_EK)
        with store.transaction():
            fanout.on_payload(c, Any, future, None)
        assert store.get_setting(sf.SETTING_EARLY_HELLO) is None
        with store.transaction():
            fanout.on_payload(c, Any, hello, None)  # before the list: held
        assert cd.held_list(store, c.id) is None
        with store.transaction():
            fanout.on_payload(c, Any, listed, None)
        held = cd.held_list(store, c.id)
        assert held is not None and held.session_device == A1
        assert store.get_setting(sf.SETTING_EARLY_HELLO) is None
    finally:
        store.close()


def test_held_sessions_are_bounded_by_the_clock_expiry_and_the_contact(tmp_path):
    """M3: a held session naming a list from the future is not kept; expired ones go at
    unlock; a removed contact's go with it."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        c = _contact(store, LOW)
        fanout = sf.Fanout(_full_host(store))
        pair = make_pair()
        future = dv.DeviceHello.sign(KEY_1[0], ALICE.public, b"\x99" * 16, A2_BOX, 2**63 - 1,
                                     bytes(32))  # fmt: skip
        with store.transaction():
            fanout._hold(c.id, pair.a, future, bytes(32))
        assert store.get_setting(sf.SETTING_HELD) is None
        hello = dv.DeviceHello.sign(KEY_1[0], ALICE.public, b"\x99" * 16, A2_BOX, sf._now() * 1000,
                                    bytes(32))  # fmt: skip
        with store.transaction():
            fanout._hold(c.id, pair.a, hello, bytes(32))
            fanout._hold(c.id + 1, pair.a, hello, bytes(32))
        held = store.get_setting(sf.SETTING_HELD)
        assert set(held) == {str(c.id), str(c.id + 1)}
        held[str(c.id + 1)][0][4] = sf._now() - sf.HELD_FOR  # expired
        store.set_setting(sf.SETTING_HELD, held)
        fanout.purge_held()
        assert set(store.get_setting(sf.SETTING_HELD)) == {str(c.id)}
        with store.transaction():
            fanout.forget(c.id)
        assert store.get_setting(sf.SETTING_HELD) is None
    finally:
        store.close()


def test_a_rotation_waits_for_a_device_no_longer_than_the_bound(tmp_path):
    """M2: a device of the contact that never acknowledges (never back, not removed) stalls
    the rotation only until MOVE_BOUND_MS (the relay's message TTL)."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        c = _contact(store, LOW)
        cd.put_device_session(store, c.id, A2, b"the session with A2", 1)
        cd.set_device_send_to(store, c.id, A2, address_to_bytes(A2_BOX))
        now = rot._ms()
        pending = {"id": "00", "old": 1, "new": 2, "devices": [A2.hex()], "went": [A2.hex()],
                   "acked": True, "at": now}  # fmt: skip
        assert rot.awaiting_devices(store, c.id, pending) == [A2.hex()]
        overdue = {**pending, "at": now - rot.MOVE_BOUND_MS - 1}
        assert rot.awaiting_devices(store, c.id, overdue) == []
    finally:
        store.close()


def test_the_rows_acknowledgement_follows_the_session_that_replaces_it(tmp_path):
    """M2: when a listed device's session takes the row's place (the row's device left the
    list), the rotation's acknowledgement is that device's: given if it acknowledged in its
    own session, awaited if not (it would otherwise wait for a device no longer there, or
    be taken from a device that never saw the new mailbox)."""
    for a2_acked in (True, False):
        store = create_profile(tmp_path / str(a2_acked), None, FAST)
        try:
            c = _contact(store, LOW)
            pair = make_pair()
            cd.put_device_session(store, c.id, A2, pair.a.to_bytes(), 1)
            cd.set_device_send_to(store, c.id, A2, address_to_bytes(A2_BOX))
            key = f"{rot.ROTATION_KEY}{c.id}"
            store.set_setting(key, {"id": "00", "old": 1, "new": 2, "went": [A2.hex()],
                                    "devices": [] if a2_acked else [A2.hex()],
                                    "at": rot._ms()})  # fmt: skip
            # A list without A1, the row's device.
            new = dv.DeviceList.sign(ALICE, 1_700_000_000_001, [_entry(A2)])
            cd.put_list(store, c.id, new.to_bytes(), new.version, 2)
            fanout = sf.Fanout(_full_host(store))
            with store.transaction():
                fanout._replace_row_session(store.get_contact(c.id), pair.a, A2, A1)
            held = cd.held_list(store, c.id)
            assert held is not None and held.session_device == A2
            pending = store.get_setting(key)
            assert bool(pending.get("acked")) is a2_acked
            assert pending["devices"] == []
        finally:
            store.close()


def test_our_own_list_from_a_contact_goes_to_own_sync(tmp_path):
    """A contact answers our request for the list it holds of us (§28.3) with our own list: it
    is taken as an own list (own_sync), not checked as the contact's (it would be refused as
    forged): so a device whose sync session with the signer is down learns of a removal."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        host = _host(store)
        taken: list[dv.DeviceList] = []
        host.own_sync = types.SimpleNamespace(take_own_list=taken.append)
        fanout = sf.Fanout(host)
        c = _contact(store, LOW)
        ours = dv.DeviceList.sign(ME, 1_700_000_000_000, [_entry(LOW)])
        with store.transaction():
            fanout.on_payload(c, make_pair().a, ours, None)
        assert taken == [ours]
        held = cd.held_list(store, c.id)
        assert held is not None  # the contact's list held is not replaced by ours
        assert dv.DeviceList.from_bytes(held.data).ids() == {A1, A2}
    finally:
        store.close()
