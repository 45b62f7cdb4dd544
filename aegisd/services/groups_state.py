"""What the two halves of the groups service share (groups.py: the user's calls;
groups_inbound.py: the payloads members send): the host they use of the messenger, each
group's log in the store, the members' sessions, fanning a change out, and how the core's
refusals become one RPC error. Imports no other service but the delivery layer and the mailbox
helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.errors import DecodeError, GroupError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.primitives import Entropy
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import groups as G
from aegisd.store.db import Contact

from .attachments import Attachments
from .context import ServiceContext
from .delivery import Delivery, Recipient
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
DEPARTED_KEY = "group.departed."  # setting per group contact: since when it shares no group
#: The longest a prune task waits (for the grace to end, then for the contact's queued blocks
#: to leave; polled); past that the maintenance loop's sweep takes over.
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


class AddressView(Protocol):
    async def create_invitation(self, expires_in: int) -> dict[str, Any]: ...
    async def revoke_invitation(self, invitation: str) -> None: ...


class MailboxesView(Protocol):
    def relay_url(self) -> str: ...


class GroupsHost(Protocol):
    """What the groups use of the messenger."""

    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    @property
    def entropy(self) -> Entropy: ...
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

    def __init__(self, host: GroupsHost) -> None:
        self.m = host

    # --- the log in the store -------------------------------------------------------------

    def _load(self, ref: int) -> tuple[G.GroupRow, core.GroupLog]:
        row = G.get_group(self.m.store, ref)
        if row is None:
            raise E.not_found("group")
        return row, core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))

    def _save(self, ref: int, log: core.GroupLog) -> None:
        G.put_log(self.m.store, ref, log.record().to_bytes(), member_rows(log.head))

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
        """Members gone from a group (removed, left, or the group gone here): a group-only
        contact among them that shares no group with us any more goes, with its session and
        mailboxes, once it has shared none for the grace period (`_remove_contact`)."""
        for key in keys:
            if key == self._me() or G.shares_group(self.m.store, self._me(), key):
                continue
            c = next((c for c in self.m.store.list_contacts() if c.identity_key is not None
                      and PublicIdentity.from_bytes(c.identity_key).ed_pub == key),
                     None)  # fmt: skip
            if c is not None and G.is_group_contact(self.m.store, c.id):
                if self.m.store.get_setting(f"{DEPARTED_KEY}{c.id}") is None:
                    self.m.store.set_setting(f"{DEPARTED_KEY}{c.id}", now_ms())
                self.m.spawn(self._remove_contact(c.id, key))

    async def _remove_contact(self, contact_id: int, key: bytes) -> None:
        """A departed group contact goes after the grace period (§25.9): a removal can still
        be undone by a concurrent change with precedence (§25.5), whose author is often the
        member removed (two admins removing each other), and that change reaches us only
        through the session we would have deleted. What waits for it leaves first: removing
        a contact drops its queued blocks, among them the change that tells a removed member
        of its removal. What does not fit these waits is left to the maintenance sweep."""
        since = self.m.store.get_setting(f"{DEPARTED_KEY}{contact_id}")
        if since is None:
            return
        grace = int(self.m.store.get_setting(SETTING_PRUNE_AFTER, PRUNE_AFTER_MS))
        wait = (int(since) + grace - now_ms()) / 1000
        if wait > PRUNE_WAIT:
            return
        await asyncio.sleep(max(wait, 0))
        deadline = time.monotonic() + PRUNE_WAIT
        while self.m.store.outbox_holds_contact(contact_id):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(PRUNE_POLL)
        c = self.m.store.get_contact(contact_id)
        if c is None or G.shares_group(self.m.store, self._me(), key):
            # gone already, or a member again (its removal undone, or met in another group)
            self.m.store.set_setting(f"{DEPARTED_KEY}{contact_id}", None)
            return
        with contextlib.suppress(AppError):
            await self.m.contacts.remove(c.name)
        if self.m.store.get_contact(contact_id) is None:
            self.m.store.set_setting(f"{DEPARTED_KEY}{contact_id}", None)

    def sweep_group_contacts(self) -> None:
        """After each connection to the relay and in the maintenance loop: group contacts
        that share no group with us any more go once their grace period is over (those whose
        prune a stop cut short too, or that a backup brought in); one that is a member again
        loses its mark. Each prune runs as its own task (it may wait)."""
        me = self._me()
        for cid in G.group_contact_ids(self.m.store):
            c = self.m.store.get_contact(cid)
            if c is None or c.identity_key is None:
                continue
            key = PublicIdentity.from_bytes(c.identity_key).ed_pub
            if G.shares_group(self.m.store, me, key):
                self.m.store.set_setting(f"{DEPARTED_KEY}{cid}", None)
                continue
            if self.m.store.get_setting(f"{DEPARTED_KEY}{cid}") is None:
                self.m.store.set_setting(f"{DEPARTED_KEY}{cid}", now_ms())
            self.m.spawn(self._remove_contact(cid, key))


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
