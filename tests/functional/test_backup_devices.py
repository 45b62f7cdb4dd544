"""A backup import resets the person's devices (docs/devices.md §10): a real relay, four
daemons. Alice on A1 and A2 (linked), Bob her contact; a backup made on A1 is imported on a
fresh A3. A3 is a new first device: its list holds itself only, at a version above the
backup's; the old devices' device mailboxes are deleted at the relay (A1's with the owner key
the file holds, A2's with the delete key A1 held for it); Bob, renewing his session with A3,
drops his sessions with A1 and A2, takes A3's list, and his next message reaches A3 only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.primitives import SystemEntropy
from aegisd.store import contact_devices as cd
from aegisd.store import open_profile
from tests.functional.conftest import T_DEVICE, Peer, connect
from tests.functional.test_backup import CHEAP, PASS, error_of, received
from tests.functional.test_devices import (
    _at_relay,
    _device_mailbox,
    _queued_for,
    _raw_deposit_refused,
)
from tests.functional.test_devices_fanout import _link, _wait_two_devices
from tests.relay.conftest import RelayProcess


def _renewed(peer: Peer) -> bool:
    return bool(peer.events(types=["contact.session_renewed"]))


def test_an_import_is_a_new_first_device_and_the_old_ones_stop_receiving(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    a2 = peers("alice2")
    _link(a1, a2)
    a2.wait_for(lambda: a2.call("contacts.list")["contacts"][0]["established"], "bob's session",
                T_DEVICE)  # fmt: skip
    _wait_two_devices(bob)
    bob.call("messages.send", {"contact": "alice", "text": "to both, before the backup"})
    for device in (a1, a2):
        device.wait_for(lambda d=device: received(d, "bob", "to both, before the backup"), "it")
    old = a1.call("devices.list")
    old_ids = {d["id"] for d in old["devices"]}
    a2_id = next(d["id"] for d in old["devices"] if not d["this_device"])
    a1_box, a2_box = _device_mailbox(a1), _device_mailbox(a2)
    assert _at_relay(relay_proc, a1_box) and _at_relay(relay_proc, a2_box)

    # The backup (version 5) holds the list and the delete key A1 holds for A2's mailbox.
    path = tmp_short / "alice.aegisbackup"
    a1.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    data = path.read_bytes()
    assert fmt.Header.from_bytes(data).version == 5
    devices = fmt.BackupContents.from_bytes(fmt.decrypt(PASS, data)).devices
    assert devices.device_list is not None
    listed = dv.DeviceList.from_bytes(devices.device_list)
    assert listed.version == old["version"]
    assert {d.device_id.hex() for d in listed.devices} == old_ids
    assert [device_id.hex() for device_id, _ in devices.delete_keys] == [a2_id]
    a1.stop()  # the device the backup was made on is lost

    a3 = peers("alice3")
    a3.wait_connected()
    # A file whose list another identity signed: refused as malformed, nothing written.
    contents = fmt.BackupContents.from_bytes(fmt.decrypt(PASS, data))
    forged = dv.DeviceList.sign(IdentityKeyPair.generate(SystemEntropy()), listed.version,
                                listed.devices)  # fmt: skip
    bad = replace(contents, devices=replace(devices, device_list=forged.to_bytes()))
    bad_path = tmp_short / "forged.aegisbackup"
    bad_path.write_bytes(fmt.encrypt(SystemEntropy(), PASS, bad.to_bytes(), fmt.MIN_KDF))
    err = error_of(a3, "backup.import", {"path": str(bad_path), "passphrase": PASS})
    assert err.code == 1042 and err.data["error"] == "not_a_backup"
    assert a3.call("contacts.list")["contacts"] == [] and a3.call("devices.list")["version"] == 0
    result = a3.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert result["contacts"] == 1 and result["renewing"] == 1
    # A new first device: a new ID, alone in its list, at a version above the backup's.
    mine = a3.wait_for(lambda: (v := a3.call("devices.list"))["version"] > old["version"] and v,
                       "the restored device's list")  # fmt: skip
    assert [d["this_device"] for d in mine["devices"]] == [True]
    a3_id = mine["devices"][0]["id"]
    assert a3_id not in old_ids
    # The old devices' device mailboxes are deleted at the relay: A1's with its owner key,
    # A2's (whose owner key A1 never had) with the delete key from the file.
    a3.wait_for(lambda: not _at_relay(relay_proc, a1_box) and not _at_relay(relay_proc, a2_box),
                "the old device mailboxes deleted")  # fmt: skip
    assert _raw_deposit_refused(relay_proc, a2_box)

    # The renewal with Bob; A3's list reaches him in the renewed session, before A3's text.
    for peer in (bob, a3):
        peer.wait_for(lambda p=peer: _renewed(p), "the renewed session")
    a3.call("messages.send", {"contact": "bob", "text": "restored here"})
    bob.wait_for(lambda: received(bob, "alice", "restored here"), "A3's text")
    assert [c["name"] for c in bob.call("contacts.list")["contacts"]] == ["alice"]

    # Bob's next message reaches A3 and neither old device: nothing is queued for A2 at the
    # relay (A2 stopped: what Bob deposited for it would wait there), nor does it show on A2.
    a2.stop()
    bob.call("messages.send", {"contact": "alice", "text": "only for the restored device"})
    a3.wait_for(lambda: received(a3, "bob", "only for the restored device"), "Bob's text on A3")
    bob.call("messages.send", {"contact": "alice", "text": "and one more"})
    a3.wait_for(lambda: received(a3, "bob", "and one more"), "Bob's second text on A3")
    assert _queued_for(relay_proc, a2, b"") == 0
    a2.start()
    a2.wait_connected()
    assert not received(a2, "bob", "only for the restored device")

    # Bob holds A3's list, its session row is A3's, and he has no session with an old device.
    bob.stop()
    store = open_profile(bob.home, None)
    try:
        c = store.contact_by_name("alice")
        assert c is not None
        held = cd.held_list(store, c.id)
        assert held is not None and held.session_device == bytes.fromhex(a3_id)
        assert dv.DeviceList.from_bytes(held.data).ids() == {bytes.fromhex(a3_id)}
        assert cd.device_sessions(store, c.id) == []
    finally:
        store.close()


def test_a_kill_after_the_import_still_signs_the_list_before_any_renewal(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """kill -9 between the import's commit and the list's signing (the relay away, so the
    first connection, where the list is signed, never came): the reset survives in the store,
    no renewal request was built, and after the restart the restored device signs its list,
    which reaches the contact in the renewed session."""
    a1, bob = peers("alice"), peers("bob")
    connect(a1, bob)
    path = tmp_short / "alice.aegisbackup"
    a1.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    a1.stop()
    a3 = peers("alice3")
    a3.wait_connected()
    relay_proc.terminate()
    result = a3.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert result["renewing"] == 1
    assert a3.proc is not None
    a3.proc.kill()  # SIGKILL
    store = open_profile(a3.home, None)
    try:
        assert store.get_setting("backup.device_reset") == 0  # the file held no list
        assert store.get_setting("devices.list") is None
        rows = store._q("SELECT renew_id FROM renewals WHERE side = 'restored'").fetchall()
        assert [r[0] for r in rows] == [None]  # no request built, none left
    finally:
        store.close()
    relay_proc.start()
    a3.start()
    mine = a3.wait_for(lambda: (v := a3.call("devices.list"))["version"] > 0 and v,
                       "the restored device's list", 60)  # fmt: skip
    assert [d["this_device"] for d in mine["devices"]] == [True]
    for peer in (bob, a3):
        peer.wait_for(lambda p=peer: _renewed(p), "the renewed session", 90)
    # The list went before anything A3 sends in the session: its text arrived, so did the list.
    a3.call("messages.send", {"contact": "bob", "text": "restored after a kill"})
    bob.wait_for(lambda: received(bob, "alice", "restored after a kill"), "A3's text", 60)
    bob.stop()
    store = open_profile(bob.home, None)
    try:
        c = store.contact_by_name("alice")
        assert c is not None
        held = cd.held_list(store, c.id)
        assert held is not None and held.version == mine["version"]
    finally:
        store.close()
