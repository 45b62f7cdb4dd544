"""Groups (issue 16) between real daemons on a real relay: invitations, an accept and a
decline, introductions that open sessions between members who are not contacts, messages
both ways between those, a role change, a non-admin's change refused, a removal (nothing
sent afterwards reaches the removed member), a message from a non-member dropped, leaving;
and the relay's disk and logs hold neither the group ID nor its name."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from aegisd.services.groups_state import SETTING_PRUNE_AFTER, SETTING_PRUNE_SPREAD
from aegisd.services.mailbox import ContactState
from aegisd.store import groups as G
from relay.storage import deposit_key
from tests.functional.calls_support import RecordingProxy
from tests.functional.conftest import Peer, connect
from tests.functional.test_hostile_contact import offline_store, queued, url_of
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

T = 60.0
NAME = "Trips to Saturn 7f3a"
OTHER_NAME = "Saturn trips b41c"


def group_of(peer: Peer) -> dict[str, Any] | None:
    groups = peer.call("group.list")["groups"]
    return peer.call("group.get", {"group": groups[0]["group"]}) if groups else None


def members(peer: Peer) -> dict[str, dict[str, Any]]:
    g = group_of(peer)
    return {} if g is None else {m["key"]: m for m in g["members"]}


def key_of(peer: Peer) -> str:
    return str(peer.call("identity.get")["identity_key"])[2:66]  # after the key's type tag


def texts(peer: Peer) -> list[str]:
    g = group_of(peer)
    if g is None:
        return []
    return [m["text"] for m in peer.call("group.history", {"group": g["group"]})["messages"]]


def invited(peer: Peer) -> int:
    invs = peer.wait_for(lambda: peer.call("group.invitations")["invitations"], "an invitation")
    return int(invs[0]["invitation"])


@pytest.fixture
def recorded(
    tmp_short: Path, relay_proc: RelayProcess
) -> Iterator[tuple[Callable[[str], Peer], RecordingProxy]]:
    """Peers whose every relay connection passes a recording proxy: the relay's own view of
    their frames."""
    proxy = RecordingProxy(relay_proc.port)
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{proxy.port}/v1/ws"

    def make(name: str) -> Peer:
        made.append(Peer(tmp_short / name, url, name))
        return made[-1]

    try:
        yield make, proxy
    finally:
        for p in made:
            p.stop()
        proxy.close()


def test_a_group_of_members_who_are_not_all_contacts(
    recorded: tuple[Callable[[str], Peer], RecordingProxy], relay_proc: RelayProcess
) -> None:
    peers, proxy = recorded
    alice, bob, carol, dave = peers("alice"), peers("bob"), peers("carol"), peers("dave")
    for p in (bob, carol, dave):
        connect(p, alice)  # alice knows everyone; bob and carol do not know each other
        no_grace(p)
    ed = {p.name: key_of(p) for p in (alice, bob, carol, dave)}

    g = alice.call("group.create", {"name": NAME})["group"]
    assert alice.call("group.get", {"group": g})["role"] == "owner"

    # bob accepts; the add reaches him and he is a member.
    alice.call("group.invite", {"group": g, "contact": "bob"})
    bob.call("group.accept", {"invitation": invited(bob)})
    bob.wait_for(lambda: ed["bob"] in members(bob), "bob's add", T)
    alice.wait_for(lambda: len(members(alice)) == 2, "alice to add bob", T)

    # dave declines: nothing changes in the group, and dave keeps nothing of it.
    alice.call("group.invite", {"group": g, "contact": "dave"})
    dave.call("group.decline", {"invitation": invited(dave)})
    alice.wait_for(
        lambda: any(e["data"].get("change") == "declined"
                    for e in alice.events(types=["group.changed"])),
        "the decline", T,
    )  # fmt: skip
    assert len(members(alice)) == 2
    assert dave.call("group.list")["groups"] == []
    assert dave.call("group.invitations")["invitations"] == []

    # carol accepts: she and bob are introduced (a session of their own, hidden contacts).
    # ... and a rename made after her invitation reaches her before her add (§25.7 step 3).
    alice.call("group.invite", {"group": g, "contact": "carol"})
    invitation = invited(carol)
    alice.call("group.rename", {"group": g, "name": OTHER_NAME})
    carol.call("group.accept", {"invitation": invitation})
    assert carol.call("invitations.list")["invitations"] == []  # her link for bob: not shown
    for p in (alice, bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"{p.name} to see three members", T)
    bob.wait_for(lambda: members(bob)[ed["carol"]]["reachable"], "bob's session to carol", T)
    carol.wait_for(lambda: members(carol)[ed["bob"]]["reachable"], "carol's session to bob", T)
    assert group_of(carol)["name"] == OTHER_NAME  # type: ignore[index]
    assert [c["name"] for c in bob.call("contacts.list")["contacts"]] == ["alice"]
    assert [c["name"] for c in carol.call("contacts.list")["contacts"]] == ["alice"]

    # Messages both ways between the non-contacts (and to alice), one enqueue for all.
    gb = group_of(bob)["group"]  # type: ignore[index]
    gc = group_of(carol)["group"]  # type: ignore[index]
    sent = bob.call("group.send", {"group": gb, "text": "from bob"})
    assert sent["recipients"] == 2 and sent["unreachable"] == 0
    carol.wait_for(lambda: "from bob" in texts(carol), "carol to get bob's message", T)
    alice.wait_for(lambda: "from bob" in texts(alice), "alice to get bob's message", T)
    # A group-only contact is no contact: a one-to-one text from it is dropped (sent before
    # her group message, on the same session: taken first).
    bob_at_carol = hidden_contacts(carol)
    assert len(bob_at_carol) == 1
    carol.call("messages.send", {"contact": bob_at_carol[0], "text": "direct from carol"})
    carol.call("group.send", {"group": gc, "text": "from carol"})
    bob.wait_for(lambda: "from carol" in texts(bob), "bob to get carol's message", T)
    assert not any(e["data"].get("text") == "direct from carol"
                   for e in bob.events(types=["message.received"]))  # fmt: skip
    # Delivery per member, aggregated from the receipts.
    bob.wait_for(
        lambda: next(m for m in bob.call("group.history", {"group": gb})["messages"]
                     if m["text"] == "from bob")["delivery"]["delivered"] == 2,
        "receipts from both", T,
    )  # fmt: skip

    # A member's change is refused (one error), and nothing changes.
    with pytest.raises(RpcCallError) as err:
        carol.call("group.remove", {"group": gc, "member": ed["bob"]})
    assert err.value.error == "group_refused" and err.value.data["reason"] == "not_permitted"
    assert len(members(carol)) == 3

    # A role change: bob becomes an admin everywhere; now his changes go through.
    alice.call("group.role", {"group": g, "member": "bob", "role": "admin"})
    for p in (bob, carol):
        p.wait_for(lambda p=p: members(p)[ed["bob"]]["role"] == "admin", "bob an admin", T)
    bob.call("group.rename", {"group": gb, "name": "Trips"})
    for p in (alice, carol):
        p.wait_for(lambda p=p: group_of(p)["name"] == "Trips", "the rename", T)  # type: ignore[index]

    # Removal: carol learns of it; what is sent afterwards is not fanned out to her.
    alice.call("group.remove", {"group": g, "member": "carol"})
    carol.wait_for(lambda: group_of(carol)["role"] is None, "carol's removal", T)  # type: ignore[index]
    bob.wait_for(lambda: ed["carol"] not in members(bob), "bob to apply the removal", T)
    after = alice.call("group.send", {"group": g, "text": "after the removal"})
    assert after["recipients"] == 1
    bob.wait_for(lambda: "after the removal" in texts(bob), "bob to get it", T)
    # ... and never reaches her (alice's outbox is empty and carol took all that waited).
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    carol.wait_for(lambda: waiting_at_relay(relay_proc, alice, "carol") == 0, "carol's take", T)
    assert "after the removal" not in texts(carol)
    # bob and carol share no group any more: their group-only contacts go at both ends.
    for p in (bob, carol):
        p.wait_for(lambda p=p: hidden_contacts(p) == [], f"{p.name}'s group contact to go", T)
    bob.call("group.send", {"group": gb, "text": "bob after the removal"})
    alice.wait_for(lambda: "bob after the removal" in texts(alice), "alice to get it", T)
    with pytest.raises(RpcCallError) as err:
        carol.call("group.send", {"group": gc, "text": "still here?"})
    assert err.value.data["reason"] == "not_a_member"
    # her leave deletes her copy (she can be invited again)
    assert carol.call("group.leave", {"group": gc}) == {"group": gc, "deleted": True}
    assert carol.call("group.list")["groups"] == []

    # Messages from the departed carol (her own software, pretending) are dropped by alice,
    # whatever their stamp: an old version, and head + 1 (which would otherwise be held).
    s = offline_store(alice)
    try:
        group_id = G.list_groups(s)[0].group_id
    finally:
        s.close()
    carol.stop()
    head = group_of(alice)["version"]  # type: ignore[index]
    with hostile(carol.home, "alice") as h:
        for version, text in ((1, "forged, old"), (head + 1, "forged, ahead")):
            forged = wire.GroupMessagePayload(group_id, version, os.urandom(16),
                                              int(time.time() * 1000), text)  # fmt: skip
            h.deposit(url_of(relay_proc), h.payload_blocks(forged))
        alice.wait_for(lambda: queued(relay_proc, h) == 0, "alice to take the blocks", T)
    alice.call("group.rename", {"group": g, "name": "Trips again"})  # the head reaches head + 1
    bob.wait_for(lambda: group_of(bob)["version"] == head + 1, "the rename at bob", T)  # type: ignore[index]
    assert not any(t.startswith("forged") for t in texts(alice))
    s = offline_store(alice)
    try:
        assert G.held(s, g) == []
    finally:
        s.close()

    # A blocked member's group messages are dropped, and nothing is sent to it.
    bob.call("contacts.block", {"name": "alice"})
    to_nobody = bob.call("group.send", {"group": gb, "text": "to nobody"})
    assert (to_nobody["recipients"], to_nobody["unreachable"]) == (0, 1)
    # "delivered to 0 of 1": the blocked member counts, with its status
    assert next(m for m in bob.call("group.history", {"group": gb})["messages"]
                if m["text"] == "to nobody")["delivery"] == {
        "recipients": 1, "delivered": 0, "read": 0, "members": {"alice": "blocked"}}  # fmt: skip
    alice.call("group.send", {"group": g, "text": "to a blocker"})
    alice.wait_for(lambda: outbox_size(alice) == 0, "alice's outbox to drain", T)
    bob.wait_for(lambda: waiting_at_relay(relay_proc, alice, "bob") == 0, "bob to take it", T)
    assert "to a blocker" not in texts(bob)
    # ... but its membership changes still make the group's state (no fork by a block).
    alice.call("group.rename", {"group": g, "name": "Trips while blocked"})
    bob.wait_for(lambda: group_of(bob)["name"] == "Trips while blocked", "the rename", T)  # type: ignore[index]
    bob.call("contacts.block", {"name": "alice", "blocked": False})

    # bob leaves: alice is alone.
    bob.call("group.leave", {"group": gb})
    alice.wait_for(lambda: list(members(alice)) == [ed["alice"]], "bob to leave", T)

    # The relay's disk, its output and every frame it received or sent hold neither the group
    # ID nor its names, nor the member list: a member's identity key is at the relay only in
    # its own address bundle (docs/threat-model.md §2), so no frame holds two of them, and no
    # key is ever written out in hex.
    keys = [bytes.fromhex(k) for k in ed.values()]
    needles = [group_id, NAME.encode(), OTHER_NAME.encode(), b"Trips"]
    hexes = [n.hex().encode() for n in (group_id, *keys)]
    for path in relay_proc.data.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert not any(n in raw for n in needles + hexes), path.name
    out = relay_proc.output().encode()
    assert not any(n in out for n in needles + hexes)
    frames = proxy.frames()
    assert sum(len(f) for f in frames) > 10 * 16384  # the group's traffic went through it
    assert not any(n in f for f in frames for n in needles + hexes)
    assert all(sum(k in f for k in keys) <= 1 for f in frames)


def no_grace(peer: Peer) -> None:
    """Departed group contacts go at once here, not after days (groups_state.PRUNE_AFTER_MS
    and PRUNE_SPREAD_MS; read at each departure, so the running daemon sees them)."""
    s = offline_store(peer)
    try:
        s.set_setting(SETTING_PRUNE_AFTER, 0)
        s.set_setting(SETTING_PRUNE_SPREAD, 0)
    finally:
        s.close()


def hidden_contacts(peer: Peer) -> list[str]:
    s = offline_store(peer)
    try:
        hidden = G.group_contact_ids(s)
        return [c.name for c in s.list_contacts() if c.id in hidden]
    finally:
        s.close()


def outbox_size(peer: Peer) -> int:
    s = offline_store(peer)
    try:
        return s.outbox_size()
    finally:
        s.close()


def waiting_at_relay(relay: RelayProcess, peer: Peer, contact: str) -> int:
    """Blocks waiting at the relay in the mailbox `peer` writes to for `contact`."""
    s = offline_store(peer)
    try:
        c = s.contact_by_name(contact)
        assert c is not None
        send_to = ContactState.from_bytes(c.state).send_to
        assert send_to is not None
    finally:
        s.close()
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        row = db.execute(
            "SELECT count(*) FROM messages JOIN mailboxes ON messages.mailbox = mailboxes.id "
            "WHERE mailboxes.deposit_key = ?",
            (deposit_key(send_to.deposit_id),),
        ).fetchone()
    return int(row[0])


def test_one_contact_keeps_at_most_three_invitations_waiting(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(bob, alice)
    names = [f"Group {i} 5d1e" for i in range(4)]
    for name in names:
        g = alice.call("group.create", {"name": name})["group"]
        alice.call("group.invite", {"group": g, "contact": "bob"})
        bob.wait_for(
            lambda name=name: name in [i["name"] for i in
                                       bob.call("group.invitations")["invitations"]],
            f"the invitation to {name}", T,
        )  # fmt: skip
    # the oldest went: one contact cannot fill the list of waiting invitations
    assert [i["name"] for i in bob.call("group.invitations")["invitations"]] == names[1:]


def test_one_sender_cannot_fill_a_groups_held_payloads(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Stamped ahead, a non-member's messages are held (the add may be on its way), at most 8
    per sender per group; an introduction from someone who was never an admin or owner of
    the group is not held at all."""
    alice, bob, dave = peers("alice"), peers("bob"), peers("dave")
    connect(dave, alice)
    g = alice.call("group.create", {"name": NAME})["group"]
    link = wire.ContactLink.from_text(bob.call("invitations.create")["link"])  # bob: no member
    s = offline_store(alice)
    try:
        group_id = G.list_groups(s)[0].group_id
    finally:
        s.close()
    dave.stop()
    ahead = group_of(alice)["version"] + 1  # type: ignore[index]
    with hostile(dave.home, "alice") as h:
        blocks = [b for i in range(10) for b in h.payload_blocks(wire.GroupMessagePayload(
            group_id, ahead, os.urandom(16), int(time.time() * 1000), f"ahead {i}"))]  # fmt: skip
        blocks += h.payload_blocks(wire.GroupIntroductionPayload(group_id, link))
        h.deposit(url_of(relay_proc), blocks)
        alice.wait_for(lambda: queued(relay_proc, h) == 0, "alice to take the blocks", T)
    s = offline_store(alice)
    try:
        held = [wire.decode_payload(r.payload) for r in G.held(s, g)]
    finally:
        s.close()
    assert len(held) == 8
    assert all(isinstance(p, wire.GroupMessagePayload) for p in held)
