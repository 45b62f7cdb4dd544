"""The concurrency rule of docs/protocol.md §25.5: whatever the order in which changes reach
the members, all members end at the same state; and the worked examples of §25.5."""

from __future__ import annotations

import contextlib
import hashlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.errors import GroupError, ReplayedChange
from aegisd.core.identity import IdentityKeyPair
from tests.support.groups import ENTROPY, PEOPLE

MEMBER, ADMIN, OWNER = wire.ROLE_MEMBER, wire.ROLE_ADMIN, wire.ROLE_OWNER
ACTORS = 4  # PEOPLE[0] owner, 1..3 admins; PEOPLE[4..7] may be added
NAMES = ["Red", "Green", "Blue"]


def start() -> g.GroupState:
    owner = PEOPLE[0]
    state = g.create_group(ENTROPY, owner, "Start")
    for person in PEOPLE[1:ACTORS]:
        state = g.apply_change(state, g.add_member(owner, state, person.public, ADMIN))
    return state


START = start()


def make(
    author: IdentityKeyPair, state: g.GroupState, data: st.DataObject
) -> wire.GroupChangeRecord:
    """A random change `author` may try on its own view; GroupError/ValueError when invalid."""
    op = data.draw(st.sampled_from(["add", "remove", "role", "rename", "leave"]))
    others = [m.key for m in state.members if m.key != author.public.ed_pub]
    if op == "add":
        person = data.draw(st.sampled_from(PEOPLE[ACTORS:]))
        role = data.draw(st.sampled_from([MEMBER, ADMIN]))
        return g.add_member(author, state, person.public, role)
    if op in ("remove", "role") and not others:
        raise ValueError("nobody else")
    if op == "remove":
        return g.remove_member(author, state, data.draw(st.sampled_from(others)))
    if op == "role":
        target = data.draw(st.sampled_from([*others, author.public.ed_pub]))
        return g.set_role(author, state, target, data.draw(st.sampled_from(wire.GROUP_ROLES)))
    if op == "rename":
        return g.rename(author, state, data.draw(st.sampled_from(NAMES)), "")
    return g.leave(author, state)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_members_converge_whatever_the_order_of_arrival(data: st.DataObject) -> None:
    replicas = [g.GroupLog(START) for _ in range(ACTORS)]
    inbox: list[list[wire.GroupChangeRecord]] = [[] for _ in range(ACTORS)]
    made: list[wire.GroupChangeRecord] = []
    for _ in range(data.draw(st.integers(1, 40))):
        who = data.draw(st.integers(0, ACTORS - 1))
        if data.draw(st.booleans()) and len(made) < 14:
            # `who` makes a change on its own current view (possibly stale).
            try:
                change = make(PEOPLE[who], replicas[who].head, data)
            except (GroupError, ValueError):
                continue
            replicas[who].receive(change)
            made.append(change)
            for other in range(ACTORS):
                if other != who:
                    inbox[other].append(change)
        elif inbox[who]:
            # One of the changes on its way to `who` arrives (any of them: no order).
            change = inbox[who].pop(data.draw(st.integers(0, len(inbox[who]) - 1)))
            # A refusal here is a refusal everywhere (or a hold that ends in a drop everywhere).
            with contextlib.suppress(GroupError):
                replicas[who].receive(change)
    for who in range(ACTORS):  # the rest arrives, in any order
        rest = data.draw(st.permutations(inbox[who]))
        for change in rest:
            with contextlib.suppress(GroupError):
                replicas[who].receive(change)
    heads = [r.head for r in replicas]
    assert all(h == heads[0] for h in heads), [h.version for h in heads]
    assert all(r.held_count() == 0 for r in replicas)
    # And the head is a function of the set: a member given everything in creation order
    # ends at the same place.
    fresh = g.GroupLog(START)
    for change in made:
        with contextlib.suppress(GroupError):
            fresh.receive(change)
    assert fresh.head == heads[0]
    # Stored and loaded, every log keeps its head.
    for r in replicas:
        again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(r.record().to_bytes()))
        assert again.head == r.head


def deliver_in_every_order(
    start: g.GroupState, changes: list[wire.GroupChangeRecord]
) -> g.GroupState:
    """Every order of arrival gives one head; it is returned."""
    heads = set()
    for order in itertools.permutations(changes):
        log = g.GroupLog(start)
        for change in order:
            log.receive(change)
        heads.add(log.head)
    assert len(heads) == 1
    return heads.pop()


def tie_break(parent: g.GroupState, change: wire.GroupChangeRecord) -> bytes:
    return hashlib.sha256(parent.head + change.author).digest()


def test_two_admins_removing_each_other() -> None:
    """§25.5, example 1: equal roles and both removals, so the lower SHA-256(parent head ||
    author) wins; the other is dropped (its author is no longer a member, cannot re-base)."""
    a, b = PEOPLE[1], PEOPLE[2]
    a_removes_b = g.remove_member(a, START, b.public.ed_pub)
    b_removes_a = g.remove_member(b, START, a.public.ed_pub)
    head = deliver_in_every_order(START, [a_removes_b, b_removes_a])
    winner = min((a_removes_b, b_removes_a), key=lambda c: tie_break(START, c))
    loser = b if winner is a_removes_b else a
    assert head.version == START.version + 1 and head.head == g.change_hash(winner)
    assert head.member(loser.public.ed_pub) is None
    # The loser cannot re-base: it is no longer a member.
    log = g.GroupLog(head)
    with pytest.raises(GroupError):
        g.remove_member(loser, log.head, (a if loser is b else b).public.ed_pub)


def test_an_owner_beats_an_admin_whatever_the_hashes() -> None:
    owner, admin = PEOPLE[0], PEOPLE[1]
    removal = g.remove_member(owner, START, admin.public.ed_pub)
    for name in NAMES:  # several hashes: the admin's change never wins
        rival = g.rename(admin, START, name, "grinding")
        head = deliver_in_every_order(START, [removal, rival])
        assert head.member(admin.public.ed_pub) is None and head.name == "Start"


def test_concurrent_add_and_rename() -> None:
    """§25.5, example 2: both on version v; one wins, the other's author learns its change was
    undone (or lost) and re-signs it on the new head, so both end applied."""
    a, b = PEOPLE[1], PEOPLE[2]
    newcomer = PEOPLE[5]
    add = g.add_member(a, START, newcomer.public)
    ren = g.rename(b, START, "Renamed", "")
    head = deliver_in_every_order(START, [add, ren])
    winner, loser = sorted((add, ren), key=lambda c: tie_break(START, c))
    assert head.head == g.change_hash(winner)
    # The loser's author sees it undone (if it had been applied first) or lost.
    log = g.GroupLog(START)
    log.receive(loser)
    result = log.receive(winner)
    assert result.outcome is g.Outcome.APPLIED and result.undone == (g.change_hash(loser),)
    again = g.GroupLog(START)
    again.receive(winner)
    assert again.receive(loser).outcome is g.Outcome.LOST
    # Re-based, it applies on top.
    author = a if loser is add else b
    rebased = (
        g.add_member(author, log.head, newcomer.public)
        if loser is add
        else g.rename(author, log.head, "Renamed", "")
    )
    assert log.receive(rebased).outcome is g.Outcome.APPLIED
    assert log.head.name == "Renamed" and log.head.member(newcomer.public.ed_pub) is not None


def test_changes_built_on_a_losing_change_go_with_it() -> None:
    a, b = PEOPLE[1], PEOPLE[2]
    x = g.rename(a, START, "X", "")
    y = g.rename(b, START, "Y", "")
    winner, loser = sorted((x, y), key=lambda c: tie_break(START, c))
    loser_author = a if loser is x else b
    on_loser = g.rename(loser_author, g.apply_change(START, loser), "Z", "")
    head = deliver_in_every_order(START, [x, y, on_loser])
    assert head.head == g.change_hash(winner) and head.version == START.version + 1


def test_messages_in_flight_at_a_removal() -> None:
    """§25.6: membership in the receiver's state decides, not the sender's stamp."""
    owner, admin = PEOPLE[0], PEOPLE[1]
    removed = g.apply_change(START, g.remove_member(owner, START, admin.public.ed_pub))
    key = admin.public.ed_pub
    deliver, hold, drop = g.Disposition.DELIVER, g.Disposition.HOLD, g.Disposition.DROP
    assert g.message_disposition(START, key, START.version) is deliver
    assert g.message_disposition(START, key, START.version + 5) is deliver  # sender ahead
    assert g.message_disposition(START, key, 0) is deliver  # sender behind
    # Sent before the removal, opened after it: dropped, as is anything it sends later.
    for stamp in (START.version, removed.version, removed.version + g.HOLD_AHEAD + 1):
        assert g.message_disposition(removed, key, stamp) is drop
    # A sender this member does not know yet, stamped ahead: held (its add may be on its way).
    stranger = PEOPLE[6].public.ed_pub
    assert g.message_disposition(removed, stranger, removed.version + 1) is hold
    assert g.message_disposition(removed, stranger, removed.version + g.HOLD_AHEAD) is hold
    assert g.message_disposition(removed, stranger, removed.version + g.HOLD_AHEAD + 1) is drop
    assert g.message_disposition(removed, stranger, removed.version) is drop


def test_finality_bounds_the_window() -> None:
    owner, admin = PEOPLE[0], PEOPLE[1]
    log = g.GroupLog(START)
    fork_at = log.head
    for i in range(g.CONTEST_WINDOW):
        log.receive(g.rename(owner, log.head, f"n{i}", ""))
    # Within the window: a concurrent change at fork_at is contested (the owner's wins).
    assert log.base == START
    assert log.receive(g.rename(admin, fork_at, "Fork", "")).outcome is g.Outcome.LOST
    # One more version and fork_at is final: nothing applies there any more.
    log.receive(g.rename(owner, log.head, "more", ""))
    assert log.base.version == START.version + 1 and log.head.version == START.version + 33
    with pytest.raises(ReplayedChange):
        log.receive(g.rename(owner, fork_at, "Too late", ""))


def test_a_removed_admin_cannot_grind_its_way_back() -> None:
    """Admin B removes admin A; the group moves on; A signs changes on the old parent, as
    many as it likes: a removal beats an equal's other change whatever the hashes, so none
    undoes anything."""
    owner, a, b = PEOPLE[0], PEOPLE[1], PEOPLE[2]
    log = g.GroupLog(START)
    removal = g.remove_member(b, START, a.public.ed_pub)
    log.receive(removal)
    for i in range(20):
        log.receive(g.rename(owner, log.head, f"later {i}", ""))
    head = log.head
    for attempt in range(64):  # re-signing varies the change hash; it must not matter
        late = g.rename(a, START, f"back {attempt}", "")
        assert log.receive(late).outcome is g.Outcome.LOST
        assert log.head == head
    assert head.member(a.public.ed_pub) is None


def test_precedence_cannot_be_ground() -> None:
    """Between equal roles and kinds, the tie-break is the same for every change an author
    signs on one parent: re-signing changes the hash, not the outcome."""
    a, b = PEOPLE[1], PEOPLE[2]
    rival = g.rename(b, START, "Rival", "")
    outcomes = set()
    for name in ["x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7"]:
        mine = g.rename(a, START, name, "")
        mine_key = g.precedence(START, mine, g.change_hash(mine))
        outcomes.add(mine_key < g.precedence(START, rival, g.change_hash(rival)))
    assert len(outcomes) == 1
