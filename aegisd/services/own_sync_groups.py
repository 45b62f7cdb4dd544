"""Groups between this profile's own devices (docs/devices.md §6 "Groups", docs/protocol.md
§28.6, payload 0x4A), in the sync sessions own_sync.py keeps.

A group is per identity: every device of the person is the same member. The members send
their changes and messages to every device, but what one device makes, joins or changes, and
what it sends in a group, goes to the members only; this carries it to the other devices.

- A group's state, whenever the user changes it here (made, joined: the inviter's add
  applied, a member added or removed, a role, a rename, a leave, its timer set) or another
  device asks: its log as this device loads it, which of its head's members are group-only
  contacts here, as a link's profile carries them (linked_groups.py), and its timer. The
  receiver checks it as a linked group: the log loads without dropping a change (each
  change's signature verified); a group it does not hold is taken only if its head names us
  a member; a group it holds takes only the changes it lacks, each through its own log
  (checked against its parent, held back or contested as a member's change is), so a device
  never rolls a group back nor takes a state no change proves; a leave taken leaves the
  group here too; a state no newer than a deletion recorded here is refused, and
  invitations into a group taken new are dropped. The timer is taken as a member's timer
  change (the later wins). A member's device session that came before the state (a contact
  request) is adopted as its group contact, crash-safe. Applying sends nothing back.
- A text sent in a group (a sent transcript): stored as ours under the same message ID,
  once; one for a group not held here (its state still on the way) is kept, bounded
  (store/own_sync.py), and stored when the state comes.
- An ask for a group's state, from a device that got a member's change it cannot place:
  answered with the state, rate-limited at both ends.

Imports linked_groups (its checks), the stores, the core; nothing here logs a group, a key or
a text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import sync_groups as sg
from aegisd.core import wire
from aegisd.core.errors import AegisError, BundleError, DecodeError, GroupError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity, keys_of
from aegisd.core.session import Session
from aegisd.core.wire import MailboxAddress
from aegisd.rpc import AppError
from aegisd.store import group_actions as GA
from aegisd.store import groups as G
from aegisd.store import own_sync as sync_rows
from aegisd.store.db import Contact
from aegisd.store.devices import SETTING_OWN_LIST
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayError

from . import linked_groups
from .device_answers import SETTING_REQUEST_EKS
from .groups_state import JOINING_KEY, member_rows
from .host import ServiceHost
from .mailbox import ContactState, address_from_bytes
from .names import clean_name

#: A device asks for a group's state at most once per group in this time, and answers an ask
#: for a group at most once in it (what triggers an ask, a member's change, a hostile member
#: can send at will; an answer is up to 200 kB to each device).
ASK_INTERVAL_MS = 10 * 60 * 1000
#: ...and asks for at most this many groups held here (a change whose parent is missing),
#: and apart from them at most this many not held (a change or message naming a group ID:
#: any contact can name any ID), at most ASKS_PER_SENDER of them from one sender, in that
#: time.
MAX_ASKS_PER_INTERVAL = 8
ASKS_PER_SENDER = 2
#: When this device last asked for a group, and answered an ask: {group ID hex: [ms, the
#: sender's key hex or "" for a group held]} and {group ID hex: ms}, kept in the store so a
#: mark commits with the sync send it stands for (a transaction rolled back leaves none).
SETTING_ASKED = "sync_groups.asked"
SETTING_ANSWERED = "sync_groups.answered"
#: The contact requests recorded for adoption (their IDs), kept until each is run, and the
#: tries of each ({ID: tries}); one failing ADOPT_TRIES times is given up (the request stays).
SETTING_ADOPT = "sync_groups.adopt"
SETTING_ADOPT_TRIES = "sync_groups.adopt_tries"
ADOPT_TRIES = 5
#: Groups the user deleted here: {group ID hex: the head's version then}, the newest
#: DELETIONS_KEPT (a state no newer, from a device that had not seen why, is refused).
SETTING_DELETED = "sync_groups.deleted"
DELETIONS_KEPT = 64


class ContactsView(Protocol):
    def unique_name(self, wanted: str) -> str: ...


class GroupsView(Protocol):
    def synced(self, ref: int, before: core.GroupState | None, log: core.GroupLog,
               undone: int) -> None: ...  # fmt: skip
    def synced_timer(self, ref: int, timer: wire.TimerPayload) -> None: ...


class FirstContactsView(Protocol):
    async def adopt(self, sender: PublicIdentity, session: Session, reply_to: MailboxAddress,
                    request_id: int, ek: bytes) -> bool: ...  # fmt: skip


class SyncSender(Protocol):
    def send(self, data: bytes) -> None: ...


class SyncGroupsHost(ServiceHost, Protocol):
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def groups(self) -> GroupsView: ...
    @property
    def own_sync(self) -> SyncSender: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    @property
    def first_contacts(self) -> FirstContactsView: ...
    def identity(self) -> IdentityKeyPair: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class OwnSyncGroups:
    def __init__(self, host: SyncGroupsHost) -> None:
        self.m = host

    # --- sending (inside the caller's transaction) ----------------------------------------

    def changed(self, ref: int) -> None:
        """The user changed group ``ref`` here (or made it, or its join completed): its state
        goes to the other devices. A join under way goes nowhere (its member list is the
        inviter's word: the add, once applied, sends it)."""
        store = self.m.store
        if store.get_setting(SETTING_OWN_LIST) is None:
            return  # one device: nothing to tell
        row = G.get_group(store, ref)
        if row is None or store.get_setting(f"{JOINING_KEY}{ref}") is not None:
            return
        log = _stored(row.log)
        hidden_ids = G.group_contact_ids(store)
        by_keys = self._contacts()  # one read of the contacts, not one per member
        hidden = []
        for member in log.head.members:
            c = by_keys.get(member.identity.encode())
            if c is not None and c.id in hidden_ids:
                hidden.append(member.key)
        seconds, changed_at = GA.get_timer(store, ref)
        item = sg.GroupStateItem(tuple(sorted(hidden)), log.record(),
                                 wire.TimerPayload(changed_at, seconds))  # fmt: skip
        self.m.own_sync.send(sg.encode(item))

    def deleted(self, group_id: bytes, version: int) -> None:
        """The user deleted the group here at ``version`` (removed, or its only member;
        inside the caller's transaction): a state of it no newer, sent by a device that had
        not yet seen the removal, must not bring it back."""
        store = self.m.store
        kept = {k: v for k, v in dict(store.get_setting(SETTING_DELETED, {})).items()
                if k != group_id.hex()}  # fmt: skip
        kept[group_id.hex()] = version
        store.set_setting(SETTING_DELETED, dict(list(kept.items())[-DELETIONS_KEPT:]))

    def ask(self, group_id: bytes, sender: bytes | None = None) -> None:
        """A member's change (or message) this device cannot place: of a group it does not
        hold (``sender``, the sending contact's key: its state on the way from another
        device of ours, or a change of it dropped before the state came) or whose parent it
        lacks (``sender`` None: a change it never got). It asks its other devices for the
        group's state (inside the caller's transaction): at most once per group per
        ASK_INTERVAL_MS; for groups held, MAX_ASKS_PER_INTERVAL in one; apart from them, for
        groups not held, ASKS_PER_SENDER per sender and MAX_ASKS_PER_INTERVAL in all in one
        (any contact can name any group ID: its junk must not use up another's asks nor the
        held groups')."""
        store = self.m.store
        if store.get_setting(SETTING_OWN_LIST) is None:
            return
        now = _now_ms()
        asked = {g: (int(t), str(who)) for g, (t, who) in
                 dict(store.get_setting(SETTING_ASKED, {})).items()
                 if now - int(t) < ASK_INTERVAL_MS}  # fmt: skip
        who = "" if sender is None else sender.hex()
        same_kind = [w for _, w in asked.values() if (w == "") == (sender is None)]
        if (group_id.hex() in asked or len(same_kind) >= MAX_ASKS_PER_INTERVAL
                or (sender is not None and same_kind.count(who) >= ASKS_PER_SENDER)):  # fmt: skip
            return
        asked[group_id.hex()] = (now, who)
        store.set_setting(SETTING_ASKED, {g: list(v) for g, v in asked.items()})
        self.m.own_sync.send(sg.encode(sg.GroupAskItem(group_id)))

    def sent(self, group_id: bytes, wire_id: bytes, sent_at_ms: int, text: str) -> None:
        """A text the user sent in a group here: a sent transcript to the other devices."""
        if self.m.store.get_setting(SETTING_OWN_LIST) is None:
            return
        self.m.own_sync.send(sg.encode(sg.GroupSentItem(group_id, wire_id, sent_at_ms, text)))

    # --- receiving (own_sync.py, inside the receive's transaction) ------------------------

    def on_payload(self, content: bytes) -> None:
        """A 0x4A from a listed own device's sync session (raises DecodeError)."""
        item = sg.decode(content)
        if isinstance(item, sg.GroupSentItem):
            self._sent(item)
            return
        if isinstance(item, sg.GroupAskItem):
            self._answer(item.group_id)
            return
        try:
            incoming = linked_groups.load(item.log)
        except (GroupError, BundleError, ValueError):
            droplog.dropped("refused a synced group log")
            return
        store, me = self.m.store, self.m.identity().public.ed_pub
        row = G.group_by_id(store, incoming.head.group_id)
        if row is None:
            gid = incoming.head.group_id
            if incoming.head.member(me) is None:
                droplog.dropped("dropped a synced group we are no member of")
                return
            gone = dict(store.get_setting(SETTING_DELETED, {})).get(gid.hex())
            if gone is not None and incoming.head.version <= int(gone):
                droplog.dropped("dropped a synced group deleted here since")
                return
            ref = G.add_group(store, gid, incoming.record().to_bytes(),
                              member_rows(incoming.head))  # fmt: skip
            self._drop_invitations(gid)
            self._hidden(item.hidden, incoming.head)
            self.m.groups.synced(ref, None, incoming, 0)
            self.m.groups.synced_timer(ref, item.timer)
            self._requests(incoming.head)
            for data in sync_rows.take_group_sent(store, gid, _now_ms()):
                sent = sg.decode(data)  # as it came (decoded then)
                if isinstance(sent, sg.GroupSentItem):
                    self._sent(sent)
            return
        held = _stored(row.log)
        if incoming.base.version > held.head.version:
            # its changes from our head on are final at the sender and not in its log: none
            # can be checked here (a device that fell that far behind waits for a member's)
            droplog.dropped("dropped a synced group log past the changes held")
            return
        before, known = held.head, held.record()
        undone = 0
        for change in item.log.changes:
            try:
                undone += len(held.receive(change).undone)
            except (GroupError, BundleError, ValueError):
                continue  # known already, final here, or refused as a member's would be
        if held.record() != known:  # else an echo, or what the members' changes brought
            if held.head != before:
                self._hidden(item.hidden, held.head)
            self.m.groups.synced(row.id, before, held, undone)
            if held.head != before:
                self._requests(held.head)
        self.m.groups.synced_timer(row.id, item.timer)

    def _answer(self, group_id: bytes) -> None:
        """Another device of ours asks for a group's state: ours, to every other device, if
        we hold it, at most once per group per ASK_INTERVAL_MS (up to 200 kB each)."""
        store = self.m.store
        row = G.group_by_id(store, group_id)
        now = _now_ms()
        answered = {g: int(t) for g, t in dict(store.get_setting(SETTING_ANSWERED, {})).items()
                    if now - int(t) < ASK_INTERVAL_MS}  # fmt: skip
        if row is None or group_id.hex() in answered:
            return
        answered[group_id.hex()] = now  # held groups only: bounded by them
        store.set_setting(SETTING_ANSWERED, answered)  # commits with the state's send
        self.changed(row.id)

    def _requests(self, head: core.GroupState) -> None:
        """A member's device session that reached this device before the group's state did
        (the state leaves the other device after a random delay; the member opens its
        session as soon as it learns the person's list) is a contact request (first
        contacts: from no contact and no member of a group held), kept with its opening's
        EK_A.pub (device_answers.request_eks: a device hello, or a hello tagged
        DEVICE_SESSION). Now that the group is here, such a request from a member of its
        head is recorded (in the state's transaction) for adoption, which makes it that
        member's group contact as the session would have (adopt_pending). A member's own
        contacts.add (an untagged hello) is left a request, however recent."""
        store, me = self.m.store, self.m.identity().public.ed_pub
        if head.member(me) is None:
            return  # left or removed: no group contacts made for it
        openings = dict(store.get_setting(SETTING_REQUEST_EKS) or {})
        pending = self._pending()
        for r in store.list_requests():
            if str(r.id) not in openings or r.id in pending:
                continue
            try:
                identity = PublicIdentity.from_bytes(r.identity_key)
            except (BundleError, ValueError):
                continue
            member = head.member(identity.ed_pub)
            if (member is not None and identity.ed_pub != me
                    and member.identity.same_keys(identity)):  # fmt: skip
                pending.append(r.id)
        if pending != self._pending():
            store.set_setting(SETTING_ADOPT, pending)
            self.m.spawn(self.adopt_pending())

    def _pending(self) -> list[int]:
        return [int(i) for i in self.m.store.get_setting(SETTING_ADOPT, [])]

    async def adopt_pending(self) -> None:
        """The adoptions recorded (_requests), each run once: after the state that recorded
        it commits, and again at unlock and in the maintenance loop while one is left (a
        crash, or the relay failing to make its mailbox, leaves it recorded). Each ID's
        tries are counted: one failing (the relay) is tried again later, the next ones run
        now, and one that failed ADOPT_TRIES times goes."""
        for request_id in self._pending():
            await self._adopt(request_id)

    async def _adopt(self, request_id: int) -> None:
        async with self.m.lock:
            store = self.m.store
            row = store.get_request(request_id)
            ek = dict(store.get_setting(SETTING_REQUEST_EKS) or {}).get(str(request_id))
            tries = dict(store.get_setting(SETTING_ADOPT_TRIES) or {})
            tried = int(tries.get(str(request_id), 0))
            if row is not None and ek is not None and tried < ADOPT_TRIES:  # else taken meanwhile
                with store.transaction():  # counted first: a crash in the try counts it
                    store.set_setting(SETTING_ADOPT_TRIES, {**tries, str(request_id): tried + 1})
                try:
                    with contextlib.suppress(AegisError, ValueError):  # a record that won't load
                        await self.m.first_contacts.adopt(
                            PublicIdentity.from_bytes(row.identity_key),
                            Session.from_bytes(row.session), address_from_bytes(row.reply_to),
                            request_id, bytes.fromhex(str(ek)))  # fmt: skip
                except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                    if tried + 1 < ADOPT_TRIES:
                        droplog.dropped("an adoption failed (tried again later)")
                        return
                    droplog.dropped("dropped an adoption (failed every try)")
            with store.transaction():  # done (or for good not to be: the request stays)
                store.set_setting(SETTING_ADOPT, [i for i in self._pending() if i != request_id]
                                  or None)  # fmt: skip
                tries = dict(store.get_setting(SETTING_ADOPT_TRIES) or {})
                tries.pop(str(request_id), None)
                store.set_setting(SETTING_ADOPT_TRIES, tries or None)

    def _hidden(self, keys: tuple[bytes, ...], head: core.GroupState) -> None:
        """The head's members that are group-only contacts at the sender and no contact
        here: each a group contact without a session (as a link installs them), taken as
        its session when the member opens one with this device (docs/devices.md §5.5)."""
        store, me = self.m.store, self.m.identity().public.ed_pub
        by_keys = self._contacts()
        for key in keys:
            member = head.member(key)
            if member is None or key == me or member.identity.encode() in by_keys:
                continue
            name = self.m.contacts.unique_name(clean_name(f"member {key.hex()[:12]}"))
            cid = store.add_contact(name, identity_key=member.identity.to_bytes(),
                                    state=ContactState(None, False).to_bytes()).id  # fmt: skip
            G.mark_group_contact(store, cid)

    def _drop_invitations(self, group_id: bytes) -> None:
        """Invitations waiting here into a group that came by sync (joined on another
        device): answered there; accepting here could only fail (the group is here)."""
        for inv in G.list_invitations(self.m.store):
            try:
                p = wire.decode_payload(inv.payload)
            except (DecodeError, ValueError):
                continue
            if isinstance(p, wire.GroupInvitePayload) and p.base.state.group_id == group_id:
                G.delete_invitation(self.m.store, inv.id)

    def _contacts(self) -> dict[bytes, Contact]:
        """The contacts by their identity's keys (as contacts.with_identity matches them)."""
        out: dict[bytes, Contact] = {}
        for c in self.m.store.list_contacts():
            keys = keys_of(c.identity_key)
            if keys is not None:
                out.setdefault(keys, c)
        return out

    def _sent(self, item: sg.GroupSentItem) -> None:
        store = self.m.store
        row = G.group_by_id(store, item.group_id)
        if row is None:  # its state is on its way (or never comes: kept bounded, then gone)
            sync_rows.keep_group_sent(store, item.group_id, sg.encode(item), _now_ms())
            return
        if G.add_message(store, row.id, item.message_id, "out", item.text,
                         sent_at=item.sent_at_ms) is None:  # fmt: skip
            return  # an echo or a duplicate
        self.m.ctx.events.emit("group.transcript", {
            "group": row.id, "message_id": G.api_id(b"", item.message_id), "text": item.text,
            "sent_at": item.sent_at_ms})  # fmt: skip


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _stored(log: bytes) -> core.GroupLog:
    return core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(log))
