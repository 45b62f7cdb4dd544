"""Events: persisted with a sequence number, pushed to subscribers, replayed after reconnect.

Every event is first appended to the store's ``events`` table (AUTOINCREMENT: sequence
numbers only grow) and only then pushed. Each subscription is one task that reads the table
from its own cursor and writes to its own connection, so

* a client that reconnects with the last sequence number it saw (``since``) gets exactly
  what it missed, in order, then live events, with no gap and no duplicate;
* a slow or stalled client only stalls its own task: ``emit`` never waits for anyone, and
  what the client has not read yet waits in the database, not in memory;
* events are never lost because no client was listening.

A few events are *live* (``emit_live``): what must not reach the disk (``contact.typing``:
when a contact typed) goes only to the subscriptions open at that moment, straight into their
queues, never into the table: no sequence number of its own, not in ``events.list``, not
replayed after a reconnect, lost for a client not connected (docs/api.md, "Live events").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..store import Event, Store

log = logging.getLogger("aegisd.events")

TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
PATTERN_RE = re.compile(r"^(\*|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?)$")
PAGE = 256
#: On lock, each subscription takes up to this many undelivered events into memory so that
#: "daemon.locked" reaches it while the store is closed; the rest waits for the next unlock.
FLUSH_ON_LOCK = 1000
#: A subscription's queue takes a live event only while it holds fewer than this many: a
#: client that does not read loses live events (worthless late), and the daemon's memory
#: stays bounded.
LIVE_QUEUE = 64

Sender = Callable[[dict[str, Any]], Awaitable[None]]


class EventFilter:
    """Type patterns: an exact type ("daemon.locked"), a prefix ("message.*"), or "*"."""

    def __init__(self, patterns: list[str] | None) -> None:
        self.patterns = list(patterns) if patterns else ["*"]
        for p in self.patterns:
            if not PATTERN_RE.match(p):
                raise ValueError(p)

    def matches(self, type: str) -> bool:
        for p in self.patterns:
            if p == "*" or p == type or (p.endswith(".*") and type.startswith(p[:-1])):
                return True
        return False


@dataclass(frozen=True)
class LiveEvent:
    """An event for the live subscriptions only (``EventBus.emit_live``): never stored."""

    type: str
    created_at: int
    data: dict[str, Any]


@dataclass(eq=False)
class Subscription:
    id: str
    owner: object
    send: Sender
    filter: EventFilter
    cursor: int
    #: The last stored event this subscription was sent or passed over (filtered out) in
    #: order: ``cursor`` can run ahead of it (detach() queues stored events behind live
    #: ones), and a live event carries this, never a number ahead of what was sent.
    sent: int = 0
    pending: collections.deque[Event | LiveEvent] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class EventBus:
    def __init__(self) -> None:
        self._store: Store | None = None
        self._subs: dict[str, Subscription] = {}
        self._counter = 0

    # -- the store comes and goes with unlock and lock -----------------------------------

    def attach(self, store: Store) -> None:
        self._store = store
        self._wake_all()

    def detach(self) -> None:
        """Before the store closes: hand each subscriber what it has not been sent yet (up to
        FLUSH_ON_LOCK events), so the last events before a lock reach it promptly."""
        store = self._store
        if store is not None and not store.closed:
            for sub in self._subs.values():
                while len(sub.pending) < FLUSH_ON_LOCK:
                    page = store.events_after(sub.cursor, limit=PAGE)
                    if not page:
                        break
                    for ev in page:
                        sub.cursor = ev.seq
                        if sub.filter.matches(ev.type):
                            sub.pending.append(ev)
        self._store = None
        self._wake_all()

    def _wake_all(self) -> None:
        for sub in self._subs.values():
            sub.wake.set()

    # -- producing ----------------------------------------------------------------------

    def emit(self, type: str, data: dict[str, Any] | None = None) -> Event:
        """Persist an event and wake the subscribers. Synchronous; never waits for a client.

        Inside ``store.transaction()`` the event commits (or not) with the rest.
        ``data`` must hold no key or passphrase. Raises RuntimeError while locked.
        """
        if not TYPE_RE.match(type):
            raise ValueError("event types are dotted lowercase names, like message.received")
        if self._store is None:
            raise RuntimeError("events need the store: the profile is locked")
        ev = self._store.append_event(type, dict(data or {}))
        self._wake_all()
        return ev

    def emit_live(self, type: str, data: dict[str, Any] | None = None) -> None:
        """Hand an event to the subscriptions open now, whose filter takes it; store nothing.

        Each gets it ahead of stored events it has not been sent yet (it is about now). A
        subscription with LIVE_QUEUE events queued already does not get it. Raises
        RuntimeError while locked, as ``emit`` does.
        """
        if not TYPE_RE.match(type):
            raise ValueError("event types are dotted lowercase names, like message.received")
        if self._store is None:
            raise RuntimeError("events need the store: the profile is locked")
        ev = LiveEvent(type, int(time.time() * 1000), dict(data or {}))
        for sub in self._subs.values():
            if sub.filter.matches(type) and len(sub.pending) < LIVE_QUEUE:
                sub.pending.append(ev)
                sub.wake.set()

    # -- consuming ----------------------------------------------------------------------

    @property
    def store(self) -> Store | None:
        return self._store

    def subscribe(
        self, owner: object, send: Sender, patterns: list[str] | None, since: int | None
    ) -> Subscription:
        """Start a subscription from ``since`` (exclusive), or from now when None.

        Delivery begins once ``sub.ready`` is set (after the subscribe response is written).
        """
        if self._store is None:
            raise RuntimeError("locked")
        cursor = self._store.last_event_seq() if since is None else since
        self._counter += 1
        sub = Subscription(str(self._counter), owner, send, EventFilter(patterns), cursor,
                           sent=cursor)  # fmt: skip
        self._subs[sub.id] = sub
        sub.task = asyncio.get_running_loop().create_task(self._pump(sub))
        return sub

    def unsubscribe(self, owner: object, sub_id: str) -> bool:
        sub = self._subs.get(sub_id)
        if sub is None or sub.owner is not owner:
            return False
        self._cancel(sub)
        return True

    def drop_owner(self, owner: object) -> None:
        for sub in [s for s in self._subs.values() if s.owner is owner]:
            self._cancel(sub)

    def count(self, owner: object | None = None) -> int:
        return sum(1 for s in self._subs.values() if owner is None or s.owner is owner)

    def _cancel(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()

    async def close(self) -> None:
        tasks = [s.task for s in self._subs.values() if s.task is not None]
        for s in list(self._subs.values()):
            self._cancel(s)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _pump(self, sub: Subscription) -> None:
        try:
            await sub.ready.wait()
            while True:
                if sub.pending:
                    await self._deliver(sub, sub.pending.popleft())
                    continue
                store = self._store
                if store is not None and not store.closed:
                    page = store.events_after(sub.cursor, limit=PAGE)
                    if page:
                        for ev in page:
                            if self._store is not store:  # locked meanwhile: detach() took over
                                break
                            sub.cursor = ev.seq
                            if sub.filter.matches(ev.type):
                                await self._deliver(sub, ev)
                            else:
                                sub.sent = ev.seq  # nothing queued behind: passed in order
                        continue
                # Nothing to send. No await between the check above and clear(): no lost wake.
                sub.wake.clear()
                await sub.wake.wait()
        except (ConnectionError, OSError):
            self._subs.pop(sub.id, None)  # the client went away
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. a database I/O error: end this subscription only
            log.error("event delivery failed with %s", type(exc).__name__)
            self._subs.pop(sub.id, None)

    @staticmethod
    async def _deliver(sub: Subscription, ev: Event | LiveEvent) -> None:
        if isinstance(ev, LiveEvent):
            # No number of its own: it carries the last stored seq sent (it may repeat, and
            # is no place to resume from); "live" tells the client not to count it.
            body = {"seq": sub.sent, "type": ev.type, "time_ms": ev.created_at,
                    "data": ev.data, "live": True}  # fmt: skip
        else:
            body = ev.to_json()
            sub.sent = ev.seq
        await sub.send(
            {
                "jsonrpc": "2.0",
                "method": "event",
                "params": {"subscription": sub.id, **body},
            }
        )
