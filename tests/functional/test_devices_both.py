"""Both people with several devices (docs/devices.md §5.2, §5.5; issue 19's review H1): a real
relay and four daemons, Alice on A1 and A2, Bob on B1 and B2, each second device linked with
devices.link. Every device of each person holds a session with every device of the other: a
message from any device reaches every device of the other person exactly once, no device
shows a contact request, and a removal on one side stops the other side's deposits to the
removed device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices import texts
from tests.functional.test_devices_fanout import _devices_events, _link, _status_events


def _count(peer: Peer, contact: str, text: str) -> int:
    return texts(peer, contact).count(("in", text))


def _devices_seen(peer: Peer, n: int) -> None:
    """``peer``'s contact is established and a contact.devices event named ``n`` devices (a
    device that answered, or whose session was adopted). A wait, not a proof that the
    sessions exist: _each_reaches proves them, each text reaching each device of the other
    person (received transcripts between one's own devices are not built: a text on a
    device came in that device's own session with the sender)."""
    peer.wait_for(lambda: peer.call("contacts.list")["contacts"][0]["established"],
                  "the contact's session", T_DEVICE)  # fmt: skip
    peer.wait_for(lambda: [e for e in _devices_events(peer) if e["devices"] == n],
                  f"sessions with {n} devices", T_DEVICE)  # fmt: skip


def _each_reaches(senders: list[Peer], to: str, receivers: list[Peer], back: str,
                  tag: str) -> list[dict[str, Any]]:  # fmt: skip
    """Each sender writes once; every receiver shows each text exactly once."""
    sent = []
    for s in senders:
        sent.append(s.call("messages.send", {"contact": to, "text": f"{tag} from {s.name}"}))
    for s in senders:
        for r in receivers:
            text = f"{tag} from {s.name}"
            r.wait_for(lambda r=r, t=text: _count(r, back, t) >= 1, f"{text!r} on {r.name}",
                       T_DEVICE)  # fmt: skip
    for s in senders:
        for r in receivers:
            assert _count(r, back, f"{tag} from {s.name}") == 1, (r.name, texts(r, back))
    return sent


def test_both_people_with_two_devices(peers: Callable[[str], Peer]) -> None:
    a1, b1 = peers("alice"), peers("bob")
    connect(a1, b1)
    a2 = peers("alice2")
    _link(a1, a2)
    _devices_seen(b1, 2)  # B1 (no list yet) opened a session with A2, which answered
    b2 = peers("bob2")
    _link(b1, b2)
    # B1's list reaches A1 and A2 (each in its session with B1); each opens a session with
    # B2, proven by a device hello, which B2 takes as its sessions with Alice (no request).
    for peer in (a1, a2, b2):
        _devices_seen(peer, 2)
    for peer in (a1, a2, b1, b2):
        assert peer.call("requests.list")["requests"] == [], peer.name
        assert len(peer.call("contacts.list")["contacts"]) == 1, peer.name

    alice, bob = [a1, a2], [b1, b2]
    _each_reaches(alice, "bob", bob, "alice", "hello")
    _each_reaches(bob, "alice", alice, "bob", "hi")
    # And again, the other way first (sessions that were answered in the meantime).
    _each_reaches(bob, "alice", alice, "bob", "second")
    _each_reaches(alice, "bob", bob, "alice", "second")

    # A1 removes A2: both of Bob's devices drop their session with it, and their messages
    # reach A1 only (sent, not failed).
    a2_id = next(d["id"] for d in a2.call("devices.list")["devices"] if d["this_device"])
    a1.call("devices.remove", {"id": a2_id})
    for peer in bob:
        peer.wait_for(lambda p=peer: _devices_events(p)[-1]["devices"] == 1, "the removal",
                      T_DEVICE)  # fmt: skip
    sent = _each_reaches(bob, "alice", [a1], "bob", "after the removal")
    for peer, s in zip(bob, sent, strict=True):
        peer.wait_for(lambda p=peer, m=s["message_id"]: "sent" in _status_events(p, m), "sent")
        assert "failed" not in _status_events(peer, s["message_id"])
    _each_reaches([a1], "bob", bob, "alice", "after the removal")
    for s in bob:
        assert _count(a2, "bob", f"after the removal from {s.name}") == 0
    for peer in (a1, b1, b2):
        assert peer.call("requests.list")["requests"] == [], peer.name


def _accept_request(peer: Peer, name: str) -> None:
    peer.wait_for(lambda: peer.call("requests.list")["requests"], "the first contact", T_DEVICE)
    request = peer.call("requests.list")["requests"][0]["request"]
    peer.call("requests.accept", {"request": request, "name": name})


def test_both_linked_before_they_meet(peers: Callable[[str], Peer]) -> None:
    """Both link their second device first, then A1 and B1 meet: each second device gets a
    contact request (contacts are not synced between one's devices yet), accepted; then A2
    and B2, each learning the other's list, may open sessions with each other at once: one
    session per pair stands either way (each text arrives once). Which pair meets the
    device-ID rule depends on timing here; the rule itself (the lower ID's unanswered session
    stands, any other is replaced) is tested on a real store in
    tests/daemon/test_fanout_device_sessions.py."""
    a1, b1 = peers("alice"), peers("bob")
    a2, b2 = peers("alice2"), peers("bob2")
    _link(a1, a2)
    _link(b1, b2)
    connect(a1, b1)
    _accept_request(a2, "bob")  # B1's session with A2, its hello unchecked there
    _accept_request(b2, "alice")
    for peer in (a1, a2, b1, b2):
        _devices_seen(peer, 2)
    alice, bob = [a1, a2], [b1, b2]
    _each_reaches(alice, "bob", bob, "alice", "hello")
    _each_reaches(bob, "alice", alice, "bob", "hi")
    for peer in (a1, a2, b1, b2):
        assert peer.call("requests.list")["requests"] == [], peer.name


def test_a_rotation_waits_for_every_device(peers: Callable[[str], Peer]) -> None:
    """Bob moves his mailbox for Alice while A2 is stopped: A1's acknowledgement does not
    retire the old mailbox (A2 still deposits there until it learns the new one); A2's, once
    it is back, does, and A2's messages reach Bob."""
    a1, b1 = peers("alice"), peers("bob")
    connect(a1, b1)
    a2 = peers("alice2")
    _link(a1, a2)
    _devices_seen(b1, 2)
    a1.call("settings.set", {"receipt_delay_max": 0.5})
    a2.stop()
    b1.call("contacts.rotate_mailbox", {"name": "alice"})
    sent = b1.call("messages.send", {"contact": "alice", "text": "moved"})
    a1.wait_for(lambda: ("in", "moved") in texts(a1, "bob"), "the text after the rotation")
    a1.call("messages.mark_read", {"contact": "bob"})
    # A1's read receipt goes after its acknowledgement (the same mailbox, in order).
    b1.wait_for(lambda: "read" in _status_events(b1, sent["message_id"]), "A1's read receipt")
    assert not b1.events(types=["contact.mailbox_rotated"])  # A2 has not acknowledged
    a2.start()
    b1.wait_for(lambda: b1.events(types=["contact.mailbox_rotated"]), "A2's acknowledgement",
                T_DEVICE)  # fmt: skip
    a2.call("messages.send", {"contact": "bob", "text": "from the laptop, after the move"})
    b1.wait_for(lambda: ("in", "from the laptop, after the move") in texts(b1, "alice"), "A2's")
    a1.call("messages.send", {"contact": "bob", "text": "from the desktop, after the move"})
    b1.wait_for(lambda: ("in", "from the desktop, after the move") in texts(b1, "alice"), "A1's")
