"""Sync between one's own devices (docs/devices.md §6): a real relay, three daemons (Alice on
A1 and A2, linked with devices.link, and Bob). A1 and A2 open a sync session; what A1 sends
shows in A2's history as sent, a message read on one device is read on the other, a device
stopped for a while catches up, and a removed device's sync payloads are refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices import confirm_both, start_link, texts, wait_state


def _sync_events(peer: Peer, state: str) -> list[dict[str, Any]]:
    return [e["data"] for e in peer.events(types=["devices.sync"]) if e["data"]["state"] == state]


def _history(peer: Peer, contact: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = peer.call("messages.history",
                                          {"contact": contact, "limit": 500})["messages"]
    return out


def _status_of(peer: Peer, contact: str, text: str) -> str | None:
    return next((m["status"] for m in _history(peer, contact) if m["text"] == text), None)


def _this_id(peer: Peer) -> str:
    return str(next(d["id"] for d in peer.call("devices.list")["devices"] if d["this_device"]))


def _linked(peers: Callable[[str], Peer], level: str | None = None) -> tuple[Peer, Peer, Peer]:
    """Alice on A1 with Bob, then A2 linked: both of Alice's devices hold a sync session with
    each other and Bob holds a session with each. ``level``: a cover level A1 chooses before
    the link."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    if level is not None:
        a1.call("privacy.set", {"level": level})
    a2 = peers("alice2")
    start_link(a1, a2)
    confirm_both(a1, a2)
    wait_state(a1, "done")
    wait_state(a2, "done")
    ids = {_this_id(a1), _this_id(a2)}
    # The device that opens the sync session (the lower ID) writes at once, most likely
    # before the other's answer: its transcript waits for that answer, then leaves.
    opener, other = (a1, a2) if _this_id(a1) < _this_id(a2) else (a2, a1)
    if opener is a2:  # a text needs bob's session with A2 first (NotReady before it)
        a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"],
                    "bob's session", T_DEVICE)  # fmt: skip
    opener.call("messages.send", {"contact": "bob", "text": "right after the link"})
    for me, other in ((a1, a2), (a2, a1)):
        me.wait_for(lambda me=me, other=other: _this_id(other) in
                    {e["device"] for e in _sync_events(me, "open")}, "the sync session",
                    T_DEVICE)  # fmt: skip
    assert {e["device"] for e in _sync_events(a1, "open") + _sync_events(a2, "open")} == ids
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)
    bob.wait_for(lambda: [e for e in bob.events(types=["contact.devices"])
                          if e["data"]["devices"] == 2], "A2's answer", T_DEVICE)  # fmt: skip
    other.wait_for(lambda: ("out", "right after the link") in texts(other, "bob"),
                   "the transcript sent before the answer")  # fmt: skip
    return a1, a2, bob


def test_sent_transcripts_and_read_state_reach_the_other_device(
    peers: Callable[[str], Peer],
) -> None:
    a1, a2, bob = _linked(peers)

    # A1 writes to Bob: A2 shows it as sent by us, under the same message ID.
    sent = a1.call("messages.send", {"contact": "bob", "text": "from the desktop"})
    bob.wait_for(lambda: ("in", "from the desktop") in texts(bob, "alice"), "A1's text")
    a2.wait_for(lambda: ("out", "from the desktop") in texts(a2, "bob"), "the transcript on A2")
    on_a2 = [m for m in _history(a2, "bob") if m["text"] == "from the desktop"]
    assert [m["message_id"] for m in on_a2] == [sent["message_id"]]
    assert any(e["data"]["message_id"] == sent["message_id"]
               for e in a2.events(types=["message.transcript"]))  # fmt: skip
    # And the other way round: A2's text shows on A1, once.
    a2.call("messages.send", {"contact": "bob", "text": "from the laptop"})
    a1.wait_for(lambda: ("out", "from the laptop") in texts(a1, "bob"), "the transcript on A1")
    bob.wait_for(lambda: ("in", "from the laptop") in texts(bob, "alice"), "A2's text")
    assert texts(a1, "bob").count(("out", "from the laptop")) == 1

    # Bob writes; read on A2, it is read on A1 too (and Bob gets a read receipt).
    bob.call("messages.send", {"contact": "alice", "text": "read me once"})
    for device in (a1, a2):
        device.wait_for(lambda d=device: _status_of(d, "bob", "read me once") == "received",
                        "bob's text")  # fmt: skip
    assert a2.call("messages.mark_read", {"contact": "bob"})["marked"] == 1
    a1.wait_for(lambda: _status_of(a1, "bob", "read me once") == "read", "read on A1")
    assert a1.events(types=["conversation.read"])[-1]["data"] == {"contact": "bob", "marked": 1}

    # A2 stopped for a while: A1 sends and reads meanwhile; A2 restarted catches up.
    a2.stop()
    bob.call("messages.send", {"contact": "alice", "text": "while the laptop sleeps"})
    a1.wait_for(lambda: _status_of(a1, "bob", "while the laptop sleeps") == "received", "it")
    a1.call("messages.mark_read", {"contact": "bob"})
    a1.call("messages.send", {"contact": "bob", "text": "answered from the desktop"})
    bob.wait_for(lambda: ("in", "answered from the desktop") in texts(bob, "alice"), "A1's")
    a2.start()
    a2.wait_for(lambda: ("out", "answered from the desktop") in texts(a2, "bob"),
                "the transcript after the restart")  # fmt: skip
    a2.wait_for(lambda: _status_of(a2, "bob", "while the laptop sleeps") == "read",
                "the read mark after the restart")  # fmt: skip


def test_a_removed_device_sync_is_refused(peers: Callable[[str], Peer]) -> None:
    a1, a2, bob = _linked(peers)
    a2_id = _this_id(a2)
    out = a1.call("devices.remove", {"id": a2_id})
    # The remover deleted the sync mailbox it made for A2 with the rest (docs/devices.md §7):
    # A2, removed but still running with its state, sends to Bob, and the relay refuses its
    # transcript to A1 as into no mailbox: A2 says so (`devices.sync` `gone`, for A1);
    # nothing changes on A1. (Before its deletion is done, a device that took the list over
    # sync refuses and counts what arrives: tests/daemon/test_own_sync_rows.py.)
    assert out["mailboxes_deleted"] >= 2
    a2.call("settings.set", {"receipt_delay_max": 0.5})
    a2.call("messages.send", {"contact": "bob", "text": "from the removed laptop"})
    a1_id = _this_id(a1)
    a2.wait_for(lambda: a1_id in {e["device"] for e in _sync_events(a2, "gone")},
                "the relay refusing A2's transcript to A1", T_DEVICE)  # fmt: skip
    assert ("out", "from the removed laptop") not in texts(a1, "bob")
    # A1 sends nothing more to A2: a transcript would leave within receipt_delay_max (0.5 s
    # here), so A2 is watched for a few seconds after Bob has the text, A1 still running.
    a1.call("settings.set", {"receipt_delay_max": 0.5})
    a1.call("messages.send", {"contact": "bob", "text": "after the removal"})
    bob.wait_for(lambda: ("in", "after the removal") in texts(bob, "alice"), "A1's text")
    watch_until = time.monotonic() + 3.0
    while time.monotonic() < watch_until:
        assert ("out", "after the removal") not in texts(a2, "bob")
        time.sleep(0.25)


def _contact(peer: Peer, name: str) -> dict[str, Any] | None:
    return next((c for c in peer.call("contacts.list")["contacts"] if c["name"] == name), None)


def test_contacts_follow_across_own_devices(peers: Callable[[str], Peer]) -> None:
    """A contact added on A1 appears on A2, which can then write to it; renamed, verified and
    blocked on one device, removed on the other: each change shows on both."""
    a1, a2, _bob = _linked(peers)
    carol = peers("carol")
    connect(a1, carol)  # A1 adds Carol by her invitation
    a2.wait_for(lambda: _contact(a2, "carol"), "carol on A2")
    # Carol learns Alice's list from A1 and opens a session with A2: A2 writes to her.
    a2.wait_for(lambda: (c := _contact(a2, "carol")) and c["established"], "carol's session",
                T_DEVICE)  # fmt: skip
    a2.call("messages.send", {"contact": "carol", "text": "hi from the laptop"})
    carol.wait_for(lambda: ("in", "hi from the laptop") in texts(carol, "alice"), "A2's text")
    a1.wait_for(lambda: ("out", "hi from the laptop") in texts(a1, "carol"), "the transcript")

    a1.call("contacts.rename", {"name": "carol", "new_name": "Carol B"})
    a2.wait_for(lambda: _contact(a2, "Carol B"), "the rename on A2")
    a2.call("contacts.verify", {"name": "Carol B", "verified": True})
    a1.wait_for(lambda: (c := _contact(a1, "Carol B")) and c["verified"], "verified on A1")
    a1.call("contacts.block", {"name": "bob", "blocked": True})
    a2.wait_for(lambda: (c := _contact(a2, "bob")) and c["blocked"], "blocked on A2")
    a2.call("contacts.block", {"name": "bob", "blocked": False})
    a1.wait_for(lambda: (c := _contact(a1, "bob")) and not c["blocked"], "unblocked on A1")
    a2.call("contacts.remove", {"name": "Carol B"})
    a1.wait_for(lambda: _contact(a1, "Carol B") is None, "the removal on A1")
    # Nothing echoes back: the contact stays gone on both, Bob stays as he is.
    assert _contact(a2, "Carol B") is None
    for device in (a1, a2):
        bob_there = _contact(device, "bob")
        assert bob_there is not None and not bob_there["blocked"]
