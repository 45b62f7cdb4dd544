"""Groups (issue 16, docs/protocol.md §25): private groups the relay cannot see as groups.

Every pair of members talks over its own pairwise session, as two contacts do; a group
payload (0x0C-0x11) is an ordinary ratchet payload of one of those sessions. This service
keeps each group's log (the pure core, aegisd/core/group.py) in the store, signs the user's
changes and fans them out, answers invitations, introduces newcomers to the members that are
not their contacts (a one-time invitation link of the newcomer's, opened as a first contact:
the resulting contact is a *group contact*, hidden from the contact list), and sends and
receives group messages through the one delivery layer: a text to the group is ONE call to
``Delivery.enqueue`` with every other member as a recipient.

This module holds the user's calls; payloads from members are groups_inbound.py's (the
inbox hands them over through the ``GroupsView`` methods below), and what both use is
groups_state.py's. Of the other services it imports those two and the delivery layer (none
imports it back): what it uses of the messenger is ``GroupsHost``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.errors import GroupError, InvalidChange
from aegisd.core.identity import PublicIdentity, keys_of, safety_number
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import attachments as A
from aegisd.store import group_actions as GA
from aegisd.store import groups as G
from aegisd.store.db import Contact

from .delivery import Recipient
from .group_actions import GroupActions
from .group_files import GroupFiles
from .groups_inbound import GroupInbound
from .groups_state import (
    INTRO_KEY,
    INTRO_TTL,
    INVITATION_MAX_AGE_MS,
    JOINING_KEY,
    MAX_INTRODUCTIONS,
    ROLE_NAMES,
    ROLES,
    SETTING_READ_RECEIPTS,
    GroupBase,
    GroupsHost,
    departed_keys,
    member_rows,
    now_ms,
    op_name,
    refused,
    sendable,
    session_failed,
    stored_invitation,
)
from .message_view import group_action_fields


class Groups(GroupBase):
    def __init__(self, host: GroupsHost) -> None:
        super().__init__(host)
        self.files = GroupFiles(host, self.pruner)  # files to the group: a copy per member (§25.10)
        self.actions = GroupActions(host, self.pruner)  # replies, reactions, ... (§25.11)
        self.inbound = GroupInbound(host, self.files, self.actions, self.pruner)
        self.files.actions_hook = self.actions.on_message  # held for a file just stored

    # --- what the inbox hands over (GroupsView) -------------------------------------------

    def on_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None:
        self.inbound.on_payload(c, session, payload)

    def on_receipt(self, c: Contact, message_id: bytes, status: str) -> None:
        self.inbound.on_receipt(c, message_id, status)

    def introduction_sender_ok(self, invitation_id: bytes, sender: PublicIdentity) -> bool | None:
        return self.inbound.introduction_sender_ok(invitation_id, sender)

    def introduced(self, invitation_id: bytes, contact_id: int) -> None:
        self.inbound.introduced(invitation_id, contact_id)

    def member_session(self, contact_id: int) -> None:
        self.inbound.member_session(contact_id)

    def synced(self, ref: int, before: core.GroupState | None, log: core.GroupLog,
               undone: int) -> None:  # fmt: skip
        self.inbound.synced(ref, before, log, undone)

    def synced_timer(self, ref: int, timer: wire.TimerPayload) -> None:
        self.inbound.synced_timer(ref, timer)

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
                                  member_rows(state))  # fmt: skip
                self.m.sync_groups.changed(ref)  # to this profile's other devices (0x4A)
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
                    c is not None and self.m.store.get_session(c.id) is not None
                    and sendable(c)),
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
                self.m.sync_groups.changed(ref)  # to this profile's other devices (0x4A)
                self.m.ctx.events.emit(
                    "group.changed", {"group": ref, "change": op_name(change.op)}
                )
            self._prune_contacts(departed_keys(parent, log.head, self._me()))
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
        for param, check, value in (("name", wire.check_group_name, name),
                                    ("description", wire.check_group_description, desc)):
            try:
                check(value)
            except ValueError as exc:
                raise E.InvalidParamsError(param, str(exc)) from None
        return await self._change(ref, lambda me, s, _l: core.rename(me, s, name, desc))

    async def leave(self, ref: int) -> dict[str, Any]:
        _, log = self._load(ref)
        alone = len(log.head.members) == 1 and log.head.role_of(self._me())
        if alone or not log.head.role_of(self._me()):
            # the only member deletes the group (§25.4); one no longer a member (removed)
            # deletes its copy, and can be invited again
            async with self.m.lock:
                with self.m.store.transaction():
                    G.delete_group(self.m.store, ref)
                    self.m.store.set_setting(f"{JOINING_KEY}{ref}", None)
                    # a stale state from another device must not bring it back (0x4A)
                    self.m.sync_groups.deleted(log.head.group_id, log.head.version)
                    self.m.ctx.events.emit("group.changed", {"group": ref, "change": "deleted"})
                self._prune_contacts(m.key for m in log.head.members)
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
                # The final base and its whole chain (§25.7 step 1): the invitee's window
                # must start where every member's does, or it would diverge.
                base, chain = core.invitation_contents(self.m.identity(), log)
            except GroupError as exc:
                raise refused(exc) from None
            invite_id = self.m.entropy.random(16)
            payload = wire.GroupInvitePayload(invite_id, now_ms(), base, chain)
            with self.m.store.transaction():
                G.add_sent_invite(self.m.store, invite_id, ref, c.id, log.head.version,
                                  log.base.version, [core.change_hash(ch) for ch in chain])
                self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload)
        self.m.delivery.wake()
        return {"group": ref, "invited": c.name}

    def invitations(self) -> list[dict[str, Any]]:
        G.drop_invitations_before(self.m.store, now_ms() - INVITATION_MAX_AGE_MS)
        out = []
        for row in G.list_invitations(self.m.store):
            p = stored_invitation(row.payload)
            if p is None:  # damaged in the store: nothing to show or answer
                G.delete_invitation(self.m.store, row.id)
                droplog.dropped("dropped a stored group invitation that does not decode")
                continue
            c = self.m.store.get_contact(row.contact_id)
            out.append({"invitation": row.id, "name": p.base.state.name,
                        "from": c.name if c else None, "members": len(p.base.state.members),
                        "created_at": row.created_at})  # fmt: skip
        return out

    async def decline(self, invitation: int) -> dict[str, Any]:
        """Always possible for a stored invitation, even one the rules refuse now (it must
        not stay for want of passing a check): it is dropped, and the inviter told if still
        a reachable contact."""
        async with self.m.lock:
            row = G.get_invitation(self.m.store, invitation)
            if row is None:
                raise E.not_found("invitation")
            with self.m.store.transaction():
                G.delete_invitation(self.m.store, row.id)  # first: nothing below keeps it
                # stored as decoded on arrival; one damaged since is dropped, unanswered
                p = stored_invitation(row.payload)
                c = self.m.store.get_contact(row.contact_id)  # the row goes with its contact
                blob = self.m.store.get_session(c.id) if c is not None else None
                if (p is not None and c is not None and blob is not None and not c.blocked
                        and sendable(c)):  # fmt: skip
                    answer = wire.GroupAnswerPayload(p.invite_id, p.base.state.group_id, False)
                    self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], answer)
        self.m.delivery.wake()
        return {"declined": True}

    def _invitation(
        self, invitation: int
    ) -> tuple[G.GroupInvitationRow, wire.GroupInvitePayload, Contact, core.GroupLog]:
        row = G.get_invitation(self.m.store, invitation)
        if row is not None and row.created_at < now_ms() - INVITATION_MAX_AGE_MS:
            G.delete_invitation(self.m.store, row.id)  # expired
            row = None
        if row is None:
            raise E.not_found("invitation")
        p = stored_invitation(row.payload)
        c = self.m.store.get_contact(row.contact_id)
        if p is None or c is None or not c.identity_key:
            G.delete_invitation(self.m.store, row.id)  # damaged in the store
            raise E.not_found("invitation")
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
        if len(strangers) > MAX_INTRODUCTIONS:
            # each is a relay invitation of ours: the inviter's claimed member list must not
            # set what an accept costs
            raise AppError(E.TOO_LARGE, "too_large", f"the group has more than "
                           f"{MAX_INTRODUCTIONS} members who are not your contacts")  # fmt: skip
        made: list[tuple[str, bytes]] = []  # (invitation, member key), revoked on a failure
        done = False
        try:
            offers = []
            for key in strangers:  # relay calls: outside the lock
                link = await self.m.address.create_invitation(INTRO_TTL)
                made.append((str(link["invitation"]), key))
                offers.append(wire.IntroductionOffer(key, wire.ContactLink.from_text(link["link"])))
            async with self.m.lock:
                row, p, c, log = self._invitation(invitation)
                blob = self.m.store.get_session(c.id)
                if c.blocked:
                    raise AppError(E.BLOCKED, "blocked", "the inviter is blocked")
                if blob is None:
                    raise AppError(E.NOT_READY, "not_ready", "no session with the inviter")
                if G.group_by_id(self.m.store, log.head.group_id) is not None:
                    raise AppError(E.EXISTS, "exists", "this group is already here")
                answer = wire.GroupAnswerPayload(p.invite_id, log.head.group_id, True,
                                                 tuple(offers))  # fmt: skip
                with self.m.store.transaction():
                    for inv, key in made:  # which member each link is for (§25.7 step 5)
                        self.m.store.set_setting(f"{INTRO_KEY}{inv}", key.hex())
                    G.delete_invitation(self.m.store, row.id)
                    ref = G.add_group(self.m.store, log.head.group_id, log.record().to_bytes(),
                                      member_rows(log.head))  # fmt: skip
                    # until the add arrives: the inviter may yet refuse (§25.7 step 3)
                    self.m.store.set_setting(f"{JOINING_KEY}{ref}", {
                        "invite": p.invite_id.hex(), "contact": c.id,
                        "links": [inv for inv, _ in made]})  # fmt: skip
                    self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], answer)
                    self.m.ctx.events.emit("group.changed", {"group": ref, "change": "joined"})
            done = True
        finally:
            if not done:  # no link of a failed accept stays open
                for inv, _ in made:
                    with contextlib.suppress(AppError, OSError):
                        await self.m.address.revoke_invitation(inv)
        self.m.delivery.wake()
        return self.describe(ref)

    async def send(self, ref: int, text: str) -> dict[str, Any]:
        if len(text.encode()) > wire.MAX_TEXT_BYTES:
            raise AppError(E.TOO_LARGE, "too_large",
                           f"a message holds at most {wire.MAX_TEXT_BYTES} bytes")  # fmt: skip
        self.m.check_usable()
        async with self.m.lock:
            head = self._my_head(ref)
            recipients, skipped, strangers = self._targets(head)
            wire_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
            mid = G.api_id(b"", wire_id)
            payload = wire.GroupMessagePayload(head.group_id, head.version, wire_id, now_ms(), text)
            with self.m.store.transaction():
                seq = G.add_message(self.m.store, ref, wire_id, "out", text)
                assert seq is not None  # 16 random bytes of ours
                G.set_statuses(self.m.store, seq, [r.contact.id for r in recipients], "queued")
                for cid, status in skipped.items():  # counted in "N of M", never sent
                    G.set_statuses(self.m.store, seq, [cid], status)
                G.add_unsent(self.m.store, seq, strangers)
                self.m.sync_groups.sent(head.group_id, wire_id, payload.sent_at_ms, text)
                if recipients:  # the delivery layer is the fan-out: one call for all
                    self.m.delivery.enqueue(
                        recipients, payload, delay=self.m.delivery.send_jitter(),
                        spread=self.m.delivery.group_spread(),
                    )
        self.m.delivery.wake()
        return {"message_id": mid, "recipients": len(recipients),
                "unreachable": len(strangers) + len(skipped)}  # fmt: skip

    async def send_file(self, ref: int, path: str, caption: str | None = None) -> dict[str, Any]:
        return await self.files.send(ref, path, caption)

    async def read(
        self, ref: int, up_to: str | None, message_ids: list[str] | None = None
    ) -> dict[str, Any]:
        """Mark the group's incoming messages read, up to the message ``up_to`` (all: None),
        only those among ``message_ids`` when given (others are ignored), and send each author
        a read receipt for its own messages only (not every member), unless read receipts are
        off or the author is blocked, removed or unreachable."""
        async with self.m.lock:
            _, log = self._load(ref)
            last = None
            if up_to is not None:
                last = G.find_message(self.m.store, ref, up_to)
                if last is None:
                    raise E.not_found("message")
            incoming = G.unread(self.m.store, ref, last)
            if message_ids is not None:
                wanted = set(message_ids)
                incoming = [msg for msg in incoming if msg.id in wanted]
            if not incoming:
                return {"marked": 0}
            by_author: dict[bytes, list[bytes]] = {}
            for msg in incoming:
                by_author.setdefault(msg.sender_key or b"", []).append(msg.wire_id)
            with self.m.store.transaction():
                G.set_read(self.m.store, [msg.seq for msg in incoming])
                if self.m.store.get_setting(SETTING_READ_RECEIPTS, True):
                    for author, ids in by_author.items():
                        member = log.head.member(author)  # a removed one gets nothing more
                        c = self._contact_of(member) if member is not None else None
                        blob = self.m.store.get_session(c.id) if c is not None else None
                        if c is not None and blob is not None and sendable(c) and not c.blocked:
                            # the existing receipt path: with cover on it rides the slot
                            self.m.delivery.queue_receipt(Recipient(c, Session.from_bytes(blob)),
                                                          wire.RECEIPT_READ, ids)  # fmt: skip
        self.m.delivery.wake()
        return {"marked": len(incoming)}

    def history(self, ref: int, before: int | None, limit: int) -> dict[str, Any]:
        _, log = self._load(ref)
        page = G.history(self.m.store, ref, before_seq=before, limit=limit + 1)
        more = len(page) > limit  # one more than asked: whether an older page exists
        page = page[1:] if more else page
        out = self.message_items(log, page)
        return {"messages": out, "next_before": page[0].seq if more else None}

    def message_items(
        self, log: core.GroupLog, page: list[G.GroupMessageRow]
    ) -> list[dict[str, Any]]:
        """The messages as group.history shows them, their senders named from ``log``'s head
        (parsed once by the caller, however many messages)."""
        names = {m.key: self._contact_of(m) for m in log.head.members}
        seqs = [msg.seq for msg in page]
        extras, reactions = GA.extras(self.m.store, seqs), GA.reactions(self.m.store, seqs)
        out = []
        for msg in page:
            item: dict[str, Any] = {
                "message_id": msg.id, "seq": msg.seq, "direction": msg.direction,
                "text": msg.body, "sent_at": msg.sent_at, "created_at": msg.created_at,
                **group_action_fields(extras.get(msg.seq), reactions.get(msg.seq, {})),
            }  # fmt: skip
            aid = A.of_group_message(self.m.store, msg.seq) if msg.direction == "in" else None
            if aid is not None:
                item["attachment_id"] = aid  # a file: saved with attachments.save
            if msg.direction == "in":
                c = names.get(msg.sender_key or b"")
                item["from"] = (msg.sender_key or b"").hex()
                item["from_contact"] = c.name if c is not None else None
                item["read"] = msg.read
            else:
                item["delivery"] = self._aggregate(msg.seq)
            out.append(item)
        return out

    def logs(self) -> dict[int, tuple[str, core.GroupLog]]:
        """Every group's name and log, each parsed once: for callers that show many groups'
        messages (conversations.list, messages.search)."""
        out = {}
        for row in G.list_groups(self.m.store):
            log = core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))
            out[row.id] = (log.head.name, log)
        return out

    def _aggregate(self, seq: int) -> dict[str, Any]:
        """Per member, from the receipts: "delivered to 4 of 5", "read by 2 of 5"."""
        st = G.statuses(self.m.store, seq)
        names = {}
        for cid in st:
            c = self.m.store.get_contact(cid)
            names[cid] = c.name if c else str(cid)
            if st[cid] == "queued" and c is not None and session_failed(c):
                st[cid] = "failed"  # its session failed: what waits for it will not arrive
        members = {names[cid]: s for cid, s in st.items()}
        members.update({key.hex(): "unreachable" for key in G.unsent(self.m.store, seq)})
        delivered = sum(1 for s in st.values() if s in ("delivered", "read"))
        read = sum(1 for s in st.values() if s == "read")
        # every other member at send, reached or not ("delivered to 3 of 5")
        return {"recipients": len(members), "delivered": delivered, "read": read,
                "members": members}  # fmt: skip

