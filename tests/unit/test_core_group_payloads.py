"""Group payloads and records (docs/protocol.md §25.8): exact round trips, strict parsing,
and decoders that raise only DecodeError on any input; the invitation's verification."""

from __future__ import annotations

import contextlib
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
    InvalidChange,
    NotAMember,
    NotPermitted,
    ReplayedChange,
    UnknownGroup,
    UnsupportedVersion,
)
from tests.support.groups import PEOPLE, group_of

MEMBER, ADMIN = wire.ROLE_MEMBER, wire.ROLE_ADMIN
URL = "wss://relay.example/v1/ws"


def link(person: int = 4, kind: int = wire.LINK_INVITATION) -> wire.ContactLink:
    return wire.ContactLink(
        kind,
        PEOPLE[person].public.record(),
        wire.MailboxAddress(URL, bytes(range(16)), b"t" * 32),
        b"b" * 16,
        b"i" * 16 if kind == wire.LINK_INVITATION else b"",
        1_700_086_400,
    )


def invitation() -> tuple[wire.GroupInvitePayload, g.GroupLog]:
    """The owner of a 3-member group invites PEOPLE[4]: a base it signed earlier, and the
    change made since (a rename)."""
    log, (owner, _admin, _member) = group_of([ADMIN, MEMBER])
    base = g.sign_state(owner, log.head)
    since = g.rename(owner, log.head, "Since", "")
    log.receive(since)
    return wire.GroupInvitePayload(b"v" * 16, 5, base, (since,)), log


INVITE, INVITE_LOG = invitation()
RENAME = g.rename(PEOPLE[0], INVITE_LOG.head, "Renamed", "with\na description")
SAMPLES: dict[str, wire.Payload] = {
    "invite": INVITE,
    "answer accepted": wire.GroupAnswerPayload(
        b"v" * 16,
        INVITE_LOG.head.group_id,
        True,
        tuple(
            sorted(
                (wire.IntroductionOffer(PEOPLE[i].public.ed_pub, link()) for i in (1, 2)),
                key=lambda o: o.member,
            )
        ),
    ),
    "answer declined": wire.GroupAnswerPayload(b"v" * 16, INVITE_LOG.head.group_id, False),
    "change": wire.GroupChangePayload(RENAME),
    "change add": wire.GroupChangePayload(
        g.add_member(PEOPLE[0], INVITE_LOG.head, PEOPLE[4].public)
    ),
    "message": wire.GroupMessagePayload(INVITE_LOG.head.group_id, 4, b"m" * 16, 7, "hé"),
    "introduction": wire.GroupIntroductionPayload(INVITE_LOG.head.group_id, link()),
    "file": wire.GroupFilePayload(INVITE_LOG.head.group_id, 4, wire.AttachmentPayload(
        b"f" * 16, 7, b"s" * 32, 40_000, wire.attachment_blocks(40_000), b"d" * 32,
        "wss://relay.example/v1/ws", "photo é.jpg")),
    "file with caption": wire.GroupFilePayload(INVITE_LOG.head.group_id, 4, wire.AttachmentPayload(
        b"f" * 16, 7, b"s" * 32, 40_000, wire.attachment_blocks(40_000), b"d" * 32,
        "wss://relay.example/v1/ws", "photo é.jpg", "the harbour at dawn", b"f" * 16)),
    **{f"action {kind}": wire.GroupActionPayload(
        INVITE_LOG.head.group_id, 4, bytes(32) if kind == "timer" else PEOPLE[1].public.ed_pub,
        action) for kind, action in (
            ("reply", wire.ReplyPayload(b"r" * 16, 7, b"m" * 16, "hé")),
            ("reaction", wire.ReactionPayload(b"m" * 16, "\U0001f44d")),
            ("reaction removed", wire.ReactionPayload(b"m" * 16, "")),
            ("edit", wire.EditPayload(b"m" * 16, 9, "hé")),
            ("delete", wire.DeletePayload(b"m" * 16)),
            ("timer", wire.TimerPayload(9, 300)),
        )},
}
#: Where a payload's trailing text starts (the text is the rest: any cut after it parses).
TEXT_TAIL = {"message": 2 + 32 + 8 + 16 + 8, "action reply": 2 + 32 + 8 + 32 + 1 + 16 + 8 + 16,
             "action edit": 2 + 32 + 8 + 32 + 1 + 16 + 8}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_and_strictness(name: str) -> None:
    payload = SAMPLES[name]
    data = wire.encode_payload(payload)
    assert wire.decode_payload(data) == payload
    for cut in range(2, len(data), max(1, len(data) // 40)):
        if name not in TEXT_TAIL or cut < TEXT_TAIL[name]:  # a text tail: any cut of it parses
            with pytest.raises(DecodeError):
                wire.decode_payload(data[:cut])
    if name not in TEXT_TAIL:
        with pytest.raises(DecodeError):
            wire.decode_payload(data + b"\x00")
    with pytest.raises(UnsupportedVersion):
        wire.decode_payload(b"\x02" + data[1:])


RECORDS = {
    "state": (wire.GroupStateRecord.from_bytes, INVITE_LOG.head.record().to_bytes()),
    "change": (wire.GroupChangeRecord.from_bytes, RENAME.to_bytes()),
    "log": (wire.GroupLogRecord.from_bytes, INVITE_LOG.record().to_bytes()),
}
PARSERS = {
    **{name: (wire.decode_payload, wire.encode_payload(p)) for name, p in SAMPLES.items()},
    **RECORDS,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_records_round_trip(name: str) -> None:
    parse, sample = RECORDS[name]
    assert parse(sample).to_bytes() == sample  # type: ignore[attr-defined]
    with pytest.raises(DecodeError):
        parse(sample + b"\x00")
    with pytest.raises(UnsupportedVersion):
        parse(b"\x02" + sample[1:])


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    parse, sample = PARSERS[name]
    with contextlib.suppress(DecodeError):
        parse(sample[:2] + data)
    with contextlib.suppress(DecodeError):
        parse(data)


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_mutated_valid_input_raises_only_decode_error(name: str, data: st.DataObject) -> None:
    parse, sample = PARSERS[name]
    mutated = bytearray(sample)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    elif kind == "extend":
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(mutated)))
        mutated[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    with contextlib.suppress(DecodeError):
        parse(bytes(mutated))


def _encoded(payload: wire.Payload) -> bytes:
    return wire.encode_payload(payload)


def test_structural_refusals() -> None:
    gid = INVITE_LOG.head.group_id
    # An introduction carries a one-time invitation link, never an address link.
    with pytest.raises(ValueError):
        _encoded(wire.GroupIntroductionPayload(gid, link(kind=wire.LINK_ADDRESS)))
    raw = bytearray(_encoded(SAMPLES["introduction"]))
    at = 2 + 32 + 2 + 1  # type, group ID, link length, the link's version byte: its kind
    raw[at] = wire.LINK_ADDRESS
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes(raw))
    # Offers only on accepting, members distinct and ascending.
    offers = SAMPLES["answer accepted"].offers  # type: ignore[union-attr]
    for bad in (
        wire.GroupAnswerPayload(b"v" * 16, gid, False, offers),
        wire.GroupAnswerPayload(b"v" * 16, gid, True, offers[::-1]),
        wire.GroupAnswerPayload(b"v" * 16, gid, True, (offers[0], offers[0])),
    ):
        with pytest.raises(ValueError):
            _encoded(bad)
    data = _encoded(SAMPLES["answer accepted"])
    flag_at = 2 + 16 + 32
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:flag_at] + b"\x00" + data[flag_at + 1 :])
    # At most MAX_INVITE_CHANGES changes in an invitation.
    many = replace(INVITE, changes=INVITE.changes * (wire.MAX_INVITE_CHANGES + 1))
    with pytest.raises(ValueError):
        _encoded(many)
    enc = bytearray(_encoded(replace(INVITE, changes=())))
    enc[-1] = wire.MAX_INVITE_CHANGES + 1
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes(enc))


def test_sizes() -> None:
    """§25.8's figures: a message as long as the longest text takes as many blocks as that
    text; a full group's invitation fits a few blocks."""
    longest = wire.GroupMessagePayload(bytes(32), 1, bytes(16), 1, "x" * wire.MAX_TEXT_BYTES)
    size = len(_encoded(longest))
    assert size == 2 + 32 + 8 + 16 + 8 + wire.MAX_TEXT_BYTES
    assert -(-size // wire.RATCHET_CAPACITY) == 5
    state = INVITE_LOG.head.record()
    name, description = len(state.name.encode()), len(state.description.encode())
    fixed = 2 + 32 + 8 + 32 + 1 + 2 + 2  # header, ID, version, head, three length fields
    assert len(state.to_bytes()) == fixed + name + description + 129 * len(state.members)
    assert fixed + 128 + 1024 + 129 * 256 == 34_255  # the largest state: 3 blocks
    add = g.add_member(PEOPLE[0], INVITE_LOG.head, PEOPLE[6].public).to_bytes()
    assert len(add) == 1 + 32 + 8 + 32 + 32 + 1 + 128 + 1 + 64 == 299


# --- invitations -----------------------------------------------------------------------------


def test_an_invitation_verifies_and_the_add_follows_the_acceptance() -> None:
    log = g.invitation_log(INVITE.base, INVITE.changes, PEOPLE[0].public, PEOPLE[4].public)
    assert log.head == INVITE_LOG.head and log.head.member(PEOPLE[4].public.ed_pub) is None
    # Accepted: the inviter adds the invitee (after another change), and sends it the changes
    # since the invitation's head, the add last; they reach it like any member's.
    INVITE_LOG.receive(RENAME)
    add = g.add_member(PEOPLE[0], INVITE_LOG.head, PEOPLE[4].public)
    INVITE_LOG.receive(add)
    assert log.receive(add).outcome is g.Outcome.HELD  # the rename is still on its way
    assert log.receive(RENAME).outcome is g.Outcome.APPLIED
    assert log.head == INVITE_LOG.head and log.head.member(PEOPLE[4].public.ed_pub) is not None
    # The invitee cannot tell which base the inviter holds: a base signed at the head, with no
    # changes, verifies too (an inviter uses invitation_contents, which signs its final base).
    direct = g.invitation_log(g.sign_state(PEOPLE[1], log.head), (), PEOPLE[1].public,
                              PEOPLE[5].public)  # fmt: skip
    assert direct.head == log.head


def test_invitation_refusals() -> None:
    owner, member, invitee = PEOPLE[0], PEOPLE[2], PEOPLE[4]

    def refused(error: type[GroupError], *args: object) -> None:
        with pytest.raises(GroupError) as info:
            g.invitation_log(*args)  # type: ignore[arg-type]
        assert type(info.value) is error

    # The invitee is a member already.
    refused(InvalidChange, INVITE.base, INVITE.changes, owner.public, member.public)
    # The inviter is a mere member.
    refused(NotPermitted, INVITE.base, INVITE.changes, member.public, invitee.public)
    # The inviter is not in the group at all.
    refused(NotAMember, INVITE.base, INVITE.changes, PEOPLE[6].public, invitee.public)
    # A base signed by a member, or whose signature does not verify.
    state = g.verify_state(INVITE.base)
    by_member = wire.SignedGroupState(state.record(), member.public.ed_pub, b"")
    by_member = replace(by_member, sig=member.sign(by_member.signature_message()))
    refused(NotPermitted, by_member, INVITE.changes, owner.public, invitee.public)
    bad = replace(INVITE.base, sig=bytes(64))
    refused(ForgedChange, bad, INVITE.changes, owner.public, invitee.public)
    renamed = replace(INVITE.base, state=replace(INVITE.base.state, name="Other"))
    refused(ForgedChange, renamed, INVITE.changes, owner.public, invitee.public)
    # Changes that do not chain from the base.
    refused(InvalidChange, INVITE.base, (RENAME,), owner.public, invitee.public)
    refused(ReplayedChange, INVITE.base, INVITE.changes * 2, owner.public, invitee.public)
    with pytest.raises(NotPermitted):
        g.sign_state(member, state)


def test_spam_invitations_cost_a_bounded_verification_and_hold_nothing() -> None:
    """Invitation spam (issue 16): an invitation from a contact is a request the user answers;
    verifying one is bounded (a base and at most CONTEST_WINDOW changes, each checked once)
    and a refused one leaves nothing behind (the core keeps no state for it)."""
    payload = replace(INVITE, changes=INVITE.changes * wire.MAX_INVITE_CHANGES)
    decoded = wire.decode_payload(wire.encode_payload(payload))
    assert isinstance(decoded, wire.GroupInvitePayload)
    with pytest.raises(GroupError):
        g.invitation_log(decoded.base, decoded.changes, PEOPLE[0].public, PEOPLE[4].public)


def test_introduction_offers_and_introductions() -> None:
    """§25.7 steps 2 and 4: the inviter passes on only offers of the invitee's own link for
    members; a member accepts an introduction only of a member, by keys."""
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    invitee = PEOPLE[4]
    offers = sorted(
        (wire.IntroductionOffer(p.public.ed_pub, link(4)) for p in (admin, member)),
        key=lambda o: o.member,
    )
    answer = wire.GroupAnswerPayload(b"v" * 16, log.head.group_id, True, tuple(offers))
    got = g.introduction_offers(log.head, answer, invitee.public)
    assert got == {o.member: o.link for o in offers}

    def refused(error: type[GroupError], answer: wire.GroupAnswerPayload) -> None:
        with pytest.raises(GroupError) as info:
            g.introduction_offers(log.head, answer, invitee.public)
        assert type(info.value) is error

    stranger = wire.IntroductionOffer(PEOPLE[6].public.ed_pub, link(4))
    refused(NotAMember, replace(answer, offers=(stranger,)))
    # a member gone since the invitation: the offer is left out, the rest stands
    gone = frozenset({stranger.member})
    both = replace(answer, offers=tuple(sorted((*offers, stranger), key=lambda o: o.member)))
    assert g.introduction_offers(log.head, both, invitee.public, gone) == got
    mine = wire.IntroductionOffer(invitee.public.ed_pub, link(4))
    refused(NotAMember, replace(answer, offers=(mine,)))
    not_theirs = wire.IntroductionOffer(admin.public.ed_pub, link(5))
    refused(ForgedChange, replace(answer, offers=(not_theirs,)))
    refused(InvalidChange, replace(answer, accepted=False, offers=()))
    refused(UnknownGroup, replace(answer, group_id=bytes(32)))
    # The member's side: an introduction of someone not (yet) a member is refused.
    intro = wire.GroupIntroductionPayload(log.head.group_id, link(4))
    by_owner = owner.public.ed_pub
    with pytest.raises(NotAMember):
        g.introduced_member(log.head, intro, introducer=by_owner)
    log.receive(g.add_member(owner, log.head, invitee.public))
    assert g.introduced_member(log.head, intro, introducer=by_owner) == invitee.public
    assert g.introduced_member(log.head, intro, introducer=admin.public.ed_pub) == invitee.public
    with pytest.raises(UnknownGroup):
        g.introduced_member(log.head, replace(intro, group_id=bytes(32)), introducer=by_owner)
    # Passed on by a mere member, or by someone outside the group: refused.
    for introducer in (member.public.ed_pub, PEOPLE[6].public.ed_pub):
        with pytest.raises(NotPermitted):
            g.introduced_member(log.head, intro, introducer=introducer)
    # A link whose identity claims a member's Ed25519 key with other X25519 keys.
    rec = invitee.public.record()
    odd = wire.IdentityRecord(rec.ed_pub, PEOPLE[5].public.x_pub, rec.binding_sig)
    with pytest.raises(ForgedChange):
        g.introduced_member(
            log.head, replace(intro, link=replace(intro.link, identity=odd)), introducer=by_owner
        )


def test_an_invitation_carries_the_inviters_base_and_window() -> None:
    """§25.7 step 1: the inviter signs its final base and sends its whole chain, so that the
    invitee contests what the members still contest; a base signed at the head would make
    the window's versions final at the invitee, and it would diverge."""
    log, (owner, admin, member) = group_of([ADMIN, MEMBER])
    fork_at = log.head
    for i in range(g.CONTEST_WINDOW + 3):  # the base moves: the window is full
        log.receive(g.rename(owner, log.head, f"n{i}", ""))
    # The member is made an admin inside the window: it invites, though not one in the base.
    log.receive(g.set_role(owner, log.head, member.public.ed_pub, ADMIN))
    contested_at = log.base
    assert contested_at.role_of(member.public.ed_pub) == MEMBER and fork_at != contested_at
    base, changes = g.invitation_contents(member, log)
    assert len(changes) == g.CONTEST_WINDOW and g.GroupState.from_record(base.state) == log.base
    invitee = g.invitation_log(base, changes, member.public, PEOPLE[4].public)
    assert invitee.base == log.base and invitee.head == log.head
    # A removal on the base (still contested) by the owner beats the chain's rename there, at
    # both; the invitee made final at the head would refuse it.
    rival = g.remove_member(owner, contested_at, admin.public.ed_pub)
    assert log.receive(rival).outcome is g.Outcome.APPLIED
    assert invitee.receive(rival).outcome is g.Outcome.APPLIED
    assert invitee.head == log.head
    # A mere member does not invite, and an invitation longer than the window is refused.
    with pytest.raises(NotPermitted):
        g.invitation_contents(PEOPLE[2], group_of([ADMIN, MEMBER])[0])
    too_long = (*changes, g.rename(owner, log.head, "one more", ""))
    with pytest.raises(InvalidChange):
        g.invitation_log(base, too_long, member.public, PEOPLE[4].public)
    # A base signed by someone who is an admin neither in it nor in the result is refused.
    outsider = wire.SignedGroupState(base.state, PEOPLE[6].public.ed_pub, b"")
    outsider = replace(outsider, sig=PEOPLE[6].sign(outsider.signature_message()))
    with pytest.raises(NotPermitted):
        g.invitation_log(outsider, changes, member.public, PEOPLE[5].public)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_reprs_hold_no_secret(name: str) -> None:
    """No group ID, invitation ID, send token or deposit ID in a payload's repr (log lines and
    tracebacks print reprs)."""
    text = repr(SAMPLES[name])
    group_id = INVITE_LOG.head.group_id
    secrets = [group_id, b"t" * 32, bytes(range(16)), b"v" * 16, b"i" * 16]
    for secret in secrets:
        assert secret.hex()[:16] not in text and repr(secret)[2:18] not in text
    assert "hé" not in text
    assert "photo" not in text and (b"s" * 32).hex()[:16] not in text  # no name, no seed


def test_a_group_file_is_a_descriptor_behind_the_group_and_version() -> None:
    """§25.8: 0x11 = group ID, version, then exactly the fields of a 0x08 descriptor, checked
    alike (a block count that does not match the size is refused), one block at most."""
    p = SAMPLES["file"]
    assert isinstance(p, wire.GroupFilePayload)
    data = _encoded(p)
    assert data[:2] == bytes([wire.VERSION, wire.PAYLOAD_GROUP_FILE])
    assert data[2:34] == p.group_id and data[34:42] == (4).to_bytes(8, "big")
    assert data[42:] == _encoded(p.file)[2:]  # the descriptor's fields, as in 0x08
    blocks_at = 42 + 16 + 8 + 32 + 8
    bad = data[:blocks_at] + (p.file.blocks + 1).to_bytes(4, "big") + data[blocks_at + 4:]
    with pytest.raises(DecodeError):
        wire.decode_payload(bad)
    for url, name in (("u", "n"), ("u" * 255, "n" * 255)):
        f = replace(p.file, relay_url=url, name=name)
        size = len(_encoded(replace(p, file=f)))
        assert size == (146 if url == "u" else 654) and size <= wire.RATCHET_CAPACITY


def test_a_group_action_is_a_one_to_one_action_behind_the_group_version_and_author() -> None:
    """§25.11: 0x19 = group ID, version, author, then a whole 0x12-0x16 payload's type and
    fields exactly as one-to-one; a timer names no author (zeros), every other kind one."""
    gid, author = INVITE_LOG.head.group_id, PEOPLE[1].public.ed_pub
    for kind in ("reply", "reaction", "edit", "delete", "timer"):
        p = SAMPLES[f"action {kind}"]
        assert isinstance(p, wire.GroupActionPayload)
        data = _encoded(p)
        assert data[:2] == bytes([wire.VERSION, wire.PAYLOAD_GROUP_ACTION])
        assert data[2:34] == gid and data[34:42] == (4).to_bytes(8, "big")
        assert data[42:74] == (bytes(32) if kind == "timer" else author)
        assert data[74:] == _encoded(p.action)[1:]  # the inner payload, without its version
    reaction, timer = SAMPLES["action reaction"], SAMPLES["action timer"]
    assert isinstance(reaction, wire.GroupActionPayload)
    assert isinstance(timer, wire.GroupActionPayload)
    with pytest.raises(ValueError):  # a reaction names its message's author
        _encoded(replace(reaction, author=bytes(32)))
    with pytest.raises(ValueError):  # a timer names none
        _encoded(replace(timer, author=author))
    data = _encoded(reaction)
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:42] + bytes(32) + data[74:])
    data = _encoded(timer)
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:42] + author + data[74:])
    # only 0x12-0x16 inside: a text, a group message or another wrapper is refused
    for inner in (wire.PAYLOAD_TEXT, wire.PAYLOAD_GROUP_MESSAGE, wire.PAYLOAD_GROUP_ACTION,
                  wire.PAYLOAD_ATTACHMENT_EXTRA):
        with pytest.raises(DecodeError):
            wire.decode_payload(data[:74] + bytes([inner]) + data[75:])
    # a timer outside the allowed values, and a reaction that is not one emoji
    bad_timer = replace(timer.action, seconds=wire.TIMER_MAX_S)
    data = _encoded(replace(timer, action=bad_timer))
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:-4] + (wire.TIMER_MAX_S + 1).to_bytes(4, "big"))
    data = _encoded(reaction)
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:-4] + b"abcd")


def test_a_captioned_group_file_is_a_0x17_descriptor_behind_the_group_and_version() -> None:
    """§25.8: 0x1A = group ID, version, then exactly the fields of a 0x17 descriptor (caption
    and batch); a file without a caption stays a 0x11."""
    p = SAMPLES["file with caption"]
    assert isinstance(p, wire.GroupFilePayload)
    data = _encoded(p)
    assert data[:2] == bytes([wire.VERSION, wire.PAYLOAD_GROUP_FILE_EXTRA])
    assert data[42:] == _encoded(p.file)[2:]  # the fields of the 0x17
    assert _encoded(p.file)[1] == wire.PAYLOAD_ATTACHMENT_EXTRA
    assert wire.decode_payload(data) == p and p.file.caption == "the harbour at dawn"
    plain = SAMPLES["file"]
    assert _encoded(plain)[1] == wire.PAYLOAD_GROUP_FILE
    # a caption over 2048 bytes is refused on its length
    at = 42 + len(_encoded(plain.file)) - 2  # type: ignore[attr-defined]
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:at] + (wire.MAX_CAPTION_BYTES + 1).to_bytes(2, "big")
                            + data[at + 2:])
