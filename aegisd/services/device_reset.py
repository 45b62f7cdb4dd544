"""What a backup holds of the person's devices, and the reset an import makes of them
(docs/devices.md §10, docs/backup.md §2 "Devices section").

Export: the device list held and the delete capabilities held for the other devices'
mailboxes (never a device key). Import: the restored profile is a new first device (a new
device ID and device key); every old device's mailbox the file holds a delete key for is
queued for deletion at its relay (retired_mailboxes, worked on every connection, as
``devices.remove`` does); once the address mailbox exists (the renewals' first step,
services/renewal.py) it signs a list holding itself only, at a version above the backup's
list, and sends it to every contact as each renewal completes (services/fanout.py).

Nothing here logs a list, a device ID or a key.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Protocol

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core import primitives as p
from aegisd.core import wire
from aegisd.core.errors import DecodeError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.primitives import Entropy
from aegisd.store import Store
from aegisd.store import device_caps as device_caps_rows
from aegisd.store import devices as store_devices
from aegisd.store import own_sync as own_sync_rows
from aegisd.store.devices import (
    SETTING_ANSWERED,
    SETTING_AWAITING,
    SETTING_DELETE_KEYS,
    SETTING_KEY,
    SETTING_OWN_LIST,
    SETTING_REQUESTED,
    SETTING_SELF,
    SETTING_UNCONFIRMED,
)

from .device_caps import queue_deletions
from .fanout import Fanout
from .mailbox import DeleteCap, OwnedMailbox

log = logging.getLogger("aegisd.device_reset")

#: Set by an import, cleared once the restored device signed its list: the version of the
#: backup's list (0: the file held none), which the new list must beat.
SETTING_RESET = "backup.device_reset"
#: Settings of the old profile's devices that the restored device does not keep.
DEVICE_SETTINGS = (
    SETTING_OWN_LIST, SETTING_DELETE_KEYS, SETTING_AWAITING, SETTING_REQUESTED, SETTING_ANSWERED,
    SETTING_UNCONFIRMED,
)  # fmt: skip


class ResetHost(Protocol):
    @property
    def store(self) -> Store: ...
    @property
    def entropy(self) -> Entropy: ...
    @property
    def fanout(self) -> Fanout: ...
    def identity(self) -> IdentityKeyPair: ...


def _held_caps(store: Store) -> dict[bytes, list[DeleteCap]]:
    """The delete capabilities held for the other devices' mailboxes, by device (this
    device's own left out: its mailboxes are deleted with their owner keys); a malformed one
    is left out."""
    me = store.get_setting(SETTING_SELF)
    doc = store.get_setting(dv.DELETE_KEYS_SETTING)
    out: dict[bytes, list[DeleteCap]] = {}
    for key, items in doc.items() if isinstance(doc, dict) else []:
        with contextlib.suppress(ValueError, TypeError):
            device_id = bytes.fromhex(key)
            if device_id.hex() == me:
                continue
            caps = []
            for item in list(items)[: fmt.MAX_CAPS_PER_DEVICE]:
                with contextlib.suppress(ValueError):
                    caps.append(DeleteCap.from_json(item))
            if caps:
                out[device_id] = caps
    return out


def export(store: Store) -> fmt.BackupDevices:
    """The devices section of a backup of this profile."""
    held = store.get_setting(SETTING_OWN_LIST)
    try:
        current = None if held is None else dv.DeviceList.from_bytes(bytes.fromhex(str(held)))
    except (ValueError, DecodeError):
        current = None  # not one the daemon wrote: the backup is still made, without it
    if current is None:
        return fmt.BackupDevices()
    sets: dict[bytes, tuple[fmt.BackupDeleteCap, ...]] = {}
    for device_id, held_caps in _held_caps(store).items():
        if current.entry(device_id) is None:
            continue
        caps = tuple(
            fmt.BackupDeleteCap(cap.relay_url, cap.owner_id, cap.delete_seed)
            for cap in held_caps
            if len(cap.relay_url.encode()) <= wire.MAX_URL_BYTES
        )  # the file's bound
        if caps:
            sets[device_id] = caps
    return fmt.BackupDevices(current.to_bytes(), tuple(sorted(sets.items())))


def check(devices: fmt.BackupDevices, identity: PublicIdentity) -> dv.DeviceList | None:
    """The backup's list, parsed and verified under the backup's identity; every delete key
    of a listed device. ValueError (or a DecodeError) otherwise: the contents are malformed."""
    if devices.device_list is None:
        return None
    listed = dv.DeviceList.from_bytes(devices.device_list)
    try:
        listed.verify(identity)
    except dv.ForgedDeviceList:
        raise ValueError("a device list not signed by the backup's identity") from None
    if any(listed.entry(device_id) is None for device_id, _ in devices.delete_keys):
        raise ValueError("delete keys of a device not in the backup's list")
    return listed


def restore(host: ResetHost, devices: fmt.BackupDevices, listed: dv.DeviceList | None) -> int:
    """Inside the import's transaction: a new device (ID and key), none of the old devices'
    settings, their mailboxes queued for deletion, the list to sign marked. How many
    mailboxes were queued."""
    store = host.store
    queued = 0
    # A device this fresh profile linked before the import stops receiving too, as at a
    # removal: the capabilities held for it are queued before they are forgotten.
    # And those taken over sync (0x47); then none is held, nor any of ours marked sent.
    linked = [(c.relay_url, c.owner_id, c.delete_seed)
              for caps in _held_caps(store).values() for c in caps]  # fmt: skip
    queued = len(queue_deletions(store, [*linked, *device_caps_rows.every(store)]))
    device_caps_rows.clear(store)
    for name in DEVICE_SETTINGS:
        store.set_setting(name, None)
    # Sync sessions with devices this fresh profile linked were the discarded identity's
    # (their mailboxes go with the fresh ones): kept, none would ever be opened again.
    own_sync_rows.clear(store)
    priv, _ = dv.new_device_key(host.entropy)
    store.set_setting(SETTING_SELF, dv.new_device_id(host.entropy).hex())
    store.set_setting(SETTING_KEY, priv.hex())
    store.set_setting(SETTING_RESET, 0 if listed is None else listed.version)
    for _, caps in devices.delete_keys:
        for cap in caps:
            mb = DeleteCap(cap.relay_url, cap.owner_id, cap.delete_key).as_mailbox()
            store_devices.retire_mailbox(store, mb.to_bytes())
            queued += 1
    return queued


def sign_list(host: ResetHost, address: OwnedMailbox) -> None:
    """Under the messenger's lock, once the address mailbox exists: the restored device's
    list, holding itself (and any device it linked since the import), at a version above the
    backup's list and the clock's (§3.2), stored and queued to every established contact (none
    yet: each gets it when its renewal completes, fanout.send_held)."""
    store = host.store
    after = store.get_setting(SETTING_RESET)
    if after is None:
        return
    me = bytes.fromhex(str(store.get_setting(SETTING_SELF)))
    priv = bytes.fromhex(str(store.get_setting(SETTING_KEY)))
    own = store.get_setting(SETTING_OWN_LIST)
    held = None if own is None else dv.DeviceList.from_bytes(bytes.fromhex(str(own)))
    now = int(time.time())
    # Above the backup's list, but never so far ahead of the clock that a contact refuses it
    # (§3.2's MAX_LIST_SKEW, half of it left for the contacts' clocks): a backup whose list
    # a clock far ahead signed would otherwise leave every contact on the old devices' list.
    ceiling = (now + dv.MAX_LIST_SKEW // 2) * dv.VERSIONS_PER_SECOND
    if int(after) + 1 > ceiling:
        log.warning("the backup's device list runs ahead of this clock: the restored list's "
                    "version is capped at half a day ahead (docs/backup.md §7)")  # fmt: skip
    version = max(dv.next_version(held, now), min(int(after) + 1, ceiling))
    version = min(version, dv.LIST_VERSION_LIMIT - 1)
    public = p.ed25519_public(p.ed25519_from_private(priv))
    entry = dv.DeviceEntry(me, address.address(), address.deposit_id, now, public)
    others = [] if held is None else [d for d in held.devices if d.device_id != me]
    new = dv.DeviceList.sign(host.identity(), version, [*others, entry])
    with store.transaction():
        store.set_setting(SETTING_OWN_LIST, new.to_bytes().hex())
        store.set_setting(SETTING_RESET, None)
        host.fanout.send_list(new, me, priv)
