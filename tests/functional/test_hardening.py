"""Hostile or careless input the daemon must survive (found in review)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from aegisd.services.names import clean_name
from tests.functional.conftest import Peer, connect


def test_deleted_text_leaves_no_trace_in_events(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = alice.call("messages.send", {"contact": "bob", "text": "secret plan 42"})["message_id"]
    bob.wait_for(lambda: bob.events(types=["message.received"]), "the message")
    bob.call("messages.delete", {"message_id": mid})
    assert "secret plan 42" not in str(bob.events())
    alice.call("conversations.delete", {"contact": "bob"})
    assert mid not in str(alice.events())


def test_peer_display_name_is_cleaned(peers: Callable[[str], Peer]) -> None:
    alice = peers("alice")
    with pytest.raises(RpcCallError) as e:
        alice.call("identity.set_name", {"display_name": "\x1b[2Jbank\nsupport"})
    assert e.value.data["field"] == "display_name"
    with pytest.raises(RpcCallError):
        alice.call("identity.set_name", {"display_name": "evil\u202egnp.exe"})  # bidi override
    # A hostile client is not bound by identity.set_name: what a receiver does with any name
    # it gets is clean_name (tested on its own below).
    assert clean_name("\x1b[2J\x1b[31mbank\nsupport") == "[2J[31mbanksupport"
    assert clean_name("evil\u202egnp.exe") == "evilgnp.exe"
    assert clean_name("\u200b\u200b") == "new contact"
    assert clean_name("Zoë  Ærø") == "Zoë Ærø"


def test_link_with_a_bundle_address_of_another_length_refused(
    peers: Callable[[str], Peer],
) -> None:
    """Issue 15 review, finding 2: a link whose bundle address is not 16 bytes is `bad_link`
    (it used to reach the relay, which answered `bad_frame` and closed the connection)."""
    import base64

    alice, bob = peers("alice"), peers("bob")
    bob.wait_connected()
    link = wire.ContactLink.from_text(bob.call("invitations.create")["link"])
    raw = link.to_bytes()
    at = raw.index(bytes([16]) + link.bundle_address)
    longer = raw[:at] + bytes([17]) + link.bundle_address + b"x" + raw[at + 17:]
    text = wire.LINK_SCHEME + base64.urlsafe_b64encode(longer).rstrip(b"=").decode()
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "bob", "link": text})
    assert e.value.data["error"] == "bad_link"


def test_link_with_plaintext_relay_elsewhere_refused(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    bob.wait_connected()
    link = wire.ContactLink.from_text(bob.call("invitations.create")["link"])
    hostile = wire.ContactLink(
        link.kind,
        link.identity,
        wire.MailboxAddress(
            "ws://192.0.2.1/v1/ws", link.mailbox.deposit_id, link.mailbox.send_token
        ),
        link.bundle_address,
        link.invitation_id,
        link.expires,
    ).to_text()
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "bob", "link": hostile})
    assert e.value.data["error"] == "bad_link"


def test_request_accepted_once(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    alice.wait_connected()
    bob.wait_connected()
    alice.call("contacts.add", {"name": "bob", "link": bob.call("address.get")["link"]})
    req = bob.wait_for(lambda: bob.call("requests.list")["requests"], "the request")[0]
    outcomes: list[object] = []

    def accept() -> None:
        try:
            outcomes.append(bob.call("requests.accept", {"request": req["request"]}))
        except RpcCallError as exc:
            outcomes.append(exc.data["error"])

    threads = [threading.Thread(target=accept) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes.count("not_found") == 1
    assert sum(isinstance(o, dict) for o in outcomes) == 1
    assert len(bob.call("contacts.list")["contacts"]) == 1
