"""The contact's session row after a reset of the person's devices (docs/devices.md §10), on a
real SQLCipher store: a contact whose sessions with the old devices survived the renewal (one
on the code before the reset was defined drops none of them) must not give the renewed row
back to an old device when the restored device's list arrives (services/fanout.py)."""

from __future__ import annotations

import types
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.services import fanout as sf
from aegisd.services.mailbox import ContactState, address_to_bytes
from aegisd.store import KdfParams, create_profile
from aegisd.store import contact_devices as cd
from tests.unit.test_core_backup import ALICE, MAILBOX

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
A1, A2, A3 = (bytes([i]) * 16 for i in (1, 2, 3))
A2_BOX = wire.MailboxAddress("wss://relay.example/v1/ws", b"2" * 16, b"t" * 32)


def _entry(device_id: bytes) -> dv.DeviceEntry:
    return dv.DeviceEntry(device_id, MAILBOX, b"b" * 16, 5, device_id * 2)


def test_an_old_devices_session_never_replaces_the_renewed_row(tmp_path):
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        renewed = ContactState(MAILBOX, True).to_bytes()
        c = store.add_contact("alice", identity_key=ALICE.public.to_bytes(), state=renewed)
        old = dv.DeviceList.sign(ALICE, 1_700_000_000_000, [_entry(A1), _entry(A2)])
        cd.put_list(store, c.id, old.to_bytes(), old.version, 1)
        cd.set_session_device(store, c.id, A1)
        # The session with A2 survived the renewal; the row is the restored device's (A3).
        cd.put_device_session(store, c.id, A2, b"the session with A2", 1)
        cd.set_device_send_to(store, c.id, A2, address_to_bytes(A2_BOX))
        store.put_session(c.id, b"the renewed session with A3")
        # A3's list arrives (fanout.on_payload stores it first): A1, the row's device, left.
        new = dv.DeviceList.sign(ALICE, old.version + 1, [_entry(A3)])
        cd.put_list(store, c.id, new.to_bytes(), new.version, 2)
        fanout = sf.Fanout(types.SimpleNamespace(store=store))
        session: Any = object()
        got = fanout._replace_row_session(store.get_contact(c.id), session, None, A1)
        assert got == (session, A1)  # the row stays: no listed device answered
        assert store.get_session(c.id) == b"the renewed session with A3"
        assert ContactState.from_bytes(store.get_contact(c.id).state).send_to == MAILBOX
        held = cd.held_list(store, c.id)
        assert held is not None and held.session_device == A1
    finally:
        store.close()
