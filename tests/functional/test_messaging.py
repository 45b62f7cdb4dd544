"""End to end: a real relay and two real daemons exchange messages through it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aegis_cli.client import RpcCallError
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess


def texts(peer: Peer, contact: str) -> list[tuple[str, str]]:
    try:
        msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    except RpcCallError as exc:
        if exc.data["error"] == "not_found":
            return []  # the contact is not there yet
        raise
    return [(m["direction"], m["text"]) for m in msgs]


def test_invitation_messages_receipts_and_safety_numbers(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    assert [c["name"] for c in bob.call("contacts.list")["contacts"]] == ["alice"]

    sent = alice.call("messages.send", {"contact": "bob", "text": "hello bob"})
    assert sent["status"] == "queued" and len(sent["message_id"]) == 32
    got = bob.wait_for(lambda: bob.events(types=["message.received"]), "the message")[0]["data"]
    assert got["text"] == "hello bob" and got["contact"] == "alice"
    assert got["message_id"] == sent["message_id"]
    alice.wait_for(
        lambda: any(
            m["message_id"] == sent["message_id"] and m["status"] == "delivered"
            for m in alice.call("messages.history", {"contact": "bob"})["messages"]
        ),
        "the delivery receipt",
    )
    bob.call("messages.send", {"contact": "alice", "text": "hi alice"})
    alice.wait_for(lambda: ("in", "hi alice") in texts(alice, "bob"), "the reply")

    # Read receipts.
    bob.call("messages.mark_read", {"contact": "alice"})
    alice.wait_for(
        lambda: (
            alice.call("messages.history", {"contact": "bob"})["messages"][0]["status"] == "read"
        ),
        "the read receipt",
    )

    a = alice.call("contacts.safety_number", {"name": "bob"})["safety_number"]
    b = bob.call("contacts.safety_number", {"name": "alice"})["safety_number"]
    assert a == b and len(a) == 60

    # The invitation is void once used.
    assert bob.call("invitations.list")["invitations"] == []


def test_long_message_spans_blocks(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    long_text = "0123456789abcdef" * 3000  # 48,000 bytes: four blocks
    alice.call("messages.send", {"contact": "bob", "text": long_text})
    bob.wait_for(lambda: ("in", long_text) in texts(bob, "alice"), "the long message")


def test_contact_address_request_accept(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    alice.wait_connected()
    bob.wait_connected()
    link = bob.call("address.get")["link"]
    alice.call("contacts.add", {"name": "bob", "link": link})
    req = bob.wait_for(lambda: bob.call("requests.list")["requests"], "the request")[0]
    assert req["name"] == "alice"
    bob.call("requests.accept", {"request": req["request"], "name": "Alice A."})
    alice.wait_for(lambda: alice.call("contacts.list")["contacts"][0]["established"], "accept")
    alice.call("messages.send", {"contact": "bob", "text": "via the address"})
    bob.wait_for(lambda: ("in", "via the address") in texts(bob, "Alice A."), "the message")
    # Rotating the address: the old link no longer leads anywhere.
    bob.call("address.rotate")
    carol = peers("carol")
    carol.wait_connected()
    with pytest.raises(RpcCallError):
        carol.call("contacts.add", {"name": "bob", "link": link})


def test_bad_links_and_names(peers: Callable[[str], Peer]) -> None:
    alice = peers("alice")
    alice.wait_connected()
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "x", "link": "aegis:AAAA"})
    assert e.value.data["error"] == "bad_link"
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "", "link": "aegis:AAAA"})
    assert e.value.code == -32602 and e.value.data["field"] == "name"
    own = alice.call("address.get")["link"]
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "me", "link": own})
    assert e.value.data["error"] == "bad_link"
    with pytest.raises(RpcCallError) as e:
        alice.call("messages.send", {"contact": "nobody", "text": "x"})
    assert e.value.data["error"] == "not_found"


def test_block_remove_and_no_read_receipts(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bob.call("settings.set", {"read_receipts": False})
    m = alice.call("messages.send", {"contact": "bob", "text": "one"})["message_id"]
    bob.wait_for(lambda: ("in", "one") in texts(bob, "alice"), "the message")
    bob.call("messages.mark_read", {"contact": "alice"})
    alice.wait_for(
        lambda: (
            alice.call("messages.history", {"contact": "bob"})["messages"][0]["status"]
            == "delivered"
        ),
        "the delivery receipt",
    )
    bob.call("contacts.block", {"name": "alice"})
    alice.call("messages.send", {"contact": "bob", "text": "while blocked"})
    time.sleep(2.0)
    assert ("in", "while blocked") not in texts(bob, "alice")
    assert alice.call("messages.history", {"contact": "bob"})["messages"][0]["message_id"] == m
    assert (
        alice.call("messages.history", {"contact": "bob"})["messages"][0]["status"] == "delivered"
    )
    bob.call("contacts.remove", {"name": "alice"})
    assert bob.call("contacts.list")["contacts"] == []


def test_undelivered_message_expires(tmp_short: Path) -> None:
    """The relay keeps a block 3 s here; the recipient stays offline; the sender marks the
    message expired once the relay's time is up and no delivery receipt came."""
    sub = tmp_short / "relay"
    sub.mkdir()
    relay = RelayProcess(
        sub, {"--message-ttl": "3", "--expiry-granularity": "1", "--sweep-interval": "0.5"}
    )
    relay.start()
    url = f"ws://127.0.0.1:{relay.port}/v1/ws"
    alice = bob = None
    try:
        alice, bob = Peer(tmp_short / "alice", url, "alice"), Peer(tmp_short / "bob", url, "bob")
        connect(alice, bob)
        bob.stop()
        mid = alice.call("messages.send", {"contact": "bob", "text": "into the void"})["message_id"]
        alice.wait_for(
            lambda: (
                alice.call("messages.history", {"contact": "bob"})["messages"][-1]["status"]
                == "expired"
            ),
            "expiry",
        )
        ev = [e["data"] for e in alice.events(types=["message.status"])]
        assert {"message_id": mid, "contact": "bob", "status": "expired"} in ev
        bob.start()  # the block is gone from the relay: nothing arrives
        time.sleep(1.5)
        assert ("in", "into the void") not in texts(bob, "alice")
    finally:
        for p in (alice, bob):
            if p is not None:
                p.stop()
        relay.close()


def test_mailbox_rotation(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("contacts.rotate_mailbox", {"name": "bob"})
    alice.wait_for(
        lambda: alice.events(types=["contact.mailbox_rotated"]), "the rotation to be acknowledged"
    )
    bob.call("messages.send", {"contact": "alice", "text": "to the new mailbox"})
    alice.wait_for(lambda: ("in", "to the new mailbox") in texts(alice, "bob"), "the message")
    alice.call("messages.send", {"contact": "bob", "text": "and back"})
    bob.wait_for(lambda: ("in", "and back") in texts(bob, "alice"), "the reply")


def test_message_before_the_answer_waits_for_it(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    alice.wait_connected()
    bob.wait_connected()
    link = bob.call("invitations.create")["link"]
    alice.call("contacts.add", {"name": "bob", "link": link})
    alice.call("messages.send", {"contact": "bob", "text": "too early?"})  # before the answer
    bob.wait_for(lambda: ("in", "too early?") in texts(bob, "alice"), "the early message")


def test_used_or_revoked_invitation_fails_cleanly(peers: Callable[[str], Peer]) -> None:
    """Known at once (the relay refuses the first contact): contacts.add fails, nothing is kept
    (tests/functional/test_contact_failures.py has the later failure)."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    for p in (alice, bob, carol):
        p.wait_connected()
    inv = bob.call("invitations.create")
    bob.call("invitations.revoke", {"invitation": inv["invitation"]})
    with pytest.raises(RpcCallError) as info:
        alice.call("contacts.add", {"name": "bob", "link": inv["link"]})
    assert info.value.code == 1022
    assert alice.call("contacts.list")["contacts"] == []
    # A used invitation: the second user gets the same clean failure.
    connect(alice, bob)
    inv2 = bob.call("invitations.create")
    alice.call("contacts.remove", {"name": "bob"})
    alice.call("contacts.add", {"name": "bob", "link": inv2["link"]})
    bob.wait_for(lambda: len(bob.call("contacts.list")["contacts"]) == 2, "the second contact")
    with pytest.raises(RpcCallError) as info:
        carol.call("contacts.add", {"name": "bob", "link": inv2["link"]})
    assert info.value.code == 1022
    assert carol.call("contacts.list")["contacts"] == []
