"""Group read receipts, message identity per author, and invitations whose answer cannot be
completed (issue 16), between real daemons on a real relay: a reader's read receipt reaches
the author only, and not at all with read receipts off; a member who reuses another's message
ID suppresses nothing; an inviter demoted before the answer refuses it and the invitee drops
the group; an offer for a member removed since the invitation is left out; an invitation the
rules refuse can still be declined."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from aegisd.store import groups as G
from tests.functional.conftest import Peer, connect
from tests.functional.test_cli_messaging import aegis, ok
from tests.functional.test_groups import group_of, invited, key_of, members
from tests.functional.test_hostile_contact import offline_store, queued, url_of
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

T = 60.0
NAME = "Reading club 93ab"


def history(peer: Peer) -> list[dict[str, Any]]:
    g = group_of(peer)
    assert g is not None
    return list(peer.call("group.history", {"group": g["group"]})["messages"])


def message(peer: Peer, text: str) -> dict[str, Any] | None:
    return next((m for m in history(peer) if m["text"] == text), None)


def changed(peer: Peer, change: str) -> bool:
    return any(e["data"].get("change") == change for e in peer.events(types=["group.changed"]))


def three_member_group(peers: Callable[[str], Peer]) -> tuple[Peer, Peer, Peer]:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, alice)
    connect(carol, alice)
    connect(carol, bob)  # every pair: no introductions needed
    g = alice.call("group.create", {"name": NAME})["group"]
    for p in (bob, carol):
        alice.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        p.wait_for(lambda p=p: key_of(p) in members(p), f"{p.name}'s add", T)
    for p in (alice, bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"{p.name} to see three members", T)
    return alice, bob, carol


def test_read_receipts_go_to_the_author_and_ids_are_per_author(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob, carol = three_member_group(peers)
    gb = group_of(bob)["group"]  # type: ignore[index]
    hello = bob.call("group.send", {"group": gb, "text": "hello"})["message_id"]
    for p in (alice, carol):
        p.wait_for(lambda p=p: message(p, "hello"), f"{p.name} to get hello", T)
    bob.wait_for(lambda: message(bob, "hello")["delivery"]["delivered"] == 2,  # type: ignore[index]
                 "both delivery receipts", T)  # fmt: skip

    # alice reads (the CLI, as `aegis messages NAME --mark-read` for a contact): bob's
    # message moves to read for alice ("read by 1 of 2")
    assert "hello" in ok(aegis(alice, "messages", "--group", NAME, "--mark-read"))
    ga = group_of(alice)["group"]  # type: ignore[index]
    assert message(alice, "hello")["read"] is True  # type: ignore[index]
    assert alice.call("group.read", {"group": ga})["marked"] == 0
    bob.wait_for(lambda: message(bob, "hello")["delivery"]["read"] == 1,  # type: ignore[index]
                 "alice's read receipt", T)  # fmt: skip
    shown = ok(aegis(bob, "group", "messages", NAME))
    assert "hello  [delivered to 2 of 2, read by 1 of 2]" in shown
    delivery = message(bob, "hello")["delivery"]  # type: ignore[index]
    assert delivery["members"] == {"alice": "read", "carol": "delivered"}
    assert any(e["data"] == {"group": gb, "message_id": hello, "status": "read"}
               for e in bob.events(types=["group.receipt"]))  # fmt: skip

    # carol reads with read receipts off: marked, nothing sent. Then, receipts on again, a
    # second message read: its receipt reaches bob, and the first stays unread for carol
    # (one fixed receipt delay: her receipts leave in the order they were made).
    gc = group_of(carol)["group"]  # type: ignore[index]
    carol.call("settings.set", {"read_receipts": False, "receipt_delay_max": 0.5})
    assert carol.call("group.read", {"group": gc})["marked"] == 1
    carol.call("settings.set", {"read_receipts": True})
    bob.call("group.send", {"group": gb, "text": "second"})
    bob.call("group.send", {"group": gb, "text": "third"})
    third = carol.wait_for(lambda: message(carol, "third"), "carol to get third", T)
    second = message(carol, "second")
    assert second is not None and second["message_id"].startswith(key_of(bob) + ":")
    assert carol.call("group.read", {"group": gc, "up_to": second["message_id"]})["marked"] == 1
    assert message(carol, "third")["read"] is False  # type: ignore[index]
    bob.wait_for(lambda: message(bob, "second")["delivery"]["members"]["carol"] == "read",  # type: ignore[index]
                 "carol's read receipt", T)  # fmt: skip
    assert message(bob, "hello")["delivery"]["members"]["carol"] == "delivered"  # type: ignore[index]
    assert message(bob, "third")["delivery"]["read"] == 0  # type: ignore[index]
    assert third["read"] is False


def test_a_demoted_inviter_refuses_the_answer_and_a_refused_invitation_can_be_declined(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, alice)
    connect(carol, bob)  # carol does not know alice: her accept makes a link for alice
    g = alice.call("group.create", {"name": NAME})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    bob.call("group.accept", {"invitation": invited(bob)})
    bob.wait_for(lambda: key_of(bob) in members(bob), "bob's add", T)
    alice.wait_for(lambda: len(members(alice)) == 2, "alice to add bob", T)
    alice.call("group.role", {"group": g, "member": "bob", "role": "admin"})
    bob.wait_for(lambda: group_of(bob)["role"] == "admin", "bob's promotion", T)  # type: ignore[index]

    # bob invites carol, then is demoted before her answer: his daemon refuses it, and carol,
    # not a member, drops the group instead of waiting for an add that will not come
    bob.call("group.invite", {"group": group_of(bob)["group"], "contact": "carol"})  # type: ignore[index]
    invitation = invited(carol)
    alice.call("group.role", {"group": g, "member": "bob", "role": "member"})
    bob.wait_for(lambda: group_of(bob)["role"] == "member", "bob's demotion", T)  # type: ignore[index]
    carol.call("group.accept", {"invitation": invitation})
    carol.wait_for(lambda: changed(carol, "invitation_refused"), "bob's refusal", T)
    assert carol.call("group.list")["groups"] == []
    assert changed(bob, "invitation_refused")
    assert len(members(alice)) == 2 and len(members(bob)) == 2
    carol.wait_for(lambda: invitation_mailboxes(carol) == 0, "her link revoked", T)


def test_an_offer_for_a_member_removed_since_the_invitation_is_left_out(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """§25.7 step 3: carol's accept offers a link for bob, whom alice removed after inviting
    her; alice leaves that offer out and adds carol (before, the answer was taken and then
    dropped: carol kept a group she was never added to, and could not be invited again)."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, alice)
    connect(carol, alice)  # carol does not know bob: her accept makes a link for him
    g = alice.call("group.create", {"name": NAME})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    bob.call("group.accept", {"invitation": invited(bob)})
    alice.wait_for(lambda: len(members(alice)) == 2, "alice to add bob", T)
    alice.call("group.invite", {"group": g, "contact": "carol"})
    invitation = invited(carol)
    alice.call("group.remove", {"group": g, "member": "bob"})
    assert len(members(alice)) == 1
    carol.call("group.accept", {"invitation": invitation})
    carol.wait_for(lambda: key_of(carol) in members(carol), "carol's add", T)
    alice.wait_for(lambda: key_of(carol) in members(alice), "alice to add carol", T)
    assert key_of(bob) not in members(carol) and len(members(carol)) == 2
    assert not changed(carol, "invitation_refused")


def invitation_mailboxes(peer: Peer) -> int:
    s = offline_store(peer)
    try:
        return len(s.list_mailboxes("invitation"))
    finally:
        s.close()


def test_an_invitation_the_rules_refuse_can_still_be_declined(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, alice)
    connect(carol, alice)
    g = alice.call("group.create", {"name": NAME})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    bob.call("group.accept", {"invitation": invited(bob)})
    alice.wait_for(lambda: len(members(alice)) == 2, "alice to add bob", T)  # a change to sign

    # alice invites carol; the stored invitation no longer checks (a signature damaged in
    # the store, as an invitation kept from laxer rules): it can still be declined
    alice.call("group.invite", {"group": g, "contact": "carol"})
    inv = invited(carol)
    s = offline_store(carol)
    try:
        row = G.get_invitation(s, inv)
        assert row is not None
        bad = row.payload[:-1] + bytes([row.payload[-1] ^ 1])  # the last change's signature
        s._q("UPDATE group_invitations SET payload = ? WHERE id = ?", (bad, inv))
    finally:
        s.close()
    assert carol.call("group.decline", {"invitation": inv}) == {"declined": True}
    assert carol.call("group.invitations")["invitations"] == []
    alice.wait_for(lambda: changed(alice, "declined"), "the decline", T)


def test_a_stored_invitation_that_does_not_decode_is_declined_or_dropped(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """An invitation damaged in the store (it no longer decodes): decline deletes it (no
    answer: there is nothing to name), accept says not_found and deletes it, the listing
    leaves it out (each of these failed on an assert before)."""
    alice, carol = peers("alice"), peers("carol")
    connect(carol, alice)
    g = alice.call("group.create", {"name": NAME})["group"]

    def damaged() -> int:
        alice.call("group.invite", {"group": g, "contact": "carol"})
        inv = invited(carol)
        s = offline_store(carol)
        try:
            s._q("UPDATE group_invitations SET payload = ? WHERE id = ?", (b"\x01\x0c!", inv))
        finally:
            s.close()
        return inv

    inv = damaged()
    assert carol.call("group.decline", {"invitation": inv}) == {"declined": True}
    assert carol.call("group.invitations")["invitations"] == []
    inv = damaged()
    with pytest.raises(RpcCallError) as err:
        carol.call("group.accept", {"invitation": inv})
    assert err.value.error == "not_found"
    inv = damaged()
    assert carol.call("group.invitations")["invitations"] == []
    assert carol.call("group.list")["groups"] == []


def test_a_member_reusing_anothers_message_id_suppresses_nothing(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """carol, hostile, copies the wire ID of bob's group message into a group message of hers,
    and that of alice's into a text to alice: alice keeps both group messages, and bob's
    receipt for alice's message still counts."""
    alice, bob, carol = three_member_group(peers)
    gb = group_of(bob)["group"]  # type: ignore[index]
    hello = bob.call("group.send", {"group": gb, "text": "hello"})["message_id"]
    alice.wait_for(lambda: message(alice, "hello"), "alice to get hello", T)
    bob_key, carol_key = key_of(bob), key_of(carol)
    bob.stop()  # alice's message waits for him at the relay
    ga = group_of(alice)["group"]  # type: ignore[index]
    mine = alice.call("group.send", {"group": ga, "text": "mine"})["message_id"]
    carol.wait_for(lambda: message(carol, "mine"), "carol to get alice's message", T)
    s = offline_store(alice)
    try:
        group_id = G.list_groups(s)[0].group_id
    finally:
        s.close()
    carol.stop()
    version = group_of(alice)["version"]  # type: ignore[index]
    now = int(time.time() * 1000)
    copy = wire.GroupMessagePayload(group_id, version, bytes.fromhex(hello), now, "carol's copy")
    text = wire.TextPayload(bytes.fromhex(mine), now, "a text with alice's group message id")
    with hostile(carol.home, "alice") as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(copy) + h.payload_blocks(text))
        alice.wait_for(lambda: queued(relay_proc, h) == 0, "alice to take the blocks", T)
    got = alice.wait_for(lambda: message(alice, "carol's copy"), "the copy", T)
    original = message(alice, "hello")
    assert original is not None and original["from"] == bob_key
    assert got["from"] == carol_key
    assert original["message_id"] != got["message_id"]
    assert original["message_id"] == f"{bob_key}:{hello}"
    bob.start()
    alice.wait_for(lambda: message(alice, "mine")["delivery"]["members"]["bob"] == "delivered",  # type: ignore[index]
                   "bob's delivery receipt", T)  # fmt: skip
