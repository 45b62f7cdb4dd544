"""A group with a member on two devices (issue 19, docs/devices.md §5.5, §6): a real relay and
four daemons. Bob's group holds Alice and Carol; Carol is no contact of Alice's (a group-only
contact, introduced by the group). Alice then links A2: the link's profile carries the group
and the group-only contact, A1's device list reaches Bob and Carol in their pairwise sessions
(Carol's group-only one too), both open a session with A2, and from then on their group
messages and changes reach A1 and A2; A2's group message reaches Bob and Carol as Alice's.
And a member added after the link (Dave, introduced to Alice by the group) reaches both devices
as a group-only contact, never a contact request."""

from __future__ import annotations

from collections.abc import Callable

from aegisd.store import contact_devices as cd
from tests.functional.conftest import Peer, connect
from tests.functional.test_devices_fanout import _link, _wait_two_devices
from tests.functional.test_groups import (
    group_of,
    hidden_contacts,
    invited,
    key_of,
    members,
    texts,
)
from tests.functional.test_hostile_contact import offline_store

T = 60.0


def _from(peer: Peer, text: str) -> str | None:
    """Whose key the group message ``text`` shows as from, at ``peer``."""
    g = group_of(peer)
    assert g is not None
    for m in peer.call("group.history", {"group": g["group"]})["messages"]:
        if m["text"] == text:
            return str(m["from"])
    return None


def test_a_group_with_a_member_on_two_devices(peers: Callable[[str], Peer]) -> None:
    a1, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, a1)
    connect(bob, carol)  # Alice and Carol: no contacts of each other
    ed = {p.name: key_of(p) for p in (a1, bob, carol)}
    g = bob.call("group.create", {"name": "two desks"})["group"]
    for n, p in enumerate((a1, carol), 2):
        bob.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        p.wait_for(lambda n=n, p=p: len(members(p)) == n, f"{p.name}'s add", T)
    for p in (a1, bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"{p.name} to see three members", T)
    a1.wait_for(lambda: members(a1)[ed["carol"]]["reachable"], "alice's session to carol", T)
    carol.wait_for(lambda: members(carol)[ed["alice"]]["reachable"], "carol's to alice", T)
    assert len(hidden_contacts(a1)) == len(hidden_contacts(carol)) == 1

    # The link: A2 holds the group (its log came in the profile) and Carol as a group-only
    # contact (hidden, as on A1).
    a2 = peers("alice2")
    _link(a1, a2)
    assert [c["name"] for c in a2.call("contacts.list")["contacts"]] == ["bob"]
    assert len(hidden_contacts(a2)) == 1
    assert set(members(a2)) == set(ed.values())
    # Bob and Carol learn Alice's list in their sessions with her and open one with A2, which
    # answers (what they send before that answer does not go to A2: docs/devices.md §5.5).
    for p in (bob, carol):
        _wait_two_devices(p)
        a2.wait_for(lambda p=p: members(a2)[ed[p.name]]["reachable"], f"{p.name} on A2")

    # Bob's and Carol's group messages: on A1 and A2.
    for p in (bob, carol):
        gp = group_of(p)["group"]  # type: ignore[index]
        sent = p.call("group.send", {"group": gp, "text": f"from {p.name}"})
        assert sent["unreachable"] == 0
        for a in (a1, a2):
            a.wait_for(lambda a=a, p=p: f"from {p.name}" in texts(a), f"{p.name}'s on {a.name}", T)
            assert _from(a, f"from {p.name}") == ed[p.name]

    # A change of Bob's (the owner) reaches both of Alice's devices.
    bob.call("group.rename", {"group": g, "name": "two desks, renamed"})
    for a in (a1, a2):
        a.wait_for(lambda a=a: group_of(a)["name"] == "two desks, renamed",  # type: ignore[index]
                   f"the rename on {a.name}", T)  # fmt: skip

    # A2 writes in the group: Bob and Carol show it as Alice's (her one key).
    ga2 = group_of(a2)["group"]  # type: ignore[index]
    assert a2.call("group.send", {"group": ga2, "text": "from the laptop"})["unreachable"] == 0
    for p in (bob, carol):
        p.wait_for(lambda p=p: "from the laptop" in texts(p), f"A2's on {p.name}", T)
        assert _from(p, "from the laptop") == ed["alice"]
    assert len(members(bob)) == len(members(carol)) == 3  # still one Alice
    # A1 still reaches both.
    ga1 = group_of(a1)["group"]  # type: ignore[index]
    a1.call("group.send", {"group": ga1, "text": "from the desktop"})
    for p in (bob, carol):
        p.wait_for(lambda p=p: "from the desktop" in texts(p), f"A1's on {p.name}", T)


def test_a_member_added_after_the_link_reaches_both_devices(peers: Callable[[str], Peer]) -> None:
    a1, bob, dave = peers("alice"), peers("bob"), peers("dave")
    connect(bob, a1)
    connect(bob, dave)
    g = bob.call("group.create", {"name": "later"})["group"]
    bob.call("group.invite", {"group": g, "contact": "alice"})
    a1.call("group.accept", {"invitation": invited(a1)})
    a1.wait_for(lambda: len(members(a1)) == 2, "alice's add", T)
    a2 = peers("alice2")
    _link(a1, a2)
    _wait_two_devices(bob)  # so that the introduction below reaches A2 too
    bob.call("group.invite", {"group": g, "contact": "dave"})
    dave.call("group.accept", {"invitation": invited(dave)})
    ed = key_of(dave)
    for a in (a1, a2):
        a.wait_for(lambda a=a: ed in members(a), f"dave's add on {a.name}", T)
    # One of A1 and A2 opens Dave's introduction link first (it is one-time); Dave learns
    # Alice's list from that one and opens a session with the other, which takes it as the
    # group contact its own introduction made, without a request.
    _wait_two_devices(dave)
    for a in (a1, a2):
        a.wait_for(lambda a=a: members(a)[ed]["reachable"], f"dave's session with {a.name}")
    gd = group_of(dave)["group"]  # type: ignore[index]
    dave.call("group.send", {"group": gd, "text": "from dave"})
    for a in (a1, a2):
        a.wait_for(lambda a=a: "from dave" in texts(a), f"dave's on {a.name}", T)
    for a in (a1, a2):  # dave is a group-only contact on each, never a request nor shown
        assert a.call("requests.list")["requests"] == []
        assert [c["name"] for c in a.call("contacts.list")["contacts"]] == ["bob"]
        shown = [e["data"]["contact"] for e in a.events(types=["contact.added",
                                                               "contact.established"])]
        assert not [n for n in shown if n.startswith("member ")], shown
    # Which route admitted him where: Dave's session row is with the device whose first
    # contact took his introduction link; the other device holds the session Dave's fanout
    # opened (a device session with it), not a second introduction nor a request.
    this = {a.name: next(d["id"] for d in a.call("devices.list")["devices"] if d["this_device"])
            for a in (a1, a2)}  # fmt: skip
    (alice,) = hidden_contacts(dave)
    s = offline_store(dave)
    try:
        c = s.contact_by_name(alice)
        assert c is not None
        held = cd.held_list(s, c.id)
        assert held is not None and held.session_device is not None
        row = held.session_device.hex()
        opened = {ds.device_id.hex() for ds in cd.device_sessions(s, c.id)}
    finally:
        s.close()
    assert row in this.values() and opened == set(this.values()) - {row}


def _requests_from(peers_: tuple[Peer, ...]) -> int:
    return sum(len(p.call("requests.list")["requests"]) for p in peers_)


def test_a_contacts_add_to_a_device_with_a_list_is_a_request(
    peers: Callable[[str], Peer],
) -> None:
    """A first contact a member's fanout did not open (its contacts.add: a hello without the
    device-session tag) at a device with a list is a contact request, never taken as a
    hidden group contact (docs/devices.md §5.5): from a member, a non-member, and a member
    removed from the group."""
    a1, bob, carol, eve = peers("alice"), peers("bob"), peers("carol"), peers("eve")
    connect(bob, a1)
    connect(bob, carol)
    g = bob.call("group.create", {"name": "asks"})["group"]
    for n, p in enumerate((a1, carol), 2):
        bob.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        p.wait_for(lambda n=n, p=p: len(members(p)) == n, f"{p.name}'s add", T)
    a1.wait_for(lambda: len(members(a1)) == 3, "alice to see three members", T)
    ed_carol = key_of(carol)
    a1.wait_for(lambda: members(a1)[ed_carol]["reachable"], "alice's session to carol", T)
    a2 = peers("alice2")
    _link(a1, a2)
    _wait_two_devices(carol)  # Carol's tagged session with A2: a hidden group contact there
    assert len(hidden_contacts(a2)) == 1
    assert a2.call("requests.list")["requests"] == []
    # Both forget each other (Alice on both devices), Carol staying in the group held: her
    # contacts.add to Alice's address must show as a request, not vanish into the group.
    for p in (a1, a2, carol):
        (hidden,) = hidden_contacts(p)
        p.call("contacts.remove", {"name": hidden})
    link = a1.call("address.get")["link"]
    carol.call("contacts.add", {"name": "alice", "link": link})
    a1.wait_for(lambda: _requests_from((a1, a2)) == 1, "carol's request", T)
    assert hidden_contacts(a1) == hidden_contacts(a2) == []
    # A non-member's: a request too.
    eve.call("contacts.add", {"name": "alice", "link": link})
    a1.wait_for(lambda: _requests_from((a1, a2)) == 2, "eve's request", T)
    # A removed member's (Carol out of the group, then her request again, to a fresh link
    # of hers: the same identity merges into her request, so count names instead).
    bob.call("group.remove", {"group": g, "member": "carol"})
    a1.wait_for(lambda: ed_carol not in members(a1), "carol's removal on A1", T)
    carol.call("contacts.remove", {"name": "alice"})
    carol.call("contacts.add", {"name": "alice again", "link": link})
    a1.wait_for(
        lambda: len(a1.call("requests.list")["requests"] + a2.call("requests.list")["requests"])
        == 2 and not hidden_contacts(a1) and not hidden_contacts(a2),
        "carol's request after her removal", T,
    )  # fmt: skip
