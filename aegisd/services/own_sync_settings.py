"""The profile's settings kept in step across this profile's own devices (0x49, docs/devices.md
§6, docs/protocol.md §28.6): the display name, the privacy (cover-traffic) level, read
receipts on or off and the default disappearing timer. Not the device's own: its network
mode, proxy, relay, limits and delays stay per device.

Each setting has its own clock ``(changed_at_ms, device_id)``, held in the setting
SETTING_CLOCKS: a change made here (api.py's identity.set_name and settings.set,
privacy_api.py's privacy.set call ``changed`` with the settings changed) stamps only those;
at each change every setting with a clock goes, each with its own, and on every device each
setting takes the value of its newest clock (as a contact's 0x46: own_sync.py). A setting
with no clock (never changed on any device since the link: the link carries the values and
their clocks, devices.py) is not sent, so it never overwrites one chosen elsewhere. Nothing
here logs a setting's value.
"""

from __future__ import annotations

import contextlib
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

#: {setting (sa.FIELDS): [changed_at_ms, device ID hex]}: each setting's newest change this
#: device made or took.
SETTING_CLOCKS = "sync.settings_clocks"


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


def clocks(store: Store) -> dict[str, sa.Clock]:
    """Each synced setting's clock held (a malformed entry: none)."""
    value = store.get_setting(SETTING_CLOCKS)
    out: dict[str, sa.Clock] = {}
    if isinstance(value, dict):
        for f in sa.FIELDS:
            item = value.get(f)
            with contextlib.suppress(TypeError, ValueError):
                if isinstance(item, list) and len(item) == 2:
                    device = bytes.fromhex(item[1])
                    if len(device) == dv.DEVICE_ID_LEN:
                        out[f] = (int(item[0]), device)
    return out


def _set_clocks(store: Store, held: dict[str, sa.Clock]) -> None:
    store.set_setting(SETTING_CLOCKS, {f: [c[0], c[1].hex()] for f, c in held.items()})


def current(store: Store) -> dict[str, str | bool | int]:
    """The synced settings' values held here."""
    level = store.get_setting(SETTING_LEVEL)
    return {
        "display_name": str(store.get_setting(SETTING_NAME, "") or ""),
        "privacy_level": str(level) if level in LEVELS else "",
        "read_receipts": bool(store.get_setting(SETTING_READ_RECEIPTS, True)),
        "disappearing_default": int(store.get_setting(SETTING_DISAPPEARING, 0) or 0),
    }


class OwnSyncSettings:
    def __init__(self, host: SettingsSyncHost, send: Callable[[bytes], None],
                 self_id: Callable[[], bytes | None]) -> None:  # fmt: skip
        self.m = host
        self._send = send
        self._self_id = self_id

    def item(self) -> sa.SettingsItem:
        """Every setting with a clock, its value held and its clock."""
        values = current(self.m.store)
        present: dict[str, Any] = {f: (c, values[f]) for f, c in clocks(self.m.store).items()}
        return sa.SettingsItem(**present)

    def changed(self, *fields: str) -> None:
        """The user changed these synced settings here (inside the caller's transaction, if
        any): stamped, and the settings go to the others."""
        if self.m.ctx.store is None:
            return
        me = self._self_id()
        if me is None:
            return  # never linked: no other device (a link carries the values)
        now_ms = time.time_ns() // 1_000_000
        store = self.m.store
        with store.transaction():
            held = clocks(store)
            for f in fields:
                before = held.get(f)
                # A clock behind the last change still makes a newer one.
                held[f] = (now_ms if before is None else max(now_ms, before[0] + 1), me)
            _set_clocks(store, held)
            self._send(sa.encode(self.item()))

    def on_payload(self, device_id: bytes, p: sa.SettingsItem) -> None:
        """Inside the receive's transaction. A setting's clock may name another device than
        ``device_id`` (the sender passes on what it took): each is taken if newer than the
        one held, and none dated in the future."""
        store = self.m.store
        held = clocks(store)
        before = current(store)
        newest_ok = (int(time.time()) + dv.MAX_LIST_SKEW) * 1000
        took = False
        for f, (clock, value) in p.fields().items():
            if clock[0] > newest_ok:
                droplog.dropped("dropped a settings change dated in the future")
                continue
            if f in held and clock <= held[f]:
                continue  # an older change, or this one again
            held[f] = clock
            took = True
            if f == "display_name":
                store.set_setting(SETTING_NAME, clean_name(str(value), ""))
            elif f == "privacy_level":
                store.set_setting(SETTING_LEVEL, value if value in LEVELS else None)
            elif f == "read_receipts":
                store.set_setting(SETTING_READ_RECEIPTS, bool(value))
            else:
                store.set_setting(SETTING_DISAPPEARING, int(value) or None)
        if not took:
            return
        _set_clocks(store, held)
        after = current(store)
        if after == before:
            return
        if after["privacy_level"] != before["privacy_level"]:
            self.m.spawn(self.m.cover.level_changed())
        self.m.ctx.events.emit("settings.synced", {
            **after, "privacy_level": after["privacy_level"] or None,
        })  # fmt: skip
