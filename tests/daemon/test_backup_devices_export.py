"""What a backup takes of the person's devices (aegisd/services/device_reset.py, docs/backup.md
§2 "Devices section"), from a real SQLCipher store: the list held, and the delete keys held
for the other listed devices only, each one checked as any device's (a malformed one is left
out, never the backup)."""

from __future__ import annotations

import types
from typing import Any

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core.primitives import SystemEntropy
from aegisd.services import device_reset
from aegisd.services import devices as sd
from aegisd.store import KdfParams, create_profile
from tests.unit.test_core_backup import ALICE, ALICE_LIST

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
        profile = sd.Devices(m)._profile(ALICE_LIST)
        assert profile.profile[0] == 4
        assert fmt.BackupContents.from_bytes(profile.profile).devices == fmt.BackupDevices()
    finally:
        store.close()
