"""Groups between one's own devices (issue 19, docs/devices.md §6 "Groups", payload 0x4A): a
real relay and four daemons, Alice on A1 and A2 (linked before any group), Bob and Carol her
contacts. A group A1 makes after the link reaches A2 with every change A1 makes (the adds,
a removal, the leave); A2 receives the members' messages and sends in it; what A1 sends in it
shows on A2 as sent, once, under the same ID; and a removed device's 0x4A changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices_fanout import _link, _wait_two_devices
from tests.functional.test_devices_sync import _sync_events, _this_id
from tests.functional.test_groups import (
    group_of,
    hidden_contacts,
    invited,
    key_of,
    members,
    texts,
)

T = 60.0


def _history(peer: Peer) -> list[dict[str, Any]]:
    g = group_of(peer)
    assert g is not None
    out: list[dict[str, Any]] = peer.call("group.history", {"group": g["group"]})["messages"]
    return out


def _established(peer: Peer) -> bool:
    return all(c["established"] for c in peer.call("contacts.list")["contacts"])


def test_a_group_made_after_the_link_follows_on_the_other_device(
    peers: Callable[[str], Peer],
) -> None:
    a1, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(a1, bob)
    connect(a1, carol)
    a2 = peers("alice2")
    _link(a1, a2)
    for me, other in ((a1, a2), (a2, a1)):
        me.wait_for(lambda me=me, other=other: _this_id(other) in
                    {e["device"] for e in _sync_events(me, "open")}, "the sync session",
                    T_DEVICE)  # fmt: skip
    for p in (bob, carol):
        _wait_two_devices(p)
    a2.wait_for(lambda: _established(a2), "bob's and carol's sessions with A2", T_DEVICE)
    ed = {p.name: key_of(p) for p in (a1, bob, carol)}

    # A1 makes the group and adds Bob and Carol: A2 holds it with all three, A1's changes
    # having come over sync (the members' adds were never sent to A2).
    g1 = a1.call("group.create", {"name": "after the link"})["group"]
    for n, p in enumerate((bob, carol), 2):
        a1.call("group.invite", {"group": g1, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        a1.wait_for(lambda n=n: len(members(a1)) == n, f"{p.name}'s add on A1", T)
    a2.wait_for(lambda: set(members(a2)) == set(ed.values()), "the group on A2", T)
    assert group_of(a2)["name"] == "after the link"  # type: ignore[index]
    assert a2.call("requests.list")["requests"] == []
    for p in (bob, carol):
        p.wait_for(lambda p=p: len(members(p)) == 3, f"three members on {p.name}", T)

    # Bob's group message reaches A2 (Bob fans out to both of Alice's devices).
    gb = group_of(bob)["group"]  # type: ignore[index]
    assert bob.call("group.send", {"group": gb, "text": "from bob"})["unreachable"] == 0
    for a in (a1, a2):
        a.wait_for(lambda a=a: "from bob" in texts(a), f"bob's on {a.name}", T)
    # A2's reaches Bob and Carol, as Alice's.
    g2 = group_of(a2)["group"]  # type: ignore[index]
    assert a2.call("group.send", {"group": g2, "text": "from the laptop"})["unreachable"] == 0
    for p in (bob, carol):
        p.wait_for(lambda p=p: "from the laptop" in texts(p), f"A2's on {p.name}", T)
        sent = next(m for m in _history(p) if m["text"] == "from the laptop")
        assert sent["from"] == ed["alice"]

    # A1's group message: on A2 as sent, same ID, once (and A2's on A1 likewise).
    mid = a1.call("group.send", {"group": g1, "text": "from the desktop"})["message_id"]
    a2.wait_for(lambda: "from the desktop" in texts(a2), "A1's transcript on A2", T)
    a1.wait_for(lambda: "from the laptop" in texts(a1), "A2's transcript on A1", T)
    for a, text in ((a2, "from the desktop"), (a1, "from the laptop")):
        shown = [m for m in _history(a) if m["text"] == text]
        assert len(shown) == 1 and shown[0]["direction"] == "out", shown
    assert next(m for m in _history(a2) if m["text"] == "from the desktop")["message_id"] == mid
    assert [e["data"]["message_id"] for e in a2.events(types=["group.transcript"])
            if e["data"]["text"] == "from the desktop"] == [mid]  # fmt: skip

    # A1 removes Carol, renames the group: A2 follows each.
    a1.call("group.remove", {"group": g1, "member": ed["carol"]})
    a2.wait_for(lambda: ed["carol"] not in members(a2), "carol's removal on A2", T)
    a1.call("group.rename", {"group": g1, "name": "two of us"})
    a2.wait_for(lambda: group_of(a2)["name"] == "two of us", "the rename on A2",  # type: ignore[index]
                T)  # fmt: skip
    # A1 sets the group's disappearing timer (members get it, not A2): its state carries it.
    a1.call("conversations.set_timer", {"group": g1, "seconds": 3600})
    a2.wait_for(lambda: a2.call("conversations.get_timer", {"group": g2})["seconds"] == 3600,
                "the group's timer on A2", T)  # fmt: skip
    # Bob made an owner (the last owner may not leave), then A1 leaves: A2 has left too (no
    # longer a member), and Bob sees Alice gone.
    a1.call("group.role", {"group": g1, "member": ed["bob"], "role": "owner"})
    a2.wait_for(lambda: members(a2)[ed["bob"]]["role"] == "owner", "bob an owner on A2", T)
    a1.call("group.leave", {"group": g1})
    a2.wait_for(lambda: not a2.call("group.list")["groups"][0]["member"], "the leave on A2", T)
    bob.wait_for(lambda: ed["alice"] not in members(bob), "alice gone at bob", T)

    # A2 removed: a group it makes afterwards never reaches A1 (A1 deleted its sync mailbox
    # for A2: the relay refuses A2's 0x4A, and A2 says so, `devices.sync` `gone`).
    a2_id, a1_id = _this_id(a2), _this_id(a1)
    a1.call("devices.remove", {"id": a2_id})
    a2.call("group.create", {"name": "from the removed laptop"})
    a2.wait_for(lambda: a1_id in {e["device"] for e in _sync_events(a2, "gone")},
                "the relay's refusal of A2's deposit", T_DEVICE)  # fmt: skip
    assert [g["name"] for g in a1.call("group.list")["groups"]] == ["two of us"]


def test_a_group_joined_after_the_link_follows_with_its_group_only_member(
    peers: Callable[[str], Peer],
) -> None:
    """Bob's group holds Carol (no contact of Alice's); A1 joins it after the link: A2 holds
    it once the add is applied on A1, Carol as a group-only contact there too, which her
    session with A2 then fills; messages go both ways between A2 and Carol."""
    a1, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(a1, bob)
    connect(bob, carol)
    g = bob.call("group.create", {"name": "joined later"})["group"]
    bob.call("group.invite", {"group": g, "contact": "carol"})
    carol.call("group.accept", {"invitation": invited(carol)})
    bob.wait_for(lambda: len(members(bob)) == 2, "carol's add", T)
    a2 = peers("alice2")
    _link(a1, a2)
    _wait_two_devices(bob)
    a2.wait_for(lambda: _established(a2), "bob's session with A2", T_DEVICE)
    assert a2.call("group.list")["groups"] == []

    bob.call("group.invite", {"group": g, "contact": "alice"})
    a1.call("group.accept", {"invitation": invited(a1)})
    ed = {p.name: key_of(p) for p in (a1, bob, carol)}
    a1.wait_for(lambda: len(members(a1)) == 3, "alice's add on A1", T)
    a2.wait_for(lambda: set(members(a2)) == set(ed.values()), "the group on A2", T)
    assert a2.call("group.list")["groups"][0]["member"]
    # Carol learns Alice's list from A1 (her group contact) and opens a session with A2,
    # which takes it as a group contact (a member of a group it holds); if it came before
    # the group's state, its request is taken so when the state arrives.
    a2.wait_for(lambda: members(a2)[ed["carol"]]["reachable"], "carol's session on A2",
                T_DEVICE)  # fmt: skip
    assert len(hidden_contacts(a2)) == len(hidden_contacts(a1)) == 1
    # A2's message first: once it is at Carol, so is A2's answer to her session (before it
    # in that session), and Carol's message reaches A2 too.
    g2 = group_of(a2)["group"]  # type: ignore[index]
    assert a2.call("group.send", {"group": g2, "text": "from the laptop"})["unreachable"] == 0
    for p in (bob, carol):
        p.wait_for(lambda p=p: "from the laptop" in texts(p), f"A2's on {p.name}", T)
    gc = group_of(carol)["group"]  # type: ignore[index]
    carol.call("group.send", {"group": gc, "text": "from carol"})
    for a in (a1, a2):
        a.wait_for(lambda a=a: "from carol" in texts(a), f"carol's on {a.name}", T)
    for a in (a1, a2):
        assert a.call("requests.list")["requests"] == []
        assert [c["name"] for c in a.call("contacts.list")["contacts"]] == ["bob"]
