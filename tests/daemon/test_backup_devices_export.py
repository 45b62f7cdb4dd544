"""What a backup takes of the person's devices (aegisd/services/device_reset.py, docs/backup.md
§2 "Devices section"), from a real SQLCipher store: the list held, and the delete keys held
for the other listed devices only, each one checked as any device's (a malformed one is left
out, never the backup)."""

from __future__ import annotations

import time
import types
from typing import Any

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core.primitives import SystemEntropy
from aegisd.services import device_reset
from aegisd.services import devices as sd
from aegisd.services.mailbox import DeleteCap
from aegisd.store import KdfParams, create_profile
from tests.unit.test_core_backup import ALICE, ALICE_LIST, MAILBOX

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
CAP = {"relay_url": "ws://127.0.0.1:1/v1/ws", "owner_id": "0f" * 16, "delete_key": "ab" * 32}


def test_the_export_takes_the_list_and_the_other_devices_delete_keys(tmp_path):
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        assert device_reset.export(store) == fmt.BackupDevices()  # never linked
        one, two, three = (bytes([i]) * 16 for i in (1, 2, 3))
        store.set_setting("devices.list", ALICE_LIST.to_bytes().hex())
        store.set_setting("devices.self", one.hex())
        store.set_setting(dv.DELETE_KEYS_SETTING, {
            three.hex(): ["not a capability", CAP, {**CAP, "relay_url": "ws://" + "x" * 300}],
            one.hex(): [CAP],  # this device's own: its mailboxes travel with their owner keys
            (b"\x09" * 16).hex(): [CAP],  # a device not in the list
            two.hex(): [CAP, CAP],
            "not hex": [CAP],
        })  # fmt: skip
        got = device_reset.export(store)
        cap = fmt.BackupDeleteCap(CAP["relay_url"], b"\x0f" * 16, b"\xab" * 32)
        assert got == fmt.BackupDevices(ALICE_LIST.to_bytes(), ((two, (cap, cap)), (three, (cap,))))
        assert device_reset.check(got, ALICE.public) == ALICE_LIST
        # A list the daemon did not write: the backup is made without devices.
        store.set_setting("devices.list", "00")
        assert device_reset.export(store) == fmt.BackupDevices()
    finally:
        store.close()


def test_a_link_profile_is_written_as_contents_version_4(tmp_path):
    """A link's profile has no devices section (docs/devices.md §4.2): it is written in
    contents version 4, which a new device on the code before version 5 reads (it refuses a
    version 5 as unsupported, and the link as a bad profile)."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        m: Any = types.SimpleNamespace(store=store, identity=lambda: ALICE, entropy=SystemEntropy(),
                                       mailboxes=types.SimpleNamespace(owned={}))  # fmt: skip
        profile = sd.Devices(m).links._profile(ALICE_LIST)
        assert profile.profile[0] == 4
        assert fmt.BackupContents.from_bytes(profile.profile).devices == fmt.BackupDevices()
    finally:
        store.close()


def _host(store: Any, sent: list[Any]) -> Any:
    fanout = types.SimpleNamespace(send_list=lambda new, me, priv: sent.append(new))
    return types.SimpleNamespace(store=store, entropy=SystemEntropy(), fanout=fanout,
                                 identity=lambda: ALICE)  # fmt: skip


def test_an_import_queues_the_mailboxes_of_a_device_the_fresh_profile_linked(tmp_path):
    """A fresh profile that linked a device before the import: the capabilities it held for
    that device's mailbox are queued for deletion, as a removal does, before they are
    forgotten (docs/devices.md §10)."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        me, linked = b"\x01" * 16, b"\x02" * 16
        store.set_setting("devices.self", me.hex())
        store.set_setting(dv.DELETE_KEYS_SETTING, {linked.hex(): [CAP], me.hex(): [CAP]})
        assert store._q("SELECT COUNT(*) FROM retired_mailboxes").fetchone()[0] == 0
        with store.transaction():
            device_reset.restore(_host(store, []), fmt.BackupDevices(), None)
        rows = store._q("SELECT descriptor FROM retired_mailboxes").fetchall()
        cap = DeleteCap.from_json(CAP)
        assert [bytes(r[0]) for r in rows] == [cap.as_mailbox().to_bytes()]
        assert store.get_setting(dv.DELETE_KEYS_SETTING) is None
    finally:
        store.close()


def test_a_backup_list_far_ahead_caps_the_restored_version(tmp_path, caplog):
    """A backup whose list a clock far ahead signed: the restored device's list is capped
    within the contacts' skew (they would refuse V + 1 as from the future), and logged."""
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        now = int(time.time())
        ahead = (now + 10 * dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND
        store.set_setting(device_reset.SETTING_RESET, ahead)
        store.set_setting("devices.self", (b"\x07" * 16).hex())
        store.set_setting("devices.key", (b"\x08" * 32).hex())
        sent: list[Any] = []
        address = types.SimpleNamespace(address=lambda: MAILBOX, deposit_id=b"b" * 16)
        device_reset.sign_list(_host(store, sent), address)
        [new] = sent
        assert new.version <= (now + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND
        assert new.version >= now * dv.VERSIONS_PER_SECOND
        assert dv.accept(ALICE.public, None, new, now) == new  # a contact takes it
        assert "runs ahead of this clock" in caplog.text
        assert store.get_setting(device_reset.SETTING_RESET) is None
    finally:
        store.close()
