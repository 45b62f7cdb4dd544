"""``privacy.get`` and ``privacy.set``: the cover-traffic level (services/cover.py; docs/api.md
"Privacy")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aegisd.core.wire import BLOCK_SIZE
from aegisd.rpc import CallContext, InvalidParamsError, Registry
from aegisd.rpc.methods import Handler

from .cover import LEVELS, SETTING_LEVEL, SETTING_TEST_INTERVAL
from .messenger import Messenger

DAY = 86400.0


def describe(m: Messenger) -> dict[str, Any]:
    cover = m.cover
    interval = cover.interval()
    per_day = DAY / interval if interval else 0.0
    return {
        "level": cover.level(),
        "level_chosen": m.store.get_setting(SETTING_LEVEL) in LEVELS,
        "levels": sorted(LEVELS),
        "interval": interval,
        # What the level costs, whatever the user does (docs/threat-model.md has it measured).
        "blocks_per_contact_per_day": round(per_day, 1),
        "bytes_per_contact_per_day": round(per_day * BLOCK_SIZE),
        "mean_added_latency": interval,
        "slots": cover.status(),
    }


def register(registry: Registry, m: Messenger, *, test_methods: bool = False) -> None:
    def method(name: str) -> Callable[[Handler], Handler]:
        return registry.method(name, unlocked=True)

    @method("privacy.get")
    async def privacy_get(ctx: CallContext) -> dict[str, Any]:
        return describe(m)

    @method("privacy.set")
    async def privacy_set(
        ctx: CallContext, level: str | None = None, interval: float | int | None = None
    ) -> dict[str, Any]:
        if level is not None and level not in LEVELS:
            raise InvalidParamsError("level", f"must be one of {', '.join(sorted(LEVELS))}")
        if interval is not None:
            if not test_methods:
                raise InvalidParamsError("interval", "is for tests only (aegisd --test-methods)")
            if isinstance(interval, bool) or not 0 < interval <= 86400:
                raise InvalidParamsError("interval", "must be between 0 and 86400 seconds")
        with m.store.transaction():
            if level is not None:
                m.store.set_setting(SETTING_LEVEL, level)
                m.sync_settings.changed("privacy_level")  # on our other devices too (0x49)
            if interval is not None:
                m.store.set_setting(SETTING_TEST_INTERVAL, float(interval))
        await m.cover.level_changed()
        return describe(m)
