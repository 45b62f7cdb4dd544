"""Cover traffic (docs/protocol.md §24, docs/threat-model.md "Unlinkability by timing").

Each established contact gets one block at each tick of a Poisson process whose rate depends
only on the privacy level, never on what the user does: at a tick, the oldest block waiting for
that contact leaves (a text, a file's descriptor, a mailbox rotation); if none waits, the
receipts waiting for that contact, batched in one block; if none, a cover block (an ordinary
ratchet message whose payload the recipient drops). So the relay sees, for every mailbox, deposits
at a constant rate whether the two people talk or not: real messages take the place of cover
instead of adding to it, and receipts no longer echo messages one to one. The cost is latency:
a message waits for its contact's next tick (exponential, mean the level's interval).

A contact with several devices (docs/devices.md §5) shares its ticks with them: at a tick, its
mailbox and each answered device's mailbox get one block each, every one chosen as above from
what waits for that mailbox (receipts go to all of them; cover to those nothing real took), so
each of a person's device mailboxes sees the same rate (docs/protocol.md §24, "Several devices").

Mailboxes for contacts to come are made ahead, at random times (POOL_SIZE of them, a new one
after an exponential wait when one is taken), and each receives loop cover: the daemon deposits
into it, through a connection of its own, at the same rate as a contact would. So a new contact's
mailbox was not born with the contact, and does not start receiving blocks when it is taken.

Gap filling: when a contact goes silent (nothing opened from it for a random 1 to 2 of its
intervals: it is away), the daemon deposits loop cover into its own mailbox for that contact,
at the same rate, until something from the contact arrives. So while someone is away, the
mailboxes their contacts receive on keep receiving at the same rate, and a relay that sees that
person's connections close does not see their contacts' mailboxes go quiet (measured as the
"absence" route of bench/linkage.py). Loop blocks carry a tag only this profile can check (an
HMAC under a local key), so the daemon drops its own without trying to decrypt them.

Left out of the slots: call signaling (a call cannot wait), first contact and session renewal.
A contact silent for OFFLINE_AFTER, or OFFLINE_TICKS intervals if that is shorter (no block at
all, cover included, arrived from it), gets no cover until something arrives again, so that the
queue at the relay of someone who is away holds at most about OFFLINE_TICKS cover blocks; real
blocks and receipts still go at the ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

from aegisd.aio import cancel_and_wait
from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.netmode import is_local
from aegisd.relayurl import SETTING_URL
from aegisd.rpc import AppError
from aegisd.store import cover as slots
from aegisd.transport.relaylink import FULL_BACKOFF

from .delivery import Recipient
from .host import ServiceHost
from .mailbox import ContactState

if TYPE_CHECKING:
    from aegisd.transport.network import Network

    from .delivery import Delivery
    from .mailboxes import Mailboxes

log = logging.getLogger("aegisd.cover")

SETTING_LEVEL = "privacy.level"
#: Tests and benchmarks only (a daemon started with --test-methods): the mean interval in
#: seconds, whatever the level says, so that a run of minutes stands for days.
SETTING_TEST_INTERVAL = "privacy.cover_interval"
#: Mean seconds between two blocks to one contact, per level (None: no cover, no slots).
LEVELS: dict[str, float | None] = {"off": None, "default": 1200.0, "strong": 120.0}
#: A contact silent this long (or for OFFLINE_TICKS of its intervals, if shorter) gets no cover:
#: at most about that many cover blocks wait at the relay for someone who is away.
OFFLINE_AFTER = 6 * 3600.0
OFFLINE_TICKS = 32
#: Silence, in intervals, after which a contact's mailbox is filled with our own loop cover:
#: drawn anew, uniformly, for each silence, so the moment filling starts varies.
FILL_AFTER = (1.0, 2.0)
SETTING_LOOP_KEY = "privacy.loop_key"
LOOP_NONCE = 16
LOOP_TAG = 16
RESCAN = 30.0
POOL_SIZE = 2
E_RELAY_FULL = 1014  # messenger.E_RELAY_FULL (messenger imports this module)
#: Mean wait before making a pool mailbox, as a multiple of the level's interval (default
#: level: 30 minutes), so that creations are spread in time and not tied to contacts.
POOL_WAIT = 1.5


def default_level(relay_url: str | None) -> str:
    """A profile that never chose a level: cover on, except with a relay on this machine (the
    demo, tests, a relay of one's own next to the daemon), where there is no network to hide
    timing from and a message should not wait."""
    return "off" if relay_url is None or is_local(relay_url) else "default"


class CoverHost(ServiceHost, Protocol):
    """What cover traffic uses of the messenger."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def mailboxes(self) -> Mailboxes: ...

    def network(self) -> Network: ...



class Cover:
    def __init__(self, m: CoverHost, *, test_methods: bool = False) -> None:
        self.m = m
        self._test_methods = test_methods
        self._task: asyncio.Task[None] | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self._loops: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._pool_wake = asyncio.Event()
        self._next: dict[int, float] = {}  # contact id -> monotonic time of its next tick
        self._heard: dict[int, float] = {}  # contact id -> monotonic time something came
        self._fill_after: dict[int, float] = {}  # contact id -> silence (s) before filling
        self._fill_next: dict[int, float] = {}  # contact id -> next loop block into its mailbox
        self._loop_key: bytes | None = None
        self._rng = random.SystemRandom()
        #: Counters for tests and `privacy.get`: blocks sent at ticks, by what they carried.
        #: "slots": contact slots that deposited (a slot of a contact with N devices deposits
        #: N blocks, which may differ in kind: real to one device, cover to another).
        self.sent = {"real": 0, "receipts": 0, "cover": 0, "loop": 0, "fill": 0, "slots": 0}

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
        self._pool_task = asyncio.create_task(self._fill_pool(), name="mailbox-pool")

    async def stop(self) -> None:
        tasks, self._task, self._pool_task = (self._task, self._pool_task), None, None
        await cancel_and_wait(*tasks, *self._loops)

    def changed(self) -> None:
        """Contacts, the pool or the level changed: look again."""
        self._wake.set()
        self._pool_wake.set()

    def heard(self, contact_id: int) -> None:
        """A block from this contact opened (cover included): it is online; stop filling."""
        self._heard[contact_id] = time.monotonic()
        self._fill_after.pop(contact_id, None)
        self._fill_next.pop(contact_id, None)

    # --- loop blocks --------------------------------------------------------------------

    def _key(self) -> bytes:
        if self._loop_key is None:
            store = self.m.store
            hexkey = store.get_setting(SETTING_LOOP_KEY)
            if not isinstance(hexkey, str):
                hexkey = self._rng.randbytes(32).hex()
                store.set_setting(SETTING_LOOP_KEY, hexkey)
            self._loop_key = bytes.fromhex(hexkey)
        return self._loop_key

    def loop_block(self) -> bytes:
        """A block that looks like any ratchet block (the version byte, then bytes the relay
        cannot tell from random) and that only this profile recognises."""
        nonce = self._rng.randbytes(LOOP_NONCE)
        tag = hmac.new(self._key(), nonce, hashlib.sha256).digest()[:LOOP_TAG]
        rest = self._rng.randbytes(wire.BLOCK_SIZE - 1 - LOOP_NONCE - LOOP_TAG)
        return bytes([wire.VERSION]) + nonce + tag + rest

    def is_loop(self, block: bytes) -> bool:
        if len(block) != wire.BLOCK_SIZE:
            return False
        nonce = block[1 : 1 + LOOP_NONCE]
        tag = block[1 + LOOP_NONCE : 1 + LOOP_NONCE + LOOP_TAG]
        want = hmac.new(self._key(), nonce, hashlib.sha256).digest()[:LOOP_TAG]
        return hmac.compare_digest(tag, want)

    async def level_changed(self) -> None:
        """After privacy.set: with cover off, everything waiting leaves now."""
        if not self.active():
            async with self.m.lock:
                store = self.m.store
                with store.transaction():
                    slots.release_all(store)
                    for cid in slots.receipt_contacts(store):
                        self._flush_receipts(cid)
            self.m.delivery.wake()
        self._next.clear()
        self.changed()

    # --- the ticks --------------------------------------------------------------------------

    def _eligible(self) -> list[int]:
        """Contacts with slots (positive ids) and pool mailboxes with loop cover (their pool
        rows' ids, negated)."""
        out = [row.id for row in slots.pool_rows(self.m.store)]
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
            interval = self.interval() if self.m.ctx.store is not None else None
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
            self._schedule_fills(interval, now, wanted)
            # New contacts are picked up at a wake-up (changed()) or within RESCAN seconds.
            due = min([*self._next.values(), *self._fill_next.values()], default=now + RESCAN)
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(due - now, RESCAN))
                continue
            for cid, at in list(self._fill_next.items()):
                if at <= now:
                    self._fill_next[cid] = now + self._rng.expovariate(1.0 / interval)
                    task = asyncio.create_task(self._fill_tick(cid))
                    self._loops.add(task)
                    task.add_done_callback(self._loops.discard)
            for cid, at in list(self._next.items()):
                if at <= now:
                    self._next[cid] = now + self._rng.expovariate(1.0 / interval)
                    try:
                        await self._tick(cid)
                    except Exception as exc:  # never let the ticks stop
                        log.error("a cover tick failed: %s", type(exc).__name__)

    def _schedule_fills(self, interval: float, now: float, wanted: set[int]) -> None:
        """Start filling the mailbox of each contact silent for its drawn number of
        intervals; stop for contacts no longer there."""
        for cid in [c for c in self._fill_next if c not in wanted]:
            del self._fill_next[cid]
        for cid in (c for c in wanted if c > 0 and c not in self._fill_next):
            after = self._fill_after.setdefault(cid, self._rng.uniform(*FILL_AFTER) * interval)
            silent_since = self._heard.setdefault(cid, now)
            if now - silent_since >= after:
                self._fill_next[cid] = now + self._rng.expovariate(1.0 / interval)
            else:  # look again when it would be due
                self._fill_next.pop(cid, None)

    async def _tick(self, contact_id: int) -> None:
        if contact_id < 0:  # network I/O: not in the way of the other ticks
            task = asyncio.create_task(self._loop_tick(contact_id))
            self._loops.add(task)
            task.add_done_callback(self._loops.discard)
            return
        m = self.m
        async with m.lock:
            store = m.store
            now_ms = time.time_ns() // 1_000_000
            with store.transaction():
                self._slot(contact_id, now_ms)
        m.delivery.wake()

    def _slot(self, contact_id: int, now_ms: int) -> None:
        """One slot of a contact: exactly one block into its mailbox and into each of its
        other devices' (docs/protocol.md §24, "Several devices"): the oldest real block
        waiting for that mailbox, else the waiting receipts (to every device: those whose
        mailbox a real block took get them at their next slot), else cover."""
        store = self.m.store
        c = store.get_contact(contact_id)
        blob = store.get_session(contact_id)
        if c is None or blob is None:
            return
        dests = self.m.delivery.slot_destinations(c)
        free = {d for d in dests if not slots.release_one(store, contact_id, now_ms, d)}
        slots.release_stray(store, contact_id, now_ms, dests)
        if len(free) < len(dests):
            self.sent["real"] += 1
            self.sent["slots"] += 1
        if not free:
            return
        session = Session.from_bytes(blob)
        batch = slots.take_receipts(store, contact_id, wire.MAX_RECEIPT_IDS)
        if batch is not None:
            payload = wire.ReceiptPayload(batch[0], tuple(batch[1]))
            self.m.delivery.enqueue_slot(c, session, payload, now_to=free, later_too=True)
            self.sent["receipts"] += 1
            self.sent["slots"] += len(free) == len(dests)
        elif not self._away(contact_id):
            self.m.delivery.enqueue_slot(c, session, wire.CoverPayload(), now_to=free,
                                         later_too=False)  # fmt: skip
            self.sent["cover"] += 1
            self.sent["slots"] += len(free) == len(dests)

    async def _loop_tick(self, pool_row_id: int) -> None:
        """Loop cover into one of our own pool mailboxes (dropped when it comes back)."""
        row = next((r for r in slots.pool_rows(self.m.store) if r.id == pool_row_id), None)
        if row is not None:
            await self._loop_into(row.descriptor)

    async def _fill_tick(self, contact_id: int) -> None:
        """Loop cover into our mailbox for a contact that is away (gap filling)."""
        row = self.m.store.mailbox_for_contact(contact_id)
        if row is not None:
            await self._loop_into(row.descriptor)
            self.sent["fill"] = self.sent.get("fill", 0) + 1

    async def _loop_into(self, descriptor: bytes) -> None:
        from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable, with_relay
        from relay.client import RelayError

        from .mailbox import OwnedMailbox

        m = self.m
        mb = OwnedMailbox.from_bytes(descriptor)
        block = self.loop_block()
        try:
            client, own = await with_relay(mb.relay_url, m.mailboxes.link, m.network())
            try:
                await client.deposit(mb.deposit_id, block, mb.token or None)
            finally:
                if own:
                    await client.close()
        except (RelayUnavailable, RelayError, *UNAVAILABLE):
            return  # a loop block that did not go is not missed: the next tick sends one
        self.sent["loop"] = self.sent.get("loop", 0) + 1

    async def _fill_pool(self) -> None:
        """Keep POOL_SIZE mailboxes made ahead, each after a random wait (cover on only)."""
        m = self.m
        while True:
            interval = self.interval() if m.ctx.store is not None else None
            if interval is None or len(slots.pool_rows(m.store)) >= POOL_SIZE:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pool_wake.wait(), RESCAN)
                self._pool_wake.clear()
                continue
            # Woken (the level or the pool changed): draw again. The wait is exponential, so
            # drawing again after any interruption leaves the creation times a Poisson process.
            self._pool_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._pool_wake.wait(), self._rng.expovariate(1.0 / (POOL_WAIT * interval))
                )
                continue
            if not m.ctx.relay_connected:
                continue
            try:
                # The proof outside the lock; the lock to store it.
                await m.mailboxes.add_pool_mailbox()
            except Exception as exc:  # relay away (AppError) or worse: try at the next wait
                log.info("no pool mailbox this time: %s", type(exc).__name__)
                if isinstance(exc, AppError) and exc.code == E_RELAY_FULL:
                    # Full: each try solves the CREATE's proof again (seconds of CPU), and
                    # a full relay rarely has room minutes later: wait long before the next.
                    await asyncio.sleep(FULL_BACKOFF)
                continue
            self.changed()

    def _away(self, contact_id: int) -> bool:
        interval = self.interval() or 0.0
        silent = time.monotonic() - self._heard.get(contact_id, 0.0)
        return silent > min(OFFLINE_AFTER, OFFLINE_TICKS * interval)

    def _send(self, contact_id: int, payload: Any) -> bool:
        """Encrypt ``payload`` for the contact and queue it, due now (caller holds the lock,
        inside a transaction)."""
        m = self.m
        c = m.store.get_contact(contact_id)
        blob = m.store.get_session(contact_id)
        if c is None or blob is None:
            return False
        m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload, slotted=False)
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
            "contacts": sum(1 for k in self._next if k > 0),
            "pool": len(slots.pool_rows(self.m.store)),
            "filling": len(self._fill_next),
            "sent": dict(self.sent),
        }
