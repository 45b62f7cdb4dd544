"""The group state and its changes (docs/protocol.md §25): who may do what, and every refusal
(one GroupError each, nothing changed)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import group as g
from aegisd.core import wire
from aegisd.core.errors import (
    DecodeError,
    ForgedChange,
    GroupError,
    GroupFull,
    InvalidChange,
    LastOwner,
    NotAMember,
    NotPermitted,
    OutOfWindow,
    ProtocolError,
    ReplayedChange,
    UnknownGroup,
)
from aegisd.core.identity import IdentityKeyPair
from tests.support.groups import ENTROPY, PEOPLE, group_of

MEMBER, ADMIN, OWNER = wire.ROLE_MEMBER, wire.ROLE_ADMIN, wire.ROLE_OWNER


def refused(log: g.GroupLog, change: wire.GroupChangeRecord, error: type[GroupError]) -> None:
    """`change` is refused with exactly `error`, and the log is byte for byte unchanged."""
    before = log.record().to_bytes()
    with pytest.raises(GroupError) as info:
        log.receive(change)
    assert type(info.value) is error, info.value
    assert log.record().to_bytes() == before


def forge(
    author: IdentityKeyPair, state: g.GroupState, op: int, **fields: object
) -> wire.GroupChangeRecord:
    """A change signed by `author` without the local validity check sign_change makes."""
    unsigned = wire.GroupChangeRecord(
        state.group_id,
        state.version,
        state.head,
        author.public.ed_pub,
        op,
        **fields,  # type: ignore[arg-type]
    )
    return replace(unsigned, sig=author.sign(unsigned.signature_message()))


def test_creation_state() -> None:
    state = g.create_group(ENTROPY, PEOPLE[0], "Friends", "line one\n\tline two")
    assert state.version == 0 and state.head == bytes(32) and len(state.group_id) == 32
    assert [(m.identity, m.role) for m in state.members] == [(PEOPLE[0].public, OWNER)]
    assert g.create_group(ENTROPY, PEOPLE[0], "Friends").group_id != state.group_id
    assert state.group_id.hex() not in repr(state) and "Friends" not in repr(state)
    rec = state.record()
    assert wire.GroupStateRecord.from_bytes(rec.to_bytes()) == rec
    assert g.GroupState.from_record(rec) == state


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "é" * 65, "a\nb", "a\tb", "a\x00b", "a\x7fb", "a\x85b", "a\u202eb",
     "a\u200bb", "a\u2028b", "\ufeffa", "a\u2066b"],
)  # fmt: skip
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        g.create_group(ENTROPY, PEOPLE[0], name)
    log, (owner, *_) = group_of([])
    with pytest.raises(ValueError):
        g.rename(owner, log.head, name, "")


def test_names_and_descriptions_that_are_fine() -> None:
    for name in ("x" * 128, "é" * 64, "Ünïcødé ✓ 🙂", "a b"):
        g.create_group(ENTROPY, PEOPLE[0], name, "d\n\td" + "x" * 1019)
    with pytest.raises(ValueError):
        g.create_group(ENTROPY, PEOPLE[0], "n", "x" * 1025)
    with pytest.raises(ValueError):
        g.create_group(ENTROPY, PEOPLE[0], "n", "a\rb")


def test_a_peer_sends_a_bad_name_it_is_a_decode_error() -> None:
    log, (owner, *_) = group_of([])
    good = g.rename(owner, log.head, "Abc", "")
    raw = good.to_bytes()
    bad = raw.replace(b"\x03Abc", b"\x03A\x1bc")
    assert bad != raw
    with pytest.raises(DecodeError):
        wire.GroupChangeRecord.from_bytes(bad)


def test_roles_add_remove_rename_leave() -> None:
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    head = log.head
    assert head.version == 3 and [
        head.role_of(p.public.ed_pub) for p in (owner, admin, member)
    ] == [OWNER, ADMIN, MEMBER]
    newcomer = PEOPLE[5]
    log.receive(g.add_member(admin, log.head, newcomer.public, ADMIN))
    assert log.head.role_of(newcomer.public.ed_pub) == ADMIN
    log.receive(g.remove_member(admin, log.head, newcomer.public.ed_pub))  # admin removes admin
    log.receive(g.rename(admin, log.head, "New name", "new\ndescription"))
    assert (log.head.name, log.head.description) == ("New name", "new\ndescription")
    log.receive(g.set_role(admin, log.head, member.public.ed_pub, ADMIN))
    log.receive(g.set_role(admin, log.head, member.public.ed_pub, MEMBER))
    log.receive(g.leave(member, log.head))
    assert log.head.member(member.public.ed_pub) is None
    assert log.head.version == 9 and len(log.head.members) == 2
    keys = [m.key for m in log.head.members]
    assert keys == sorted(keys)


def test_a_member_may_only_leave() -> None:
    log, (_owner, admin, member) = group_of([ADMIN, MEMBER])
    other = PEOPLE[6]
    for change in (
        forge(member, log.head, wire.CHANGE_ADD, identity=other.public.record(), role=MEMBER),
        forge(member, log.head, wire.CHANGE_REMOVE, target=admin.public.ed_pub),
        forge(member, log.head, wire.CHANGE_ROLE, target=member.public.ed_pub, role=ADMIN),
        forge(member, log.head, wire.CHANGE_RENAME, name="Mine", description=""),
    ):
        refused(log, change, NotPermitted)
    with pytest.raises(NotPermitted):
        g.add_member(member, log.head, other.public)  # refused before it is even sent


def test_admins_do_not_touch_owners() -> None:
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    refused(
        log, forge(admin, log.head, wire.CHANGE_REMOVE, target=owner.public.ed_pub), NotPermitted
    )
    refused(
        log,
        forge(admin, log.head, wire.CHANGE_ROLE, target=owner.public.ed_pub, role=ADMIN),
        NotPermitted,
    )
    refused(
        log,
        forge(admin, log.head, wire.CHANGE_ROLE, target=member.public.ed_pub, role=OWNER),
        NotPermitted,
    )
    refused(
        log,
        forge(admin, log.head, wire.CHANGE_ROLE, target=admin.public.ed_pub, role=OWNER),
        NotPermitted,
    )
    # An owner may do all of it.
    log.receive(g.set_role(owner, log.head, admin.public.ed_pub, OWNER))
    log.receive(g.set_role(admin, log.head, owner.public.ed_pub, ADMIN))  # owners demote owners
    assert log.head.role_of(owner.public.ed_pub) == ADMIN


def test_the_last_owner() -> None:
    log, (owner, _admin, member) = group_of([ADMIN, MEMBER])
    refused(log, forge(owner, log.head, wire.CHANGE_LEAVE), LastOwner)
    refused(
        log,
        forge(owner, log.head, wire.CHANGE_ROLE, target=owner.public.ed_pub, role=ADMIN),
        LastOwner,
    )
    refused(
        log, forge(owner, log.head, wire.CHANGE_REMOVE, target=owner.public.ed_pub), InvalidChange
    )
    # Naming another owner first, then leaving, works.
    log.receive(g.set_role(owner, log.head, member.public.ed_pub, OWNER))
    log.receive(g.leave(owner, log.head))
    assert [m.role for m in log.head.members if m.role == OWNER] == [OWNER]
    # The only member does not leave: it deletes the group.
    alone = g.GroupLog(g.create_group(ENTROPY, owner, "Solo"))
    refused(alone, forge(owner, alone.head, wire.CHANGE_LEAVE), InvalidChange)


def test_forged_changes() -> None:
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    change = g.rename(admin, log.head, "Other", "")
    bad_sig = replace(change, sig=bytes([change.sig[0] ^ 1]) + change.sig[1:])
    refused(log, bad_sig, ForgedChange)
    # The member signs, claiming the admin wrote it.
    mine = replace(change, sig=member.sign(change.signature_message()))
    refused(log, mine, ForgedChange)
    # A signature over the same change for another parent does not carry over.
    moved = replace(change, parent_version=change.parent_version + 1)
    refused(log, moved, ForgedChange)
    # An added identity whose binding signature does not verify.
    rec = PEOPLE[6].public.record()
    broken = wire.IdentityRecord(rec.ed_pub, PEOPLE[7].public.x_pub, rec.binding_sig)
    refused(
        log, forge(owner, log.head, wire.CHANGE_ADD, identity=broken, role=MEMBER), ForgedChange
    )


def test_replays() -> None:
    log, (owner, admin) = group_of([ADMIN])
    change = g.rename(admin, log.head, "Other", "")
    log.receive(change)
    refused(log, change, ReplayedChange)
    # Once final (more than CONTEST_WINDOW versions later), nothing applies there any more.
    old = log.head
    stale = g.rename(owner, old, "Stale", "")
    for i in range(g.CONTEST_WINDOW + 1):
        log.receive(g.rename(owner, log.head, f"name {i}", ""))
    assert log.base.version > old.version
    refused(log, stale, ReplayedChange)
    refused(log, change, ReplayedChange)


def test_a_removed_member_is_refused() -> None:
    log, (owner, admin, _member) = group_of([ADMIN, MEMBER])
    log.receive(g.remove_member(owner, log.head, admin.public.ed_pub))
    refused(
        log, forge(admin, log.head, wire.CHANGE_RENAME, name="Back", description=""), NotAMember
    )
    refused(log, forge(admin, log.head, wire.CHANGE_LEAVE), NotAMember)
    stranger = PEOPLE[7]
    refused(
        log,
        forge(stranger, log.head, wire.CHANGE_ADD, identity=stranger.public.record(), role=MEMBER),
        NotAMember,
    )


def test_unknown_group() -> None:
    log, (owner, *_) = group_of([ADMIN])
    other = g.GroupLog(g.create_group(ENTROPY, owner, "Elsewhere"))
    refused(log, g.rename(owner, other.head, "X", ""), UnknownGroup)


def test_invalid_changes() -> None:
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    refused(
        log,
        forge(owner, log.head, wire.CHANGE_ADD, identity=member.public.record(), role=MEMBER),
        InvalidChange,
    )
    refused(
        log,
        forge(owner, log.head, wire.CHANGE_REMOVE, target=PEOPLE[7].public.ed_pub),
        InvalidChange,
    )
    refused(
        log,
        forge(owner, log.head, wire.CHANGE_ROLE, target=admin.public.ed_pub, role=ADMIN),
        InvalidChange,
    )
    refused(
        log,
        forge(
            owner,
            log.head,
            wire.CHANGE_RENAME,
            name=log.head.name,
            description=log.head.description,
        ),
        InvalidChange,
    )
    with pytest.raises(ValueError):  # an add never makes an owner: not even encodable
        forge(owner, log.head, wire.CHANGE_ADD, identity=PEOPLE[7].public.record(), role=OWNER)


def test_a_group_of_257_is_refused() -> None:
    owner = PEOPLE[0]
    state = g.create_group(ENTROPY, owner, "Big")
    while len(state.members) < wire.MAX_GROUP_MEMBERS:
        state = g.apply_change(
            state, g.add_member(owner, state, IdentityKeyPair.generate(ENTROPY).public)
        )
    assert len(state.members) == 256
    log = g.GroupLog(state)
    extra = IdentityKeyPair.generate(ENTROPY).public
    refused(
        log, forge(owner, state, wire.CHANGE_ADD, identity=extra.record(), role=MEMBER), GroupFull
    )
    with pytest.raises(GroupFull):
        g.add_member(owner, state, extra)
    # A full state still encodes and parses; 257 members do not parse.
    raw = state.record().to_bytes()
    assert wire.GroupStateRecord.from_bytes(raw) == state.record()
    count_at = raw.index((256).to_bytes(2, "big") + state.members[0].identity.to_bytes())
    with pytest.raises(DecodeError):
        wire.GroupStateRecord.from_bytes(
            raw[:count_at] + (257).to_bytes(2, "big") + raw[count_at + 2 :]
        )


def test_held_back_until_the_parent_arrives_and_bounded() -> None:
    log, (owner, admin) = group_of([ADMIN])
    first = g.rename(owner, log.head, "One", "")
    after = g.apply_change(log.head, first)
    second = g.rename(admin, after, "Two", "")
    assert log.receive(second).outcome is g.Outcome.HELD
    assert log.head.name == "Friends" and log.held_count() == 1
    result = log.receive(first)
    assert result.outcome is g.Outcome.APPLIED and log.head.name == "Two" and log.held_count() == 0
    # Too far ahead to hold.
    far = replace(
        g.rename(owner, log.head, "Far", ""), parent_version=log.head.version + g.HOLD_AHEAD + 1
    )
    far = replace(far, sig=owner.sign(far.signature_message()))
    refused(log, far, OutOfWindow)
    # At most MAX_HELD_PER_AUTHOR held back per author.
    for i in range(g.MAX_HELD_PER_AUTHOR):
        assert log.receive(unknown_parent(owner, log.head, i)).outcome is g.Outcome.HELD
    refused(log, unknown_parent(owner, log.head, 200), OutOfWindow)
    # Another member still has its share.
    assert log.receive(unknown_parent(admin, log.head, 201)).outcome is g.Outcome.HELD


def unknown_parent(author: IdentityKeyPair, state: g.GroupState, i: int) -> wire.GroupChangeRecord:
    """A leave by `author` signed on a parent nobody has (it is held back or refused)."""
    junk = wire.GroupChangeRecord(state.group_id, state.version + 1, bytes([i + 1]) * 32,
                                  author.public.ed_pub, wire.CHANGE_LEAVE)  # fmt: skip
    return replace(junk, sig=author.sign(junk.signature_message()))


def test_at_most_max_held_in_all() -> None:
    owner = PEOPLE[0]
    state = g.create_group(ENTROPY, owner, "Big")
    for person in PEOPLE[1:]:
        state = g.apply_change(state, g.add_member(owner, state, person.public, ADMIN))
    log = g.GroupLog(state)
    authors = itertools.cycle(PEOPLE)
    for i in range(g.MAX_HELD):
        assert log.receive(unknown_parent(next(authors), log.head, i)).outcome is g.Outcome.HELD
    refused(log, unknown_parent(PEOPLE[3], log.head, 250), OutOfWindow)


def test_strangers_cannot_fill_the_held_back_buffer() -> None:
    """Anyone who knows the group ID can sign; only members of a state the log knows are held
    for, so an honest out-of-order change still finds room."""
    log, (owner, admin) = group_of([ADMIN])
    stranger = IdentityKeyPair.generate(ENTROPY)
    for i in range(g.MAX_HELD):
        refused(log, unknown_parent(stranger, log.head, i), OutOfWindow)
    assert log.held_count() == 0
    first = g.rename(owner, log.head, "One", "")
    second = g.rename(admin, g.apply_change(log.head, first), "Two", "")
    assert log.receive(second).outcome is g.Outcome.HELD
    log.receive(first)
    assert log.head.name == "Two"


def test_a_removed_member_held_for_only_while_the_log_knows_it() -> None:
    """A member removed before the base is no member of any state the log knows."""
    log, (owner, admin) = group_of([ADMIN])
    log.receive(g.remove_member(owner, log.head, admin.public.ed_pub))
    assert log.receive(unknown_parent(admin, log.head, 1)).outcome is g.Outcome.HELD
    for i in range(g.CONTEST_WINDOW):
        log.receive(g.rename(owner, log.head, f"n{i}", ""))
    assert log.base.member(admin.public.ed_pub) is None
    refused(log, unknown_parent(admin, log.head, 2), OutOfWindow)


def test_a_log_with_a_held_change_on_the_new_base_version_reloads() -> None:
    """A change held for a parent at version v that is not the chain's is dropped when v
    becomes final: kept, it would be refused on loading and the group never load again."""
    owner, a = PEOPLE[0], PEOPLE[1]
    state = g.create_group(ENTROPY, owner, "S")
    state = g.apply_change(state, g.add_member(owner, state, a.public, ADMIN))
    log = g.GroupLog(state)
    x = g.rename(a, state, "X", "")  # never delivered to this member
    y = g.rename(a, g.apply_change(state, x), "Y", "")
    log.receive(g.rename(owner, log.head, "n0", ""))  # the owner's wins over x everywhere
    assert log.receive(y).outcome is g.Outcome.HELD
    for i in range(1, g.CONTEST_WINDOW + 1):
        log.receive(g.rename(owner, log.head, f"n{i}", ""))
    assert log.base.version == y.parent_version and log.held_count() == 0
    again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(log.record().to_bytes()))
    assert again.head == log.head


def test_a_stored_change_refused_on_loading_is_dropped() -> None:
    log, _people = group_of([ADMIN])
    stranger = IdentityKeyPair.generate(ENTROPY)
    junk = unknown_parent(stranger, log.head, 7)  # held by an older version, say
    rec = log.record()
    stored = wire.GroupLogRecord(rec.base, (*rec.changes, junk))
    again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(stored.to_bytes()))
    assert again.head == log.head and again.held_count() == 0


def test_the_version_limit() -> None:
    """Versions stay below 2^63: a record at the limit does not parse, and a state one short
    of it takes no change (the +1 never overflows the u64)."""
    owner = PEOPLE[0]
    state = replace(g.create_group(ENTROPY, owner, "S"), version=wire.GROUP_VERSION_LIMIT - 1)
    with pytest.raises(InvalidChange):
        g.rename(owner, state, "T", "")
    raw = replace(state, version=wire.GROUP_VERSION_LIMIT).record().to_bytes()
    with pytest.raises(DecodeError):
        wire.GroupStateRecord.from_bytes(raw)
    big = replace(state, version=2**64 - 1).record().to_bytes()
    with pytest.raises(DecodeError):
        wire.GroupStateRecord.from_bytes(big)
    below = replace(state, version=wire.GROUP_VERSION_LIMIT - 1).record().to_bytes()
    assert wire.GroupStateRecord.from_bytes(below).version == wire.GROUP_VERSION_LIMIT - 1


def test_a_held_change_found_invalid_is_dropped() -> None:
    log, (owner, admin, _member) = group_of([ADMIN, MEMBER])
    removal = g.remove_member(owner, log.head, admin.public.ed_pub)
    after = g.apply_change(log.head, removal)
    # The admin's change on top of its own removal: signed fine, invalid there.
    late = forge(admin, after, wire.CHANGE_RENAME, name="Mine", description="")
    assert log.receive(late).outcome is g.Outcome.HELD
    result = log.receive(removal)
    assert result.undone == (g.change_hash(late),) and log.held_count() == 0
    assert log.head.name == "Friends"


def test_errors_are_protocol_errors_without_secrets() -> None:
    log, (_owner, _admin, member) = group_of([ADMIN, MEMBER])
    change = forge(member, log.head, wire.CHANGE_RENAME, name="Secret plan", description="")
    with pytest.raises(ProtocolError) as info:
        log.receive(change)
    assert "Secret" not in str(info.value) and log.head.group_id.hex() not in str(info.value)


def test_stored_log_round_trip() -> None:
    log, (owner, admin, _member) = group_of([ADMIN, MEMBER])
    lost_parent = log.head
    log.receive(g.rename(owner, log.head, "A", ""))
    rival = g.rename(admin, lost_parent, "B", "")
    log.receive(rival)
    held = forge(
        owner,
        g.apply_change(log.head, g.rename(owner, log.head, "C", "")),
        wire.CHANGE_RENAME,
        name="D",
        description="",
    )
    log.receive(held)
    raw = log.record().to_bytes()
    again = g.GroupLog.from_record(wire.GroupLogRecord.from_bytes(raw))
    assert again.head == log.head and again.held_count() == 1
    assert again.record().to_bytes() == raw
    with pytest.raises(DecodeError):
        wire.GroupLogRecord.from_bytes(raw + b"\x00")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_is_applied_held_or_refused_with_nothing_changed(data: st.DataObject) -> None:
    """Fields of a valid change replaced at random and signed again by one of the people
    (member or not): the log applies it, holds it, finds it lost, or refuses it with one
    GroupError leaving the log byte for byte as it was; it never raises anything else."""
    log, _people = group_of([ADMIN, MEMBER])
    state = log.head
    keys = [p.public.ed_pub for p in PEOPLE]
    signer = data.draw(st.sampled_from(PEOPLE))
    fields = {
        "group_id": data.draw(st.sampled_from([state.group_id, bytes(32)])),
        "parent_version": data.draw(st.integers(0, state.version + 2)),
        "parent_hash": data.draw(st.sampled_from([state.head, bytes(32), b"\x01" * 32])),
        "author": signer.public.ed_pub,
        "op": data.draw(st.sampled_from(wire.GROUP_CHANGE_OPS)),
        "identity": data.draw(st.sampled_from([p.public.record() for p in PEOPLE])),
        "target": data.draw(st.sampled_from(keys)),
        "role": data.draw(st.sampled_from(wire.GROUP_ROLES)),
        "name": data.draw(st.sampled_from(["Friends", "Other"])),
        "description": data.draw(st.sampled_from(["about", ""])),
    }
    if fields["op"] == wire.CHANGE_ADD and fields["role"] == OWNER:
        fields["role"] = ADMIN
    unsigned = wire.GroupChangeRecord(**fields)  # type: ignore[arg-type]
    change = replace(unsigned, sig=signer.sign(unsigned.signature_message()))
    if data.draw(st.booleans()):
        change = wire.GroupChangeRecord.from_bytes(change.to_bytes())
    before = log.record().to_bytes()
    try:
        result = log.receive(change)
    except GroupError:
        assert log.record().to_bytes() == before
        return
    if result.outcome is g.Outcome.LOST:  # a contest at an earlier parent, lost: not kept
        assert log.record().to_bytes() == before
    if result.outcome is g.Outcome.APPLIED:  # on its parent, possibly beating a later change
        assert log.head.head == g.change_hash(change)
        assert log.head.version == change.parent_version + 1


def test_was_admin_names_only_admins_and_owners_of_a_known_state() -> None:
    # who may have sent an introduction the daemon holds (services/groups_inbound.py)
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    assert log.was_admin(owner.public.ed_pub) and log.was_admin(admin.public.ed_pub)
    assert not log.was_admin(member.public.ed_pub)
    assert not log.was_admin(PEOPLE[5].public.ed_pub)
    log.receive(g.set_role(owner, log.head, admin.public.ed_pub, MEMBER))
    assert log.was_admin(admin.public.ed_pub)  # an admin of a state the log still knows
