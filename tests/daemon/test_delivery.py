"""The delivery layer's interface (aegisd/services/delivery.py): one payload, N recipients,
against a real SQLCipher store and real ratchet sessions (the drain is covered end to end by
tests/functional/)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.core import wire
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Reassembler, Session
from aegisd.rpc import AppError
from aegisd.services.delivery import NEVER, PENDING_DESTINATION, Delivery, DeliveryHooks, Recipient
from aegisd.services.mailbox import ContactState, address_to_bytes
from aegisd.services.messenger import Messenger
from aegisd.store import Store, create_profile
from aegisd.store import contact_devices as cd
from aegisd.store.db import Contact
from tests.support.parties import make_pair

URL = "ws://127.0.0.1:1/v1/ws"


class Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any] | None]] = []

    def emit(self, type: str, data: dict[str, Any] | None = None) -> None:
        self.emitted.append((type, data))


def _delivery(store: Store) -> Delivery:
    def never(*_: Any) -> Any:
        raise AssertionError("enqueue must not reach the drain's hooks")

    return Delivery(DeliveryHooks(
        store=lambda: store, events=Events(), entropy=SystemEntropy(), link=lambda: None,
        network=never, superseded=lambda: None, cover_active=lambda: False,
        renewal_refused=never, drop_contact_mailbox=never, contact_mailbox_gone=never,
    ))  # fmt: skip


def _contact(store: Store, name: str, n: int, *, established: bool = True,
             failed: str | None = None) -> tuple[Contact, wire.MailboxAddress]:  # fmt: skip
    to = wire.MailboxAddress(URL, bytes([n]) * wire.RELAY_ID_LEN, bytes([n]) * 32)
    c = store.add_contact(name, state=ContactState(to, established, failed).to_bytes())
    return c, to


def _open(peer: Session, blocks: list[bytes]) -> wire.Payload:
    """What the recipient's session makes of the blocks, in order."""
    entropy, parts = SystemEntropy(), Reassembler()
    out = None
    for block in blocks:
        out = parts.add(peer.decrypt(entropy, block)) or out
    assert out is not None
    return wire.decode_payload(out)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = create_profile(tmp_path / "p", None)
    yield s
    s.close()


def test_one_payload_is_encrypted_for_each_recipient_in_one_transaction(store: Store) -> None:
    d = _delivery(store)
    (bob, to_bob), (carol, to_carol) = _contact(store, "bob", 1), _contact(store, "carol", 2)
    pair_b, pair_c = make_pair(), make_pair()
    text = "x" * (3 * wire.RATCHET_CAPACITY)  # a long text: several blocks per recipient
    payload = wire.TextPayload(b"\1" * wire.MESSAGE_ID_LEN, 1, text)
    with store.transaction():
        mid = store.add_message(bob.id, "out", text, status="queued").id
        d.enqueue([Recipient(bob, pair_b.a), Recipient(carol, pair_c.a)], payload, message_id=mid)
    items = store.pending_blocks(now=2**62, limit=100)
    by_dest: dict[bytes, list[bytes]] = {}
    for item in items:
        assert item.message_id == mid
        by_dest.setdefault(item.destination, []).append(item.block)
    assert set(by_dest) == {address_to_bytes(to_bob), address_to_bytes(to_carol)}
    assert all(len(blocks) > 1 for blocks in by_dest.values())
    # Each recipient's own session opens its blocks; the advanced sessions are stored.
    assert _open(pair_b.b, by_dest[address_to_bytes(to_bob)]) == payload
    assert _open(pair_c.b, by_dest[address_to_bytes(to_carol)]) == payload
    assert store.get_session(bob.id) == pair_b.a.to_bytes()
    assert store.get_session(carol.id) == pair_c.a.to_bytes()
    assert store.outbox_holds_message(mid)


def test_a_recipient_that_cannot_be_reached_keeps_nothing_of_the_call(store: Store) -> None:
    d = _delivery(store)
    bob, _ = _contact(store, "bob", 1)
    gone, _ = _contact(store, "gone", 2, failed="the invitation was already used")
    payload = wire.TextPayload(b"\2" * wire.MESSAGE_ID_LEN, 1, "hi")
    with pytest.raises(AppError) as e, store.transaction():
        d.enqueue([Recipient(bob, make_pair().a), Recipient(gone, make_pair().a)], payload)
    assert e.value.code == 1024 and e.value.data["error"] == "not_ready"
    assert store.pending_blocks(now=2**62, limit=100) == []
    assert store.get_session(bob.id) is None


def test_blocks_for_an_unanswered_contact_wait_addressed_to_nobody(store: Store) -> None:
    d = _delivery(store)
    dan, _ = _contact(store, "dan", 3, established=False)
    with store.transaction():
        d.enqueue([Recipient(dan, make_pair().a)], wire.TextPayload(b"\3" * 16, 1, "later"))
    assert store.pending_blocks(now=NEVER - 1, limit=100) == []  # not due before the answer
    rows = store._q("SELECT destination, not_before FROM outbox").fetchall()
    assert rows == [(PENDING_DESTINATION, NEVER)]


def test_call_signaling_goes_in_each_named_session_once(store: Store) -> None:
    """Messenger.send_call_payload (docs/devices.md §9) with a session named twice in ``to``:
    one encryption per session (two from one loaded copy of a session would reuse its message
    key), through the real method, store and delivery; each device's own session opens it."""
    d = _delivery(store)
    bob, to_bob = _contact(store, "bob", 1)
    row, dev = make_pair(), make_pair()
    a2 = b"\xa2" * 16
    to_a2 = address_to_bytes(wire.MailboxAddress(URL, b"\2" * wire.RELAY_ID_LEN, b"\2" * 32))
    with store.transaction():
        store.put_session(bob.id, row.a.to_bytes())
        cd.put_device_session(store, bob.id, a2, dev.a.to_bytes(), 0)
        cd.set_device_send_to(store, bob.id, a2, to_a2)
    messenger = SimpleNamespace(loss=SimpleNamespace(check_usable=lambda: None),
                                lock=asyncio.Lock(), store=store, delivery=d)  # fmt: skip
    cancel = wire.CallPayload(b"\4" * wire.CALL_ID_LEN, wire.CALL_CANCEL)
    went = asyncio.run(Messenger.send_call_payload(
        messenger, bob.id, cancel, to=[cd.ROW_DEVICE, a2, cd.ROW_DEVICE, a2]  # type: ignore[arg-type]
    ))  # fmt: skip
    assert went == [cd.ROW_DEVICE, a2]
    by_dest: dict[bytes, list[bytes]] = {}
    for item in store.pending_blocks(now=2**62, limit=100):
        by_dest.setdefault(item.destination, []).append(item.block)
    assert {k: len(v) for k, v in by_dest.items()} == {address_to_bytes(to_bob): 1, to_a2: 1}
    assert _open(row.b, by_dest[address_to_bytes(to_bob)]) == cancel
    assert _open(dev.b, by_dest[to_a2]) == cancel
