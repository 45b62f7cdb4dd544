"""What an inviter sends an invitee who accepted (services/groups_state.py
``missed_changes``, docs/protocol.md §25.7 step 3): every change of its chain that the
invitation did not carry, a concurrent change that won on an older parent included."""

from __future__ import annotations

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.services.groups_state import missed_changes
from tests.support.groups import PEOPLE, group_of


def test_a_winning_change_on_an_older_parent_reaches_the_invitee() -> None:
    log, (a, b, c) = group_of([wire.ROLE_ADMIN, wire.ROLE_ADMIN])
    d = PEOPLE[3]
    parent = log.head
    log.receive(g.rename(b, parent, "by b", ""))  # b's change reaches the inviter first
    base, chain = g.invitation_contents(a, log)  # a invites d now
    invitee = g.invitation_log(base, chain, a.public, d.public)
    carried = frozenset(g.change_hash(ch) for ch in chain)
    # c removes b concurrently, on the same (older) parent: a removal wins among equals
    assert log.receive(g.remove_member(c, parent, b.public.ed_pub)).outcome is g.Outcome.APPLIED
    missed = missed_changes(log, carried)
    assert missed  # the winner is on an older parent than the invitation's head
    add = g.add_member(a, log.head, d.public)
    log.receive(add)
    for ch in [*missed, add]:
        invitee.receive(ch)
    assert invitee.head.member(d.public.ed_pub) is not None
    assert invitee.head.head == log.head.head
