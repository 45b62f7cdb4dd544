"""Groups between real daemons on a real relay, the cases test_groups.py does not cover (issue
16, "Group state"): a five-member group with members introduced to each other, a member
offline during changes who catches up, two admins removing each other at once, messages
sent by a member who does not know yet that it was removed, the last owner, and invitation
spam from a hostile contact (docs/protocol.md §25.4 to §25.9)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.identity import PublicIdentity
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.services.delivery import PENDING_DESTINATION
from aegisd.services.groups_state import SETTING_PRUNE_AFTER
from aegisd.services.mailbox import ContactState
from aegisd.store import groups as G
from relay.storage import deposit_key
from tests.functional.conftest import Peer, connect
from tests.functional.test_groups import (
    group_of,
    hidden_contacts,
    invited,
    key_of,
    members,
    no_grace,
    outbox_size,
    texts,
    waiting_at_relay,
)
from tests.functional.test_hostile_contact import offline_store, queued, received, text, url_of
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

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


def writes_to(peer: Peer, key: str) -> bytes:
    """The deposit id of the mailbox `peer` writes to for the member with this key."""
    s = offline_store(peer)
    try:
        for c in s.list_contacts():
            if c.identity_key and PublicIdentity.from_bytes(c.identity_key).ed_pub.hex() == key:
                send_to = ContactState.from_bytes(c.state).send_to
                assert send_to is not None
                return bytes(send_to.deposit_id)
    finally:
        s.close()
    raise AssertionError(f"{peer.name} has no contact with {key}")


def waiting_in(relay: RelayProcess, deposit_ids: list[bytes]) -> int:
    """Blocks waiting at the relay in these mailboxes: the relay's own view."""
    with sqlite3.connect(relay.data / "relay.sqlite3", timeout=10) as db:
        return sum(int(db.execute(
            "SELECT count(*) FROM messages JOIN mailboxes ON messages.mailbox = mailboxes.id "
            "WHERE mailboxes.deposit_key = ?", (deposit_key(d),)).fetchone()[0])
            for d in deposit_ids)  # fmt: skip


def hidden_keys(peer: Peer) -> set[str]:
    s = offline_store(peer)
    try:
        hidden = G.group_contact_ids(s)
        return {PublicIdentity.from_bytes(c.identity_key).ed_pub.hex()
                for c in s.list_contacts() if c.id in hidden and c.identity_key}  # fmt: skip
    finally:
        s.close()


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
    four = everyone[:4]
    for p in four:
        no_grace(p)  # group contacts that share no group go at once, not after days
    ek = key_of(eve)
    to_eve = [writes_to(p, ek) for p in four]  # the mailboxes each of the four writes to
    ann.call("group.role", {"group": ref(ann), "member": key_of(ben), "role": "admin"})
    ben.wait_for(lambda: group_of(ben)["role"] == "admin", "ben an admin", T)  # type: ignore[index]
    ben.call("group.remove", {"group": ref(ben), "member": ek})
    eve.wait_for(lambda: group_of(eve)["role"] is None, "eve's removal", T)  # type: ignore[index]
    for p in four:
        p.wait_for(lambda p=p: len(members(p)) == 4, f"{p.name} to apply the removal", T)
    assert len({head(p) for p in four}) == 1
    drained(four)
    eve.stop()  # from here on, what is sent to her waits at the relay
    before = waiting_in(relay_proc, to_eve)
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
    assert waiting_in(relay_proc, to_eve) == before  # nothing of the four's went to eve
    for p in (ben, cal, dan):  # their sessions with eve went (her mailboxes with them)
        p.wait_for(lambda p=p: ek not in hidden_keys(p), f"{p.name}: eve gone", T)
    # eve's own group contacts go at her deadlines (moved here): after her next connection
    s = offline_store(eve)
    try:
        s._q("UPDATE group_contacts SET remove_at = 0 WHERE remove_at IS NOT NULL")
    finally:
        s.close()
    eve.start()
    eve.wait_for(lambda: len(hidden_contacts(eve)) == 0, "eve's group contacts to go", T)
    assert not after & set(texts(eve))
    with pytest.raises(RpcCallError) as err:
        eve.call("group.send", {"group": ref(eve), "text": "eve still here?"})
    assert err.value.data["reason"] == "not_a_member"
    print(f"five members, whole test {time.monotonic() - t0:.1f}s")


# --- two admins removing each other -----------------------------------------------------------


def test_two_admins_removing_each_other_at_once(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Both removals are made while the relay is down (neither has the other's): every member
    ends at the head §25.5 names (equal roles, both removals: the lower SHA-256(parent head ||
    author key) wins), the loser learns it is out, and what it sends afterwards is refused."""
    ann, ben, cal, dan = (peers(n) for n in ("ann", "ben", "cal", "dan"))
    for p in (ben, cal, dan):
        connect(p, ann)
    gref = form(ann, [ben, cal, dan], "Two admins 0d4b")
    for p in (ben, cal):
        ann.call("group.role", {"group": gref, "member": key_of(p), "role": "admin"})
    for p in (ann, ben, cal, dan):
        p.wait_for(lambda p=p: group_of(p)["version"] == 5, f"{p.name} at version 5", T)  # type: ignore[index]
    parent = stored_log(ann).head.head
    # §25.5: equal roles, both removals; the lower SHA-256(parent head || author key) wins
    winner, loser = sorted(
        (ben, cal), key=lambda p: hashlib.sha256(parent + bytes.fromhex(key_of(p))).digest()
    )
    print(f"winner {winner.name}, loser {loser.name}")

    relay_proc.terminate()
    winner.call("group.remove", {"group": ref(winner), "member": key_of(loser)})
    loser.call("group.remove", {"group": ref(loser), "member": key_of(winner)})
    # The winner's change held back until Dan applied the loser's: Dan removes the winner
    # first, keeps his session with it for the grace (groups_state.PRUNE_AFTER_MS), and the
    # winner's change, which undoes that removal, reaches him through it (§25.5, §25.9).
    wk = key_of(winner)
    winner.stop()
    relay_proc.start()
    dan.wait_for(lambda: wk not in members(dan), "dan to apply the loser's change", T)
    assert len(hidden_contacts(dan)) == 2
    winner.start()

    stay = [ann, winner, dan]
    for p in stay:
        p.wait_for(lambda p=p: key_of(loser) not in members(p) and key_of(winner) in members(p),
                   f"{p.name} to end without {loser.name}", T)  # fmt: skip
    assert len({head(p) for p in stay}) == 1
    assert head(ann)[0] == 6
    loser.wait_for(lambda: group_of(loser)["role"] is None, f"{loser.name} to learn it is out", T)  # type: ignore[index]
    assert head(loser) == head(ann)
    with pytest.raises(RpcCallError) as err:
        loser.call("group.send", {"group": ref(loser), "text": "the loser writes"})
    assert err.value.data["reason"] == "not_a_member"
    for p in stay:
        sent = p.call("group.send", {"group": ref(p), "text": f"{p.name} at 6"})
        assert sent["recipients"] == 2
    for p in stay:
        p.wait_for(lambda p=p: {f"{q.name} at 6" for q in stay if q is not p} <= set(texts(p)),
                   f"{p.name} to see the others at 6", T)  # fmt: skip
    # dan keeps his session with the loser for the grace period (groups_state.PRUNE_AFTER_MS)
    assert len(hidden_contacts(dan)) == 2
    # the loser's own software writes on anyway (its stamp: 6): the others drop it
    group_id = stored_log(ann).head.group_id
    loser.stop()
    with hostile(loser.home, "ann") as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(wire.GroupMessagePayload(
            group_id, 6, os.urandom(16), int(time.time() * 1000), "the loser again")))  # fmt: skip
        ann.wait_for(lambda: queued(relay_proc, h) == 0, "ann to take the block", T)
    # ...and invites Dan, with whom it shares no group now: Dan keeps the session only for a
    # change undoing the removal, and drops the invitation (§25.9)
    dk = key_of(dan)
    s = offline_store(loser)
    try:
        (to_dan,) = [c.name for c in s.list_contacts() if c.identity_key
                     and PublicIdentity.from_bytes(c.identity_key).ed_pub.hex() == dk]  # fmt: skip
        state = s.get_identity()
        assert state is not None
        me = PrekeyStore.from_bytes(state).identity
    finally:
        s.close()
    with hostile(loser.home, to_dan) as h:
        h.deposit(url_of(relay_proc), h.payload_blocks(wire.GroupInvitePayload(
            os.urandom(16), int(time.time() * 1000),
            core.sign_state(me, core.create_group(SystemEntropy(), me, "From the loser")), ())))
        dan.wait_for(lambda: queued(relay_proc, h) == 0, "dan to take the invitation", T)
    assert dan.call("group.invitations")["invitations"] == []
    ann.call("group.send", {"group": gref, "text": "ann after the loser"})
    dan.wait_for(lambda: "ann after the loser" in texts(dan), "dan to hear ann", T)
    assert "the loser again" not in texts(ann)
    # past the deadline (moved here, the daemon stopped meanwhile): the sweep after the next
    # connection removes dan's session with the loser, and keeps the one with the winner
    # (which lost its mark when the winner's change made it a member again)
    dan.stop()
    s = offline_store(dan)
    try:
        marks = [G.departed(s, cid) for cid in G.group_contact_ids(s)]
        assert sorted(m is None for m in marks) == [False, True]
        s._q("UPDATE group_contacts SET remove_at = 0 WHERE remove_at IS NOT NULL")
    finally:
        s.close()
    dan.start()
    dan.wait_for(lambda: len(hidden_contacts(dan)) == 1, "dan's session with the loser to go", T)
    assert members(dan)[key_of(winner)]["reachable"]


def test_a_departed_contact_that_never_answered_goes_anyway(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Cal opens a session with Ben (introduced) and writes to him; Ben never answers (his
    daemon stopped before Cal opened it), so Cal's block waits for his answer for good
    (delivery.PENDING_DESTINATION). Ann removes Ben: Cal's group contact with him goes after
    the grace all the same, with the block."""
    ann, cal, ben = peers("ann"), peers("cal"), peers("ben")
    connect(cal, ann)
    connect(ben, ann)
    gref = form(ann, [cal], "Never answered 3f7a")
    cal.stop()  # Ben's introduction link reaches Cal only once Ben is gone
    ann.call("group.invite", {"group": gref, "contact": "ben"})
    ben.call("group.accept", {"invitation": invited(ben)})
    ben.wait_for(lambda: outbox_size(ben) == 0, "ben's answer to leave", T)
    bk = key_of(ben)
    ann.wait_for(lambda: bk in members(ann), "ann to add ben", T)
    drained([ann])
    ben.stop()
    cal.start()
    cal.wait_for(lambda: bk in members(cal) and len(hidden_contacts(cal)) == 1,
                 "cal to open a session with ben", T)  # fmt: skip
    cal.call("group.send", {"group": gref, "text": "hi ben"})

    def to_ben() -> list[bytes]:
        s = offline_store(cal)
        try:
            (hidden,) = G.group_contact_ids(s)
            rows = s._q("SELECT destination FROM outbox WHERE contact_id = ?",
                        (hidden,)).fetchall()  # fmt: skip
            return [bytes(r[0]) for r in rows]
        finally:
            s.close()

    # The blocks to Ben wait for his answer (the one to Ann leaves): the text, and the group's
    # timer in force, shared once the session opened (docs/protocol.md §25.11; queued just
    # after the contact appears, so waited for).
    cal.wait_for(lambda: len(to_ben()) == 2, "the text and the timer to wait for ben", T)
    assert to_ben() == [PENDING_DESTINATION] * 2
    no_grace(cal)
    s = offline_store(cal)
    try:
        s.set_setting(SETTING_PRUNE_AFTER, 5000)
    finally:
        s.close()
    ann.call("group.remove", {"group": gref, "member": bk})
    cal.wait_for(lambda: bk not in members(cal), "cal to apply the removal", T)
    # A deadline that passes while the relay is down: Cal keeps the contact (a change that
    # reached the relay meanwhile could undo the removal) until a connection read its mailbox.
    relay_proc.terminate()
    time.sleep(7)
    assert len(hidden_contacts(cal)) == 1
    relay_proc.start()
    cal.wait_for(lambda: hidden_contacts(cal) == [], "cal's contact with ben to go", T)
    assert outbox_size(cal) == 0


# --- a member offline during changes ----------------------------------------------------------


def by_author(peer: Peer, author: Peer) -> list[str]:
    key = key_of(author)
    return [m["text"] for m in history(peer) if m["direction"] == "in" and m["from"] == key]


def test_an_offline_member_catches_up(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Cal's daemon is stopped while the group is renamed, gets Dan and loses Eve, and Ann and
    Ben write; restarted, Cal holds the others' head and every message once, in order per
    author, and is introduced to Dan, who joined meanwhile."""
    ann, ben, cal, dan, eve = (peers(n) for n in ("ann", "ben", "cal", "dan", "eve"))
    for p in (ben, cal, dan, eve):
        connect(p, ann)
    gref = form(ann, [ben, cal, eve], "Catch up 5e1a")
    cal.stop()

    ann.call("group.rename", {"group": gref, "name": "Caught up 5e1a"})
    for i in (1, 2):
        for p in (ann, ben):
            p.call("group.send", {"group": ref(p), "text": f"{p.name} {i}"})
    ann.call("group.invite", {"group": gref, "contact": "dan"})
    dan.call("group.accept", {"invitation": invited(dan)})
    for p in (ann, ben, eve, dan):
        p.wait_for(lambda p=p: key_of(dan) in members(p), f"{p.name} to see dan", T)
    ann.call("group.remove", {"group": gref, "member": key_of(eve)})
    for p in (ann, ben):
        p.call("group.send", {"group": ref(p), "text": f"{p.name} 3"})
    online = [ann, ben, dan]
    for p in online:
        p.wait_for(lambda p=p: head(p)[0] == 6 and len(members(p)) == 4, f"{p.name} at 6", T)
    assert len({head(p) for p in online}) == 1
    drained([ann, ben])  # all that cal must catch up on waits at the relay

    cal.start()
    cal.wait_for(lambda: head(cal) == head(ann), "cal to reach the others' head", T)
    assert head(cal)[1] == "Caught up 5e1a"
    for author in (ann, ben):
        want = [f"{author.name} {i}" for i in (1, 2, 3)]
        cal.wait_for(lambda a=author, w=want: by_author(cal, a) == w,
                     f"{author.name}'s messages at cal, in order", T)  # fmt: skip
    # introduced to dan meanwhile: the session opens now that cal is back
    cal.wait_for(lambda: members(cal)[key_of(dan)]["reachable"], "cal's session to dan", T)
    dan.wait_for(lambda: members(dan)[key_of(cal)]["reachable"], "dan's session to cal", T)
    sent = dan.call("group.send", {"group": ref(dan), "text": "dan to all"})
    assert (sent["recipients"], sent["unreachable"]) == (3, 0)
    cal.wait_for(lambda: by_author(cal, dan) == ["dan to all"], "dan's message at cal", T)
    assert len(texts(cal)) == 7  # each once
    sent = cal.call("group.send", {"group": ref(cal), "text": "cal is back"})
    assert (sent["recipients"], sent["unreachable"]) == (3, 0)
    for p in online:
        p.wait_for(lambda p=p: "cal is back" in texts(p), f"{p.name} to hear cal", T)
    assert "cal is back" not in texts(eve)


# --- the last owner, and leaving --------------------------------------------------------------


def test_the_last_owner_and_leaving(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    ann, ben, cal = (peers(n) for n in ("ann", "ben", "cal"))
    for p in (ben, cal):
        connect(p, ann)
    gref = form(ann, [ben, cal], "Owners 77b0")
    ann.call("group.role", {"group": gref, "member": key_of(cal), "role": "admin"})
    cal.wait_for(lambda: group_of(cal)["role"] == "admin", "cal an admin", T)  # type: ignore[index]

    def refused(p: Peer, method: str, params: dict[str, Any], reason: str) -> None:
        before = head(p)
        with pytest.raises(RpcCallError) as err:
            p.call(method, {"group": ref(p), **params})
        assert (err.value.error, err.value.data["reason"]) == ("group_refused", reason)
        assert head(p) == before

    # the last owner can neither leave, nor be demoted, nor be removed (by an admin)
    refused(ann, "group.leave", {}, "last_owner")
    refused(ann, "group.role", {"member": key_of(ann), "role": "admin"}, "last_owner")
    refused(cal, "group.remove", {"member": key_of(ann)}, "not_permitted")
    refused(ann, "group.remove", {"member": key_of(ann)}, "invalid_change")
    refused(cal, "group.role", {"member": key_of(ben), "role": "owner"}, "not_permitted")

    # ann names ben an owner, then leaves: everyone sees it, ben is the owner
    ann.call("group.role", {"group": gref, "member": key_of(ben), "role": "owner"})
    ben.wait_for(lambda: group_of(ben)["role"] == "owner", "ben an owner", T)  # type: ignore[index]
    assert ann.call("group.leave", {"group": gref}) == {"group": gref, "deleted": False}
    for p in (ben, cal):
        p.wait_for(lambda p=p: key_of(ann) not in members(p), f"{p.name} to see ann leave", T)
    assert group_of(ann)["role"] is None  # type: ignore[index]
    assert len({head(p) for p in (ann, ben, cal)}) == 1
    with pytest.raises(RpcCallError) as err:
        ann.call("group.send", {"group": gref, "text": "ann, gone"})
    assert err.value.data["reason"] == "not_a_member"
    sent = ben.call("group.send", {"group": ref(ben), "text": "ben, owner now"})
    assert (sent["recipients"], sent["unreachable"]) == (1, 0)
    cal.wait_for(lambda: "ben, owner now" in texts(cal), "cal to hear ben", T)
    drained([ben])
    assert "ben, owner now" not in texts(ann)

    # ben is the last owner now: the same rules; cal leaves; ben, alone, deletes the group
    refused(ben, "group.leave", {}, "last_owner")
    refused(cal, "group.remove", {"member": key_of(ben)}, "not_permitted")
    assert cal.call("group.leave", {"group": ref(cal)})["deleted"] is False
    ben.wait_for(lambda: list(members(ben)) == [key_of(ben)], "ben alone", T)
    assert ben.call("group.leave", {"group": ref(ben)})["deleted"] is True
    assert ben.call("group.list")["groups"] == []


# --- messages in flight at a removal ----------------------------------------------------------


def test_messages_of_a_member_who_does_not_know_it_was_removed(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """What Ben sent before his removal reached the others stays; what he sends after it,
    not knowing (his daemon stopped, his own software stamping his old version), is
    dropped; restarted, he learns of it and gets nothing sent since."""
    ann, ben, cal = (peers(n) for n in ("ann", "ben", "cal"))
    for p in (ben, cal):
        connect(p, ann)
    gref = form(ann, [ben, cal], "In flight 31c9")
    ben.call("group.send", {"group": ref(ben), "text": "ben before"})
    for p in (ann, cal):
        p.wait_for(lambda p=p: "ben before" in texts(p), f"{p.name} to get ben's message", T)
    group_id = stored_log(ann).head.group_id
    stamp, ben_key = head(ben)[0], key_of(ben)
    ben.stop()
    ann.call("group.remove", {"group": gref, "member": ben_key})
    cal.wait_for(lambda: ben_key not in members(cal), "cal to apply the removal", T)
    with hostile(ben.home, "ann") as h:  # ben's own software: his last version's stamp
        h.deposit(url_of(relay_proc), h.payload_blocks(wire.GroupMessagePayload(
            group_id, stamp, os.urandom(16), int(time.time() * 1000), "ben after")))  # fmt: skip
        ann.wait_for(lambda: queued(relay_proc, h) == 0, "ann to take the block", T)
    drained([ann])
    to_ben = [writes_to(ann, ben_key)]
    before = waiting_in(relay_proc, to_ben)  # the removal, maybe a receipt
    ann.call("group.send", {"group": gref, "text": "ann after"})
    cal.wait_for(lambda: "ann after" in texts(cal), "cal to get ann's message", T)
    drained([ann])
    assert waiting_in(relay_proc, to_ben) == before  # nothing of it went to ben
    assert "ben before" in texts(ann) and "ben before" in texts(cal)
    assert "ben after" not in texts(ann)
    drained([ann])
    ben.start()
    ben.wait_for(lambda: group_of(ben)["role"] is None, "ben to learn of his removal", T)  # type: ignore[index]
    assert head(ben) == head(ann)
    assert "ann after" not in texts(ben)


# --- invitation spam --------------------------------------------------------------------------

MARK = "EVIL-7c1f"


def test_invitation_spam_is_capped_and_malformed_invitations_refused(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """A hostile contact's malformed invitations (undecodable, a forbidden character in the
    name, a forged base, more changes than the window) leave nothing; then seven contacts
    send 21 valid ones: at most 3 of one contact wait (a fourth replaces its oldest) and 20
    in all (the 21st is dropped). The daemon answers throughout, and its log counts what it
    refused in fixed phrases, never the invitations' text."""
    vic = peers("vic")
    senders = [peers(f"s{i}") for i in range(7)]
    for s in senders:
        connect(s, vic)
    mal = senders[0]
    mal.stop()
    with hostile(mal.home, "vic") as h:
        state = h.store.get_identity()
        assert state is not None
        me = PrekeyStore.from_bytes(state).identity

        def invite(group: core.GroupState, changes: tuple[wire.GroupChangeRecord, ...] = ()
                   ) -> wire.GroupInvitePayload:  # fmt: skip
            return wire.GroupInvitePayload(os.urandom(16), int(time.time() * 1000),
                                           core.sign_state(me, group), changes)  # fmt: skip

        blocks = h.session.encrypt(h.entropy, bytes([1, 0x0C]) + os.urandom(300))  # garbage
        named = wire.encode_payload(invite(core.create_group(SystemEntropy(), me, MARK + "abc")))
        bidi = named.replace(MARK.encode() + b"abc", MARK.encode() + "\u202e".encode())
        assert len(bidi) == len(named)
        blocks += h.session.encrypt(h.entropy, bidi)  # a right-to-left override in the name
        forged = invite(core.create_group(SystemEntropy(), me, MARK + " forged"))
        forged = wire.GroupInvitePayload(forged.invite_id, forged.sent_at_ms,
                                         wire.SignedGroupState(forged.base.state,
                                                               forged.base.signer, bytes(64)),
                                         ())  # fmt: skip
        blocks += h.payload_blocks(forged)
        group = core.create_group(SystemEntropy(), me, MARK + " long")
        base, chain = group, []
        for i in range(core.CONTEST_WINDOW + 1):  # one change more than an invitation carries
            change = core.rename(me, group, f"{MARK} {i}", "")
            group = core.apply_change(group, change)
            chain.append(change)
        blocks += h.payload_blocks(wire.GroupInvitePayload(
            os.urandom(16), int(time.time() * 1000), core.sign_state(me, base), tuple(chain)))
        blocks += h.payload_blocks(text("after the malformed ones"))
        h.deposit(url_of(relay_proc), blocks)
    vic.wait_for(lambda: received(vic, "s0", "after the malformed ones"), "the text after them", T)
    assert vic.call("group.invitations")["invitations"] == []
    mal.start()

    def waiting() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = vic.call("group.invitations")["invitations"]
        return out

    for i in range(3):
        for s in senders:
            g = s.call("group.create", {"name": f"{s.name} group {i}"})["group"]
            s.call("group.invite", {"group": g, "contact": "vic"})
    drained(senders)
    for s in senders:
        vic.wait_for(lambda s=s: waiting_at_relay(relay_proc, s, "vic") == 0,
                     f"vic to take {s.name}'s invitations", T)  # fmt: skip
    inv = waiting()
    assert len(inv) == 20  # the 21st was dropped
    per = {s.name: sum(1 for i in inv if i["from"] == s.name) for s in senders}
    assert max(per.values()) == 3 and sum(per.values()) == 20
    # a fourth from one contact replaces its oldest: still 3 of it, still 20 in all
    full = next(n for n, k in per.items() if k == 3)
    sender = next(s for s in senders if s.name == full)
    g = sender.call("group.create", {"name": f"{full} group 3"})["group"]
    sender.call("group.invite", {"group": g, "contact": "vic"})
    vic.wait_for(lambda: f"{full} group 3" in [i["name"] for i in waiting()], "the fourth", T)
    names = [i["name"] for i in waiting() if i["from"] == full]
    assert names == [f"{full} group {i}" for i in (1, 2, 3)] and len(waiting()) == 20
    # declining makes room for one
    vic.call("group.decline", {"invitation": waiting()[0]["invitation"]})
    short = next(s for s in senders if per[s.name] < 3)
    g = short.call("group.create", {"name": f"{short.name} late"})["group"]
    short.call("group.invite", {"group": g, "contact": "vic"})
    vic.wait_for(lambda: f"{short.name} late" in [i["name"] for i in waiting()], "the late one", T)
    assert len(waiting()) == 20
    assert vic.call("status")["relay"]["connected"]

    vic.stop()
    assert vic.proc is not None
    log = vic.proc.stderr()
    assert "dropped a group invitation (too many pending) (1x)" in log, log
    assert "dropped a group invitation (too many from one contact) (1x)" in log, log
    assert "dropped a group payload: InvalidChange (1x)" in log, log  # 33 changes
    assert "dropped a group payload: ForgedChange (1x)" in log, log
    assert "dropped a payload that did not parse (2x)" in log, log  # garbage, the override
    assert MARK not in log
