"""A receive cancelled between an in-memory change and its commit (the link stopped by a
reconnect while a first contact waited): nothing of it may outlive it; and a device session
whose first contact was lost anyway is opened again, boundedly, without losing the device
that was only away. Against a real SQLCipher store, real PQXDH keys and ratchet sessions and
a real relay; the cancel is a real task cancel at the await where the daemon's reconnect met
it (docs/devices.md §5.5)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nacl.public import Box, PrivateKey

from aegisd.core import devices as dv
from aegisd.core import pqxdh, wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session
from aegisd.services.delivery import address_to_bytes
from aegisd.services.device_sessions import REOPEN_AFTER, REOPENS, SETTING_REOPENED
from aegisd.services.fanout import Fanout
from aegisd.services.inbox import Inbox
from aegisd.services.mailbox import ContactState, OwnedMailbox, new_keys
from aegisd.services.mailboxes import SETTING_URL, Mailboxes
from aegisd.store import Store, create_profile
from aegisd.store import contact_devices as cd
from aegisd.store import cover as cover_slots
from aegisd.store.devices import SETTING_OWN_LIST
from aegisd.transport.network import Network
from aegisd.transport.relaylink import RelayLink, acknowledge
from relay.client import Message, RelayClient
from tests.daemon.test_delivery import _contact
from tests.relay.conftest import RelayProcess
from tests.relay.helpers import block, new_owner
from tests.support.parties import bob_with_store, make_pair
from tests.unit.test_core_devices import IDENTITY, device

URL = "ws://127.0.0.1:1/v1/ws"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = create_profile(tmp_path / "p", None)
    yield s
    s.close()


def _mailbox(token: bytes = b"t" * 32) -> tuple[OwnedMailbox, PrivateKey]:
    """A mailbox of ours and the relay's sealing key for it."""
    relay = PrivateKey.generate()
    sign, box = new_keys()
    mb = OwnedMailbox(URL, sign, box, os.urandom(wire.RELAY_ID_LEN), os.urandom(wire.RELAY_ID_LEN),
                      bytes(relay.public_key), token, b"")  # fmt: skip
    return mb, relay


class Host:
    """What the inbox uses of the messenger, for an invitation's first contact."""

    def __init__(self, store: Store, prekeys: PrekeyStore) -> None:
        self.store = store
        self.prekeys: PrekeyStore | None = prekeys
        self.entropy = SystemEntropy()
        self.lock = asyncio.Lock()
        self.waiting = asyncio.Event()
        self.mailboxes = SimpleNamespace(owned={}, create=self._create, peer_url_ok=lambda u: True)
        self.cover = SimpleNamespace(is_loop=lambda b: False)
        self.address = SimpleNamespace(request_top_up=lambda: None)
        self.contacts = SimpleNamespace(with_identity=lambda i: None)
        self.groups = SimpleNamespace(introduction_sender_ok=lambda i, s: None)
        self.renewals = SimpleNamespace(reset=lambda: None)
        # No other device of our own: every first contact here is a contact's.
        self.own_sync = SimpleNamespace(is_own=lambda sender: False,
                                        contact_changed=lambda c, **kw: None)

    async def _create(self, role: str, **kw: Any) -> Any:
        # Where the daemon's receive awaits the relay (a mailbox made, subscribed): it waits
        # here until cancelled, as a reconnect's link.stop() cancelled it.
        self.waiting.set()
        await asyncio.Event().wait()

    def _reload_prekeys(self) -> None:  # as messenger.py's
        state = self.store.get_identity()
        if state is not None:
            self.prekeys = PrekeyStore.from_bytes(state)


@pytest.mark.parametrize("path", ["invitation", "device"])
def test_a_cancelled_first_contact_keeps_its_one_time_keys(store: Store, path: str) -> None:
    """``invitation``: a first contact at an invitation's mailbox; ``device``: a linked
    device's first contact from a contact's device (a device hello at its address, taken as
    the contact's session row: the A2 set-up of the functional tests)."""
    entropy = SystemEntropy()
    me = IdentityKeyPair.generate(entropy)
    prekeys = PrekeyStore.create(entropy, me, 1_700_000_000)
    xs, kems = prekeys.generate_one_time(entropy, 1)
    store.put_identity(prekeys.to_bytes())
    invitation = os.urandom(16)
    mb, relay = _mailbox()
    if path == "invitation":
        row_id = store.add_mailbox("invitation", mb.to_bytes(), invitation_id=invitation)
    else:
        row_id = store.add_mailbox("address", mb.to_bytes())
    row = store.get_mailbox(row_id)
    assert row is not None
    bundle = pqxdh.verify_bundle(prekeys.bundle_base().to_bytes(), xs[0].to_bytes(),
                                 kems[0].to_bytes(), me.public)  # fmt: skip
    reply = wire.MailboxAddress(URL, os.urandom(wire.RELAY_ID_LEN), b"r" * 32)
    bob = IdentityKeyPair.generate(entropy)
    content: Any
    if path == "invitation":
        content = wire.encode_payload(wire.HelloPayload(reply, "alice", invitation))
    else:
        priv, _ = dv.new_device_key(entropy)

        def content(ek: bytes) -> bytes:
            hello = dv.DeviceHello.sign(priv, bob.public, b"d" * 16, reply, 1, ek)
            return dv.encode_device_payload(hello)

    _, first = initiate_session(entropy, bob, bundle, content)
    sealed = bytes(Box(relay, PrivateKey(mb.box_secret).public_key).encrypt(first))
    store.set_setting(SETTING_OWN_LIST, "00")  # a linked device: it holds a list
    host = Host(store, prekeys)
    host.mailboxes.owned[mb.owner_id] = (row, mb)
    if path == "device":  # bob: a contact this linked device knows without a session
        bob_c = store.add_contact("bob", identity_key=bob.public.to_bytes(),
                                  state=ContactState(None, False).to_bytes())  # fmt: skip
        host.contacts = SimpleNamespace(with_identity=lambda i: bob_c)
        host.fanout = Fanout(SimpleNamespace(ctx=SimpleNamespace(store=store), store=store))  # type: ignore[arg-type]
    inbox = Inbox(host)  # type: ignore[arg-type]

    async def main() -> None:
        msg = Message(mb.owner_id, b"m", sealed)
        task = asyncio.ensure_future(inbox.on_block(None, msg))  # type: ignore[arg-type]
        await asyncio.wait_for(host.waiting.wait(), 10)
        task.cancel()  # the reconnect: no handler of on_block's ran before the fix
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The next connection's replenish_prekeys saves the prekeys held in memory: the
    # one-time keys the cancelled receive burnt must not be among what it saves.
    assert host.prekeys is not None
    store.put_identity(host.prekeys.to_bytes())
    again = PrekeyStore.from_bytes(store.get_identity() or b"")
    # The relay delivers the block again: it opens (not "replayed", not "missing one-time key").
    accept_first_contact(entropy, again, first)
    assert store.get_mailbox(row_id) is not None  # the invitation is not used up


def test_a_cancelled_create_leaves_no_mailbox_without_its_contact(store: Store) -> None:
    mb, _ = _mailbox()
    store.set_setting(SETTING_URL, URL)
    subscribing = asyncio.Event()

    async def subscribe(owner_id: bytes, key: Any) -> None:
        subscribing.set()
        await asyncio.Event().wait()  # the link stops here

    host = SimpleNamespace(store=store, ctx=SimpleNamespace(store=store), _spawn=lambda c: None)
    mailboxes = Mailboxes(host)  # type: ignore[arg-type]
    mailboxes.link = SimpleNamespace(subscribe=subscribe)  # type: ignore[assignment]

    async def main() -> None:
        task = asyncio.ensure_future(mailboxes.create("contact", public=False, made=mb))
        await asyncio.wait_for(subscribing.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert store.list_mailboxes("contact") == []  # no contact mailbox with no contact
    assert [r.descriptor for r in cover_slots.pool_rows(store)] == [mb.to_bytes()]
    assert mb.owner_id in mailboxes.owned  # still received on, as a pool mailbox


@pytest.fixture
def relay_process() -> Iterator[RelayProcess]:
    d = Path(tempfile.mkdtemp(prefix="ae", dir="/tmp"))
    rp = RelayProcess(d, {})
    rp.start()
    try:
        yield rp
    finally:
        rp.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("isolation", [False, True], ids=["shared", "isolated"])
def test_a_reconnect_lets_the_block_being_handled_commit(
    relay_process: RelayProcess, isolation: bool
) -> None:
    url = f"ws://127.0.0.1:{relay_process.port}/v1/ws"

    async def main() -> None:
        admin = await RelayClient.connect(url)
        token = os.urandom(32)
        o = await new_owner(admin, token=token)
        entered, release = asyncio.Event(), asyncio.Event()
        done: list[bool] = []

        async def handler(client: RelayClient, msg: Message) -> None:
            entered.set()
            await release.wait()  # a first contact waiting under the lock, mid-transaction
            done.append(await acknowledge(client, msg.msg_id))

        link = RelayLink(url, handler=handler, subscriptions=lambda: [(o.owner_id, o.sig)],
                         on_state=lambda up, reason: None, network=Network(isolation=isolation))
        link.start()
        await asyncio.wait_for(link.connected.wait(), 20)
        if isolation:  # until the mailbox's own connection subscribed
            for _ in range(400):
                if link._clients:
                    break
                await asyncio.sleep(0.05)
        sender = await RelayClient.connect(url)
        await sender.deposit(o.deposit_id, block(b"first"), token=token)
        await asyncio.wait_for(entered.wait(), 20)
        stopping = asyncio.ensure_future(link.stop(finish=True))  # restart_link's stop
        await asyncio.sleep(0)
        assert not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, 20)
        assert done == [True]  # it finished and its acknowledgement went through
        # Nothing comes again: the relay holds no unacknowledged block.
        copy = await RelayClient.connect(url)
        await o.subscribe(copy)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(copy.messages.get(), 1.0)
        for c in (admin, sender, copy):
            await c.close()

    asyncio.run(main())


def test_a_device_session_never_answered_is_opened_again_a_few_times(store: Store) -> None:
    """fanout._missing: a session this device opened whose first contact was lost (never
    answered) is opened anew after REOPEN_AFTER, at most REOPENS times (devices.md §5.5)."""

    c, _ = _contact(store, "bob", 1)
    listed = dv.DeviceList.sign(IDENTITY, 1, [device(1), device(2)])
    cd.put_list(store, c.id, listed.to_bytes(), 1, 0)
    cd.set_session_device(store, c.id, device(1).device_id)  # the contact's session row's
    events: list[str] = []
    ctx = SimpleNamespace(store=store, events=SimpleNamespace(emit=lambda t, p: events.append(t)))
    fan = Fanout(SimpleNamespace(ctx=ctx, store=store))  # type: ignore[arg-type]
    other = device(2).device_id
    assert fan._missing(c.id) == [device(2)]
    now = int(time.time())
    cd.put_device_session(store, c.id, other, b"state", now)
    assert fan._missing(c.id) == []  # just opened: its answer is awaited
    cd.put_device_session(store, c.id, other, b"state", now - REOPEN_AFTER - 1)
    assert fan._missing(c.id) == [device(2)]  # never answered: opened anew
    store.set_setting(SETTING_REOPENED, {str(c.id): {other.hex(): REOPENS}})
    assert fan._missing(c.id) == []  # bounded: not for ever
    store.set_setting(SETTING_REOPENED, {str(c.id): {other.hex(): 1}})
    fresh = store.get_contact(c.id)
    assert fresh is not None
    fan.device_answered(fresh, other, device(2).mailbox)
    assert fan._missing(c.id) == []  # answered: nothing to do
    assert store.get_setting(SETTING_REOPENED) is None  # and its count starts over
    assert events == ["contact.devices"]


def test_an_answer_in_the_session_a_reopening_replaced_still_counts(store: Store) -> None:
    """The device was only away: it answers the first session after the reopening replaced
    it (and maybe the second after that). Whichever it answers last is its session, with
    real ratchet sessions on both sides (devices.md §5.5)."""

    entropy = SystemEntropy()
    me = IdentityKeyPair.generate(entropy)
    d_identity, d_prekeys, xs, kems = bob_with_store(entropy, one_time=2)

    def open_one(i: int) -> tuple[Any, Any]:
        bundle = pqxdh.verify_bundle(d_prekeys.bundle_base().to_bytes(), xs[i], kems[i],
                                     d_identity.public)  # fmt: skip
        ours, block = initiate_session(entropy, me, bundle, b"hello")
        return ours, accept_first_contact(entropy, d_prekeys, block).session

    s1, d1 = open_one(0)
    s2, d2 = open_one(1)  # the reopening, 10 minutes later
    c, _ = _contact(store, "bob", 1)
    store.put_session(c.id, make_pair().a.to_bytes())  # the row: with another device
    device_id = b"\x02" * 16
    events: list[str] = []
    ctx = SimpleNamespace(store=store, events=SimpleNamespace(emit=lambda t, p: events.append(t)))
    fan = Fanout(SimpleNamespace(ctx=ctx, store=store))  # type: ignore[arg-type]
    cd.put_device_session(store, c.id, device_id, s2.to_bytes(), int(time.time()))
    fan._keep_superseded(c.id, device_id, s1.to_bytes())
    host = SimpleNamespace(store=store, entropy=entropy, fanout=fan, ctx=ctx,
                           cover=SimpleNamespace(heard=lambda cid: None),
                           mailboxes=SimpleNamespace(peer_url_ok=lambda u: True))  # fmt: skip
    inbox = Inbox(host)  # type: ignore[arg-type]

    def answer(session: Any, n: int) -> bytes:
        reply = wire.MailboxAddress(URL, bytes([n]) * wire.RELAY_ID_LEN, b"t" * 32)
        [blk] = session.encrypt(entropy, wire.encode_payload(wire.HelloPayload(reply, "", b"")))
        return blk

    inbox._receive_from_contact(c.id, answer(d1, 7))  # the answer to the first session
    [ds] = cd.device_sessions(store, c.id)
    assert ds.send_to is not None  # answered: deposited to from now on
    assert [d for d, _ in fan.superseded(c.id)] == [device_id]  # the second, kept
    inbox._receive_from_contact(c.id, answer(d2, 8))  # then it took the second after all
    [ds] = cd.device_sessions(store, c.id)
    reply8 = wire.MailboxAddress(URL, bytes([8]) * wire.RELAY_ID_LEN, b"t" * 32)
    assert ds.send_to == address_to_bytes(reply8)
    # What the device sends next in the second session opens in the session stored.
    [blk] = d2.encrypt(entropy, b"x")

    assert Session.from_bytes(ds.state).decrypt(entropy, blk).data == b"x"
