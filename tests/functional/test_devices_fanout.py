"""A contact fans out to every device of a person (docs/devices.md §5): a real relay, three
daemons (Alice on A1 and A2, linked with devices.link, and Bob). Bob learns Alice's list from
A1, opens a session with A2, and from then on his messages reach both; A2 writes to Bob as
Alice; a removal stops Bob's deposits to the removed device; a list not signed by Alice's
identity is refused with nothing changed."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable
from typing import Any

from aegisd.core import devices as dv
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.store import open_profile
from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices import (
    confirm_both,
    start_link,
    texts,
    wait_state,
    watch_blocks,
)
from tests.relay.conftest import RelayProcess


def _devices_events(peer: Peer) -> list[dict[str, Any]]:
    return [e["data"] for e in peer.events(types=["contact.devices"])]


def _wait_two_devices(bob: Peer) -> None:
    """Bob holds Alice's list of two and A2 answered his session (retried: T_DEVICE)."""
    bob.wait_for(lambda: [e for e in _devices_events(bob) if e["devices"] == 2], "A2's answer",
                 T_DEVICE)  # fmt: skip


def _link(a1: Peer, a2: Peer) -> None:
    start_link(a1, a2)
    confirm_both(a1, a2)
    wait_state(a1, "done")
    wait_state(a2, "done")


def _forge_list_on(peer: Peer, contact: str) -> None:
    """With the daemon stopped: its held list replaced by one of a higher version signed by
    another identity, naming one device more (accepted, it would change what the contact
    does), and marked unacknowledged by ``contact`` (so the next unlock sends it)."""
    store = open_profile(peer.home, None)
    try:
        held = dv.DeviceList.from_bytes(bytes.fromhex(str(store.get_setting("devices.list"))))
        other = IdentityKeyPair.generate(SystemEntropy())
        extra = dataclasses.replace(held.devices[0], device_id=os.urandom(16))
        forged = dv.DeviceList.sign(other, held.version + 1, [*held.devices, extra])
        cid = store.contact_by_name(contact)
        assert cid is not None
        with store.transaction():
            store.set_setting("devices.list", forged.to_bytes().hex())
            store.set_setting("devices.awaiting", {str(cid.id): forged.version})
    finally:
        store.close()


def test_a_contact_fans_out_to_every_device(peers: Callable[[str], Peer]) -> None:
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    safety = bob.call("contacts.safety_number", {"name": "alice"})
    a2 = peers("alice2")
    _link(a1, a2)
    # Bob gets the list from A1, opens a session with A2, which answers: two devices.
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)
    _wait_two_devices(bob)

    # One message from Bob: on both of Alice's devices.
    bob.call("messages.send", {"contact": "alice", "text": "to all of you"})
    a1.wait_for(lambda: ("in", "to all of you") in texts(a1, "bob"), "bob's text on A1")
    a2.wait_for(lambda: ("in", "to all of you") in texts(a2, "bob"), "bob's text on A2")

    # A2 writes to Bob: Bob shows it as from Alice, the same contact, the same safety number.
    a2.call("messages.send", {"contact": "bob", "text": "from the laptop"})
    bob.wait_for(lambda: ("in", "from the laptop") in texts(bob, "alice"), "A2's text")
    assert [c["name"] for c in bob.call("contacts.list")["contacts"]] == ["alice"]
    assert bob.call("contacts.safety_number", {"name": "alice"}) == safety
    # A1 still works both ways.
    a1.call("messages.send", {"contact": "bob", "text": "from the desktop"})
    bob.wait_for(lambda: ("in", "from the desktop") in texts(bob, "alice"), "A1's text")

    # A1 removes A2: Bob drops its session (one device again) and stops sending to it.
    a2_id = next(d["id"] for d in a2.call("devices.list")["devices"] if d["this_device"])
    assert a1.call("devices.remove", {"id": a2_id})["contacts_told"] == 1
    bob.wait_for(lambda: _devices_events(bob)[-1]["devices"] == 1, "the removal")
    bob.call("messages.send", {"contact": "alice", "text": "after the removal"})
    a1.wait_for(lambda: ("in", "after the removal") in texts(a1, "bob"), "bob's text on A1")

    # A list that Alice's identity did not sign (A1's store forged, sent at its next unlock):
    # refused, counted, nothing changed.
    told = len(_devices_events(bob))
    a1.stop()
    _forge_list_on(a1, "bob")
    a1.start()
    a1.wait_connected()
    bob.call("messages.send", {"contact": "alice", "text": "still one device"})
    a1.wait_for(lambda: ("in", "still one device") in texts(a1, "bob"), "bob's text on A1")
    a1.call("messages.send", {"contact": "bob", "text": "after the forgery"})
    bob.wait_for(lambda: ("in", "after the forgery") in texts(bob, "alice"), "A1's text")
    # The removed device got nothing since its removal.
    seen = [t for _d, t in texts(a2, "bob")]
    assert "after the removal" not in seen and "still one device" not in seen
    assert len(_devices_events(bob)) == told  # nothing changed
    bob.stop()  # the daemon logs what it refused, counted, at its stop
    assert bob.proc is not None
    log = bob.proc.stderr()
    assert re.search(r"refused a device list not signed by the contact \(1x\)", log), log[-2000:]


def test_the_first_device_removed_by_the_second(peers: Callable[[str], Peer]) -> None:
    """A2 removes A1, the device Bob's first session is with: the session with A2 takes its
    place, and Bob's messages reach A2 only."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    _wait_two_devices(bob)
    # Mailbox rotations on both sides: A2's in its own session with Bob (acknowledged there),
    # Bob's to every device of Alice's (done once both acknowledged).
    a2.call("contacts.rotate_mailbox", {"name": "bob"})
    a2.wait_for(lambda: a2.events(types=["contact.mailbox_rotated"]), "Bob's acknowledgement")
    bob.call("contacts.rotate_mailbox", {"name": "alice"})
    bob.wait_for(lambda: bob.events(types=["contact.mailbox_rotated"]), "Alice's")
    bob.call("messages.send", {"contact": "alice", "text": "after the rotations"})
    for device in (a1, a2):
        device.wait_for(lambda d=device: ("in", "after the rotations") in texts(d, "bob"), "it")
    a2.call("messages.send", {"contact": "bob", "text": "rotated laptop"})
    bob.wait_for(lambda: ("in", "rotated laptop") in texts(bob, "alice"), "A2's text")
    a1_id = next(d["id"] for d in a1.call("devices.list")["devices"] if d["this_device"])
    assert a2.call("devices.remove", {"id": a1_id})["contacts_told"] == 1
    bob.wait_for(lambda: _devices_events(bob)[-1]["devices"] == 1, "the removal")
    bob.call("messages.send", {"contact": "alice", "text": "only the laptop"})
    a2.wait_for(lambda: ("in", "only the laptop") in texts(a2, "bob"), "bob's text on A2")
    a2.call("messages.send", {"contact": "bob", "text": "laptop here"})
    bob.wait_for(lambda: ("in", "laptop here") in texts(bob, "alice"), "A2's text")
    assert ("in", "only the laptop") not in texts(a1, "bob")


def _delete_contact_mailbox(peer: Peer, contact: str) -> None:
    """With the daemon stopped: its mailbox for ``contact`` deleted at the relay (what a
    removal or a lost device leaves: the contact's deposits there are refused for good)."""
    import asyncio

    from aegisd.services.mailbox import OwnedMailbox
    from relay.client import RelayClient

    store = open_profile(peer.home, None)
    try:
        c = store.contact_by_name(contact)
        assert c is not None
        row = store.mailbox_for_contact(c.id)
        assert row is not None
        mb = OwnedMailbox.from_bytes(row.descriptor)
    finally:
        store.close()

    async def go() -> None:
        client = await RelayClient.connect(mb.relay_url)
        try:
            await client.delete(mb.owner_id, mb.signing_key)
        finally:
            await client.close()

    asyncio.run(go())


def _status_events(peer: Peer, message_id: str) -> list[str]:
    return [e["data"]["status"] for e in peer.events(types=["message.status"])
            if e["data"]["message_id"] == message_id]  # fmt: skip


def test_a_refused_device_copy_fails_that_device_only(peers: Callable[[str], Peer]) -> None:
    """Bob's copy for A2 is refused (A2's mailbox for him is gone): the message is sent (A1's
    copy went), not failed, and nothing more goes to A2 (docs/devices.md §5.4)."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    _wait_two_devices(bob)
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)
    a2.stop()
    _delete_contact_mailbox(a2, "bob")
    sent = bob.call("messages.send", {"contact": "alice", "text": "one copy refused"})
    a1.wait_for(lambda: ("in", "one copy refused") in texts(a1, "bob"), "bob's text on A1")
    # "sent" comes once no copy waits: A2's was refused by then.
    bob.wait_for(lambda: "sent" in _status_events(bob, sent["message_id"]), "sent")
    assert "failed" not in _status_events(bob, sent["message_id"])
    assert not bob.events(types=["contact.failed"])
    bob.call("messages.send", {"contact": "alice", "text": "still to A1"})
    a1.wait_for(lambda: ("in", "still to A1") in texts(a1, "bob"), "bob's next text on A1")


def test_a_contact_added_after_the_link_gets_the_list(peers: Callable[[str], Peer]) -> None:
    """Alice links A2 while her first contact to Bob waits for him (a contact not established
    when the list went): Bob gets her list when he answers, and (A2 taking his first contact)
    reaches both devices. A1's
    acknowledgement lost (its list sent again at its next unlock): Bob acknowledges the list
    he holds again, and counts no refusal."""
    a1, bob = peers("alice"), peers("bob")
    a1.wait_connected()
    bob.wait_connected()
    link = bob.call("invitations.create")["link"]
    bob.stop()
    a1.call("contacts.add", {"name": "bob", "link": link})
    a2 = peers("alice2")
    _link(a1, a2)
    assert not a1.call("contacts.list")["contacts"][0]["established"]
    bob.start()
    a1.wait_for(lambda: a1.call("contacts.list")["contacts"][0]["established"], "the answer")
    # Bob got the list when he answered: he opens a session with A2, which, not knowing
    # him (a link carries established contacts only), shows it as a request; accepted, it is
    # Bob's session with A2.
    a2.wait_for(lambda: a2.call("requests.list")["requests"], "bob's first contact")
    request = a2.call("requests.list")["requests"][0]["request"]
    a2.call("requests.accept", {"request": request, "name": "bob"})
    _wait_two_devices(bob)
    bob.call("messages.send", {"contact": "alice", "text": "to both of you"})
    for device in (a1, a2):
        device.wait_for(lambda d=device: ("in", "to both of you") in texts(d, "bob"), "it")

    # The acknowledgement lost: A1 sends the list again at its next unlock.
    a1.stop()
    store = open_profile(a1.home, None)
    try:
        held = dv.DeviceList.from_bytes(bytes.fromhex(str(store.get_setting("devices.list"))))
        c = store.contact_by_name("bob")
        assert c is not None
        store.set_setting("devices.awaiting", {str(c.id): held.version})
    finally:
        store.close()
    a1.start()
    a1.wait_connected()
    # Bob's read receipt goes after his acknowledgement (a delayed block keeps its order).
    bob.call("settings.set", {"receipt_delay_max": 0.5})
    sent = a1.call("messages.send", {"contact": "bob", "text": "after the restart"})
    bob.wait_for(lambda: ("in", "after the restart") in texts(bob, "alice"), "A1's text")
    bob.call("messages.mark_read", {"contact": "alice"})
    a1.wait_for(lambda: "read" in _status_events(a1, sent["message_id"]), "the read receipt")
    a1.stop()
    store = open_profile(a1.home, None)
    try:
        assert not store.get_setting("devices.awaiting")  # acknowledged: not sent again
    finally:
        store.close()
    bob.stop()
    assert bob.proc is not None
    log = bob.proc.stderr()
    assert "refused a stale device list" not in log, log[-2000:]


def _acks_from(peer: Peer, contact: str, acks: list[dv.ListAck]) -> None:
    """With the daemon stopped: ``acks`` queued in its session with ``contact`` (what a
    hostile contact can send: acknowledgements of lists that do not exist)."""
    from aegisd.core.session import Session
    from aegisd.services.mailbox import ContactState, address_to_bytes

    store = open_profile(peer.home, None)
    try:
        c = store.contact_by_name(contact)
        assert c is not None
        blob = store.get_session(c.id)
        state = ContactState.from_bytes(c.state)
        assert blob is not None and state.send_to is not None
        session = Session.from_bytes(blob)
        with store.transaction():
            for ack in acks:
                blocks = session.encrypt(SystemEntropy(), dv.encode_device_payload(ack))
                store.enqueue_blocks(address_to_bytes(state.send_to), blocks, contact_id=c.id)
            store.put_session(c.id, session.to_bytes())
    finally:
        store.close()


def test_hostile_acknowledgements_ask_once(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Twelve acknowledgements of one list Alice does not hold, and three of lists from the
    far future: she asks Bob for the list once (not once per acknowledgement)."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a1.call("settings.set", {"receipt_delay_max": 0.5})
    bob.stop()
    version = int(time.time() * 1000) + 5_000
    acks = [dv.ListAck(version, bytes(32))] * 12 + [
        dv.ListAck((int(time.time()) + 2 * dv.MAX_LIST_SKEW) * 1000 + i, bytes(32))
        for i in range(3)
    ]
    _acks_from(bob, "alice", acks)
    blocks = watch_blocks(relay_proc)
    bob.start()
    bob.wait_connected()
    sent = bob.call("messages.send", {"contact": "alice", "text": "after the acknowledgements"})
    a1.wait_for(lambda: ("in", "after the acknowledgements") in texts(a1, "bob"), "the text")
    # A1's read receipt is queued after its requests and goes after them (a delayed block
    # keeps its order behind the delayed blocks before it).
    a1.call("messages.mark_read", {"contact": "bob"})
    bob.wait_for(lambda: "read" in _status_events(bob, sent["message_id"]), "the read receipt")
    # Bob's 15 acknowledgements and text, A1's one request and receipt, Bob's answer (his
    # ack of nothing more): far below the 15 requests answered one by one.
    assert blocks() <= len(acks) + 6, blocks()
