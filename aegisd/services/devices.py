"""Several devices per person, as far as the daemon goes today (docs/devices.md §4, §7): this
device's ID and key, the signed device list (`devices.list`, `devices.confirm_listed`), the
delete capabilities held for the other devices' mailboxes, `devices.remove`, and the RPC
methods of the devices. A link under way (`devices.link`, `devices.join`, `devices.confirm`,
`devices.status`, `devices.cancel`) is services/device_link.py's (the slot and what both sides
share), device_offer.py's (E's side) and device_join.py's (N's side).

Nothing here logs a link, a code, a key or a name.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from aegisd.core import devices as dv
from aegisd.core import primitives as p
from aegisd.rpc import AppError, CallContext, InvalidParamsError, Registry
from aegisd.store import devices as store_devices
from aegisd.store.devices import (
    SETTING_DELETE_KEYS,
    SETTING_KEY,
    SETTING_SELF,
    SETTING_UNCONFIRMED,
)
from aegisd.store.devices import SETTING_OWN_LIST as SETTING_LIST

from .device_join import JoinSide
from .device_link import TTL_MIN
from .device_offer import OfferSide
from .mailbox import DeleteCap, OwnedMailbox
from .messenger import Messenger

# Application error codes 1090-1099 (docs/api.md, "Errors"); 1090-1094 are the link's
# (services/device_link.py).
E_NO_SUCH_DEVICE = 1095

MAX_CAPS_PER_DEVICE = 16  # capabilities taken from one device (hostile input: bounded)


def _now() -> int:
    return int(time.time())


class DeviceLinks(OfferSide, JoinSide):
    """The one link slot, on either side (device_link.py, device_offer.py, device_join.py)."""


class Devices:
    def __init__(self, messenger: Messenger) -> None:
        self.m = messenger
        self.links = DeviceLinks(messenger, self)  # a link under way (device_link.py)

    # --- the device list ------------------------------------------------------------------

    def self_id(self) -> bytes:
        value = self.m.store.get_setting(SETTING_SELF)
        if value is None:
            device_id = dv.new_device_id(self.m.entropy)
            self.m.store.set_setting(SETTING_SELF, device_id.hex())
            return device_id
        return bytes.fromhex(str(value))

    def device_key(self) -> bytes:
        """This device's public device key (docs/devices.md: its hellos and bundle prove it);
        drawn on first need, kept in the store, never in a link's profile or a backup."""
        value = self.m.store.get_setting(SETTING_KEY)
        if value is None:
            priv, pub = dv.new_device_key(self.m.entropy)
            self.m.store.set_setting(SETTING_KEY, priv.hex())
            return pub
        return _ed_public(bytes.fromhex(str(value)))

    def device_private(self) -> bytes:
        """This device's device key, raw private: what signs its hellos (never sent)."""
        self.device_key()
        return bytes.fromhex(str(self.m.store.get_setting(SETTING_KEY)))

    def held(self) -> dv.DeviceList | None:
        value = self.m.store.get_setting(SETTING_LIST)
        return None if value is None else dv.DeviceList.from_bytes(bytes.fromhex(str(value)))

    def _store_list(self, device_list: dv.DeviceList) -> None:
        self.m.store.set_setting(SETTING_LIST, device_list.to_bytes().hex())
        self.m.own_sync.list_changed(device_list)  # sync sessions follow the list (own_sync.py)

    async def _entry(self) -> dv.DeviceEntry:
        """This device in a list: its address mailbox is its device mailbox (§3.1)."""
        _, mb = await self.m.address.ensure()
        return self._entry_for(mb)

    def _entry_for(self, mb: OwnedMailbox) -> dv.DeviceEntry:
        return dv.DeviceEntry(
            self.self_id(), mb.address(), mb.deposit_id, _now(), self.device_key()
        )

    async def own_list(self) -> dv.DeviceList:
        """The list held; a profile that never linked signs version 1 with itself."""
        current = self.held()
        if current is not None:
            return current
        entry = await self._entry()
        async with self.m.lock:
            current = self.held()
            if current is None:
                version = dv.next_version(None, _now())
                current = dv.DeviceList.sign(self.m.identity(), version, [entry])
                self._store_list(current)
            return current

    def list_view(self) -> dict[str, Any]:
        current = self.held()
        me = self.m.store.get_setting(SETTING_SELF)
        if current is None:  # one device, that never linked: itself
            return {
                "version": 0,
                "unconfirmed": False,
                "devices": [{"id": me or "", "this_device": True, "added_at": None, "relay": None,
                             "delete_keys": 0}],
            }
        unconfirmed = bool(self.m.store.get_setting(SETTING_UNCONFIRMED))
        caps = self._caps()
        return {"version": current.version, "unconfirmed": unconfirmed, "devices": [
            {"id": d.device_id.hex(), "this_device": d.device_id.hex() == me,
             "added_at": d.added_at, "relay": d.mailbox.relay_url,
             "delete_keys": self.m.device_caps.count(d.device_id, caps.get(d.device_id.hex()))}
            for d in current.devices]}  # fmt: skip

    def confirm_listed(self) -> dict[str, Any]:
        """The user saw this device in the list of the device in use (`aegis device list`
        there): `unconfirmed` is a false alarm, dismissed. Nothing is sent or checked: only
        the user can see the other device's list today (docs/devices.md §4.3)."""
        if self.held() is None:
            raise AppError(E_NO_SUCH_DEVICE, "not_found", "this device never joined by a link")
        self.m.store.set_setting(SETTING_UNCONFIRMED, None)
        return self.list_view()

    async def remove(self, device_id: str) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(device_id)
        except ValueError:
            raise InvalidParamsError("id", "must be a device ID (32 hex digits)") from None
        async with self.m.lock:
            current = self.held()
            if current is None or current.entry(raw) is None:
                raise AppError(E_NO_SUCH_DEVICE, "not_found", "no such device in the list")
            if raw == self.self_id():
                raise AppError(
                    E_NO_SUCH_DEVICE,
                    "this_device",
                    "this device cannot remove itself: remove it from another one",
                )
            kept = [d for d in current.devices if d.device_id != raw]
            new = dv.DeviceList.sign(self.m.identity(), dv.next_version(current, _now()), kept)
            # Its mailboxes this device holds delete keys for go into the queue of mailboxes
            # to delete (kept across restarts) in the list's own transaction; deleted at once
            # below, or on the next connection if the relay is away (docs/devices.md §7).
            with self.m.store.transaction():
                # Ours for it first, then the profile's relay, other relays last (the link's
                # keys and the synced, in one list: device_caps.py).
                queued = self.m.device_caps.retire_device(raw)
                self._store_list(new)
                # The contacts learn of it and drop their sessions with it (docs/devices.md §5.3).
                told = self.m.fanout.send_list(new, self.self_id(), self.device_private())
            self.m.mailboxes.reload()  # our sync mailbox for it left the store (committed now)
        deleted, refused = await self._delete_now(queued)
        return {"version": new.version, "devices": len(new.devices),
                "mailboxes_deleted": deleted, "mailboxes_refused": refused,
                "mailboxes_queued": len(queued) - deleted - refused,
                "contacts_told": told}  # fmt: skip

    async def _delete_now(self, queued: list[tuple[int, bytes]]) -> tuple[int, int]:
        """Delete queued mailboxes at their relay now, in order: how many are gone and how
        many are on a relay the URL policy refuses. A row (with its delete key) leaves the
        queue only once its mailbox is gone; the first relay away or saying "not now" leaves
        the rest queued (renewal.py retire_due takes them on the next connection), a refused
        URL stays queued (for when the policy allows it) and the next is tried."""
        done = refused = 0
        for row_id, descriptor in queued:
            result = await self.m.renewals.relay_delete(OwnedMailbox.from_bytes(descriptor))
            if result == "away":
                break
            if result == "refused":
                refused += 1
                continue
            with contextlib.suppress(Exception):  # locked meanwhile: retire_due deletes again
                store_devices.unretire_mailbox(self.m.store, row_id)
            done += 1
        return done, refused

    # --- delete keys (docs/devices.md §6) -------------------------------------------------

    def _caps(self) -> dict[str, list[Any]]:
        value = self.m.store.get_setting(SETTING_DELETE_KEYS)
        return dict(value) if isinstance(value, dict) else {}

    def _keep_caps(self, device_id: bytes, caps: list[DeleteCap]) -> None:
        """Store the delete capabilities a device gave for its mailboxes (replacing the ones
        it gave before)."""
        if not caps:
            return
        held = self._caps()
        held[device_id.hex()] = [c.to_json() for c in caps[:MAX_CAPS_PER_DEVICE]]
        self.m.store.set_setting(SETTING_DELETE_KEYS, held)

    def _own_caps(self, current: dv.DeviceList) -> list[DeleteCap]:
        """This device's delete capability for its device mailbox (the one the list names),
        if that mailbox has a delete key (one made before delete keys has none)."""
        entry = current.entry(self.self_id())
        if entry is None:
            return []
        for _, mb in self.m.mailboxes.owned.values():
            if mb.deposit_id == entry.mailbox.deposit_id:
                cap = mb.delete_cap()
                return [] if cap is None else [cap]
        return []


def _ed_public(priv: bytes) -> bytes:
    return p.ed25519_public(p.ed25519_from_private(priv))


def register(registry: Registry, m: Messenger) -> Devices:
    devices = Devices(m)

    @registry.method("devices.link")
    async def devices_link(ctx: CallContext, expires_in: int = dv.LINK_TTL) -> dict[str, Any]:
        if type(expires_in) is not int or not TTL_MIN <= expires_in <= dv.LINK_TTL:
            raise InvalidParamsError("expires_in", f"must be {TTL_MIN} to {dv.LINK_TTL} seconds")
        return await devices.links.offer(expires_in)

    @registry.method("devices.join")
    async def devices_join(ctx: CallContext, link: str) -> dict[str, Any]:
        if not isinstance(link, str):
            raise InvalidParamsError("link", "must be a string")
        return await devices.links.join(link)

    @registry.method("devices.status")
    async def devices_status(ctx: CallContext) -> dict[str, Any]:
        return devices.links.status()

    @registry.method("devices.confirm")
    async def devices_confirm(
        ctx: CallContext, accept: bool | None = None, code: str | None = None
    ) -> dict[str, Any]:
        if accept is not None and not isinstance(accept, bool):
            raise InvalidParamsError("accept", "must be true or false")
        if code is not None and (not isinstance(code, str) or len(code) > 32):
            raise InvalidParamsError("code", "must be the code the new device shows")
        return await devices.links.confirm(accept, code)

    @registry.method("devices.cancel")
    async def devices_cancel(ctx: CallContext) -> dict[str, Any]:
        return await devices.links.cancel()

    @registry.method("devices.list")
    async def devices_list(ctx: CallContext) -> dict[str, Any]:
        return devices.list_view()

    @registry.method("devices.confirm_listed")
    async def devices_confirm_listed(ctx: CallContext) -> dict[str, Any]:
        return devices.confirm_listed()

    @registry.method("devices.remove")
    async def devices_remove(ctx: CallContext, id: str) -> dict[str, Any]:
        if not isinstance(id, str):
            raise InvalidParamsError("id", "must be a string")
        return await devices.remove(id)

    return devices
