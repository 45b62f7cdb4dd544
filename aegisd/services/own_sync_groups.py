"""Groups between this profile's own devices (docs/devices.md §6 "Groups", docs/protocol.md
§28.6, payload 0x4A), in the sync sessions own_sync.py keeps.

A group is per identity: every device of the person is the same member. The members send
their changes and messages to every device, but what one device makes, joins or changes, and
what it sends in a group, goes to the members only; this carries it to the other devices.

- A group's state, whenever the user changes it here (made, joined: the inviter's add
  applied, a member added or removed, a role, a rename, a leave): its log as this device
  loads it and which of its head's members are group-only contacts here, as a link's profile
  carries them (linked_groups.py). The receiver checks it as a linked group: the log loads
  without dropping a change (each change's signature verified); a group it does not hold is
  taken only if its head names us a member; a group it holds takes only the changes it lacks,
  each through its own log (checked against its parent, held back or contested as a member's
  change is), so a device never rolls a group back nor takes a state no change proves; a
  leave taken leaves the group here too. Applying sends nothing back.
- A text sent in a group (a sent transcript): stored as ours under the same message ID,
  once; one for a group not held here (its state still on the way) is dropped.

Imports linked_groups (its checks), the stores, the core; nothing here logs a group, a key or
a text.
"""

from __future__ import annotations

from typing import Protocol

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import sync_groups as sg
from aegisd.core import wire
from aegisd.core.errors import BundleError, GroupError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.store import Store
from aegisd.store import groups as G
from aegisd.store.db import Contact

from . import linked_groups
from .context import ServiceContext
from .groups_state import JOINING_KEY, member_rows
from .mailbox import ContactState
from .names import clean_name


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def unique_name(self, wanted: str) -> str: ...


class GroupsView(Protocol):
    def synced(self, ref: int, before: core.GroupState | None, log: core.GroupLog) -> None: ...


class SyncSender(Protocol):
    def send(self, data: bytes) -> None: ...


class SyncGroupsHost(Protocol):
    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def groups(self) -> GroupsView: ...
    @property
    def own_sync(self) -> SyncSender: ...
    def identity(self) -> IdentityKeyPair: ...


class OwnSyncGroups:
    def __init__(self, host: SyncGroupsHost) -> None:
        self.m = host

    # --- sending (inside the caller's transaction) ----------------------------------------

    def changed(self, ref: int) -> None:
        """The user changed group ``ref`` here (or made it, or its join completed): its state
        goes to the other devices. A join under way goes nowhere (its member list is the
        inviter's word: the add, once applied, sends it)."""
        store = self.m.store
        row = G.get_group(store, ref)
        if row is None or store.get_setting(f"{JOINING_KEY}{ref}") is not None:
            return
        log = _stored(row.log)
        hidden_ids = G.group_contact_ids(store)
        hidden = []
        for member in log.head.members:
            c = self.m.contacts.with_identity(member.identity)
            if c is not None and c.id in hidden_ids:
                hidden.append(member.key)
        item = sg.GroupStateItem(tuple(sorted(hidden)), log.record())
        self.m.own_sync.send(sg.encode(item))

    def sent(self, group_id: bytes, wire_id: bytes, sent_at_ms: int, text: str) -> None:
        """A text the user sent in a group here: a sent transcript to the other devices."""
        self.m.own_sync.send(sg.encode(sg.GroupSentItem(group_id, wire_id, sent_at_ms, text)))

    # --- receiving (own_sync.py, inside the receive's transaction) ------------------------

    def on_payload(self, content: bytes) -> None:
        """A 0x4A from a listed own device's sync session (raises DecodeError)."""
        item = sg.decode(content)
        if isinstance(item, sg.GroupSentItem):
            self._sent(item)
            return
        try:
            incoming = linked_groups.load(item.log)
        except (GroupError, BundleError, ValueError):
            droplog.dropped("refused a synced group log")
            return
        store, me = self.m.store, self.m.identity().public.ed_pub
        row = G.group_by_id(store, incoming.head.group_id)
        if row is None:
            if incoming.head.member(me) is None:
                droplog.dropped("dropped a synced group we are no member of")
                return
            ref = G.add_group(store, incoming.head.group_id, incoming.record().to_bytes(),
                              member_rows(incoming.head))  # fmt: skip
            self._hidden(item.hidden, incoming.head)
            self.m.groups.synced(ref, None, incoming)
            return
        held = _stored(row.log)
        if incoming.base.version > held.head.version:
            # its changes from our head on are final at the sender and not in its log: none
            # can be checked here (a device that fell that far behind waits for a member's)
            droplog.dropped("dropped a synced group log past the changes held")
            return
        before, known = held.head, held.record()
        for change in item.log.changes:
            try:
                held.receive(change)
            except (GroupError, BundleError, ValueError):
                continue  # known already, final here, or refused as a member's would be
        if held.record() == known:
            return  # nothing new: an echo, or what the members' changes brought already
        self._hidden(item.hidden, held.head)
        self.m.groups.synced(row.id, before, held)

    def _hidden(self, keys: tuple[bytes, ...], head: core.GroupState) -> None:
        """The head's members that are group-only contacts at the sender and no contact
        here: each a group contact without a session (as a link installs them), taken as
        its session when the member opens one with this device (docs/devices.md §5.5)."""
        store, me = self.m.store, self.m.identity().public.ed_pub
        for key in keys:
            member = head.member(key)
            if member is None or key == me or self.m.contacts.with_identity(member.identity):
                continue
            name = self.m.contacts.unique_name(clean_name(f"member {key.hex()[:12]}"))
            cid = store.add_contact(name, identity_key=member.identity.to_bytes(),
                                    state=ContactState(None, False).to_bytes()).id  # fmt: skip
            G.mark_group_contact(store, cid)

    def _sent(self, item: sg.GroupSentItem) -> None:
        store = self.m.store
        row = G.group_by_id(store, item.group_id)
        if row is None:
            droplog.dropped("dropped a group transcript of an unknown group")
            return
        if G.add_message(store, row.id, item.message_id, "out", item.text,
                         sent_at=item.sent_at_ms) is None:  # fmt: skip
            return  # an echo or a duplicate
        self.m.ctx.events.emit("group.transcript", {
            "group": row.id, "message_id": G.api_id(b"", item.message_id), "text": item.text,
            "sent_at": item.sent_at_ms})  # fmt: skip


def _stored(log: bytes) -> core.GroupLog:
    return core.GroupLog.from_record(wire.GroupLogRecord.from_bytes(log))
