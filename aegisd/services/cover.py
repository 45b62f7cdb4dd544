"""Cover traffic (docs/protocol.md §24, docs/threat-model.md "Unlinkability by timing").

Each established contact gets one block at each tick of a Poisson process whose rate depends
only on the privacy level, never on what the user does: at a tick, the oldest block waiting for
that contact leaves (a text, a file's descriptor, a mailbox rotation); if none waits, the
receipts waiting for that contact, batched in one block; if none, a cover block (an ordinary
ratchet message whose payload the recipient drops). So the relay sees, for every mailbox, deposits
at a constant rate whether the two people talk or not: real messages take the place of cover
instead of adding to it, and receipts no longer echo messages one to one. The cost is latency:
a message waits for its contact's next tick (exponential, mean the level's interval).

Left out of the slots: call signaling (a call cannot wait), first contact and session renewal.
A contact silent for OFFLINE_AFTER (no block at all, cover included, arrived from it) gets no
cover until something arrives again, so that the queue at the relay of someone who is away is
not filled with cover; real blocks and receipts still go at the ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from aegisd.aio import cancel_and_wait
from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.netmode import is_local
from aegisd.relayurl import SETTING_URL
from aegisd.store import cover as slots

from .mailbox import ContactState

if TYPE_CHECKING:
    from .messenger import Messenger

log = logging.getLogger("aegisd.cover")

SETTING_LEVEL = "privacy.level"
#: Tests and benchmarks only (a daemon started with --test-methods): the mean interval in
#: seconds, whatever the level says, so that a run of minutes stands for days.
SETTING_TEST_INTERVAL = "privacy.cover_interval"
#: Mean seconds between two blocks to one contact, per level (None: no cover, no slots).
LEVELS: dict[str, float | None] = {"off": None, "default": 1200.0, "strong": 120.0}
OFFLINE_AFTER = 6 * 3600.0
RESCAN = 30.0


def default_level(relay_url: str | None) -> str:
    """A profile that never chose a level: cover on, except with a relay on this machine (the
    demo, tests, a relay of one's own next to the daemon), where there is no network to hide
    timing from and a message should not wait."""
    return "off" if relay_url is None or is_local(relay_url) else "default"


class Cover:
    def __init__(self, m: Messenger, *, test_methods: bool = False) -> None:
        self.m = m
        self._test_methods = test_methods
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next: dict[int, float] = {}  # contact id -> monotonic time of its next tick
        self._heard: dict[int, float] = {}  # contact id -> monotonic time something came
        self._rng = random.SystemRandom()
        #: Counters for tests and `privacy.get`: blocks sent at ticks, by what they carried.
        self.sent = {"real": 0, "receipts": 0, "cover": 0}

    # --- settings ---------------------------------------------------------------------------

    def level(self) -> str:
        store = self.m.store
        chosen = store.get_setting(SETTING_LEVEL)
        return str(chosen) if chosen in LEVELS else default_level(store.get_setting(SETTING_URL))

    def interval(self) -> float | None:
        base = LEVELS[self.level()]
        if base is not None and self._test_methods:
            override = self.m.store.get_setting(SETTING_TEST_INTERVAL)
            if isinstance(override, (int, float)) and override > 0:
                return float(override)
        return base

    def active(self) -> bool:
        """Blocks wait for slots (the level is not off)."""
        return self.interval() is not None

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._next.clear()
        now = time.monotonic()
        self._heard = {c.id: now for c in self.m.store.list_contacts()}
        self._task = asyncio.create_task(self._run(), name="cover")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def changed(self) -> None:
        """Contacts or the level changed: look again."""
        self._wake.set()

    def heard(self, contact_id: int) -> None:
        """A block from this contact opened (cover included): it is online."""
        self._heard[contact_id] = time.monotonic()

    async def level_changed(self) -> None:
        """After privacy.set: with cover off, everything waiting leaves now."""
        if not self.active():
            async with self.m.lock:
                store = self.m.store
                with store.transaction():
                    slots.release_all(store)
                    for cid in slots.receipt_contacts(store):
                        self._flush_receipts(cid)
            self.m._outbox_wake.set()
        self._next.clear()
        self.changed()

    # --- the ticks --------------------------------------------------------------------------

    def _eligible(self) -> list[int]:
        out = []
        for c in self.m.store.list_contacts():
            if c.blocked or self.m.store.get_session(c.id) is None:
                continue
            state = ContactState.from_bytes(c.state)
            if state.established and state.send_to is not None:
                out.append(c.id)
        return out

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            interval = self.interval() if self.m.daemon.store is not None else None
            if interval is None:
                self._next.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            wanted = set(self._eligible())
            for cid in list(self._next):
                if cid not in wanted:
                    del self._next[cid]
            for cid in wanted - set(self._next):
                self._next[cid] = now + self._rng.expovariate(1.0 / interval)
                self._heard.setdefault(cid, now)
            # New contacts are picked up at a wake-up (changed()) or within RESCAN seconds.
            due = min(self._next.values(), default=now + RESCAN)
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(due - now, RESCAN))
                continue
            for cid, at in list(self._next.items()):
                if at <= now:
                    self._next[cid] = now + self._rng.expovariate(1.0 / interval)
                    try:
                        await self._tick(cid)
                    except Exception as exc:  # never let the ticks stop
                        log.error("a cover tick failed: %s", type(exc).__name__)

    async def _tick(self, contact_id: int) -> None:
        m = self.m
        async with m.lock:
            store = m.store
            now_ms = time.time_ns() // 1_000_000
            with store.transaction():
                if slots.release_one(store, contact_id, now_ms):
                    self.sent["real"] += 1
                elif self._flush_receipts(contact_id, limit_one=True):
                    self.sent["receipts"] += 1
                elif time.monotonic() - self._heard.get(
                    contact_id, 0.0
                ) < OFFLINE_AFTER and self._send(contact_id, wire.CoverPayload()):
                    self.sent["cover"] += 1
        m._outbox_wake.set()

    def _send(self, contact_id: int, payload: Any) -> bool:
        """Encrypt ``payload`` for the contact and queue it, due now (caller holds the lock,
        inside a transaction)."""
        m = self.m
        c = m.store.get_contact(contact_id)
        blob = m.store.get_session(contact_id)
        if c is None or blob is None:
            return False
        m._enqueue(c, Session.from_bytes(blob), payload, slotted=False)
        return True

    def _flush_receipts(self, contact_id: int, *, limit_one: bool = False) -> bool:
        """Queue waiting receipts of this contact (one block, or all of them), due now."""
        sent = False
        while True:
            batch = slots.take_receipts(self.m.store, contact_id, wire.MAX_RECEIPT_IDS)
            if batch is None:
                return sent
            kind, ids = batch
            sent = self._send(contact_id, wire.ReceiptPayload(kind, tuple(ids))) or sent
            if limit_one:
                return sent

    def status(self) -> dict[str, Any]:
        interval = self.interval()
        return {
            "level": self.level(),
            "interval": interval,
            "contacts": len(self._next),
            "sent": dict(self.sent),
        }
