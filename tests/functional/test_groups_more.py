"""Groups between real daemons on a real relay, the cases test_groups.py does not cover (issue
16, "Group state"): a five-member group with members introduced to each other, a member
offline during changes who catches up, two admins removing each other at once, messages
sent by a member who does not know yet that it was removed, the last owner, and invitation
spam from a hostile contact (docs/protocol.md §25.4 to §25.9)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.store import groups as G
from tests.functional.conftest import Peer, connect
from tests.functional.test_groups import (
    group_of,
    hidden_contacts,
    invited,
    key_of,
    members,
    outbox_size,
    texts,
)
from tests.functional.test_hostile_contact import offline_store
from tests.relay.conftest import RelayProcess

T = 90.0


def ref(peer: Peer) -> int:
    g = group_of(peer)
    assert g is not None, peer.name
    return int(g["group"])


def head(peer: Peer) -> tuple[int, str, frozenset[str]]:
    """What must agree between members: version, name, member keys (with roles)."""
    g = group_of(peer)
    assert g is not None, peer.name
    return g["version"], g["name"], frozenset(f"{m['key']}:{m['role']}" for m in g["members"])


def stored_log(peer: Peer) -> core.GroupLog:
    s = offline_store(peer)
    try:
        row = G.list_groups(s)[0]
        return core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))
    finally:
        s.close()


def history(peer: Peer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = peer.call("group.history", {"group": ref(peer), "limit": 500})[
        "messages"
    ]
    return out


def join(owner: Peer, gref: int, peer: Peer, everyone: list[Peer]) -> None:
    """`owner` invites its contact `peer`, who accepts; waits until every one of `everyone`
    (the members then) has a session with every other."""
    owner.call("group.invite", {"group": gref, "contact": peer.name})
    peer.call("group.accept", {"invitation": invited(peer)})
    keys = {p.name: key_of(p) for p in everyone}
    for p in everyone:
        p.wait_for(
            lambda p=p: (len(ms := members(p)) == len(everyone)
                         and all(ms[k]["reachable"] for k in keys.values() if k in ms)),
            f"{p.name} to reach all {len(everyone)} members", T,
        )  # fmt: skip


def form(owner: Peer, others: list[Peer], name: str) -> int:
    """A group of `owner` (a contact of each of `others`) and `others`, all reachable."""
    gref = int(owner.call("group.create", {"name": name})["group"])
    now = [owner]
    for p in others:
        now.append(p)
        join(owner, gref, p, now)
    return gref


def drained(peers: list[Peer]) -> None:
    for p in peers:
        p.wait_for(lambda p=p: outbox_size(p) == 0, f"{p.name}'s outbox to drain", T)


# --- a five-member group ----------------------------------------------------------------------


def test_five_members_messages_delivery_and_a_removal(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Everybody sees everybody's message, each "delivered to 4 of 4"; a removed member gets
    nothing sent after; the four others go on. Ann knows everyone; Ben and Cal know each
    other; the other pairs meet through the group."""
    t0 = time.monotonic()
    ann, ben, cal, dan, eve = (peers(n) for n in ("ann", "ben", "cal", "dan", "eve"))
    everyone = [ann, ben, cal, dan, eve]
    for p in everyone[1:]:
        connect(p, ann)
    connect(cal, ben)
    form(ann, everyone[1:], "Five of us 9c2e")
    assert [c["name"] for c in dan.call("contacts.list")["contacts"]] == ["ann"]
    assert len(hidden_contacts(dan)) == 3  # ben, cal and eve: through the group only
    assert len(hidden_contacts(cal)) == 2  # dan and eve (ben is a contact)
    print(f"five members formed in {time.monotonic() - t0:.1f}s")

    for p in everyone:
        sent = p.call("group.send", {"group": ref(p), "text": f"hello from {p.name}"})
        assert (sent["recipients"], sent["unreachable"]) == (4, 0)
    want = {f"hello from {p.name}" for p in everyone}
    for p in everyone:
        p.wait_for(lambda p=p: set(texts(p)) == want, f"{p.name} to see every message", T)
    for p in everyone:
        p.wait_for(
            lambda p=p: [m["delivery"]["delivered"] for m in history(p) if m["direction"] == "out"]
            == [4], f"{p.name}'s message delivered to 4", T,
        )  # fmt: skip
        (mine,) = [m for m in history(p) if m["direction"] == "out"]
        assert mine["delivery"]["recipients"] == 4
        assert set(mine["delivery"]["members"].values()) == {"delivered"}
        assert sorted(texts(p)) == sorted(want)  # each once

    # Eve removed (by Ben, made an admin): she learns it; what follows never reaches her.
    ann.call("group.role", {"group": ref(ann), "member": key_of(ben), "role": "admin"})
    ben.wait_for(lambda: group_of(ben)["role"] == "admin", "ben an admin", T)  # type: ignore[index]
    ben.call("group.remove", {"group": ref(ben), "member": key_of(eve)})
    eve.wait_for(lambda: group_of(eve)["role"] is None, "eve's removal", T)  # type: ignore[index]
    four = everyone[:4]
    for p in four:
        p.wait_for(lambda p=p: len(members(p)) == 4, f"{p.name} to apply the removal", T)
    assert len({head(p) for p in four}) == 1
    for p in four:
        sent = p.call("group.send", {"group": ref(p), "text": f"{p.name} after eve"})
        assert (sent["recipients"], sent["unreachable"]) == (3, 0)
    after = {f"{p.name} after eve" for p in four}
    for p in four:
        p.wait_for(lambda p=p: after <= set(texts(p)), f"{p.name} to see the four", T)
        p.wait_for(
            lambda p=p: [m["delivery"]["delivered"] for m in history(p)
                         if m["direction"] == "out"][-1] == 3, f"{p.name}: 3 of 3", T,
        )  # fmt: skip
    drained(four)
    # eve's group contacts (dan, ben's is a contact...): gone at both ends, nothing waits
    eve.wait_for(lambda: len(hidden_contacts(eve)) == 0, "eve's group contacts to go", T)
    assert not after & set(texts(eve))
    with pytest.raises(RpcCallError) as err:
        eve.call("group.send", {"group": ref(eve), "text": "eve still here?"})
    assert err.value.data["reason"] == "not_a_member"
    print(f"five members, whole test {time.monotonic() - t0:.1f}s")
