"""The concurrency rule of docs/protocol.md §25.5: whatever the order in which changes reach
the members, all members end at the same state; and the worked examples of §25.5."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.errors import GroupError, OutOfWindow, ReplayedChange
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


STRANGER = IdentityKeyPair.generate(ENTROPY)  # never a member of anything


class Network:
    """ACTORS replicas of one group, each with the changes on their way to it; every change
    is delivered to every replica in an order the test draws. `lag`, when set, bounds how
    stale a change's parent may be when it is made and how long a change may stay on its
    way (in versions of the furthest replica), which is the condition under which §25.5
    promises convergence once versions become final."""

    def __init__(self, data: st.DataObject, lag: int | None) -> None:
        self.data = data
        self.lag = lag
        self.replicas = [g.GroupLog(START) for _ in range(ACTORS)]
        self.inbox: list[list[wire.GroupChangeRecord]] = [[] for _ in range(ACTORS)]
        self.made: list[wire.GroupChangeRecord] = []
        #: (late change, removal of its author by an equal or higher role on the same parent)
        self.late_changes: list[tuple[wire.GroupChangeRecord, wire.GroupChangeRecord]] = []
        self.parents: dict[bytes, g.GroupState] = {}  # change hash -> the state it applies to
        self.furthest = START.version
        self.reloads = 0

    def fresh_enough(self, state: g.GroupState) -> bool:
        return self.lag is None or state.version >= self.furthest - self.lag

    def receive(self, who: int, change: wire.GroupChangeRecord) -> bool:
        """Deliver; False when it must be sent again later (no room to hold it now)."""
        try:
            self.replicas[who].receive(change)
        except OutOfWindow:
            return False
        except GroupError:  # a refusal here is a refusal everywhere (or lost everywhere)
            pass
        self.furthest = max(self.furthest, self.replicas[who].head.version)
        return True

    def publish(self, who: int, change: wire.GroupChangeRecord, parent: g.GroupState) -> None:
        self.made.append(change)
        self.parents[g.change_hash(change)] = parent
        if not self.receive(who, change):
            self.inbox[who].append(change)
        for other in range(ACTORS):
            if other != who:
                self.inbox[other].append(change)

    def make(self, who: int) -> None:
        """`who` makes a random change on its own current view (possibly stale)."""
        state = self.replicas[who].head
        if not self.fresh_enough(state):
            return
        try:
            change = make(PEOPLE[who], state, self.data)
        except (GroupError, ValueError):
            return
        self.publish(who, change, state)

    def duel(self) -> None:
        """Two admins remove each other on the same parent (one's view)."""
        a, b = self.data.draw(st.permutations(range(1, ACTORS)))[:2]
        state = self.replicas[a].head
        if not self.fresh_enough(state):
            return
        for author, target in ((a, b), (b, a)):
            with contextlib.suppress(GroupError):
                change = g.remove_member(PEOPLE[author], state, PEOPLE[target].public.ed_pub)
                self.publish(author, change, state)

    def late(self) -> None:
        """A member removed by an equal or higher role signs a change on its removal's parent
        later, as many times as it likes, and sends the one with the lowest hash."""
        removals = [c for c in self.made if c.op == wire.CHANGE_REMOVE]
        if not removals:
            return
        removal = self.data.draw(st.sampled_from(removals))
        parent = self.parents[g.change_hash(removal)]
        who = next((i for i in range(ACTORS) if PEOPLE[i].public.ed_pub == removal.target), None)
        if who is None or not self.fresh_enough(parent):
            return
        if parent.role_of(removal.author) < parent.role_of(removal.target):
            return
        tries = []
        for attempt in range(8):
            with contextlib.suppress(GroupError):
                tries.append(g.rename(PEOPLE[who], parent, f"back {attempt}", ""))
        if not tries:
            with contextlib.suppress(GroupError):
                tries.append(g.leave(PEOPLE[who], parent))
        if tries:
            change = min(tries, key=g.change_hash)
            self.late_changes.append((change, removal))
            self.publish(who, change, parent)

    def junk(self, who: int) -> None:
        """Someone who knows the group ID but was never a member sends changes on parents
        nobody has: they must not take the room honest out-of-order changes need."""
        head = self.replicas[who].head
        for i in range(self.data.draw(st.integers(1, g.MAX_HELD))):
            unsigned = wire.GroupChangeRecord(head.group_id, head.version + 1,
                                              bytes([i + 1]) * 32, STRANGER.public.ed_pub,
                                              wire.CHANGE_LEAVE)  # fmt: skip
            self.receive(who, replace(unsigned, sig=STRANGER.sign(unsigned.signature_message())))

    def reload(self, who: int) -> None:
        """`who` stores its log and loads it again (a restart) at any point."""
        before = self.replicas[who]
        again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(before.record().to_bytes()))
        assert again.head == before.head and again.base == before.base
        self.replicas[who] = again
        self.reloads += 1

    def deliver_one(self, who: int) -> None:
        box = self.inbox[who]
        if box:
            change = box.pop(self.data.draw(st.integers(0, len(box) - 1)))
            if not self.receive(who, change):
                box.append(change)

    def deliver_overdue(self) -> None:
        """Changes on their way for `lag` versions arrive now, oldest parent first."""
        if self.lag is None:
            return
        progress = True
        while progress:
            progress = False
            for who in range(ACTORS):
                box = self.inbox[who]
                for change in sorted(box, key=lambda c: c.parent_version):
                    if self.furthest - change.parent_version >= self.lag:
                        box.remove(change)
                        if self.receive(who, change):
                            progress = True
                        else:
                            box.append(change)

    def deliver_the_rest(self) -> None:
        for who in range(ACTORS):
            rest = list(self.data.draw(st.permutations(self.inbox[who])))
            while rest:  # anything refused for want of room is sent again
                again = [c for c in rest if not self.receive(who, c)]
                if len(again) == len(rest):
                    break
                rest = again
            self.inbox[who] = rest

    def check(self) -> None:
        heads = [r.head for r in self.replicas]
        assert all(h == heads[0] for h in heads), [h.version for h in heads]
        # (A change still refused for want of room at the end waits for a parent that lost:
        # the fresh member below, given everything, shows that nothing needed was left.)
        for r in self.replicas:
            # Nothing waits for a parent but a descendant of a change that lost before a
            # reload (the hashes of lost changes are not stored, §25.2), and never a stranger's.
            stored = r.record().changes
            held = stored[r.head.version - r.base.version :]
            assert len(held) == r.held_count() and all(c in self.made for c in held)
            assert self.reloads or not held
        # A late change never beats the removal of its author by an equal or higher role.
        first = self.replicas[0]
        on_chain = first.record().changes[: first.head.version - first.base.version]
        chain = {g.change_hash(c) for c in on_chain}
        for change, _removal in self.late_changes:
            assert g.change_hash(change) not in chain
        # And the head is a function of the set: a member given everything in creation order
        # ends at the same place (within the window: nothing reaches it late).
        fresh = g.GroupLog(START)
        for change in self.made:
            with contextlib.suppress(GroupError):
                fresh.receive(change)
        assert fresh.head == heads[0]
        for r in self.replicas:  # stored and loaded, every log keeps its head
            again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(r.record().to_bytes()))
            assert again.head == r.head


def run_network(
    data: st.DataObject, steps: tuple[int, int], max_made: int, lag: int | None
) -> Network:
    net = Network(data, lag)
    for _ in range(data.draw(st.integers(*steps))):
        who = data.draw(st.integers(0, ACTORS - 1))
        step = data.draw(st.sampled_from(
            ["make", "make", "deliver", "deliver", "deliver", "duel", "late", "junk", "reload"]
        ))  # fmt: skip
        if step in ("make", "duel", "late") and len(net.made) >= max_made:
            step = "deliver"
        if step == "make":
            net.make(who)
        elif step == "duel":
            net.duel()
        elif step == "late":
            net.late()
        elif step == "junk":
            net.junk(who)
        elif step == "reload":
            net.reload(who)
        else:
            net.deliver_one(who)
        net.deliver_overdue()
    net.deliver_the_rest()
    net.check()
    return net


@contextlib.contextmanager
def small_limits(window: int, held: int, per_author: int) -> Iterator[None]:
    """The log's limits made small, so that a short run reaches finality and the held-back
    bounds (the rules are the same whatever the numbers)."""
    saved = (g.CONTEST_WINDOW, g.MAX_HELD, g.MAX_HELD_PER_AUTHOR)
    g.CONTEST_WINDOW, g.MAX_HELD, g.MAX_HELD_PER_AUTHOR = window, held, per_author
    try:
        yield
    finally:
        g.CONTEST_WINDOW, g.MAX_HELD, g.MAX_HELD_PER_AUTHOR = saved


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_members_converge_whatever_the_order_of_arrival(data: st.DataObject) -> None:
    run_network(data, steps=(1, 40), max_made=14, lag=None)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_members_converge_across_finality_and_held_back_limits(data: st.DataObject) -> None:
    """The same with a window of 5 versions and room for 3 held changes (1 per author), up to
    60 changes: versions become final, holds are refused and sent again, logs reloaded."""
    with small_limits(window=5, held=3, per_author=1):
        net = run_network(data, steps=(60, 150), max_made=60, lag=2)
    assert net.replicas[0].base.version >= START.version


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
    # Known to this member as removed: dropped even stamped ahead (else a removed member
    # keeps its messages held by stamping them so).
    log = g.GroupLog(START)
    log.receive(g.remove_member(owner, START, key))
    assert log.departed() == {key} and stranger not in log.departed()
    for stamp in (removed.version + 1, removed.version + g.HOLD_AHEAD):
        assert g.message_disposition(log.head, key, stamp, log.departed()) is drop
        assert g.message_disposition(log.head, stranger, stamp, log.departed()) is hold


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


def test_a_change_from_a_member_departed_here_but_back_by_precedence() -> None:
    """§25.9: owner O, admins X, Y at v. O renames on v; X removes Y on v; Y gets O's first
    and renames on v+1. Z, receiving X's, Y's then O's, sees Y departed when Y's change
    comes, built on a state it never saw Y a member of: held (its parent is unknown), it
    applies once O's arrives (O beats X), and Z ends where every other order ends."""
    o, x, y, z = PEOPLE[0], PEOPLE[1], PEOPLE[2], PEOPLE[3]
    o_renames = g.rename(o, START, "Red", "")
    x_removes_y = g.remove_member(x, START, y.public.ed_pub)
    y_renames = g.rename(y, g.apply_change(START, o_renames), "Green", "")
    log = g.GroupLog(START)
    log.receive(x_removes_y)
    assert y.public.ed_pub in log.departed()
    assert y_renames.parent_version > START.version  # past any state Z saw Y a member of
    assert log.receive(y_renames).outcome is g.Outcome.HELD
    log.receive(o_renames)
    assert log.head.name == "Green" and log.head.member(y.public.ed_pub) is not None
    assert log.head.member(z.public.ed_pub) is not None
    assert deliver_in_every_order(START, [x_removes_y, y_renames, o_renames]) == log.head
