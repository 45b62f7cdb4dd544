"""A removal deletes every mailbox of the removed device (docs/devices.md §6 "Delete keys", §7;
payload 0x47, docs/protocol.md §28.7): a real relay, four daemons (Alice on A1, A2 and A3, A1
linking both, and Bob). Each device gives the delete keys of all its mailboxes to the others
over sync; A2, which never linked A3, removes it while it is stopped: A3's device mailbox, its
contact mailbox for Bob and its sync mailboxes are gone at the relay at once, with the sync
mailbox A2 made for it, and Bob's next message reaches A1 and A2 only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aegisd.services.mailbox import OwnedMailbox
from aegisd.store import cover as cover_slots
from aegisd.store import open_profile
from aegisd.store import own_sync as sync_rows
from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_devices import (
    _at_relay,
    _device_mailbox,
    _raw_deposit_refused,
    aegis,
    texts,
)
from tests.functional.test_devices import delete_keys_for as _keys_for
from tests.functional.test_devices_fanout import _devices_events, _link
from tests.functional.test_devices_sync import _sync_events, _this_id
from tests.relay.conftest import RelayProcess


def _mailboxes_of(peer: Peer) -> dict[str, Any]:
    """With its daemon stopped: every mailbox of the peer (with a delete key), its contact
    mailbox for Bob and its sync mailboxes, as deposit IDs."""
    store = open_profile(peer.home, None)
    try:
        rows = [*store.list_mailboxes(), *cover_slots.pool_rows(store)]
        every = [OwnedMailbox.from_bytes(r.descriptor) for r in rows]
        bob = store.contact_by_name("bob")
        assert bob is not None
        for_bob = store.mailbox_for_contact(bob.id)
        assert for_bob is not None
        sync = [store.get_mailbox(r.mailbox_id) for r in sync_rows.rows(store)
                if r.mailbox_id is not None]  # fmt: skip
        return {
            "every": [mb.deposit_id for mb in every if mb.delete_seed],
            "bob": OwnedMailbox.from_bytes(for_bob.descriptor).deposit_id,
            "sync": [OwnedMailbox.from_bytes(r.descriptor).deposit_id for r in sync if r],
        }
    finally:
        store.close()


def test_a_removal_deletes_every_mailbox_of_the_removed_device(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2, a3 = peers("alice2"), peers("alice3")
    _link(a1, a2)
    _link(a1, a3)
    bob.wait_for(lambda: [e for e in _devices_events(bob) if e["devices"] == 3],
                 "sessions with A2 and A3", T_DEVICE)  # fmt: skip
    for p in (a2, a3):
        p.wait_for(lambda p=p: p.call("contacts.list")["contacts"][0]["established"],
                   "bob's session", T_DEVICE)  # fmt: skip
    a2_id, a3_id = _this_id(a2), _this_id(a3)
    # Each pair holds a sync session (A1 linked both; A2 and A3 never linked each other).
    a1_id = _this_id(a1)
    for me, other in ((a2, a3_id), (a3, a2_id), (a1, a3_id), (a3, a1_id)):
        me.wait_for(lambda me=me, other=other: other in
                    {e["device"] for e in _sync_events(me, "open")}, "a sync session",
                    T_DEVICE)  # fmt: skip
    # A2 took the list naming A3 from A1 over sync: the alert of docs/devices.md §7 (a link
    # made on another device, not a device it had seen removed).
    a2.wait_for(lambda: any(a3_id in e["data"]["devices"] and not e["data"]["readded"]
                            for e in a2.events(types=["devices.added"])),
                "the alert naming A3 on A2", T_DEVICE)  # fmt: skip
    # At least its device mailbox, its contact mailbox for Bob, its two sync mailboxes, on
    # both (each copy leaves after its own delay: A3 must not stop with one still queued).
    a2.wait_for(lambda: _keys_for(a2, a3_id) >= 4, "A3's delete keys on A2", T_DEVICE)
    a1.wait_for(lambda: _keys_for(a1, a3_id) >= 4, "A3's delete keys on A1", T_DEVICE)
    device_mb = _device_mailbox(a3)
    a3.stop()
    made = _mailboxes_of(a3)
    assert len(made["sync"]) == 2 and made["bob"] in made["every"]
    assert device_mb in made["every"] and set(made["sync"]) <= set(made["every"])
    # Every one of them reaches A2 (what A3 deposited before it stopped).
    a2.wait_for(lambda: _keys_for(a2, a3_id) == len(made["every"]), "all of A3's keys",
                T_DEVICE)  # fmt: skip
    a1.wait_for(lambda: _keys_for(a1, a3_id) >= len(made["every"]),
                f"A3's keys on A1 ({_keys_for(a1, a3_id)} of {len(made['every'])})",
                T_DEVICE)  # fmt: skip
    assert all(_at_relay(relay_proc, d) for d in made["every"])
    listed = aegis(a2.home, "device", "list").stdout
    assert f"{a3_id}  added" in listed
    assert f"{len(made['every'])} mailboxes deletable from here" in listed

    out = a2.call("devices.remove", {"id": a3_id})
    # Each of A3's mailboxes, and the sync mailbox A2 made for A3 (with its owner key).
    assert out["mailboxes_deleted"] == len(made["every"]) + 1, out
    assert (out["mailboxes_queued"], out["mailboxes_refused"], out["devices"]) == (0, 0, 2)
    for deposit_id in made["every"]:
        assert not _at_relay(relay_proc, deposit_id)
    assert _raw_deposit_refused(relay_proc, device_mb)  # as into no mailbox
    assert _keys_for(a2, a3_id) == -1  # listed no more, nothing held

    # Bob learns of the removal and writes: A1 and A2 have it; A3 has no mailbox left.
    bob.wait_for(lambda: _devices_events(bob)[-1]["devices"] == 2, "the removal", T_DEVICE)
    bob.call("messages.send", {"contact": "alice", "text": "after the removal"})
    for p in (a1, a2):
        p.wait_for(lambda p=p: ("in", "after the removal") in texts(p, "bob"), "Bob's text")
    for deposit_id in made["every"]:
        assert not _at_relay(relay_proc, deposit_id)
