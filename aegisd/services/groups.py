"""Groups (issue 16, docs/protocol.md §25): private groups the relay cannot see as groups.

Every pair of members talks over its own pairwise session, as two contacts do; a group
payload (0x0C-0x10) is an ordinary ratchet payload of one of those sessions. This service
keeps each group's log (the pure core, aegisd/core/group.py) in the store, signs the user's
changes and fans them out, answers invitations, introduces newcomers to the members that are
not their contacts (a one-time invitation link of the newcomer's, opened as a first contact:
the resulting contact is a *group contact*, hidden from the contact list), and sends and
receives group messages through the one delivery layer: a text to the group is ONE call to
``Delivery.enqueue`` with every other member as a recipient.

Inbound payloads come from the inbox through ``on_payload`` (the inbox holds the protocol
lock and the receive transaction); nothing a peer sends is trusted: every change, base and
offer is checked by the core, refusals are dropped, and what waits (invitations, held
messages and introductions) is bounded.

Of the other services this module imports only the delivery layer and the inbox's
``clean_name`` (neither imports it back): what it uses of the messenger is ``GroupsHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.errors import DecodeError, GroupError, InvalidChange, NotAMember
from aegisd.core.identity import IdentityKeyPair, PublicIdentity, keys_of, safety_number
from aegisd.core.primitives import Entropy
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import groups as G
from aegisd.store.db import Contact

from .context import ServiceContext
from .delivery import Delivery, Recipient
from .inbox import clean_name

#: Group invitations waiting for the user; past this a new one is dropped (counted).
MAX_PENDING_INVITATIONS = 20
SETTING_MAX_INVITATIONS = "groups.max_pending_invitations"
#: Messages and introductions held per group for a version not reached yet (§25.6), and how
#: long: anyone with a session can send one stamped just ahead.
MAX_HELD_PER_GROUP = 64
HELD_MAX_AGE_MS = 7 * 24 * 3600 * 1000
#: How long an introduction link of ours stays valid (the member opens it when it is online).
INTRO_TTL = 7 * 24 * 3600
INTRO_KEY = "group.intro."  # setting per introduction invitation: the member it is for
ROLE_NAMES = {wire.ROLE_MEMBER: "member", wire.ROLE_ADMIN: "admin", wire.ROLE_OWNER: "owner"}
ROLES = {v: k for k, v in ROLE_NAMES.items()}


def refused(exc: GroupError) -> AppError:
    """One RPC error for every refusal of the core; data.reason names it (its class)."""
    reason = "".join("_" + ch.lower() if ch.isupper() else ch for ch in type(exc).__name__)
    return AppError(E.GROUP_REFUSED, "group_refused", str(exc), reason=reason.lstrip("_"))


def _ms() -> int:
    return time.time_ns() // 1_000_000


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def by_name(self, name: str) -> Contact: ...
    def unique_name(self, wanted: str) -> str: ...
    async def add(self, name: str, link_text: str) -> dict[str, Any]: ...


class AddressView(Protocol):
    async def create_invitation(self, expires_in: int) -> dict[str, Any]: ...


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

    def identity(self) -> IdentityKeyPair: ...
    def check_usable(self) -> None: ...
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Groups:
    def __init__(self, host: GroupsHost) -> None:
        self.m = host

    # --- the log in the store -------------------------------------------------------------

    def _load(self, ref: int) -> tuple[G.GroupRow, core.GroupLog]:
        row = G.get_group(self.m.store, ref)
        if row is None:
            raise E.not_found("group")
        return row, core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))

    def _save(self, ref: int, log: core.GroupLog) -> None:
        G.put_log(self.m.store, ref, log.record().to_bytes(), _members(log.head))

    def _me(self) -> bytes:
        return self.m.identity().public.ed_pub

    def _contact_of(self, member: core.Member) -> Contact | None:
        c = self.m.contacts.with_identity(member.identity)
        return c

    def _recipients(self, state: core.GroupState, *, also: core.GroupState | None = None
                    ) -> tuple[list[Recipient], int]:  # fmt: skip
        """A recipient for every other member with a session (of `state`, and of `also`);
        blocked members get nothing. Returns them and how many members cannot be reached."""
        me, out, missing, seen = self._me(), [], 0, set()
        members = list(state.members) + (list(also.members) if also else [])
        for member in members:
            if member.key == me or member.key in seen:
                continue
            seen.add(member.key)
            c = self._contact_of(member)
            blob = self.m.store.get_session(c.id) if c is not None else None
            if c is None or blob is None:
                missing += 1
                continue
            if not c.blocked:
                out.append(Recipient(c, Session.from_bytes(blob)))
        return out, missing

    def _fan_out(self, parent: core.GroupState, log: core.GroupLog,
                 change: wire.GroupChangeRecord) -> None:  # fmt: skip
        """A change of ours goes to every member of its parent and of the new head (§25.5)."""
        recipients, _ = self._recipients(parent, also=log.head)
        if recipients:
            self.m.delivery.enqueue(recipients, wire.GroupChangePayload(change))

    # --- the user's calls -----------------------------------------------------------------

    async def create(self, name: str, description: str = "") -> dict[str, Any]:
        try:
            state = core.create_group(self.m.entropy, self.m.identity(), name, description)
        except ValueError as exc:
            raise E.InvalidParamsError("name", str(exc)) from None
        log = core.GroupLog(state)
        async with self.m.lock:
            with self.m.store.transaction():
                ref = G.add_group(self.m.store, state.group_id, log.record().to_bytes(),
                                  _members(state))  # fmt: skip
                self.m.ctx.events.emit("group.changed", {"group": ref, "change": "created"})
        return self.describe(ref)

    def list_groups(self) -> list[dict[str, Any]]:
        out = []
        for row in G.list_groups(self.m.store):
            head = core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log)).head
            me = head.role_of(self._me())
            out.append({"group": row.id, "name": head.name, "members": len(head.members),
                        "role": ROLE_NAMES.get(me), "member": me > 0})  # fmt: skip
        return out

    def by_name(self, name: str) -> int:
        """A group's local reference from its name (the first that has it)."""
        for g in self.list_groups():
            if g["name"] == name:
                return int(g["group"])
        raise E.not_found("group")

    def describe(self, ref: int) -> dict[str, Any]:
        _, log = self._load(ref)
        head, me = log.head, self.m.identity().public
        hidden = G.group_contact_ids(self.m.store)
        members = []
        for member in head.members:
            c = self._contact_of(member) if member.key != me.ed_pub else None
            members.append({
                "key": member.key.hex(),
                "role": ROLE_NAMES[member.role],
                "you": member.key == me.ed_pub,
                "contact": c.name if c is not None and c.id not in hidden else None,
                "reachable": member.key == me.ed_pub or (
                    c is not None and self.m.store.get_session(c.id) is not None),
                "safety_number": None if member.key == me.ed_pub
                else safety_number(me, member.identity),
            })  # fmt: skip
        return {"group": ref, "name": head.name, "description": head.description,
                "version": head.version, "role": ROLE_NAMES.get(head.role_of(me.ed_pub)),
                "members": members}  # fmt: skip

    def _member_key(self, log: core.GroupLog, member: str) -> bytes:
        """A member named by its key (hex, as group.get shows it) or by a contact's name."""
        for m in log.head.members:
            if m.key.hex() == member.lower():
                return m.key
        c = self.m.store.contact_by_name(member)
        if c is not None and c.identity_key is not None:
            keys = keys_of(c.identity_key)
            for m in log.head.members:
                if m.identity.encode() == keys:
                    return m.key
        raise E.not_found("member")

    async def _change(self, ref: int, make: Any) -> dict[str, Any]:
        """Sign a change of ours on the head (`make(identity, state, log)`), apply it, store
        it and fan it out, in one transaction; a refusal changes nothing."""
        self.m.check_usable()
        async with self.m.lock:
            _, log = self._load(ref)
            parent = log.head
            try:
                change = make(self.m.identity(), parent, log)
                log.receive(change)
            except GroupError as exc:
                raise refused(exc) from None
            with self.m.store.transaction():
                self._save(ref, log)
                self._fan_out(parent, log, change)
                self.m.ctx.events.emit("group.changed", {"group": ref, "change": _op(change.op)})
        self.m.delivery.wake()
        return self.describe(ref)

    async def remove(self, ref: int, member: str) -> dict[str, Any]:
        _, log = self._load(ref)
        key = self._member_key(log, member)
        return await self._change(ref, lambda me, s, _l: core.remove_member(me, s, key))

    async def set_role(self, ref: int, member: str, role: str) -> dict[str, Any]:
        if role not in ROLES:
            raise E.InvalidParamsError("role", "must be member, admin or owner")
        _, log = self._load(ref)
        key = self._member_key(log, member)
        return await self._change(ref, lambda me, s, _l: core.set_role(me, s, key, ROLES[role]))

    async def rename(self, ref: int, name: str, description: str | None) -> dict[str, Any]:
        _, log = self._load(ref)
        desc = log.head.description if description is None else description
        try:
            wire.check_group_name(name)
            wire.check_group_description(desc)
        except ValueError as exc:
            raise E.InvalidParamsError("name", str(exc)) from None
        return await self._change(ref, lambda me, s, _l: core.rename(me, s, name, desc))

    async def leave(self, ref: int) -> dict[str, Any]:
        _, log = self._load(ref)
        if len(log.head.members) == 1 and log.head.role_of(self._me()):
            async with self.m.lock:  # the only member deletes the group (§25.4)
                with self.m.store.transaction():
                    G.delete_group(self.m.store, ref)
                    self.m.ctx.events.emit("group.changed", {"group": ref, "change": "deleted"})
            return {"group": ref, "deleted": True}
        await self._change(ref, lambda me, s, _l: core.leave(me, s))
        return {"group": ref, "deleted": False}

    async def invite(self, ref: int, contact: str) -> dict[str, Any]:
        self.m.check_usable()
        async with self.m.lock:
            c = self.m.contacts.by_name(contact)
            if c.blocked:
                raise AppError(E.BLOCKED, "blocked", "this contact is blocked")
            blob = self.m.store.get_session(c.id)
            if blob is None or c.identity_key is None:
                raise AppError(E.NOT_READY, "not_ready", "no session with this contact")
            _, log = self._load(ref)
            invitee = PublicIdentity.from_bytes(c.identity_key)
            if log.head.member(invitee.ed_pub) is not None:
                raise refused(InvalidChange("the contact is a member already"))
            try:
                base = core.sign_state(self.m.identity(), log.head)
            except GroupError as exc:
                raise refused(exc) from None
            invite_id = self.m.entropy.random(16)
            payload = wire.GroupInvitePayload(invite_id, _ms(), base, ())
            with self.m.store.transaction():
                G.add_sent_invite(self.m.store, invite_id, ref, c.id)
                self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload)
        self.m.delivery.wake()
        return {"group": ref, "invited": c.name}

    def invitations(self) -> list[dict[str, Any]]:
        out = []
        for row in G.list_invitations(self.m.store):
            p = wire.decode_payload(row.payload)
            assert isinstance(p, wire.GroupInvitePayload)
            c = self.m.store.get_contact(row.contact_id)
            out.append({"invitation": row.id, "name": p.base.state.name,
                        "from": c.name if c else None, "members": len(p.base.state.members),
                        "created_at": row.created_at})  # fmt: skip
        return out

    async def decline(self, invitation: int) -> dict[str, Any]:
        async with self.m.lock:
            row, p, c, _ = self._invitation(invitation)
            blob = self.m.store.get_session(c.id)
            with self.m.store.transaction():
                G.delete_invitation(self.m.store, row.id)
                if blob is not None and not c.blocked:
                    answer = wire.GroupAnswerPayload(p.invite_id, p.base.state.group_id, False)
                    self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], answer)
        self.m.delivery.wake()
        return {"declined": True}

    def _invitation(
        self, invitation: int
    ) -> tuple[G.GroupInvitationRow, wire.GroupInvitePayload, Contact, core.GroupLog]:
        row = G.get_invitation(self.m.store, invitation)
        if row is None:
            raise E.not_found("invitation")
        p = wire.decode_payload(row.payload)
        c = self.m.store.get_contact(row.contact_id)
        assert isinstance(p, wire.GroupInvitePayload) and c is not None and c.identity_key
        try:
            log = core.invitation_log(p.base, p.changes, PublicIdentity.from_bytes(c.identity_key),
                                      self.m.identity().public)  # fmt: skip
        except GroupError as exc:
            raise refused(exc) from None
        return row, p, c, log

    async def accept(self, invitation: int) -> dict[str, Any]:
        """Answer with an introduction offer (a one-time invitation link of ours) for every
        member that is not our contact yet, and keep the group: we become a member when the
        inviter's add reaches us."""
        self.m.check_usable()
        async with self.m.lock:
            _, p, c, log = self._invitation(invitation)
            if G.group_by_id(self.m.store, log.head.group_id) is not None:
                raise AppError(E.EXISTS, "exists", "this group is already here")
            strangers = sorted(
                m.key for m in log.head.members
                if m.key != self._me() and self._contact_of(m) is None
            )  # fmt: skip
        offers = []
        for key in strangers:  # relay calls: outside the lock
            made = await self.m.address.create_invitation(INTRO_TTL)
            link = wire.ContactLink.from_text(made["link"])
            self.m.store.set_setting(f"{INTRO_KEY}{made['invitation']}", key.hex())
            offers.append(wire.IntroductionOffer(key, link))
        async with self.m.lock:
            row, p, c, log = self._invitation(invitation)
            blob = self.m.store.get_session(c.id)
            if blob is None:
                raise AppError(E.NOT_READY, "not_ready", "no session with the inviter")
            answer = wire.GroupAnswerPayload(p.invite_id, log.head.group_id, True, tuple(offers))
            with self.m.store.transaction():
                G.delete_invitation(self.m.store, row.id)
                ref = G.add_group(self.m.store, log.head.group_id, log.record().to_bytes(),
                                  _members(log.head))  # fmt: skip
                self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], answer)
                self.m.ctx.events.emit("group.changed", {"group": ref, "change": "joined"})
        self.m.delivery.wake()
        return self.describe(ref)

    async def send(self, ref: int, text: str) -> dict[str, Any]:
        if len(text.encode()) > wire.MAX_TEXT_BYTES:
            raise AppError(E.TOO_LARGE, "too_large",
                           f"a message holds at most {wire.MAX_TEXT_BYTES} bytes")  # fmt: skip
        self.m.check_usable()
        async with self.m.lock:
            _, log = self._load(ref)
            head = log.head
            if head.member(self._me()) is None:
                raise refused(NotAMember("you are not a member of this group"))
            recipients, missing = self._recipients(head)
            wire_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
            mid = wire_id.hex()
            payload = wire.GroupMessagePayload(head.group_id, head.version, wire_id, _ms(), text)
            with self.m.store.transaction():
                G.add_message(self.m.store, ref, mid, "out", text)
                G.set_statuses(self.m.store, mid, [r.contact.id for r in recipients], "queued")
                if recipients:  # the delivery layer is the fan-out: one call for all
                    self.m.delivery.enqueue(
                        recipients, payload, delay=self.m.delivery.send_jitter()
                    )
        self.m.delivery.wake()
        return {"message_id": mid, "recipients": len(recipients), "unreachable": missing}

    def history(self, ref: int, before: int | None, limit: int) -> dict[str, Any]:
        _, log = self._load(ref)
        page = G.history(self.m.store, ref, before_seq=before, limit=limit)
        names = {m.key: self._contact_of(m) for m in log.head.members}
        out = []
        for msg in page:
            item: dict[str, Any] = {
                "message_id": msg.id, "seq": msg.seq, "direction": msg.direction,
                "text": msg.body, "sent_at": msg.sent_at, "created_at": msg.created_at,
            }  # fmt: skip
            if msg.direction == "in":
                c = names.get(msg.sender_key or b"")
                item["from"] = (msg.sender_key or b"").hex()
                item["from_contact"] = c.name if c is not None else None
            else:
                item["delivery"] = self._aggregate(msg.id)
            out.append(item)
        return {"messages": out, "next_before": page[0].seq if len(page) == limit else None}

    def _aggregate(self, mid: str) -> dict[str, Any]:
        """Per member, from the receipts: "delivered to 4 of 5"."""
        st = G.statuses(self.m.store, mid)
        names = {}
        for cid in st:
            c = self.m.store.get_contact(cid)
            names[cid] = c.name if c else str(cid)
        delivered = sum(1 for s in st.values() if s in ("delivered", "read"))
        return {"recipients": len(st), "delivered": delivered,
                "read": sum(1 for s in st.values() if s == "read"),
                "members": {names[cid]: s for cid, s in st.items()}}  # fmt: skip

    # --- inbound (the inbox: protocol lock held, inside the receive transaction) ----------

    def on_receipt(self, c: Contact, message_id: bytes, status: str) -> None:
        mid = message_id.hex()
        if G.has_message(self.m.store, mid) and G.advance_status(self.m.store, mid, c.id, status):
            self.m.ctx.events.emit("group.receipt", {"message_id": mid, "status": status})

    def on_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None:
        assert c.identity_key is not None
        sender = PublicIdentity.from_bytes(c.identity_key)
        try:
            if isinstance(payload, wire.GroupInvitePayload):
                self._on_invitation(c, sender, payload)
            elif isinstance(payload, wire.GroupAnswerPayload):
                self._on_answer(c, sender, payload)
            elif isinstance(payload, wire.GroupChangePayload):
                self._on_change(payload.change)
            elif isinstance(payload, wire.GroupMessagePayload):
                self._on_message(c, session, sender, payload)
            elif isinstance(payload, wire.GroupIntroductionPayload):
                self._on_introduction(c, payload)
        except GroupError as exc:
            droplog.dropped(f"dropped a group payload: {type(exc).__name__}")

    def _on_invitation(self, c: Contact, sender: PublicIdentity, p: wire.GroupInvitePayload
                       ) -> None:  # fmt: skip
        core.invitation_log(p.base, p.changes, sender, self.m.identity().public)  # or raises
        limit = int(self.m.store.get_setting(SETTING_MAX_INVITATIONS, MAX_PENDING_INVITATIONS))
        if G.count_invitations(self.m.store) >= limit:
            droplog.dropped("dropped a group invitation (too many pending)")
            return
        inv = G.add_invitation(self.m.store, c.id, wire.encode_payload(p))
        self.m.ctx.events.emit("group.invitation", {
            "invitation": inv, "name": p.base.state.name, "from": c.name,
            "members": len(p.base.state.members)})  # fmt: skip

    def _on_answer(self, c: Contact, sender: PublicIdentity, p: wire.GroupAnswerPayload) -> None:
        ref = G.take_sent_invite(self.m.store, p.invite_id, c.id)
        if ref is None:
            droplog.dropped("dropped a group answer to no invitation")
            return
        _, log = self._load(ref)
        if p.group_id != log.head.group_id:
            return
        if not p.accepted:
            self.m.ctx.events.emit("group.changed", {"group": ref, "change": "declined",
                                                     "contact": c.name})  # fmt: skip
            return
        offers = core.introduction_offers(log.head, p, sender)
        parent = log.head
        change = core.add_member(self.m.identity(), parent, sender)
        log.receive(change)
        self._save(ref, log)
        self._fan_out(parent, log, change)
        for key, link in offers.items():
            member = log.head.member(key)
            mc = self._contact_of(member) if member is not None else None
            blob = self.m.store.get_session(mc.id) if mc is not None else None
            if mc is not None and blob is not None and not mc.blocked:
                intro = wire.GroupIntroductionPayload(log.head.group_id, link)
                self.m.delivery.enqueue([Recipient(mc, Session.from_bytes(blob))], intro)
        self.m.ctx.events.emit("group.changed", {"group": ref, "change": "add"})

    def _on_change(self, change: wire.GroupChangeRecord) -> None:
        row = G.group_by_id(self.m.store, change.group_id)
        if row is None:
            droplog.dropped("dropped a change of an unknown group")
            return
        _, log = self._load(row.id)
        received = log.receive(change)
        self._save(row.id, log)
        if received.outcome is core.Outcome.APPLIED:
            self.m.ctx.events.emit("group.changed", {"group": row.id, "change": _op(change.op)})
            self._release_held(row.id, log.head)

    def _on_message(self, c: Contact, session: Session, sender: PublicIdentity,
                    p: wire.GroupMessagePayload, held: bool = False) -> None:  # fmt: skip
        row = G.group_by_id(self.m.store, p.group_id)
        if row is None:
            droplog.dropped("dropped a message of an unknown group")
            return
        _, log = self._load(row.id)
        verdict = core.message_disposition(log.head, sender.ed_pub, p.version)
        member = log.head.member(sender.ed_pub)
        if member is not None and not member.identity.same_keys(sender):
            verdict = core.Disposition.DROP
        if verdict is core.Disposition.HOLD and not held:
            self._hold(row.id, c, p)
            return
        if verdict is not core.Disposition.DELIVER:
            if not held:
                droplog.dropped("dropped a group message from a non-member")
            return
        mid = p.message_id.hex()
        if G.has_message(self.m.store, mid):
            return
        G.add_message(self.m.store, row.id, mid, "in", p.text, sender_key=sender.ed_pub,
                      sent_at=p.sent_at_ms)  # fmt: skip
        hidden = c.id in G.group_contact_ids(self.m.store)
        self.m.ctx.events.emit("group.message", {
            "group": row.id, "message_id": mid, "from": sender.ed_pub.hex(),
            "from_contact": None if hidden else c.name, "text": p.text,
            "sent_at": p.sent_at_ms})  # fmt: skip
        self.m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED,
                                      [p.message_id])  # fmt: skip

    def _on_introduction(self, c: Contact, p: wire.GroupIntroductionPayload,
                         held: bool = False) -> None:  # fmt: skip
        row = G.group_by_id(self.m.store, p.group_id)
        if row is None:
            return
        _, log = self._load(row.id)
        try:
            identity = core.introduced_member(log.head, p)
        except NotAMember:
            if not held:
                self._hold(row.id, c, p)  # the add may be on its way
            return
        if identity.same_keys(self.m.identity().public) or self.m.contacts.with_identity(identity):
            return
        name = self.m.contacts.unique_name(clean_name(f"member {identity.ed_pub.hex()[:12]}"))
        self.m._spawn(self._open_session(name, p.link))

    async def _open_session(self, name: str, link: wire.ContactLink) -> None:
        """A first contact through the newcomer's introduction link (§25.7 step 4); the
        contact serves the group only (hidden from the contact list)."""
        with contextlib.suppress(AppError, GroupError, DecodeError, OSError):
            made = await self.m.contacts.add(name, link.to_text())
            c = self.m.store.contact_by_name(made["name"])
            if c is not None:
                G.mark_group_contact(self.m.store, c.id)

    def _hold(self, ref: int, c: Contact, p: wire.Payload) -> None:
        G.drop_held_before(self.m.store, ref, _ms() - HELD_MAX_AGE_MS)
        if len(G.held(self.m.store, ref)) >= MAX_HELD_PER_GROUP:
            droplog.dropped("dropped a held group payload (too many)")
            return
        G.hold(self.m.store, ref, c.id, wire.encode_payload(p))

    def _release_held(self, ref: int, head: core.GroupState) -> None:
        """The state moved: decide again on what waits for it."""
        for h in G.held(self.m.store, ref):
            c = self.m.store.get_contact(h.contact_id)
            blob = self.m.store.get_session(h.contact_id)
            p = wire.decode_payload(h.payload)
            if c is None or blob is None or c.identity_key is None:
                G.drop_held(self.m.store, h.id)
                continue
            sender = PublicIdentity.from_bytes(c.identity_key)
            if isinstance(p, wire.GroupMessagePayload):
                verdict = core.message_disposition(head, sender.ed_pub, p.version)
                if verdict is core.Disposition.HOLD:
                    continue
                G.drop_held(self.m.store, h.id)
                self._on_message(c, Session.from_bytes(blob), sender, p, held=True)
            elif isinstance(p, wire.GroupIntroductionPayload):
                G.drop_held(self.m.store, h.id)
                self._on_introduction(c, p, held=True)

    # --- first contacts through an introduction link of ours (the inbox asks) -------------

    def introduction_sender_ok(self, invitation_id: bytes, sender: PublicIdentity) -> bool | None:
        """None: not an introduction link. Otherwise whether the first contact's identity is
        the member the link was made for (§25.7 step 5)."""
        wanted = self.m.store.get_setting(f"{INTRO_KEY}{invitation_id.hex()}")
        if wanted is None:
            return None
        return bool(sender.ed_pub.hex() == wanted)

    def introduced(self, invitation_id: bytes, contact_id: int) -> None:
        """The member's session is established: a group contact (inside the transaction)."""
        self.m.store.set_setting(f"{INTRO_KEY}{invitation_id.hex()}", None)
        G.mark_group_contact(self.m.store, contact_id)


def _members(state: core.GroupState) -> list[tuple[bytes, int]]:
    return [(m.key, m.role) for m in state.members]


def _op(op: int) -> str:
    return {wire.CHANGE_ADD: "add", wire.CHANGE_REMOVE: "remove", wire.CHANGE_ROLE: "role",
            wire.CHANGE_RENAME: "rename", wire.CHANGE_LEAVE: "leave"}.get(op, "change")  # fmt: skip
