"""What the two halves of the groups service share (groups.py: the user's calls;
groups_inbound.py: the payloads members send): the host they use of the messenger, each
group's log in the store, the members' sessions, fanning a change out, and how the core's
refusals become one RPC error. Imports no other service but the delivery layer and the mailbox
helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.errors import DecodeError, GroupError, NotAMember
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import groups as G
from aegisd.store.db import Contact

from .attachments import Attachments
from .delivery import PENDING_DESTINATION, Delivery, Recipient
from .host import ServiceHost
from .mailbox import ContactState

#: Group invitations waiting for the user; past this a new one is dropped (counted).
MAX_PENDING_INVITATIONS = 20
SETTING_MAX_INVITATIONS = "groups.max_pending_invitations"
#: ...of them from one contact (past this its oldest goes: one contact cannot fill the
#: list), and how long one waits.
MAX_INVITATIONS_PER_CONTACT = 3
INVITATION_MAX_AGE_MS = 30 * 24 * 3600 * 1000
#: Messages and introductions held per group for a version not reached yet (§25.6), and how
#: long: anyone with a session can send one stamped just ahead.
MAX_HELD_PER_GROUP = 64
#: ...and per contact within a group, so that one sender cannot fill the group's share.
MAX_HELD_PER_SENDER = 8
HELD_MAX_AGE_MS = 7 * 24 * 3600 * 1000
#: How long an introduction link of ours stays valid (the member opens it when it is online).
INTRO_TTL = 7 * 24 * 3600
#: Introduction links one accept may make (one relay invitation each).
MAX_INTRODUCTIONS = 32
#: An introduction whose first contact failed for a passing reason is tried again by the
#: maintenance loop, this many times in all; at most this many wait per group.
INTRO_TRIES = 5
MAX_PENDING_INTROS_PER_GROUP = 64
#: A group contact that shares no group with us any more is kept this long (profile setting,
#: for tests), then removed with its session and mailboxes: a concurrent change that undoes
#: its departure can only reach us through that session (§25.5, §25.9).
PRUNE_AFTER_MS = 7 * 24 * 3600 * 1000
SETTING_PRUNE_AFTER = "groups.prune_after_ms"
#: Each departed contact's deadline gets a uniform random delay up to this (profile setting):
#: the remaining members do not delete a departed member's pair mailboxes at one moment, nor
#: does the departed member delete all of its own at once (docs/threat-model.md).
PRUNE_SPREAD_MS = 24 * 3600 * 1000
SETTING_PRUNE_SPREAD = "groups.prune_spread_ms"
#: Past its deadline plus this a departed contact goes even if blocks for it still wait or no
#: connection read its mailbox since (profile setting, for tests).
PRUNE_LIMIT_MS = 7 * 24 * 3600 * 1000
SETTING_PRUNE_LIMIT = "groups.prune_limit_ms"
#: The longest a removal task waits (polled); past that the sweeps start another.
PRUNE_WAIT = 600.0
PRUNE_POLL = 0.5
#: One setting for texts and group messages (the messenger's too): off, no read receipts.
SETTING_READ_RECEIPTS = "privacy.read_receipts"
INTRO_KEY = "group.intro."  # setting per introduction invitation: the member it is for
#: Setting per group we accepted and are not a member of yet: the invitation's ID, the
#: inviter and our introduction links, so that the inviter's refusal can undo the accept.
JOINING_KEY = "group.joining."
ROLE_NAMES = {wire.ROLE_MEMBER: "member", wire.ROLE_ADMIN: "admin", wire.ROLE_OWNER: "owner"}
ROLES = {v: k for k, v in ROLE_NAMES.items()}


def refused(exc: GroupError) -> AppError:
    """One RPC error for every refusal of the core; data.reason names it (its class)."""
    reason = "".join("_" + ch.lower() if ch.isupper() else ch for ch in type(exc).__name__)
    return AppError(E.GROUP_REFUSED, "group_refused", str(exc), reason=reason.lstrip("_"))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def stored_invitation(payload: bytes) -> wire.GroupInvitePayload | None:
    """A stored invitation's payload (decoded on arrival); None if it does not decode as one
    (damaged on disk): the daemon must be able to drop it, never fail on it."""
    try:
        p = wire.decode_payload(payload)
    except (DecodeError, ValueError):
        return None
    return p if isinstance(p, wire.GroupInvitePayload) else None


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def by_name(self, name: str) -> Contact: ...
    def unique_name(self, wanted: str) -> str: ...
    async def add(self, name: str, link_text: str, *, group_only: bool = False
                  ) -> dict[str, Any]: ...  # fmt: skip
    async def remove(self, name: str) -> None: ...
    async def remove_locked(self, c: Contact) -> None: ...


class AddressView(Protocol):
    async def create_invitation(self, expires_in: int) -> dict[str, Any]: ...
    async def revoke_invitation(self, invitation: str) -> None: ...


class MailboxesView(Protocol):
    def relay_url(self) -> str: ...


class GroupsHost(ServiceHost, Protocol):
    """What the groups use of the messenger."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def address(self) -> AddressView: ...
    @property
    def attachments(self) -> Attachments: ...
    @property
    def mailboxes(self) -> MailboxesView: ...

    def identity(self) -> IdentityKeyPair: ...
    def check_usable(self) -> None: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class GroupBase:
    """A group's log and its members' sessions, over the store."""

    def __init__(self, host: GroupsHost, pruner: DepartedContacts | None = None) -> None:
        self.m = host
        # one per daemon: Groups makes it and hands it to its other halves
        self.pruner = pruner if pruner is not None else DepartedContacts(host)

    # --- the log in the store -------------------------------------------------------------

    def _load(self, ref: int) -> tuple[G.GroupRow, core.GroupLog]:
        row = G.get_group(self.m.store, ref)
        if row is None:
            raise E.not_found("group")
        return row, core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))

    def _my_head(self, ref: int) -> core.GroupState:
        """The group's state now, refused unless we are one of its members (under the lock)."""
        head = self._load(ref)[1].head
        if head.member(self._me()) is None:
            raise refused(NotAMember("you are not a member of this group"))
        return head

    def _save(self, ref: int, log: core.GroupLog) -> None:
        G.put_log(self.m.store, ref, log.record().to_bytes(), member_rows(log.head))
        self.pruner.returned(m.key for m in log.head.members)

    def _me(self) -> bytes:
        return self.m.identity().public.ed_pub

    def _contact_of(self, member: core.Member) -> Contact | None:
        c = self.m.contacts.with_identity(member.identity)
        return c

    def _recipients(self, state: core.GroupState, *, also: core.GroupState | None = None
                    ) -> tuple[list[Recipient], int]:  # fmt: skip
        """A recipient for every other member with a session (of `state`, and of `also`);
        blocked members get nothing. Returns them and how many members cannot be reached (no
        session yet, or one whose first contact failed: one such member must not hold up the
        others, as the delivery layer would refuse the whole call)."""
        me, out, missing, seen = self._me(), [], 0, set()
        members = list(state.members) + (list(also.members) if also else [])
        for member in members:
            if member.key == me or member.key in seen:
                continue
            seen.add(member.key)
            c = self._contact_of(member)
            blob = self.m.store.get_session(c.id) if c is not None else None
            if c is None or blob is None or not sendable(c):
                missing += 1
                continue
            if not c.blocked:
                out.append(Recipient(c, Session.from_bytes(blob)))
        return out, missing

    def _targets(self, state: core.GroupState) -> tuple[list[Recipient], dict[int, str],
                                                       list[bytes]]:  # fmt: skip
        """Every other member of `state`, for a group message: the recipients (a session,
        not blocked), the status of each member with a contact it is not sent to
        (`unreachable`, `blocked`), and the keys of members with no contact here yet."""
        me, out, skipped, strangers = self._me(), [], {}, []
        for member in state.members:
            if member.key == me:
                continue
            c = self._contact_of(member)
            if c is None:
                strangers.append(member.key)
                continue
            blob = self.m.store.get_session(c.id)
            if c.blocked:
                skipped[c.id] = "blocked"
            elif blob is None or not sendable(c):
                skipped[c.id] = "unreachable"
            else:
                out.append(Recipient(c, Session.from_bytes(blob)))
        return out, skipped, strangers

    def _fan_out(self, parent: core.GroupState, log: core.GroupLog,
                 change: wire.GroupChangeRecord) -> None:  # fmt: skip
        """A change of ours goes to every member of its parent and of the new head (§25.5)."""
        recipients, _ = self._recipients(parent, also=log.head)
        if recipients:
            self.m.delivery.enqueue(recipients, wire.GroupChangePayload(change))

    def _prune_contacts(self, keys: Iterable[bytes]) -> None:
        self.pruner.departed(keys)


class DepartedContacts:
    """Group contacts that share no group with us any more (§25.9): each goes, with its
    session and mailboxes, past a deadline stored in its own group_contacts row (the grace
    plus a random spread): a removal can still be undone by a concurrent change with
    precedence (§25.5), whose author is often the member removed (two admins removing each
    other), and that change reaches us only through the session we would have deleted. One
    instance per daemon (groups.py makes it; both halves of the service use it): at most one
    removal task per contact."""

    def __init__(self, host: GroupsHost) -> None:
        self.m = host
        self._running: set[int] = set()  # contacts with a removal task
        #: When the current relay connection's after-connect steps ran (None while down or
        #: before they ran): a removal past its deadline waits for such a connection. Its
        #: subscriptions pushed what was queued before it came up (a change that arrived
        #: during the grace while we were offline) and push what arrives while it stays up,
        #: so the mailbox is deleted only after what reached the relay by the deadline.
        self.read_from: int | None = None
        #: The current connection (a fresh object each time the link reports up; None once
        #: it ends): after-connect steps of an earlier connection do not mark this one read.
        self._connection: object | None = None

    def _me(self) -> bytes:
        return self.m.identity().public.ed_pub

    def relay_state(self, up: bool) -> None:
        self.read_from = None
        self._connection = object() if up else None

    def connection(self) -> object | None:
        """What the after-connect steps starting now pass to connected()."""
        return self._connection

    def link_ended(self) -> None:
        """The link stopped without reporting down (a lock, new network settings)."""
        self.relay_state(False)

    def on_lock(self) -> None:
        """The removal tasks were cancelled (one cancelled before its first step never ran
        its finally): none is running any more."""
        self._running.clear()
        self.link_ended()

    def connected(self, connection: object | None) -> None:
        """The after-connect steps ran on `connection` (their relay round trips came after
        the subscriptions, whose queued blocks the relay pushes first): marked read if it is
        still the current one."""
        if connection is not None and connection is self._connection \
                and self.m.ctx.relay_connected:  # fmt: skip
            self.read_from = now_ms()
        self.sweep()

    def _deadline(self, since: int) -> int:
        grace = int(self.m.store.get_setting(SETTING_PRUNE_AFTER, PRUNE_AFTER_MS))
        spread = int(self.m.store.get_setting(SETTING_PRUNE_SPREAD, PRUNE_SPREAD_MS))
        jitter = int.from_bytes(self.m.entropy.random(8), "big") % (spread + 1) if spread else 0
        return since + grace + jitter

    def _key_of(self, c: Contact) -> bytes | None:
        return None if c.identity_key is None else PublicIdentity.from_bytes(c.identity_key).ed_pub

    def departed(self, keys: Iterable[bytes]) -> None:
        """Members gone from a group (removed, left, or the group gone here): a group-only
        contact among them that shares no group with us any more gets a new deadline (each
        departure overwrites the last one's) and a removal task."""
        me = self._me()
        wanted = {k for k in keys if k != me and not G.shares_group(self.m.store, me, k)}
        if not wanted:
            return
        for c in self.m.store.list_contacts():
            key = self._key_of(c)
            if key in wanted and G.is_group_contact(self.m.store, c.id):
                now = now_ms()
                G.mark_departed(self.m.store, c.id, now, self._deadline(now))
                self._start(c.id)

    def returned(self, keys: Iterable[bytes]) -> None:
        """Members of a group's new head: a departed group contact among them is one again
        (its removal undone, or met in another group): its mark goes."""
        wanted = set(keys)
        for cid in G.group_contact_ids(self.m.store):
            c = self.m.store.get_contact(cid)
            if c is not None and self._key_of(c) in wanted:
                G.clear_departed(self.m.store, cid)

    def sweep(self) -> None:
        """After each connection to the relay and in the maintenance loop: a group contact
        that shares no group with us and has no mark gets one (a backup brought it in, or a
        crash came between); one that is a member again loses its mark; each marked one
        gets its removal task unless it has one."""
        me = self._me()
        for cid in G.group_contact_ids(self.m.store):
            c = self.m.store.get_contact(cid)
            key = None if c is None else self._key_of(c)
            if key is None:
                continue
            if G.shares_group(self.m.store, me, key):
                G.clear_departed(self.m.store, cid)
                continue
            if G.departed(self.m.store, cid) is None:
                now = now_ms()
                G.mark_departed(self.m.store, cid, now, self._deadline(now))
            self._start(cid)

    def _start(self, contact_id: int) -> None:
        if contact_id in self._running:
            return
        self._running.add(contact_id)

        async def run() -> None:
            try:
                await self._remove_when_due(contact_id)
            finally:  # also when on_lock cancels it
                self._running.discard(contact_id)

        self.m.spawn(run())

    async def _remove_when_due(self, contact_id: int) -> None:
        """Waits (at most PRUNE_WAIT; the sweeps take over past that) for the deadline, for
        a relay connection whose after-connect steps ran (none: it ends, and the sweep after
        the next connection starts it again), and for the contact's queued
        blocks that can leave (the change telling a removed member of its removal among
        them); PRUNE_LIMIT past the deadline it goes anyway (a relay that never comes back,
        a member that never answered its first contact). Removal drops what is still
        queued."""
        until = time.monotonic() + PRUNE_WAIT
        while time.monotonic() < until:
            mark = G.departed(self.m.store, contact_id)
            if mark is None:
                return  # a member again, or gone
            now = now_ms()
            wait = (mark[1] - now) / 1000
            if wait > 0:
                if wait > PRUNE_WAIT:
                    return
                await asyncio.sleep(wait)
                continue
            limit = int(self.m.store.get_setting(SETTING_PRUNE_LIMIT, PRUNE_LIMIT_MS))
            forced = now > mark[1] + limit
            if not forced and self.read_from is None:
                return  # offline: the sweep after the next connection starts it again
            if forced or not self.m.store.outbox_holds_contact(contact_id, PENDING_DESTINATION):
                await self._remove(contact_id)
                return
            await asyncio.sleep(PRUNE_POLL)

    async def _remove(self, contact_id: int) -> None:
        """Check and remove in one step under the messenger's lock: a change that made it a
        member again cannot come between."""
        async with self.m.lock:
            c = self.m.store.get_contact(contact_id)
            key = None if c is None else self._key_of(c)
            if c is None or key is None or G.departed(self.m.store, contact_id) is None:
                return
            if G.shares_group(self.m.store, self._me(), key):
                G.clear_departed(self.m.store, contact_id)
                return
            await self.m.contacts.remove_locked(c)  # its mark goes with its row


def missed_changes(log: core.GroupLog, carried: frozenset[bytes]
                   ) -> list[wire.GroupChangeRecord]:  # fmt: skip
    """What an invitee lacks of our chain (§25.7 step 3): every change on it that the
    invitation did not carry (hashes), whatever its parent: a concurrent change that won on
    an older parent than the invitation's head too."""
    return [ch for ch in log.chain() if core.change_hash(ch) not in carried]


def departed_keys(before: core.GroupState, after: core.GroupState, me: bytes) -> set[bytes]:
    """Who left between two states; everyone, if it is us who left."""
    gone = {m.key for m in before.members} - {m.key for m in after.members}
    return {m.key for m in before.members} if me in gone else gone


def session_failed(c: Contact) -> bool:
    return bool(ContactState.from_bytes(c.state).failed)


def sendable(c: Contact) -> bool:
    state = ContactState.from_bytes(c.state)
    return not state.failed and state.send_to is not None


def member_rows(state: core.GroupState) -> list[tuple[bytes, int]]:
    return [(m.key, m.role) for m in state.members]


def op_name(op: int) -> str:
    return {wire.CHANGE_ADD: "add", wire.CHANGE_REMOVE: "remove", wire.CHANGE_ROLE: "role",
            wire.CHANGE_RENAME: "rename", wire.CHANGE_LEAVE: "leave"}.get(op, "change")  # fmt: skip
