"""The profile's settings kept in step across this profile's own devices (0x49, docs/devices.md
§6, docs/protocol.md §28.6): the display name, the privacy (cover-traffic) level, read
receipts on or off and the default disappearing timer. Not the device's own: its network
mode, proxy, relay, limits and delays stay per device.

The whole set goes at each change (api.py's identity.set_name and settings.set,
privacy_api.py's privacy.set call ``changed``), stamped ``(changed_at_ms, device_id)``: the
newest wins on every device, as a contact's 0x46 (own_sync.py). The stamp held is the
setting SETTING_CLOCK. Nothing here logs a setting's value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import sync_actions as sa
from aegisd.store import Store

from .contacts import SETTING_NAME
from .context import ServiceContext
from .cover import LEVELS, SETTING_LEVEL
from .disappearing import SETTING_DEFAULT as SETTING_DISAPPEARING
from .groups_state import SETTING_READ_RECEIPTS
from .names import clean_name

#: "MS:DEVICE_HEX": the newest settings change this device made or took.
SETTING_CLOCK = "sync.settings_clock"


class CoverView(Protocol):
    async def level_changed(self) -> None: ...


class SettingsSyncHost(Protocol):
    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def cover(self) -> CoverView: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class OwnSyncSettings:
    def __init__(self, host: SettingsSyncHost, send: Callable[[bytes], None],
                 self_id: Callable[[], bytes | None]) -> None:  # fmt: skip
        self.m = host
        self._send = send
        self._self_id = self_id

    def _clock(self) -> tuple[int, bytes] | None:
        value = self.m.store.get_setting(SETTING_CLOCK)
        if not isinstance(value, str) or ":" not in value:
            return None
        ms, device = value.split(":", 1)
        return int(ms), bytes.fromhex(device)

    def _set_clock(self, ms: int, device_id: bytes) -> None:
        self.m.store.set_setting(SETTING_CLOCK, f"{ms}:{device_id.hex()}")

    def current(self, changed_at_ms: int, device_id: bytes) -> sa.SettingsItem:
        store = self.m.store
        level = store.get_setting(SETTING_LEVEL)
        return sa.SettingsItem(
            changed_at_ms, device_id, str(store.get_setting(SETTING_NAME, "") or ""),
            str(level) if level in LEVELS else "",
            bool(store.get_setting(SETTING_READ_RECEIPTS, True)),
            int(store.get_setting(SETTING_DISAPPEARING, 0) or 0),
        )  # fmt: skip

    def changed(self) -> None:
        """The user changed a synced setting on this device: the set goes to the others."""
        if self.m.ctx.store is None:
            return
        me = self._self_id()
        if me is None:
            return  # never linked: no other device
        now_ms = time.time_ns() // 1_000_000
        held = self._clock()
        if held is not None and held[0] >= now_ms:
            now_ms = held[0] + 1  # a clock behind the last change still makes a newer one
        with self.m.store.transaction():
            self._set_clock(now_ms, me)
            self._send(sa.encode(self.current(now_ms, me)))

    def on_payload(self, device_id: bytes, p: sa.SettingsItem) -> None:
        """Inside the receive's transaction; ``device_id``: the sending device's."""
        if p.device_id != device_id:
            droplog.dropped("dropped a settings change not made by its sending device")
            return
        if p.changed_at_ms > (int(time.time()) + dv.MAX_LIST_SKEW) * 1000:
            droplog.dropped("dropped a settings change dated in the future")
            return
        held = self._clock()
        if held is not None and (p.changed_at_ms, p.device_id) <= held:
            return  # an older change, or this one again
        store = self.m.store
        before = self.current(0, b"")
        self._set_clock(p.changed_at_ms, p.device_id)
        name = clean_name(p.display_name, "")
        level = p.privacy_level if p.privacy_level in LEVELS else None
        store.set_setting(SETTING_NAME, name)
        store.set_setting(SETTING_LEVEL, level)
        store.set_setting(SETTING_READ_RECEIPTS, p.read_receipts)
        store.set_setting(SETTING_DISAPPEARING, p.disappearing_default or None)
        after = self.current(0, b"")
        if after == before:
            return
        if after.privacy_level != before.privacy_level:
            self.m.spawn(self.m.cover.level_changed())
        self.m.ctx.events.emit("settings.synced", {
            "display_name": after.display_name, "privacy_level": after.privacy_level or None,
            "read_receipts": after.read_receipts,
            "disappearing_default": after.disappearing_default,
        })  # fmt: skip
