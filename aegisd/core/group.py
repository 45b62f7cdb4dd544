"""Group state and its signed changes (docs/protocol.md §25).

A group exists only inside its members' pairwise sessions: this module holds the state every
member keeps (ID, name, description, members with their identity keys and roles, version) and
the rules every member applies identically to signed changes, so that all members converge
whatever order the changes arrive in. Pure: no I/O, no clock; randomness is injected.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, replace
from enum import Enum

from . import wire
from .errors import (
    BundleError,
    ForgedChange,
    GroupError,
    GroupFull,
    InvalidChange,
    LastOwner,
    NotAMember,
    NotPermitted,
    OutOfWindow,
    ReplayedChange,
    UnknownGroup,
)
from .identity import IdentityKeyPair, PublicIdentity
from .primitives import Entropy, ed25519_verify

#: A change may still compete with the canonical one at its version while it applies to one of
#: the last CONTEST_WINDOW versions; older versions are final (§25.5).
CONTEST_WINDOW = 32
#: Changes held back because their parent has not arrived yet, per group.
MAX_HELD = 64
#: Of which at most this many by one author (a member of a state the log knows), so that no
#: one fills the buffer an honest out-of-order change needs.
MAX_HELD_PER_AUTHOR = 8
#: A held-back change applies at most this many versions past the head.
HOLD_AHEAD = 64
#: Hashes of lost changes remembered, per group (their descendants are dropped on arrival).
MAX_LOST = 1024
_CREATION_HEAD = bytes(wire.GROUP_HASH_LEN)


@dataclass(frozen=True)
class Member:
    identity: PublicIdentity
    role: int

    @property
    def key(self) -> bytes:
        """The member's Ed25519 public key: how changes name members."""
        return self.identity.ed_pub


@dataclass(frozen=True)
class GroupState:
    """One version of a group. Members strictly ascending by key; at least one owner."""

    group_id: bytes
    version: int
    head: bytes  # hash of the change that made this version; zeros(32) at creation
    name: str
    description: str
    members: tuple[Member, ...]

    def member(self, key: bytes) -> Member | None:
        for m in self.members:
            if m.key == key:
                return m
        return None

    def role_of(self, key: bytes) -> int:
        """The role of `key`, 0 when it is not a member."""
        m = self.member(key)
        return m.role if m else 0

    def owner_count(self) -> int:
        return sum(1 for m in self.members if m.role == wire.ROLE_OWNER)

    def record(self) -> wire.GroupStateRecord:
        return wire.GroupStateRecord(
            self.group_id, self.version, self.head, self.name, self.description,
            tuple(wire.GroupMemberRecord(m.identity.record(), m.role) for m in self.members),
        )  # fmt: skip

    @classmethod
    def from_record(cls, rec: wire.GroupStateRecord) -> GroupState:
        """A state from its record; every member's identity binding is verified."""
        members = tuple(Member(_identity(m.identity), m.role) for m in rec.members)
        return cls(rec.group_id, rec.version, rec.head, rec.name, rec.description, members)

    def __repr__(self) -> str:  # neither the group ID nor its name in a log line
        return f"GroupState(version={self.version}, members={len(self.members)})"


def _identity(rec: wire.IdentityRecord) -> PublicIdentity:
    try:
        return PublicIdentity.from_record(rec)
    except BundleError:
        raise ForgedChange("an identity's binding signature does not verify") from None


def create_group(
    entropy: Entropy, owner: IdentityKeyPair, name: str, description: str = ""
) -> GroupState:
    """A new group at version 0 with `owner` its only member. ValueError for a bad name."""
    wire.check_group_name(name)
    wire.check_group_description(description)
    return GroupState(
        entropy.random(wire.GROUP_ID_LEN), 0, _CREATION_HEAD, name, description,
        (Member(owner.public, wire.ROLE_OWNER),),
    )  # fmt: skip


def change_hash(change: wire.GroupChangeRecord) -> bytes:
    """SHA-256 of the signed change's bytes: the head of the state the change makes."""
    return hashlib.sha256(change.to_bytes()).digest()


def verify_signature(change: wire.GroupChangeRecord) -> None:
    if not ed25519_verify(change.author, change.sig, change.signature_message()):
        raise ForgedChange("the change's signature does not verify")


# --- changes ----------------------------------------------------------------------------------


def sign_change(
    author: IdentityKeyPair,
    state: GroupState,
    op: int,
    *,
    identity: PublicIdentity | None = None,
    target: bytes = b"",
    role: int = 0,
    name: str = "",
    description: str = "",
) -> wire.GroupChangeRecord:
    """A change of `state` by `author`, signed; refused (the error apply_change would raise)
    when it is not valid against `state`, so nobody sends a change every member refuses."""
    unsigned = wire.GroupChangeRecord(
        state.group_id, state.version, state.head, author.public.ed_pub, op,
        identity.record() if identity else None, target, role, name, description,
    )  # fmt: skip
    change = replace(unsigned, sig=author.sign(unsigned.signature_message()))
    apply_change(state, change)
    return change


def add_member(
    author: IdentityKeyPair, state: GroupState, identity: PublicIdentity,
    role: int = wire.ROLE_MEMBER,
) -> wire.GroupChangeRecord:  # fmt: skip
    return sign_change(author, state, wire.CHANGE_ADD, identity=identity, role=role)


def remove_member(
    author: IdentityKeyPair, state: GroupState, member: bytes
) -> wire.GroupChangeRecord:
    return sign_change(author, state, wire.CHANGE_REMOVE, target=member)


def set_role(
    author: IdentityKeyPair, state: GroupState, member: bytes, role: int
) -> wire.GroupChangeRecord:
    return sign_change(author, state, wire.CHANGE_ROLE, target=member, role=role)


def rename(
    author: IdentityKeyPair, state: GroupState, name: str, description: str
) -> wire.GroupChangeRecord:
    return sign_change(author, state, wire.CHANGE_RENAME, name=name, description=description)


def leave(author: IdentityKeyPair, state: GroupState) -> wire.GroupChangeRecord:
    return sign_change(author, state, wire.CHANGE_LEAVE)


def apply_change(state: GroupState, change: wire.GroupChangeRecord) -> GroupState:
    """The state `change` makes of `state` (its parent). The caller has verified the change's
    signature (verify_signature); everything else is checked here, in the order of §25.4,
    and a refusal raises one GroupError and changes nothing."""
    if change.group_id != state.group_id:
        raise UnknownGroup("no such group")
    if change.parent_version != state.version or change.parent_hash != state.head:
        if change.parent_version <= state.version:
            raise ReplayedChange("the change applies to another version")
        raise OutOfWindow("the change applies to a version not reached yet")
    author = state.member(change.author)
    if author is None:
        raise NotAMember("the author is not a member")
    if state.version + 1 >= wire.GROUP_VERSION_LIMIT:
        raise InvalidChange("the group's version is at its limit")
    members = list(state.members)
    name, description = state.name, state.description
    op = change.op
    if op == wire.CHANGE_LEAVE:
        if len(members) == 1:
            raise InvalidChange("the only member deletes the group instead of leaving it")
        if author.role == wire.ROLE_OWNER and state.owner_count() == 1:
            raise LastOwner("the last owner names another owner before leaving")
        members.remove(author)
    else:
        if author.role < wire.ROLE_ADMIN:
            raise NotPermitted("only an admin or owner may make this change")
        if op == wire.CHANGE_ADD:
            if change.identity is None or change.role not in (wire.ROLE_MEMBER, wire.ROLE_ADMIN):
                raise InvalidChange("malformed add")
            identity = _identity(change.identity)
            if state.member(identity.ed_pub) is not None:
                raise InvalidChange("already a member")
            if len(members) >= wire.MAX_GROUP_MEMBERS:
                raise GroupFull("the group is full")
            members.append(Member(identity, change.role))
            members.sort(key=lambda m: m.key)
        elif op == wire.CHANGE_REMOVE:
            target = _target(state, change, author)
            if target.role == wire.ROLE_OWNER and author.role != wire.ROLE_OWNER:
                raise NotPermitted("only an owner removes an owner")
            members.remove(target)
        elif op == wire.CHANGE_ROLE:
            subject = state.member(change.target)
            if subject is None:
                raise InvalidChange("not a member")
            if change.role == subject.role or change.role not in wire.GROUP_ROLES:
                raise InvalidChange("the member has this role already")
            owner_involved = wire.ROLE_OWNER in (change.role, subject.role)
            if owner_involved and author.role != wire.ROLE_OWNER:
                raise NotPermitted("only an owner names or demotes an owner")
            if subject.role == wire.ROLE_OWNER and state.owner_count() == 1:
                raise LastOwner("the last owner cannot be demoted")
            members[members.index(subject)] = Member(subject.identity, change.role)
        elif op == wire.CHANGE_RENAME:
            if (change.name, change.description) == (name, description):
                raise InvalidChange("nothing changes")
            name, description = change.name, change.description
        else:
            raise InvalidChange("unknown change")
    return GroupState(
        state.group_id, state.version + 1, change_hash(change), name, description, tuple(members)
    )


def _target(state: GroupState, change: wire.GroupChangeRecord, author: Member) -> Member:
    if change.target == author.key:
        raise InvalidChange("a member removes itself by leaving")
    target = state.member(change.target)
    if target is None:
        raise InvalidChange("not a member")
    return target


# --- signed base (what an invitation starts from) ---------------------------------------------


def sign_state(signer: IdentityKeyPair, state: GroupState) -> wire.SignedGroupState:
    if state.role_of(signer.public.ed_pub) < wire.ROLE_ADMIN:
        raise NotPermitted("only an admin or owner signs a group state")
    return _signed(signer, state)


def _signed(signer: IdentityKeyPair, state: GroupState) -> wire.SignedGroupState:
    unsigned = wire.SignedGroupState(state.record(), signer.public.ed_pub, b"")
    return replace(unsigned, sig=signer.sign(unsigned.signature_message()))


def invitation_contents(
    inviter: IdentityKeyPair, log: GroupLog
) -> tuple[wire.SignedGroupState, tuple[wire.GroupChangeRecord, ...]]:
    """What an invitation carries (§25.7 step 1): the inviter's final base (`log.base`),
    signed by the inviter, and its whole chain after it (at most CONTEST_WINDOW changes), so
    that the invitee's log starts with the same base and window as the inviter's; a later
    base would make final at the invitee versions the members still contest. The inviter is
    an admin or owner of its head (it may have been a mere member in the base)."""
    if log.head.role_of(inviter.public.ed_pub) < wire.ROLE_ADMIN:
        raise NotPermitted("only an admin or owner invites")
    return _signed(inviter, log.base), log.chain()


def verify_state(signed: wire.SignedGroupState) -> GroupState:
    """The state of a signed base: signed by one of its admins or owners, every identity's
    binding verified."""
    state = GroupState.from_record(signed.state)
    if state.role_of(signed.signer) < wire.ROLE_ADMIN:
        raise NotPermitted("the base is not signed by one of its admins or owners")
    if not ed25519_verify(signed.signer, signed.sig, signed.signature_message()):
        raise ForgedChange("the base's signature does not verify")
    return state


def invitation_log(
    base: wire.SignedGroupState,
    changes: tuple[wire.GroupChangeRecord, ...],
    inviter: PublicIdentity,
    invitee: PublicIdentity,
) -> GroupLog:
    """The log an invitee holds while it answers an invitation (§25.7): the signed base, then
    each change in order (at most CONTEST_WINDOW), every one of which must apply. The base's
    signer is an admin or owner of the base or of the result, and the inviter (who sent it
    through their pairwise session) one of the result's admins or owners, with the keys of
    that session, and the invitee not yet a member: it is added once it accepts, by a change
    that reaches it like any other. Raises one GroupError, or returns the log. Nothing here
    proves the membership: the invitee trusts the inviter's claim of it."""
    if len(changes) > CONTEST_WINDOW:
        raise InvalidChange("more changes than the contest window in an invitation")
    state = GroupState.from_record(base.state)
    if not ed25519_verify(base.signer, base.sig, base.signature_message()):
        raise ForgedChange("the base's signature does not verify")
    log = GroupLog(state)
    for change in changes:
        if log.receive(change).outcome is not Outcome.APPLIED:
            raise InvalidChange("an invitation's changes form one chain")
    head = log.head
    if max(state.role_of(base.signer), head.role_of(base.signer)) < wire.ROLE_ADMIN:
        raise NotPermitted("the base is not signed by one of its admins or owners")
    sender = head.member(inviter.ed_pub)
    if sender is None or not sender.identity.same_keys(inviter):
        raise NotAMember("the inviter is not a member")
    if sender.role < wire.ROLE_ADMIN:
        raise NotPermitted("only an admin or owner invites")
    if head.member(invitee.ed_pub) is not None:
        raise InvalidChange("the invitee is a member already")
    return log


def introduction_offers(
    state: GroupState, answer: wire.GroupAnswerPayload, invitee: PublicIdentity,
    departed: frozenset[bytes] = frozenset(),
) -> dict[bytes, wire.ContactLink]:
    """The inviter's check of an accepting answer (§25.7 step 2): every offer is for a member
    of `state` other than the invitee, and its link is the invitee's (by keys). An offer for
    a key in `departed` (a member removed or gone since the invitation) is left out: the
    invitee offered it in good faith, and there is no one to introduce. Returns the link to
    pass to each member, by member key."""
    if answer.group_id != state.group_id:
        raise UnknownGroup("no such group")
    if not answer.accepted:
        raise InvalidChange("a declined invitation carries no offers")
    out: dict[bytes, wire.ContactLink] = {}
    for offer in answer.offers:
        if offer.member in departed and state.member(offer.member) is None:
            continue
        if state.member(offer.member) is None or offer.member == invitee.ed_pub:
            raise NotAMember("an offer for someone who is not a member")
        if not _identity(offer.link.identity).same_keys(invitee):
            raise ForgedChange("an offer's link is not the invitee's")
        out[offer.member] = offer.link
    return out


def introduced_member(
    state: GroupState, introduction: wire.GroupIntroductionPayload, *, introducer: bytes
) -> PublicIdentity:
    """A member's check of an introduction (§25.7 step 4): the link's identity is, by its
    keys, a member of `state` (NotAMember: hold it until the add arrives, or drop it), and
    `introducer` (the Ed25519 key of the session it came through) is an admin or owner of
    `state`, as whoever added the newcomer was (NotPermitted: a member cannot make others
    open sessions to someone of its choosing). Returns the identity to check the first
    contact's bundle against."""
    if introduction.group_id != state.group_id:
        raise UnknownGroup("no such group")
    identity = _identity(introduction.link.identity)
    member = state.member(identity.ed_pub)
    if member is None or not member.identity.same_keys(identity):
        raise NotAMember("the introduced identity is not a member")
    if state.role_of(introducer) < wire.ROLE_ADMIN:
        raise NotPermitted("only an admin or owner introduces a member")
    return identity


# --- the log: concurrency rule, held-back changes, finality ------------------------------------


class Outcome(Enum):
    APPLIED = "applied"  # on the canonical chain now
    LOST = "lost"  # valid, but a concurrent change with precedence holds its version
    HELD = "held"  # its parent has not arrived; held back until it does


@dataclass(frozen=True)
class Received:
    outcome: Outcome
    head: GroupState
    #: Changes that were on the canonical chain before this one arrived and are not any more
    #: (their authors re-base them if still wanted), and held-back changes found invalid when
    #: their parent arrived. Hashes.
    undone: tuple[bytes, ...] = ()


def precedence(
    parent: GroupState, change: wire.GroupChangeRecord, digest: bytes
) -> tuple[int, int, bytes, bytes]:
    """Sort key among changes with the same parent: the lowest wins (§25.5). A higher role
    of the author in the parent state first (an owner's change beats an admin's); among
    equal roles a removal beats any other change; then the lower SHA-256(parent head ||
    author key), which no author can grind by re-signing (it depends on the parent and the
    key only); last, between one author's own changes, the lower change hash."""
    return (
        -parent.role_of(change.author),
        0 if change.op == wire.CHANGE_REMOVE else 1,
        hashlib.sha256(parent.head + change.author).digest(),
        digest,
    )


class GroupLog:
    """A member's view of one group: the final base state, the canonical chain of changes of
    the contest window after it, the changes held back for a parent not yet seen, and the
    hashes of changes that lost (§25.5).

    The head is a function of the set of changes received, not of their order: from the base,
    repeatedly take the child with the lowest `precedence` among the valid children of the
    current node. Valid: signature verified and `apply_change` accepts it against its parent.
    A change that loses can never win later (a node's valid children only grow, and its
    winner is their minimum), and neither can anything built on it: both are dropped, their
    hashes remembered so that a descendant arriving later is dropped rather than held."""

    def __init__(self, base: GroupState) -> None:
        self._base = base
        self._changes: dict[bytes, wire.GroupChangeRecord] = {}  # the chain after the base
        self._states: dict[bytes, GroupState] = {base.head: base}  # base and chain states
        self._held: dict[bytes, wire.GroupChangeRecord] = {}
        self._lost: dict[bytes, int] = {}  # hash -> version it made; oldest evicted first
        self._chain: list[bytes] = []
        self._head = base

    @property
    def head(self) -> GroupState:
        return self._head

    @property
    def base(self) -> GroupState:
        return self._base

    def held_count(self) -> int:
        return len(self._held)

    def departed(self) -> frozenset[bytes]:
        """Keys of members of a state this log knows (the base or one on the chain) who are
        not members of the head: removed, or left (§25.6)."""
        known = {m.key for s in self._states.values() for m in s.members}
        return frozenset(known - {m.key for m in self._head.members})

    def was_admin(self, key: bytes) -> bool:
        """Whether `key` is an admin or owner of some state this log knows (the base or one
        on the chain): who may have sent an introduction whose add is still on its way."""
        return any(s.role_of(key) >= wire.ROLE_ADMIN for s in self._states.values())

    def chain(self) -> tuple[wire.GroupChangeRecord, ...]:
        """The changes after the base, in order (what an invitation carries)."""
        return tuple(self._changes[h] for h in self._chain)

    def receive(self, change: wire.GroupChangeRecord) -> Received:
        """Take a change from a peer (or one's own). Refusals raise one GroupError and change
        nothing; a change whose parent is unknown is held back."""
        if change.group_id != self._base.group_id:
            raise UnknownGroup("no such group")
        verify_signature(change)
        digest = change_hash(change)
        if digest in self._changes or digest in self._held or digest in self._lost:
            raise ReplayedChange("the change is already known")
        base = self._base
        if change.parent_version < base.version or (
            change.parent_version == base.version and change.parent_hash != base.head
        ):
            raise ReplayedChange("the change applies to a final version")
        if change.parent_hash in self._lost:
            self._lose(digest, change.parent_version + 1)
            return Received(Outcome.LOST, self._head, self._connect_held())
        parent = self._states.get(change.parent_hash)
        if parent is None:
            self._check_holdable(change)
            self._held[digest] = change
            return Received(Outcome.HELD, self._head)
        state = apply_change(parent, change)  # raises on a refusal
        before = list(self._chain)
        self._contest(digest, change, parent, state)
        dropped = self._connect_held()
        undone = tuple(h for h in before if h not in self._chain) + dropped
        outcome = Outcome.APPLIED if digest in self._changes else Outcome.LOST
        self._finalize()
        return Received(outcome, self._head, undone)

    def _check_holdable(self, change: wire.GroupChangeRecord) -> None:
        """A change whose parent is unknown is held only within the bounds of §25.5: its
        author a member of a state this log knows (the base or one on the chain), at most
        MAX_HELD_PER_AUTHOR held per author and MAX_HELD in all, its parent at most
        HOLD_AHEAD versions past the head. Anyone can sign; only members can fill."""
        if change.parent_version > self._head.version + HOLD_AHEAD:
            raise OutOfWindow("the change's parent is too far ahead to wait for")
        if not any(s.member(change.author) is not None for s in self._states.values()):
            raise OutOfWindow("the change's parent is unknown and its author is no member")
        by_author = sum(1 for held in self._held.values() if held.author == change.author)
        if len(self._held) >= MAX_HELD or by_author >= MAX_HELD_PER_AUTHOR:
            raise OutOfWindow("too many changes are waiting for their parent")

    def _contest(
        self, digest: bytes, change: wire.GroupChangeRecord, parent: GroupState, state: GroupState
    ) -> None:
        """A valid change whose parent is on the chain (the base or a chain state) meets the
        chain's change at that parent, if any: the one with precedence stays."""
        at = change.parent_version - self._base.version  # index of the rival in the chain
        if at < len(self._chain):
            rival = self._chain[at]
            mine = precedence(parent, change, digest)
            if mine >= precedence(parent, self._changes[rival], rival):
                self._lose(digest, state.version)
                return
            for h in self._chain[at:]:  # the rival and everything built on it lose
                del self._changes[h]
                del self._states[h]
                self._lose(h, change.parent_version + 1)
            self._chain = self._chain[:at]
        self._changes[digest] = change
        self._states[digest] = state
        self._chain.append(digest)
        self._head = state

    def _lose(self, digest: bytes, version: int) -> None:
        self._lost[digest] = version
        while len(self._lost) > MAX_LOST:
            del self._lost[next(iter(self._lost))]

    def _connect_held(self) -> tuple[bytes, ...]:
        """Held-back changes whose parent is now known: contested, or lost with their parent,
        or dropped when invalid. Returns the hashes of those that did not join the chain."""
        dropped: list[bytes] = []
        progress = True
        while progress:
            progress = False
            for digest, change in list(self._held.items()):
                lost = change.parent_hash in self._lost
                parent = self._states.get(change.parent_hash)
                if parent is None and not lost:
                    continue
                del self._held[digest]
                progress = True
                if parent is None:
                    self._lose(digest, change.parent_version + 1)
                    dropped.append(digest)
                    continue
                try:
                    state = apply_change(parent, change)
                except (ReplayedChange, OutOfWindow, NotAMember, NotPermitted, GroupFull,
                        LastOwner, InvalidChange, ForgedChange, UnknownGroup):  # fmt: skip
                    dropped.append(digest)
                    continue
                self._contest(digest, change, parent, state)
                if digest not in self._changes:
                    dropped.append(digest)
        return tuple(dropped)

    def _finalize(self) -> None:
        while len(self._chain) > CONTEST_WINDOW:
            first = self._chain.pop(0)
            del self._states[self._base.head]
            del self._changes[first]
            self._base = self._states[first]
        for digest, change in list(self._held.items()):
            # At the base's version only the base itself is a parent (known, so never held):
            # anything else held there would be refused as final when the log is loaded.
            if change.parent_version <= self._base.version:
                del self._held[digest]
        for digest, version in list(self._lost.items()):
            if version <= self._base.version:
                del self._lost[digest]

    # --- storage --------------------------------------------------------------------------

    def record(self) -> wire.GroupLogRecord:
        """The base, the chain in order, then the held-back changes (the hashes of lost
        changes are not kept: a descendant of one arriving after a restart is held back
        instead of dropped, and leaves the window with its version)."""
        return wire.GroupLogRecord(self._base.record(), self.chain() + tuple(self._held.values()))

    @classmethod
    def from_record(cls, rec: wire.GroupLogRecord) -> GroupLog:
        """The log a record stores. A stored change refused on loading (a held one whose
        bounds no longer hold, say) is dropped: it would have been dropped later anyway, and
        a group must never become unloadable."""
        log = cls(GroupState.from_record(rec.base))
        for change in rec.changes:
            with contextlib.suppress(GroupError):
                log.receive(change)
        return log


# --- messages ---------------------------------------------------------------------------------


class Disposition(Enum):
    DELIVER = "deliver"
    HOLD = "hold"  # the sender may be a member of a version this member has not reached
    DROP = "drop"


def message_disposition(
    state: GroupState,
    sender: bytes,
    stamped_version: int,
    departed: Collection[bytes] = (),
) -> Disposition:
    """What to do with a group message from `sender` (Ed25519 key, authenticated by the
    pairwise session it came through) stamped with the sender's view of the version (§25.6).

    Membership in the receiver's current state decides, never the stamp alone: a member's
    message is delivered whatever its stamp; a non-member's is held while its stamp is ahead
    of the receiver (the sender may have been added by a change still on its way), within
    HOLD_AHEAD versions, and dropped otherwise, and always when the receiver knows the sender
    was removed or left (`departed`, GroupLog.departed()), whatever version it carries: else
    a removed member could keep its messages held by stamping them ahead."""
    if state.member(sender) is not None:
        return Disposition.DELIVER
    if sender in departed:
        return Disposition.DROP
    if state.version < stamped_version <= state.version + HOLD_AHEAD:
        return Disposition.HOLD
    return Disposition.DROP
