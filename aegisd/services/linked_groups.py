"""The contacts and groups a device link's profile carries (docs/devices.md §4.5, §6 "Groups",
§11): the established contacts, each group's log (its state: members, roles, name) and which
contacts are group-only, never a message.

A group is per identity, so the new device is the same member as the device that linked it:
with the log it shows the group, applies the changes members send it and sends to the
members, once they opened sessions with it (they learn the person's device list in their
pairwise sessions, docs/devices.md §5.5). What the profile leaves out (invitations received
or sent, a group whose join is under way, the groups' timers, history) and the groups made
or changed on one device after the link reach the others by sync (own_sync_groups.py, 0x4A).
"""

from __future__ import annotations

from aegisd.core import backup as fmt
from aegisd.core import group as core_group
from aegisd.core import wire
from aegisd.core.identity import PublicIdentity
from aegisd.store import Store
from aegisd.store import groups as G

from .groups_state import JOINING_KEY
from .mailbox import ContactState


def contacts_and_groups(
    store: Store,
) -> tuple[tuple[fmt.BackupContact, ...], fmt.BackupGroups]:
    """The established contacts for a link's profile (their names, identities, flags: no
    session, mailbox or history), group-only ones included and marked so in the groups."""
    contacts: list[fmt.BackupContact] = []
    index: dict[int, int] = {}  # contact id -> its place in the profile
    for c in store.list_contacts():
        if c.identity_key is None or not ContactState.from_bytes(c.state).established:
            continue
        index[c.id] = len(contacts)
        contacts.append(fmt.BackupContact(
            c.name, PublicIdentity.from_bytes(c.identity_key).record(), c.verified, c.blocked,
            c.created_at, None, (), ()))  # fmt: skip
    return tuple(contacts), _groups_out(store, index)


def _groups_out(store: Store, index: dict[int, int]) -> fmt.BackupGroups:
    """The groups; ``index``: contact id -> its place in the profile's contacts (a
    group-only contact not carried takes nothing with it)."""
    hidden = tuple(sorted(index[cid] for cid in G.group_contact_ids(store) if cid in index))
    groups = []
    for row in G.list_groups(store):
        if store.get_setting(f"{JOINING_KEY}{row.id}") is not None:
            continue  # a join under way: its member list is the inviter's word, unproven
        # as the core loads it (what a load drops goes here), so the new device's check
        # below finds every change it carries
        log = core_group.GroupLog.from_record(wire.GroupLogRecord.from_bytes(row.log))
        groups.append(fmt.BackupGroup(log.record(), row.created_at, ()))
    return fmt.BackupGroups(hidden, tuple(groups))


def check(groups: fmt.BackupGroups, contacts: int) -> list[core_group.GroupLog]:
    """Each log as the core loads it (raises GroupError, BundleError, ValueError): its head
    gives the members, never the profile's word. A profile carries no group messages,
    invitations or joins (ValueError), nor a log whose load drops a change (the link's
    profile carries the log as loaded: one that drops a change was not made by a device);
    ``contacts``: how many contacts it carries, for the group-only indices. CPU-bound
    (a signature per change): the caller runs it off the event loop."""
    if groups.invitations or groups.sent_invites or groups.joining:
        raise ValueError("a link's profile carries no invitations or joins")
    if any(i >= contacts for i in groups.group_contacts):
        raise ValueError("a group contact out of range")
    logs = []
    for g in groups.groups:
        if g.messages:
            raise ValueError("a link's profile carries no group messages")
        logs.append(load(g.log))
    return logs


def load(record: wire.GroupLogRecord) -> core_group.GroupLog:
    """A log another device of ours sent (a link's profile, a group's sync: own_sync_groups.py)
    as the core loads it (raises GroupError, BundleError, ValueError): one whose load drops
    a change was not made by a device (each sends its log as it loaded it). CPU-bound: a
    signature per change."""
    log = core_group.GroupLog.from_record(record)
    if len(log.record().changes) != len(record.changes):
        raise ValueError("a group log that drops a change on load")
    return log


def install(store: Store, groups: fmt.BackupGroups, logs: list[core_group.GroupLog],
            cids: list[int]) -> None:  # fmt: skip
    """The profile's groups into the new device's store (inside the install's transaction);
    ``cids``: the contacts' ids by their places in the profile."""
    for i in groups.group_contacts:
        G.mark_group_contact(store, cids[i])
    for bg, log in zip(groups.groups, logs, strict=True):
        G.add_group(store, log.head.group_id, log.record().to_bytes(),
                    [(m.key, m.role) for m in log.head.members], bg.created_at)  # fmt: skip
