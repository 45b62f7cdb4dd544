"""Group payloads from members (0x0C-0x11, docs/protocol.md §25), handed over by the inbox
with the protocol lock held, inside the receive transaction. Nothing a peer sends is trusted:
every change, base and offer is checked by the core, a refusal is dropped (counted), and what
waits (invitations, held messages and introductions) is bounded. Imports groups_state, the
delivery layer and names.py's ``clean_name`` (none imports it back)."""

from __future__ import annotations

import contextlib

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.errors import DecodeError, GroupError, NotAMember, NotPermitted
from aegisd.core.identity import PublicIdentity
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import group_actions as GA
from aegisd.store import groups as G
from aegisd.store.db import Contact
from aegisd.store.devices import SETTING_OWN_LIST

from .delivery import Recipient
from .group_actions import GroupActions
from .group_files import GroupFiles
from .groups_state import (
    HELD_MAX_AGE_MS,
    INTRO_KEY,
    INTRO_TRIES,
    INVITATION_MAX_AGE_MS,
    JOINING_KEY,
    MAX_HELD_PER_GROUP,
    MAX_HELD_PER_SENDER,
    MAX_INVITATIONS_PER_CONTACT,
    MAX_PENDING_INTROS_PER_GROUP,
    MAX_PENDING_INVITATIONS,
    SETTING_MAX_INVITATIONS,
    UNKNOWN_HELD_BYTES,
    UNKNOWN_HELD_MAX_AGE_MS,
    UNKNOWN_HELD_PER_SENDER,
    UNKNOWN_HELD_SENDER_BYTES,
    UNKNOWN_HELD_TOTAL,
    DepartedContacts,
    GroupBase,
    GroupsHost,
    departed_keys,
    missed_changes,
    now_ms,
    op_name,
)
from .names import clean_name


class GroupInbound(GroupBase):
    def __init__(self, host: GroupsHost, files: GroupFiles, actions: GroupActions | None = None,
                 pruner: DepartedContacts | None = None) -> None:  # fmt: skip
        super().__init__(host, pruner)
        self.files = files
        self.actions = actions if actions is not None else GroupActions(host, pruner)
        self._opening: set[int] = set()  # pending introductions being tried now

    def on_receipt(self, c: Contact, message_id: bytes, status: str) -> None:
        """A delivery or read receipt: matched to our own message with this id that was sent
        to this member (the session names the member; we drew the id, so it is ours alone)."""
        own = G.own_message_to(self.m.store, message_id, c.id)
        if own is not None and G.advance_status(self.m.store, own[0], c.id, status):
            # with its group: erasure and deletion for everyone forget it with the message's
            at = G.message_at(self.m.store, own[0])
            self.m.ctx.events.emit("group.receipt", {"group": at[0] if at else None,
                                                     "message_id": own[1], "status": status})

    def on_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None:
        assert c.identity_key is not None
        sender = PublicIdentity.from_bytes(c.identity_key)
        try:
            if isinstance(payload, wire.GroupInvitePayload):
                self._on_invitation(c, sender, payload)
            elif isinstance(payload, wire.GroupAnswerPayload):
                self._on_answer(c, sender, payload)
            elif isinstance(payload, wire.GroupChangePayload):
                self._on_change(payload.change, c)
            elif isinstance(payload, (wire.GroupMessagePayload, wire.GroupFilePayload,
                                      wire.GroupActionPayload)):  # fmt: skip
                self._on_message(c, session, sender, payload)
            elif isinstance(payload, wire.GroupIntroductionPayload):
                self._on_introduction(c, payload)
        except GroupError as exc:
            droplog.dropped(f"dropped a group payload: {type(exc).__name__}")

    def _on_invitation(self, c: Contact, sender: PublicIdentity, p: wire.GroupInvitePayload
                       ) -> None:  # fmt: skip
        if G.is_group_contact(self.m.store, c.id) and not G.shares_group(
            self.m.store, self._me(), sender.ed_pub
        ):  # kept only for a change undoing its departure (§25.9): no contact of the user's
            droplog.dropped("dropped a group invitation from a departed group contact")
            return
        core.invitation_log(p.base, p.changes, sender, self.m.identity().public)  # or raises
        G.drop_invitations_before(self.m.store, now_ms() - INVITATION_MAX_AGE_MS)
        limit = int(self.m.store.get_setting(SETTING_MAX_INVITATIONS, MAX_PENDING_INVITATIONS))
        theirs = G.invitations_of(self.m.store, c.id)
        if len(theirs) >= MAX_INVITATIONS_PER_CONTACT:  # the contact's oldest goes
            for old in theirs[: len(theirs) - MAX_INVITATIONS_PER_CONTACT + 1]:
                G.delete_invitation(self.m.store, old)
            droplog.dropped("dropped a group invitation (too many from one contact)")
        elif G.count_invitations(self.m.store) >= limit:
            droplog.dropped("dropped a group invitation (too many pending)")
            return
        inv = G.add_invitation(self.m.store, c.id, wire.encode_payload(p))
        self.m.ctx.events.emit("group.invitation", {
            "invitation": inv, "name": p.base.state.name, "from": c.name,
            "members": len(p.base.state.members)})  # fmt: skip

    def _on_answer(self, c: Contact, sender: PublicIdentity, p: wire.GroupAnswerPayload) -> None:
        sent = G.take_sent_invite(self.m.store, p.invite_id, c.id)
        if sent is None:
            if not p.accepted:
                self._on_refusal(c, p)  # our inviter can no longer add us, maybe
            else:
                droplog.dropped("dropped a group answer to no invitation")
            return
        ref = sent.group_ref
        _, log = self._load(ref)
        if p.group_id != log.head.group_id:
            return
        if not p.accepted:
            self.m.ctx.events.emit("group.changed", {"group": ref, "change": "declined",
                                                     "contact": c.name})  # fmt: skip
            return
        if log.head.member(sender.ed_pub) is not None:
            return  # added meanwhile (another admin's invitation): nothing to do
        if log.base.version != sent.base_version:
            # the invited base is final no more at our end: the invitee's log could not
            # take the changes since (they apply to versions it holds final); invite again
            droplog.dropped("dropped a group answer to a stale invitation")
            self.m.ctx.events.emit("group.changed", {"group": ref, "change": "invitation_stale",
                                                     "contact": c.name})  # fmt: skip
            self._refuse(c, p)
            return
        # every change of the chain the invitation did not carry, whatever its parent (a
        # concurrent change that won on an older parent too), before the add (§25.7 step 3)
        missed = missed_changes(log, sent.chain)
        parent = log.head
        try:
            # offers for members gone since the invitation are left out, not refused
            offers = core.introduction_offers(log.head, p, sender, log.departed())
            change = core.add_member(self.m.identity(), parent, sender)
            log.receive(change)
        except GroupError as exc:
            # the sent invitation is taken: any refusal is answered, so that the invitee never
            # waits for an add that will not come (we may no longer add: demoted or removed
            # since we invited, or the group is full; or the answer's offers are refused)
            droplog.dropped(f"refused a group answer: {type(exc).__name__}")
            self.m.ctx.events.emit("group.changed", {
                "group": ref, "change": "invitation_refused", "contact": c.name})  # fmt: skip
            self._refuse(c, p)
            return
        self._save(ref, log)
        if missed:
            blob = self.m.store.get_session(c.id)
            assert blob is not None  # the answer just came through it
            session = Session.from_bytes(blob)
            for ch in missed:
                self.m.delivery.enqueue([Recipient(c, session)], wire.GroupChangePayload(ch))
        self._fan_out(parent, log, change)
        self.m.sync_groups.changed(ref)  # our add: to this profile's other devices (0x4A)
        self.actions.share_timer(c, ref)  # a timer set before it joined (§25.11)
        for key, link in offers.items():
            member = log.head.member(key)
            mc = self._contact_of(member) if member is not None else None
            blob = self.m.store.get_session(mc.id) if mc is not None else None
            if mc is not None and blob is not None and not mc.blocked:
                intro = wire.GroupIntroductionPayload(log.head.group_id, link)
                self.m.delivery.enqueue([Recipient(mc, Session.from_bytes(blob))], intro)
        self.m.ctx.events.emit("group.changed", {"group": ref, "change": "add"})

    def _refuse(self, c: Contact, p: wire.GroupAnswerPayload) -> None:
        """Our refusal of an accepting answer: a group answer of ours with the invitation's
        ID and accepted = 0 (§25.7 step 3)."""
        blob = self.m.store.get_session(c.id)
        if blob is not None:  # the answer just came through it
            refusal = wire.GroupAnswerPayload(p.invite_id, p.group_id, False)
            self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], refusal)

    def _on_refusal(self, c: Contact, p: wire.GroupAnswerPayload) -> None:
        """The inviter refused our accept: unless we are a member by now, the group we kept
        goes, with the introduction links we made for it."""
        row = G.group_by_id(self.m.store, p.group_id)
        key = f"{JOINING_KEY}{row.id}" if row is not None else ""
        joining = self.m.store.get_setting(key) if row is not None else None
        if (row is None or joining is None or joining["invite"] != p.invite_id.hex()
                or joining["contact"] != c.id):
            droplog.dropped("dropped a group answer to no invitation")
            return
        self.m.store.set_setting(key, None)
        _, log = self._load(row.id)
        if log.head.role_of(self._me()):
            return  # a member already (another admin added us): nothing to undo
        for inv in joining["links"]:
            self.m.store.set_setting(f"{INTRO_KEY}{inv}", None)
            self.m.spawn(self._revoke(inv))
        G.delete_group(self.m.store, row.id)
        self.m.ctx.events.emit("group.changed", {"group": row.id, "change": "invitation_refused",
                                                 "contact": c.name})  # fmt: skip
        self._prune_contacts(m.key for m in log.head.members)

    async def _revoke(self, invitation: str) -> None:
        with contextlib.suppress(AppError, OSError):
            await self.m.address.revoke_invitation(invitation)

    def _on_change(self, change: wire.GroupChangeRecord, c: Contact | None = None) -> None:
        row = G.group_by_id(self.m.store, change.group_id)
        if row is None:  # its state may be on its way from another device of ours
            self._hold_unknown(c, change.group_id, wire.GroupChangePayload(change))
            return
        _, log = self._load(row.id)
        before = log.head
        # Taken from anyone, a departed member too (§25.9): the log refuses a change whose
        # author is not a member of its parent, and holds one whose parent has not come yet
        # (which may be the change undoing the departure).
        received = log.receive(change)
        self._save(row.id, log)
        if received.outcome is core.Outcome.HELD:  # a change we lack: another device may not
            self.m.sync_groups.ask(change.group_id)
        if received.undone:  # changes shown applied before lost (or found invalid) now
            self.m.ctx.events.emit("group.changed", {"group": row.id, "change": "undone",
                                                     "count": len(received.undone)})  # fmt: skip
        if received.outcome is core.Outcome.APPLIED:
            if log.head.role_of(self._me()) and not before.role_of(self._me()):
                self.m.store.set_setting(f"{JOINING_KEY}{row.id}", None)  # our add: joined
                self.m.sync_groups.changed(row.id)  # the group to our other devices (0x4A)
            self.m.ctx.events.emit("group.changed", {"group": row.id, "change": op_name(change.op)})
            self._release_held(row.id, log.head, log.departed())
        self._prune_contacts(departed_keys(before, log.head, self._me()))

    def synced(self, ref: int, before: core.GroupState | None, log: core.GroupLog,
               undone: int) -> None:  # fmt: skip
        """Another device of ours sent the group's state (own_sync_groups.py, checked there,
        inside the receive's transaction): stored and applied as a member's change would be
        (before: None for a group new here; ``undone``: changes shown applied here that
        its changes put off the chain). Nothing goes back, nor to the members."""
        self._save(ref, log)
        if undone:
            self.m.ctx.events.emit("group.changed", {"group": ref, "change": "undone",
                                                     "count": undone})  # fmt: skip
        if before is not None and log.head == before:
            return  # only held-back or lost changes came: the group shows as it did
        me = self._me()
        if log.head.role_of(me) and (before is None or not before.role_of(me)):
            self.m.store.set_setting(f"{JOINING_KEY}{ref}", None)  # a member: joined here too
        self.m.ctx.events.emit("group.changed", {"group": ref, "change": "synced"})
        self._release_held(ref, log.head, log.departed())
        if before is not None:
            self._prune_contacts(departed_keys(before, log.head, me))
        else:  # what members sent before the state came, taken now
            self._release_unknown(log.head.group_id)

    def synced_timer(self, ref: int, timer: wire.TimerPayload) -> None:
        """The group's disappearing timer at another device of ours (0x4A): taken as a
        member's timer change is, the later one winning (group_actions.py)."""
        self.actions.synced_timer(ref, timer)

    def _on_message(self, c: Contact, session: Session, sender: PublicIdentity,
                    p: wire.GroupMessagePayload | wire.GroupFilePayload | wire.GroupActionPayload,
                    held: bool = False) -> None:  # fmt: skip
        """A text, a file (§25.10) or an action (§25.11) from a member: judged alike (§25.6)."""
        row = G.group_by_id(self.m.store, p.group_id)
        if row is None:  # its state may be on its way from another device of ours
            if not held:
                self._hold_unknown(c, p.group_id, p)
            return
        _, log = self._load(row.id)
        verdict = core.message_disposition(log.head, sender.ed_pub, p.version, log.departed())
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
        if isinstance(p, wire.GroupFilePayload):
            self.files.deliver(row.id, c, session, sender, p)
            return
        if isinstance(p, wire.GroupActionPayload):
            self.actions.deliver(row.id, c, session, sender, p)
            return
        # one message per (group, author, id): another member's use of the id is its own
        if G.add_message(self.m.store, row.id, p.message_id, "in", p.text,
                         sender_key=sender.ed_pub, sent_at=p.sent_at_ms) is None:
            return  # this author's duplicate: never shown twice
        mid = G.api_id(sender.ed_pub, p.message_id)
        hidden = c.id in G.group_contact_ids(self.m.store)
        self.m.ctx.events.emit("group.message", {
            "group": row.id, "message_id": mid, "from": sender.ed_pub.hex(),
            "from_contact": None if hidden else c.name, "text": p.text,
            "sent_at": p.sent_at_ms, "timer": GA.get_timer(self.m.store, row.id)[0]})  # fmt: skip
        self.m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED,
                                      [p.message_id])  # fmt: skip
        self.actions.on_message(row.id, sender.ed_pub, p.message_id)  # held for it (§25.11)

    def _on_introduction(self, c: Contact, p: wire.GroupIntroductionPayload,
                         held: bool = False) -> None:  # fmt: skip
        row = G.group_by_id(self.m.store, p.group_id)
        if row is None:
            return
        _, log = self._load(row.id)
        if c.identity_key is None:
            return
        introducer = PublicIdentity.from_bytes(c.identity_key).ed_pub
        try:
            identity = core.introduced_member(log.head, p, introducer=introducer)
        except NotPermitted:
            droplog.dropped("dropped an introduction from a member who may not add")
            return
        except NotAMember:
            # the add may be on its way, but only from who could have made it: an admin or
            # owner of a state the log knows who has not left (anyone else would fill the hold)
            if not held and log.was_admin(introducer) and introducer not in log.departed():
                self._hold(row.id, c, p)
            else:
                droplog.dropped("dropped an introduction naming a non-member")
            return
        if identity.same_keys(self.m.identity().public) or self.m.contacts.with_identity(identity):
            return
        if G.count_pending_intros(self.m.store, row.id) >= MAX_PENDING_INTROS_PER_GROUP:
            droplog.dropped("dropped an introduction (too many pending)")
            return
        name = self.m.contacts.unique_name(clean_name(f"member {identity.ed_pub.hex()[:12]}"))
        # kept until its first contact is made (or given up): a passing failure loses nothing
        intro = G.add_pending_intro(self.m.store, row.id, name, p.link.to_text())
        self.m.spawn(self.open_session(intro))

    async def open_session(self, intro_id: int) -> None:
        """A first contact through the newcomer's introduction link (§25.7 step 4); the
        contact serves the group only (hidden from the contact list, marked so as it is
        made). A failure counts a try; the maintenance loop tries again (retry_intros)."""
        intro = G.get_pending_intro(self.m.store, intro_id)
        if intro is None or intro.id in self._opening:
            return  # gone, or being tried now (the first try and a retry must not overlap)
        G.tried_pending_intro(self.m.store, intro.id)
        self._opening.add(intro.id)
        try:
            await self.m.contacts.add(intro.name, intro.link, group_only=True)
        except AppError as exc:
            if exc.code in (E.BAD_LINK, E.EXPIRED, E.EXISTS):  # for good: not worth a retry
                G.drop_pending_intro(self.m.store, intro.id)
            droplog.dropped("an introduction's first contact failed")
            return
        except (GroupError, DecodeError, OSError):
            droplog.dropped("an introduction's first contact failed")
            return
        finally:
            self._opening.discard(intro.id)
        G.drop_pending_intro(self.m.store, intro.id)
        async with self.m.lock:  # a timer change it had no session for (§25.11)
            c = self.m.store.contact_by_name(intro.name)
            if c is not None:
                with self.m.store.transaction():
                    self.actions.share_timer(c, intro.group_ref)
            self.m.delivery.wake()

    async def retry_intros(self) -> None:
        """The maintenance loop's: introductions whose first contact failed, tried again
        (at most INTRO_TRIES in all)."""
        for intro in G.pending_intros(self.m.store):
            if intro.tries >= INTRO_TRIES:
                G.drop_pending_intro(self.m.store, intro.id)
                droplog.dropped("dropped an introduction (first contact failed every try)")
            else:
                await self.open_session(intro.id)

    def _hold_unknown(self, c: Contact | None, group_id: bytes, p: wire.Payload) -> None:
        """A member's change or message for a group this device does not hold. On a profile
        with several devices the group may have been made or joined on another one moments
        ago, its state on its way (a random delay): kept, bounded, until it comes
        (_release_unknown), and the state asked for (own_sync_groups.py). Otherwise, or
        past the bounds: dropped."""
        if c is None or self.m.store.get_setting(SETTING_OWN_LIST) is None:
            droplog.dropped("dropped a group payload of an unknown group")
            return
        if c.identity_key is not None:
            self.m.sync_groups.ask(group_id, PublicIdentity.from_bytes(c.identity_key).ed_pub)
        if not G.hold_unknown(self.m.store, group_id, c.id, wire.encode_payload(p), now_ms(),
                              per_sender=UNKNOWN_HELD_PER_SENDER,
                              sender_bytes=UNKNOWN_HELD_SENDER_BYTES, total=UNKNOWN_HELD_TOTAL,
                              max_bytes=UNKNOWN_HELD_BYTES,
                              max_age_ms=UNKNOWN_HELD_MAX_AGE_MS):  # fmt: skip
            droplog.dropped("dropped a group payload of an unknown group (too many held)")

    def _release_unknown(self, group_id: bytes) -> None:
        """The group's state came (inside its transaction): what its members sent before,
        each taken now as it would have been then."""
        for contact_id, data in G.take_unknown(self.m.store, group_id,
                                               now_ms() - UNKNOWN_HELD_MAX_AGE_MS):  # fmt: skip
            c = self.m.store.get_contact(contact_id)
            blob = self.m.store.get_session(contact_id)
            if c is None or blob is None or c.identity_key is None:
                continue
            try:
                p = wire.decode_payload(data)
            except DecodeError:
                continue
            if c.blocked and not isinstance(p, wire.GroupChangePayload):
                droplog.dropped("dropped a held group payload (contact blocked)")
                continue  # as live (inbox.py): of a blocked contact only its group changes
            self.on_payload(c, Session.from_bytes(blob), p)

    def _hold(self, ref: int, c: Contact, p: wire.Payload) -> None:
        G.drop_held_before(self.m.store, ref, now_ms() - HELD_MAX_AGE_MS)
        if (len(G.held(self.m.store, ref)) >= MAX_HELD_PER_GROUP
                or G.count_held_from(self.m.store, ref, c.id) >= MAX_HELD_PER_SENDER):
            droplog.dropped("dropped a held group payload (too many)")
            return
        G.hold(self.m.store, ref, c.id, wire.encode_payload(p))

    def _release_held(self, ref: int, head: core.GroupState, departed: frozenset[bytes]) -> None:
        """The state moved: decide again on what waits for it (what waited too long goes)."""
        G.drop_held_before(self.m.store, ref, now_ms() - HELD_MAX_AGE_MS)
        for h in G.held(self.m.store, ref):
            c = self.m.store.get_contact(h.contact_id)
            blob = self.m.store.get_session(h.contact_id)
            p = wire.decode_payload(h.payload)
            if c is None or blob is None or c.identity_key is None or c.blocked:
                G.drop_held(self.m.store, h.id)  # blocked: nothing of it shown (as live)
                continue
            sender = PublicIdentity.from_bytes(c.identity_key)
            if isinstance(p, (wire.GroupMessagePayload, wire.GroupFilePayload,
                              wire.GroupActionPayload)):  # fmt: skip
                verdict = core.message_disposition(head, sender.ed_pub, p.version, departed)
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

    def member_session(self, contact_id: int) -> None:
        """A member opened a device session with this device, its introduction having gone
        to another device of ours: a group contact, given the groups' timers as an
        introduced one is (inside the transaction, §25.11)."""
        G.mark_group_contact(self.m.store, contact_id)
        c = self.m.store.get_contact(contact_id)
        if c is not None:
            self.actions.share_timer(c)

    def introduced(self, invitation_id: bytes, contact_id: int) -> None:
        """The member's session is established: a group contact (inside the transaction)."""
        self.m.store.set_setting(f"{INTRO_KEY}{invitation_id.hex()}", None)
        G.mark_group_contact(self.m.store, contact_id)
        c = self.m.store.get_contact(contact_id)
        if c is not None:  # a timer change it had no session for (§25.11)
            self.actions.share_timer(c)
