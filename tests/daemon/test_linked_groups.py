"""What a device link's profile carries of the groups (services/linked_groups.py,
docs/devices.md §4.5, §5.5): a join under way stays out; the new device refuses a profile
whose groups carry messages, invitations or joins, a group contact past the contacts, or a
log its load would drop a change of. And the store's query of groups both keys share."""

from __future__ import annotations

import dataclasses

import pytest

from aegisd.core import backup as fmt
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.services import linked_groups
from aegisd.services.groups_state import JOINING_KEY
from aegisd.store import KdfParams, create_profile
from aegisd.store import groups as G

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
E = SystemEntropy()


def _log() -> tuple[IdentityKeyPair, core.GroupLog]:
    owner = IdentityKeyPair.generate(E)
    log = core.GroupLog(core.create_group(E, owner, "g"))
    log.receive(core.rename(owner, log.head, "renamed", ""))
    return owner, log


def _store_with_groups(tmp_path):  # type: ignore[no-untyped-def]
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    refs = []
    for _ in range(2):
        _, log = _log()
        refs.append(G.add_group(store, log.head.group_id, log.record().to_bytes(),
                                [(m.key, m.role) for m in log.head.members]))  # fmt: skip
    return store, refs


def test_a_join_under_way_is_left_out_of_the_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, (joined, joining) = _store_with_groups(tmp_path)
    try:
        store.set_setting(f"{JOINING_KEY}{joining}", {"invite": "00"})
        _, groups = linked_groups.contacts_and_groups(store)
        ids = [g.log.base.group_id for g in groups.groups]
        row = G.get_group(store, joined)
        assert row is not None and ids == [row.group_id]
        assert len(linked_groups.check(groups, 0)) == 1  # what it sends, the check takes
    finally:
        store.close()


def test_a_profile_with_more_than_the_logs_is_refused() -> None:
    _, log = _log()
    good = fmt.BackupGroup(log.record(), 1, ())
    assert len(linked_groups.check(fmt.BackupGroups((), (good,)), 0)) == 1
    message = fmt.BackupGroupMessage("m", None, "hi", None, 1, ())
    bad = [
        fmt.BackupGroups((), (dataclasses.replace(good, messages=(message,)),)),
        fmt.BackupGroups((), (good,), joining=(fmt.BackupJoining(0, b"i" * 16, 0),)),
        fmt.BackupGroups((0,), (good,)),  # a group contact, and no contact carried
    ]
    for groups in bad:
        with pytest.raises(ValueError):
            linked_groups.check(groups, 0)


def test_a_log_whose_load_drops_a_change_is_refused() -> None:
    _, log = _log()
    rec = log.record()
    (change,) = rec.changes
    forged = dataclasses.replace(change, sig=bytes(len(change.sig)))
    dropped = fmt.BackupGroup(wire.GroupLogRecord(rec.base, (forged,)), 1, ())
    with pytest.raises(ValueError):
        linked_groups.check(fmt.BackupGroups((), (dropped,)), 0)


def test_groups_with_both_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        me, other, third = b"a" * 32, b"b" * 32, b"c" * 32
        ref = G.add_group(store, b"g" * 32, b"log", [(me, 3), (other, 1)])
        G.add_group(store, b"h" * 32, b"log", [(third, 3), (other, 1)])  # removed from it
        assert G.groups_with_both(store, me, other) == [ref]
        assert G.groups_with_both(store, me, third) == []
    finally:
        store.close()
