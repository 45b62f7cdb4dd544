"""A session this device opened with a contact's listed device is deposited to only once that
device proved its device key in it (services/device_answers.py, docs/devices.md §5.2), on a
real SQLCipher store: a removed device that still holds the identity key and answers in a
listed device's place (its bundle served at that device's address by a colluding relay) gets
nothing."""

from __future__ import annotations

import types
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.services import device_answers
from aegisd.services import fanout as sf
from aegisd.services.mailbox import ContactState, address_to_bytes
from aegisd.store import KdfParams, Store, create_profile
from aegisd.store import contact_devices as cd
from tests.support.parties import make_pair

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
E = SystemEntropy()
URL = "wss://relay.example/v1/ws"
A1, A2 = b"\x40" * 16, b"\x80" * 16
ANSWER = wire.MailboxAddress(URL, b"a" * 16, b"t" * 32)  # the mailbox A2 answers with
ELSEWHERE = wire.MailboxAddress(URL, b"z" * 16, b"t" * 32)


def _box(n: int) -> wire.MailboxAddress:
    return wire.MailboxAddress(URL, bytes([n]) * 16, b"t" * 32)


class _Person:
    """Alice: the identity, two listed devices with their device keys, and a removed one that
    kept the identity key (it signs with its own device key, the only one it has)."""

    def __init__(self) -> None:
        self.identity = IdentityKeyPair.generate(E)
        self.keys = {d: dv.new_device_key(E) for d in (A1, A2, b"\xee" * 16)}
        entries = [dv.DeviceEntry(d, _box(i), bytes([i]) * 16, 5, self.keys[d][1])
                   for i, d in enumerate((A1, A2), 1)]  # fmt: skip
        self.listed = dv.DeviceList.sign(self.identity, 1_700_000_000_000, entries)

    def hello(self, signer: bytes, named: bytes, ek: bytes) -> dv.DeviceHello:
        return dv.DeviceHello.sign(self.keys[signer][0], self.identity.public, named, ELSEWHERE,
                                   self.listed.version, ek)  # fmt: skip


def _setup(tmp_path: Any) -> tuple[Store, sf.Fanout, Any, _Person]:
    store = create_profile(tmp_path / "p", None, FAST)
    alice = _Person()
    host = types.SimpleNamespace(
        store=store, entropy=E, identity=lambda: IdentityKeyPair.generate(E),
        mailboxes=types.SimpleNamespace(peer_url_ok=lambda url: True),
        ctx=types.SimpleNamespace(events=types.SimpleNamespace(emit=lambda *a: None)),
        delivery=types.SimpleNamespace(wake=lambda: None, enqueue=lambda *a, **k: None,
                                       receipt_delay=lambda: 0.0),
        spawn=lambda coro: coro.close(),
    )  # fmt: skip
    c = store.add_contact("alice", identity_key=alice.identity.public.to_bytes(),
                          state=ContactState(_box(1), True).to_bytes())  # fmt: skip
    cd.put_list(store, c.id, alice.listed.to_bytes(), alice.listed.version, 1)
    cd.set_session_device(store, c.id, A1)
    store.put_session(c.id, make_pair().a.to_bytes())
    return store, sf.Fanout(host), store.get_contact(c.id), alice


def _opened(store: Store, c: Any, ek: bytes) -> None:
    """fanout._open's bookkeeping for a session opened with A2 whose EK_A.pub is ``ek``."""
    with store.transaction():
        cd.put_device_session(store, c.id, A2, make_pair().a.to_bytes(), 1)
        device_answers.opened(store, c.id, A2, ek)


def _send_to(store: Store, c: Any) -> bytes | None:
    return next(s.send_to for s in cd.device_sessions(store, c.id) if s.device_id == A2)


def _hello(fanout: sf.Fanout, store: Store, c: Any, hello: dv.DeviceHello) -> None:
    with store.transaction():
        fanout.on_payload(c, make_pair().a, hello, A2)


def test_an_answer_without_the_listed_devices_proof_is_not_deposited_to(tmp_path: Any) -> None:
    store, fanout, c, alice = _setup(tmp_path)
    try:
        ek = E.random(32)
        _opened(store, c, ek)
        with store.transaction():
            fanout.device_answered(c, A2, ANSWER)
        assert _send_to(store, c) is None  # an answer alone: anyone holding IK could give it
        # The removed device (it holds the identity key, not A2's device key) naming A2:
        _hello(fanout, store, c, alice.hello(b"\xee" * 16, A2, ek))
        # A2's own proof, but of another session (replayed), or bound to no session:
        _hello(fanout, store, c, alice.hello(A2, A2, E.random(32)))
        _hello(fanout, store, c, alice.hello(A2, A2, sf.LEGACY_EK))
        # A1 proving itself in A2's session is not A2:
        _hello(fanout, store, c, alice.hello(A1, A1, ek))
        assert _send_to(store, c) is None
        _hello(fanout, store, c, alice.hello(A2, A2, ek))
        # Deposited to at the answer's mailbox (the hello's own is not used).
        assert _send_to(store, c) == address_to_bytes(ANSWER)
        assert not fanout._opened_unanswered(c.id, A2)
    finally:
        store.close()


def test_a_proof_that_comes_before_its_answer_waits_for_it_across_a_restart(
        tmp_path: Any) -> None:  # fmt: skip
    store, fanout, c, alice = _setup(tmp_path)
    try:
        ek = E.random(32)
        _opened(store, c, ek)
        _hello(fanout, store, c, alice.hello(A2, A2, ek))
        assert _send_to(store, c) is None
        fanout = sf.Fanout(fanout.m)  # a restart: what was kept is in the store
        with store.transaction():
            fanout.device_answered(c, A2, ANSWER)
        assert _send_to(store, c) == address_to_bytes(ANSWER)
    finally:
        store.close()


def test_a_reopened_session_needs_its_own_answer_and_a_dropped_device_leaves_nothing(
        tmp_path: Any) -> None:  # fmt: skip
    store, fanout, c, alice = _setup(tmp_path)
    try:
        old = E.random(32)
        _opened(store, c, old)
        _hello(fanout, store, c, alice.hello(A2, A2, old))  # a proof, its answer lost
        _opened(store, c, E.random(32))  # reopened: the old proof does not answer the new one
        with store.transaction():
            fanout.device_answered(c, A2, ANSWER)
        assert _send_to(store, c) is None
        # A list without A2: what was kept for it goes.
        without = dv.DeviceList.sign(alice.identity, alice.listed.version + 1,
                                     [alice.listed.devices[0]])  # fmt: skip
        with store.transaction():
            fanout.on_payload(c, make_pair().a, without, None)
        for name in (device_answers.SETTING_SESSION_EKS, device_answers.SETTING_ANSWERS,
                     device_answers.SETTING_PROOFS):
            assert not (store.get_setting(name) or {}).get(str(c.id))
    finally:
        store.close()
