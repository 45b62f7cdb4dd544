"""The proven answer is per session (services/device_answers.py, docs/devices.md §5.2), with
real PQXDH and ratchet sessions through the inbox on a real SQLCipher store: a removed device X
(it holds the identity key, not A2's device key) to which a colluding relay handed one of the
sessions this device opened with A2 (its bundle served at A2's bundle address) never gets
anything deposited for A2, whichever session it answers in and whatever A2's proofs of other
sessions say (found by a review: both ways worked before)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.core import devices as dv
from aegisd.core import pqxdh, wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session
from aegisd.services import device_answers
from aegisd.services.fanout import Fanout
from aegisd.services.inbox import Inbox
from aegisd.services.mailbox import ContactState, OwnedMailbox, address_to_bytes
from aegisd.store import KdfParams, Store, create_profile
from aegisd.store import contact_devices as cd
from tests.support.parties import bob_with_store, make_pair

URL = "ws://127.0.0.1:1/v1/ws"
E = SystemEntropy()
A2 = b"\x02" * 16
FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def _box(n: int) -> wire.MailboxAddress:
    return wire.MailboxAddress(URL, bytes([n]) * wire.RELAY_ID_LEN, b"t" * 32)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = create_profile(tmp_path / "p", None, FAST)
    yield s
    s.close()


class _World:
    """This device opened s1 with "A2", then, unanswered, reopened s2; one of the two went to
    the real A2, the other to X (the relay served X's bundle: the same identity signs both)."""

    def __init__(self, store: Store) -> None:
        me = IdentityKeyPair.generate(E)
        ident, prekeys, xs, kems = bob_with_store(E, one_time=2)

        def open_one(i: int) -> tuple[Session, Session, bytes]:
            bundle = pqxdh.verify_bundle(prekeys.bundle_base().to_bytes(), xs[i], kems[i],
                                         ident.public)  # fmt: skip
            ours, block = initiate_session(E, me, bundle, b"hello")
            ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
            return ours, accept_first_contact(E, prekeys, block).session, ek

        s1, self.far1, self.ek1 = open_one(0)
        s2, self.far2, self.ek2 = open_one(1)
        self.ident = ident
        self.priv, pub = dv.new_device_key(E)
        self.store = store
        c = store.add_contact("alice", identity_key=ident.public.to_bytes(),
                              state=ContactState(_box(1), True).to_bytes())  # fmt: skip
        self.listed = dv.DeviceList.sign(ident, 1_700_000_000_000,
                                         [dv.DeviceEntry(A2, _box(9), b"b" * 16, 5, pub)])
        cd.put_list(store, c.id, self.listed.to_bytes(), self.listed.version, 1)
        store.put_session(c.id, make_pair().a.to_bytes())  # the row: with another device
        self.cid = c.id
        ctx = SimpleNamespace(store=store, events=SimpleNamespace(emit=lambda t, p: None))
        fan = Fanout(SimpleNamespace(  # type: ignore[arg-type]
            ctx=ctx, store=store, entropy=E, identity=lambda: me,
            mailboxes=SimpleNamespace(peer_url_ok=lambda u: True),
            delivery=SimpleNamespace(receipt_delay=lambda: 0.0, wake=lambda: None,
                                     enqueue=lambda *a, **k: None)))  # fmt: skip
        with store.transaction():
            cd.put_device_session(store, c.id, A2, s2.to_bytes(), int(time.time()))
            fan._keep_superseded(c.id, A2, s1.to_bytes(), self.ek1)
            device_answers.opened(store, c.id, A2, self.ek2)
        self.inbox = Inbox(SimpleNamespace(  # type: ignore[arg-type]
            store=store, entropy=E, fanout=fan, ctx=ctx,
            cover=SimpleNamespace(heard=lambda cid: None),
            mailboxes=SimpleNamespace(peer_url_ok=lambda u: True)))  # fmt: skip

    def answer(self, far: Session, n: int) -> None:
        payload = wire.encode_payload(wire.HelloPayload(_box(n), "", b""))
        [blk] = far.encrypt(E, payload)
        self.inbox._receive_from_contact(self.cid, blk)

    def proof(self, far: Session, ek: bytes) -> None:
        """A2's proof (only A2 holds its device key) bound to ``ek``, sent in ``far``."""
        hello = dv.DeviceHello.sign(self.priv, self.ident.public, A2, _box(77),
                                    self.listed.version, ek)  # fmt: skip
        [blk] = far.encrypt(E, dv.encode_device_payload(hello))
        self.inbox._receive_from_contact(self.cid, blk)

    def send_to(self) -> bytes | None:
        [ds] = cd.device_sessions(self.store, self.cid)
        return ds.send_to


def test_x_answering_the_session_a_reopening_replaced_takes_nothing_from_a2(
        store: Store) -> None:  # fmt: skip
    w = _World(store)
    x, a2 = w.far1, w.far2  # s1 went to X, the reopening s2 to the real A2
    w.answer(a2, 8)
    w.proof(a2, w.ek2)
    assert w.send_to() == address_to_bytes(_box(8))
    w.answer(x, 66)  # X answers s1, which becomes the device's session (it decrypted)
    assert w.send_to() is None  # not proven: nothing for A2 goes to X
    # X cannot prove: A2's proof of s2 replayed by the relay does not open in s1, and one
    # bound to s1 needs A2's key. A2 writing again in s2 brings its proven mailbox back.
    w.answer(a2, 8)
    assert w.send_to() == address_to_bytes(_box(8))


def test_a2s_proof_of_one_session_proves_no_answer_in_another(store: Store) -> None:
    w = _World(store)
    a2, x = w.far1, w.far2  # s1 went to the real A2, the reopening s2 to X
    w.proof(a2, w.ek1)  # the relay delivers A2's proof of s1, withholds its answer
    w.answer(x, 66)  # X answers s2 with no proof
    assert w.send_to() is None
    w.proof(a2, w.ek2)  # A2's key over s2's EK, sent in s1: still s1's session, not s2's
    w.answer(x, 66)
    assert w.send_to() is None
    w.answer(a2, 7)  # A2's own answer in s1, proven in s1: taken
    assert w.send_to() == address_to_bytes(_box(7))


def test_answers_and_proofs_of_sessions_no_longer_held_are_pruned(store: Store) -> None:
    w = _World(store)
    w.proof(w.far1, w.ek1)
    w.answer(w.far2, 5)
    answers: dict[str, Any] = (store.get_setting(device_answers.SETTING_ANSWERS) or {})
    assert set(answers[str(w.cid)]) == {w.ek2.hex()}
    fan: Any = w.inbox.m.fanout
    ours = OwnedMailbox(URL, b"\1" * 32, b"\2" * 32, b"o" * 16, b"d" * 16, b"r" * 32, b"")
    store.add_mailbox("contact", ours.to_bytes(), contact_id=w.cid)
    with store.transaction():  # A2 opens a new session itself (it lost its state): adopted
        fan._adopt(store.get_contact(w.cid), make_pair().a, A2, _box(3), b"n" * 32)
    kept: Callable[[str], Any] = lambda n: (store.get_setting(n) or {}).get(str(w.cid))  # noqa: E731
    assert set(kept(device_answers.SETTING_ANSWERS)) == {(b"n" * 32).hex()}
    assert kept(device_answers.SETTING_PROOFS) == [(b"n" * 32).hex()]


@pytest.mark.parametrize("has_list", [True, False])
def test_an_unproven_opening_from_a_contact_with_a_device_list_is_dropped(
        store: Store, has_list: bool) -> None:  # fmt: skip
    """A linked device knowing a contact without a session takes a plain hello (0x03) opening
    as the contact's session only while it holds no device list of that contact: with one,
    every listed device opens with a device hello, and an unproven opening may be a removed
    device's (it holds the identity key)."""
    store.set_setting("devices.list", "00")  # a device that joined by a link (presence only)
    _us, prekeys, xs, kems = bob_with_store(E)
    store.put_identity(prekeys.to_bytes())
    them = IdentityKeyPair.generate(E)
    c = store.add_contact("alice", identity_key=them.public.to_bytes(),
                          state=ContactState(None, True).to_bytes())  # fmt: skip
    if has_list:
        _, pub = dv.new_device_key(E)
        listed = dv.DeviceList.sign(them, 1_700_000_000_000,
                                    [dv.DeviceEntry(A2, _box(9), b"b" * 16, 5, pub)])
        cd.put_list(store, c.id, listed.to_bytes(), listed.version, 1)
    bundle = pqxdh.verify_bundle(prekeys.bundle_base().to_bytes(), xs[0], kems[0])
    hello = wire.encode_payload(wire.HelloPayload(_box(4), "", wire.DEVICE_SESSION))
    _, block = initiate_session(E, them, bundle, hello)
    made: list[bool] = []

    async def create(*_a: Any, **_k: Any) -> Any:
        made.append(True)
        raise RuntimeError("stop here: the session would be taken")

    host = SimpleNamespace(
        store=store, entropy=E, prekeys=prekeys, _reload_prekeys=lambda: None,
        own_sync=SimpleNamespace(is_own=lambda sender: False),
        address=SimpleNamespace(request_top_up=lambda: None),
        contacts=SimpleNamespace(with_identity=lambda _k: store.get_contact(c.id)),
        mailboxes=SimpleNamespace(peer_url_ok=lambda u: True, create=create),
    )  # fmt: skip
    first = Inbox(host).first_contacts  # type: ignore[arg-type]
    row: Any = SimpleNamespace(role="address")
    if has_list:
        asyncio.run(first.receive(row, block))
        assert made == [] and store.get_session(c.id) is None
    else:
        with pytest.raises(RuntimeError):
            asyncio.run(first.receive(row, block))
        assert made == [True]
