"""The relay: an aiohttp application serving the frames of relay/wire.py over one WebSocket.

Here the process-wide state (Relay: storage, the mailbox cache, the connections, delivery,
maintenance and expiry), the HTTP endpoints and create_app. One client's connection is
relay/connection.py, the requests' handlers relay/handlers.py, a mailbox's in-memory view and
the other small state classes relay/state.py.

Nothing here logs or prints an address, a port, an ID, a time or a count. Log lines are fixed
strings; exceptions are reduced to their type name; clients only ever see error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nacl.exceptions import CryptoError

from . import memory, wire
from .config import Config
from .connection import _CLOSE_GOING_AWAY, Connection
from .gate import Gate
from .state import MailboxState, Subscription
from .storage import WRITER_OWNER, SQLiteStorage, Storage, StorageError

log = logging.getLogger("aegis.relay")

RELAY_KEY: web.AppKey[Relay] = web.AppKey("relay")


# Seconds the wall clock may gain on the monotonic clock between two sweeps before it counts as
# a jump (NTP slewing gains at most 0.5 ms a second).
_CLOCK_SLACK = 60.0
# Queued blocks one expiry call deletes at most (with secure_delete, each is a 16 KiB write):
# the writer is shared, and one sweep must not hold it long (review of issue 15, item 6).
_EXPIRY_BLOCKS = 1024


def _make_storage(cfg: Config, clock: Callable[[], float]) -> Storage:
    if cfg.store.startswith(("postgresql://", "postgres://")):
        from .storage_pg import PostgresStorage  # asyncpg only where it is used

        return PostgresStorage(cfg.store, queue_limit=cfg.queue_limit,
                               max_mailboxes=cfg.max_mailboxes,
                               rewrite_rows=cfg.pg_rewrite_rows,
                               notify_batch_ms=cfg.pg_notify_batch_ms,
                               checkpoint_interval=cfg.checkpoint_interval)
    if cfg.store:
        raise ValueError("--store: a postgresql:// URL or nothing")
    return SQLiteStorage(
        cfg.data_dir, cfg.max_batch, clock, cfg.mailbox_use_granularity,
        reserve_bytes=cfg.disk_reserve, max_db_bytes=cfg.max_db_bytes,
        max_batch_bytes=cfg.max_batch_bytes, checkpoint_bytes=cfg.checkpoint_bytes)


class Relay:
    """Process-wide state: configuration, storage, the mailbox cache, connections."""

    def __init__(self, cfg: Config, storage: Storage | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.monotonic = monotonic  # injected with `clock` by the tests of a clock jump
        # Mailbox expiry waits until this (monotonic) time: a grace period after the start and
        # after a forward jump of the wall clock (sweep).
        self.expiry_from = 0.0
        self._clocks = (0.0, 0.0)  # (wall, monotonic) at the last sweep
        self.storage: Storage = storage or _make_storage(cfg, clock)
        self.gate = Gate(cfg)
        self.clock = clock
        self.by_okey: dict[bytes, MailboxState] = {}
        self.by_dkey: dict[bytes, MailboxState] = {}
        self.by_id: dict[int, MailboxState] = {}
        self._loading: dict[bytes, asyncio.Future[MailboxState | None]] = {}
        self.cache_max = 100_000
        self.mailboxes = 0
        # What is stored, counted in blocks, in memory (never a fresh count from storage while
        # writes are in flight: they would be forgotten). blob_reserved: blob quotas granted
        # and not yet used, held against the blob area and the budget until their connection
        # ends (so uploads in flight count).
        self.queued_blocks = 0
        self.blob_blocks = 0
        self.blob_reserved = 0
        # Blob puts begun and not yet settled, and how many have settled (any outcome): a
        # recount on a shared store tells from them which puts its read may have missed.
        self.blob_writing = 0
        self.blob_settled = 0
        self.budget_blocks = 0
        # Live nodes sharing the store (relay_nodes): each applies 1/nodes of the per-mailbox
        # rates (MailboxState.share). One for SQLite.
        self.nodes = 1
        self.started = 0.0
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        # A connection that held much output ended: give the memory back (at most every 5 s).
        self.trim_wanted = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.storage.open()
        self.mailboxes = await self.storage.mailbox_count()
        self.blob_blocks = await self.storage.blob_count()
        self.queued_blocks = await self.storage.queued_count()
        self.started = self.clock()
        self.expiry_from = self.monotonic() + self.expiry_grace()
        self._clocks = (self.started, self.monotonic())
        self.storage.watch(self.remote)
        if self.storage.shared:
            await self.heartbeat(announce=True)
        budget = self.cfg.storage_budget
        if budget <= 0 and self.storage.shared:
            # The database's disk is not this node's to measure: every mailbox full (set
            # --storage-budget); the database's own full disk still refuses (StorageFull).
            budget = self.cfg.max_mailboxes * self.cfg.queue_limit * wire.BLOCK_SIZE
        elif budget <= 0:
            # Half of what the relay may use on its disk: the free space plus what its files
            # hold already (a disk shared with others is not the relay's to fill).
            st = os.statvfs(self.cfg.data_dir)
            held = sum(e.stat().st_size for e in os.scandir(self.cfg.data_dir) if e.is_file())
            budget = (st.f_bavail * st.f_frsize + held) // 2
        self.budget_blocks = budget // wire.BLOCK_SIZE
        self.spawn(self._maintenance())
        self.spawn(self._reaper())

    async def stop(self) -> None:
        self.closing = True
        for conn in list(self.connections):
            await conn.close(_CLOSE_GOING_AWAY)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self.storage.shared:
            with contextlib.suppress(StorageError):
                await self.storage.retire()
        await self.storage.close()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _maintenance(self) -> None:
        next_sweep = next_ckpt = next_trim = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                # While full, check every second whether space came back (the owners' ACKs
                # and deletes free it); recovering needs no operator.
                if self.storage.full and await self.storage.recover():
                    log.warning("storage has room again")
                if self.trim_wanted and now >= next_trim:
                    self.trim_wanted = False
                    next_trim = now + 5.0
                    memory.give_back()
                missed = await self.storage.check_listener()
                if missed is not None:
                    # Notifications between the lost listener and the new one, or those a dead
                    # node never sent, were missed: every subscribed queue is read again.
                    log.warning("storage notifications resumed" if missed == "resumed"
                                else "a relay node went away: queues read again")
                    await self.reread_all()
                if now >= next_sweep:
                    if self.storage.shared:
                        await self.recount()
                    await self.sweep()
                    next_sweep = now + self.cfg.sweep_interval
                if now >= next_ckpt:
                    await self.storage.checkpoint()
                    next_ckpt = now + self.cfg.checkpoint_interval
            except StorageError as exc:
                log.warning("maintenance failed: %s", exc)
            # At least once a second, to notice a full disk (the writer sets the flag).
            await asyncio.sleep(max(0.05, min(1.0, min(next_sweep, next_ckpt) - time.monotonic())))

    async def _reaper(self) -> None:
        """Close connections that did not upgrade or say HELLO in time, idle ones (without
        subscription: no frame for idle_timeout; with: not even a ping for
        subscribed_idle_timeout), and those that stopped reading (above conn_buffer for
        stall_timeout).

        One timer for all connections, rather than a timeout on every receive."""
        cfg = self.cfg
        period = min(1.0, max(0.02, min(cfg.handshake_timeout, cfg.idle_timeout,
                                        cfg.subscribed_idle_timeout, cfg.stall_timeout) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            self.gate.sweep(now)
            for conn in list(self.connections):
                conn.kick()
                if conn.quota_expired(now):
                    conn.release_quota()
                if conn.stalled(now):
                    # It does not read: a close frame would wait behind what it does not read.
                    conn.abort()
                    continue
                if not conn.hello:
                    late = now - conn.last_frame > cfg.handshake_timeout
                elif conn.subs:
                    late = now - conn.last_seen > cfg.subscribed_idle_timeout
                else:
                    late = not conn.busy() and now - conn.last_frame > cfg.idle_timeout
                if late:
                    conn.error(0, wire.E_TIMEOUT)

    async def sweep(self) -> None:
        """Delete expired blocks and blobs, and mailboxes nobody used for mailbox_ttl."""
        now = int(self.clock())
        counts, blobs = await self.storage.expire(now)
        for mailbox, n in counts.items():
            mb = self.by_id.get(mailbox)
            if mb is not None:
                mb.queued = max(0, mb.queued - n)
        self.queued_blocks = max(0, self.queued_blocks - sum(counts.values()))
        self.blob_blocks = max(0, self.blob_blocks - blobs)
        # A subscription is a use: a daemon that stays connected for months keeps its mailboxes.
        stale = [sub.mb for conn in self.connections for sub in conn.subs.values()
                 if sub.mb.used < self.use_period()]
        if stale:
            await self.touch(stale)
        # The clock ran while the relay was stopped, and its clients could not use it: give
        # them a day (or one use period, if shorter) to come back before anything expires.
        # The same after the wall clock jumped forward while the relay ran (an NTP step, an
        # operator): it gained more than the monotonic clock, and every unsubscribed mailbox
        # would look unused at once (review of issue 15, item 9).
        mono = self.monotonic()
        last_wall, last_mono = self._clocks
        self._clocks = (self.clock(), mono)
        if self._clocks[0] - last_wall > mono - last_mono + _CLOCK_SLACK:
            log.warning("the wall clock jumped forward: mailbox expiry waits %d s",
                        self.expiry_grace())
            self.expiry_from = mono + self.expiry_grace()
        if mono < self.expiry_from:
            return
        while True:
            ids, removed, more = await self.storage.expire_mailboxes(
                now - self.cfg.mailbox_ttl + 1, _EXPIRY_BLOCKS)
            self.queued_blocks = max(0, self.queued_blocks - removed)
            self.mailboxes = max(0, self.mailboxes - len(ids))
            for mailbox in ids:
                mb = self.by_id.get(mailbox)
                if mb is not None:
                    mb.deleted = True
                    if mb.sub is not None:
                        self.end_subscription(mb.sub, notify=True)
                    self._uncache(mb)
            if not more:
                break

    def expiry_grace(self) -> int:
        return min(86400, self.cfg.mailbox_use_granularity)

    def use_period(self) -> int:
        """Now, rounded down to mailbox_use_granularity: what a mailbox's last use is set to."""
        g = max(1, self.cfg.mailbox_use_granularity)
        return int(self.clock()) // g * g

    async def touch(self, mbs: list[MailboxState]) -> None:
        """Record a use of these mailboxes: one write per mailbox and period at most."""
        period = self.use_period()
        for mb in mbs:
            mb.used = period
        await self.storage.touch_mailboxes([mb.id for mb in mbs], period)

    def unqueued(self, mb: MailboxState, n: int) -> None:
        """`n` queued blocks of `mb` are gone (acknowledged, dropped)."""
        mb.queued = max(0, mb.queued - n)
        self.queued_blocks = max(0, self.queued_blocks - n)

    def full(self, blocks: int = 1) -> bool:
        """Would storing `blocks` more pass the relay-wide storage budget?"""
        return self.budget_used() + blocks > self.budget_blocks

    def budget_used(self) -> int:
        return self.queued_blocks + self.blob_blocks + self.blob_reserved

    def crowded(self) -> bool:
        """Is more than crowded_fraction of the storage budget in use? Then only short queues
        take deposits (_deposit_auth): a budget filled through a few long queues would refuse
        everyone's deposits for as long as their owner keeps them (one subscription a month)."""
        return self.budget_used() >= self.cfg.crowded_fraction * self.budget_blocks

    def blob_expiry(self) -> int:
        g = max(1, self.cfg.expiry_granularity)
        return int(math.ceil((self.clock() + self.cfg.blob_ttl) / g) * g)

    def expiry(self) -> int:
        """A coarse expiry: now + ttl rounded up to the granularity (hides arrival times)."""
        g = max(1, self.cfg.expiry_granularity)
        return int(math.ceil((self.clock() + self.cfg.message_ttl) / g) * g)

    # --- other nodes (a shared store) ---------------------------------------------------------

    async def recount(self) -> None:
        """Several nodes: the relay-wide counts from the store (what this node counts misses
        the others' writes and acknowledgements), plus this node's deposits in flight, which
        the count may not hold yet (those of other nodes it misses until the next sweep). The
        heartbeat first: the share it sets and the counts are of the same moment."""
        await self.heartbeat()
        mailboxes = await self.storage.mailbox_count()
        queued = await self.storage.queued_count()
        writing = sum(mb.writing for mb in self.by_id.values())
        self.mailboxes, self.queued_blocks = mailboxes, queued + writing
        self.blob_blocks = await self._blob_recount()

    async def _blob_recount(self) -> int:
        """The stored blob blocks plus this node's puts not yet settled. A put that settles
        while the count is read may or may not be in it: read again (at most three times),
        then count those as stored too, so the area is never over-promised (an over-count
        lasts one sweep; an under-count would grant a quota past the area)."""
        for _ in range(3):
            settled = self.blob_settled
            blobs = await self.storage.blob_count()
            if self.blob_settled == settled:
                return blobs + self.blob_writing
        return blobs + self.blob_writing + (self.blob_settled - settled)

    async def heartbeat(self, announce: bool = False) -> None:
        """Say this node is live (for three sweep intervals) and take its share of the
        per-mailbox rates among the live nodes: a client spreading one mailbox's deposits over
        N nodes gets the configured rate in all, not N times it. A node killed without
        retiring counts until its row expires, so meanwhile the others admit less, not more."""
        ttl = max(3, math.ceil(3 * self.cfg.sweep_interval))
        try:
            nodes = max(1, await self.storage.heartbeat(ttl, announce))
        except StorageError as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        if nodes != self.nodes:
            self.nodes = nodes
            log.info("relay nodes sharing the store changed")
            now = time.monotonic()  # the buckets' clock
            for mb in self.by_id.values():
                mb.share(self.cfg, nodes, now)

    def remote(self, kind: str, mailbox: int) -> None:
        """Another node committed a deposit (`d`), changed or deleted a mailbox (`m`), or took
        its subscription (`s`); or a node started or stopped (`n`)."""
        if kind == "n":
            self.spawn(self.heartbeat())
            return
        mb = self.by_id.get(mailbox)
        if mb is None:
            return
        if kind == "d":
            # (Not in queued_blocks: the other nodes' writes are counted at each sweep.)
            mb.queued += 1
            sub = mb.sub
            if sub is not None and sub.active:
                sub.gen += 1
                sub.backlog = True
                if sub.conn.congested():
                    sub.conn.push_deferred = True
                else:
                    self.spawn(self.pump(sub))  # a pump under way reads again (sub.again)
        elif kind == "s":
            if mb.sub is not None:
                self.end_subscription(mb.sub, notify=True)
        elif kind == "m":
            self.spawn(self._reload(mb))

    async def _reload(self, mb: MailboxState) -> None:
        try:
            row = await self.storage.load_mailbox(okey=mb.okey)
        except StorageError:
            if mb.sub is None and not mb.writing:
                self._uncache(mb)  # loaded afresh at its next use
            return
        if row is None:
            mb.deleted = True
            if mb.sub is not None:
                self.end_subscription(mb.sub, notify=True)
            self._uncache(mb)
            return
        mb.tokens = row.tokens
        mb.queued = row.queued + mb.writing

    async def reread_all(self) -> None:
        """Announcements may have been missed: read again the subscribed queues that hold
        blocks (a node's restart would otherwise make every node read every queue)."""
        subs = [sub for conn in list(self.connections) for sub in list(conn.subs.values())]
        try:
            held = await self.storage.holding(list({sub.mb.id for sub in subs}))
        except StorageError:
            held = {sub.mb.id for sub in subs}
        for sub in subs:
            if sub.mb.id in held and sub.active:
                sub.backlog = True
                if not sub.pumping:
                    self.spawn(self.pump(sub))

    # --- the mailbox cache -----------------------------------------------------------------------

    async def mailbox(self, *, okey: bytes | None = None,
                      dkey: bytes | None = None) -> MailboxState | None:
        key = okey if okey is not None else dkey
        assert key is not None
        table = self.by_okey if okey is not None else self.by_dkey
        mb = table.get(key)
        if mb is not None:
            return mb
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[MailboxState | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            row = await self.storage.load_mailbox(okey=okey, dkey=dkey)
            mb = None
            if row is not None:
                mb = self.by_id.get(row.id)
                if mb is None:
                    mb = MailboxState(row, self.cfg, time.monotonic(), self.nodes)
                    self._cache(mb)
            fut.set_result(mb)
            return mb
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._loading[key]

    def _cache(self, mb: MailboxState) -> None:
        if len(self.by_id) >= self.cache_max:
            for old in list(itertools.islice(self.by_id.values(), 64)):
                # Never one with a deposit's write in flight: a SUBSCRIBE would load a second
                # object for the mailbox, and the write's push would miss it (and its count).
                if old.sub is None and not old.writing:
                    self._uncache(old)
                else:  # held: to the back, or 64 held ones in front would stop all eviction
                    self.by_id[old.id] = self.by_id.pop(old.id)
        self.by_okey[mb.okey] = mb
        self.by_dkey[mb.dkey] = mb
        self.by_id[mb.id] = mb

    def _uncache(self, mb: MailboxState) -> None:
        self.by_okey.pop(mb.okey, None)
        self.by_dkey.pop(mb.dkey, None)
        self.by_id.pop(mb.id, None)

    # --- delivery --------------------------------------------------------------------------------

    def stored(self, mb: MailboxState, rowid: int, block: bytes) -> None:
        """A block was durably queued: push it at once to a subscriber with room in its window.

        Without a backlog every older block of the mailbox is already out on this connection,
        so the new one is next in the mailbox's order. Handles are random row keys (storage),
        so a block already out is recognised by membership in `out_rows`, never by comparing
        handles."""
        sub = mb.sub
        if sub is None or not sub.active:
            return
        sub.gen += 1
        conn = sub.conn
        if (not sub.backlog and not sub.pumping and conn.outstanding(mb.id) < self.cfg.window
                and not conn.congested()):
            conn.push(sub.owner_id, mb, rowid, block, 0)
        else:
            sub.backlog = True
            if conn.congested():
                conn.push_deferred = True  # resumed when its output drains
            elif not sub.pumping:
                self.spawn(self.pump(sub))

    async def pump(self, sub: Subscription) -> None:
        """Send queued blocks to a subscriber until its window is full or the queue is drained."""
        if sub.pumping:
            sub.again = True
            return
        sub.pumping = True
        conn, mb = sub.conn, sub.mb
        # The subscriber's turn at the writer, whoever's deposit woke the pump.
        WRITER_OWNER.set(conn)
        try:
            while sub.active and (sub.backlog or sub.again):
                sub.again = False
                # One pump of a connection reads at a time, and no more than fits under the
                # bound: the blocks read are in memory until pushed (issue 15, item 5).
                async with conn.pump_lock:
                    if conn.congested():
                        conn.push_deferred = True
                        break
                    out = conn.out_rows.get(mb.id, set())
                    room = self.cfg.window - len(out)
                    if room <= 0:
                        break
                    gen = sub.gen
                    limit = min(room, conn.room_blocks())
                    # The oldest blocks not already out on this connection, in the mailbox's
                    # order.
                    rows = await self.storage.queued(mb.id, out, limit)
                    if not sub.active:
                        break
                    out = conn.out_rows.get(mb.id, set())
                    fresh = [r for r in rows if r[0] not in out]
                    room = self.cfg.window - len(out)
                    stopped = False
                    for rowid, sealed in fresh[:room]:
                        # Checked at every block: many subscriptions pumping at once must not
                        # each add a window's worth beyond the bound.
                        if conn.congested():
                            conn.push_deferred = stopped = True
                            break
                        conn.push_stored(sub.owner_id, mb, rowid, sealed, 0)
                    if stopped:
                        break
                    if len(rows) < limit and len(fresh) <= room and sub.gen == gen:
                        sub.backlog = False
        except StorageError as exc:
            log.warning("delivery failed: %s", exc)
        finally:
            sub.pumping = False

    def end_subscription(self, sub: Subscription, notify: bool) -> None:
        """End a subscription. With `notify` (it moved to another connection, or the mailbox
        was deleted from one) the connection gets END and loses its deliveries of the mailbox
        not yet acknowledged: their msg_ids become unknown there, and the blocks are delivered
        again, with new ids and new seals, to the connection that holds the mailbox now
        (§4.3). Without it (UNSUBSCRIBE, the connection's own DELETE, its end) they stay."""
        sub.active = False
        if sub.mb.sub is sub:
            sub.mb.sub = None
        sub.conn.subs.pop(sub.mb.id, None)
        if notify:
            sub.conn.withdraw(sub.mb)
            sub.conn.send(wire.encode(wire.END, 0, sub.owner_id))

    def undeliverable(self, mb: MailboxState, rowid: int) -> None:
        """A stored block that no longer opens (altered on disk): drop it rather than let it
        block the mailbox's queue forever."""
        log.warning("delivery failed: %s", CryptoError.__name__)

        def removed(fut: asyncio.Future[int]) -> None:
            # By what was removed: a pump and a FETCH elsewhere may meet the same bad row.
            if not fut.cancelled() and fut.exception() is None:
                self.unqueued(mb, fut.result())

        self.storage.remove(mb.id, [rowid]).add_done_callback(removed)


# --- HTTP endpoints ------------------------------------------------------------------------------


def _busy() -> web.Response:
    resp = web.Response(status=503, text="busy\n")
    resp.force_close()
    return resp


async def ws_endpoint(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY_KEY]
    # Admitted or refused by the gate at the TCP accept (relay/gate.py); without the gate
    # (an embedding that does not install it) the plain count.
    entry = relay.gate.entry(request.transport)
    if relay.closing or (entry.refused if entry is not None
                         else len(relay.connections) >= relay.cfg.max_connections):
        return _busy()
    ws = web.WebSocketResponse(max_msg_size=relay.cfg.max_frame, compress=False,
                               heartbeat=relay.cfg.ping_interval, autoping=False)
    if not ws.can_prepare(request).ok:
        return web.Response(status=400, text="WebSocket endpoint\n")
    await ws.prepare(request)
    conn = Connection(relay, ws, request.transport)
    if entry is not None:
        relay.gate.upgraded(entry, conn)
    relay.connections.add(conn)
    try:
        await conn.run()
    finally:
        relay.connections.discard(conn)
    return ws


async def health(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    if relay.closing:
        return web.json_response({"status": "stopping"}, status=503)
    resp = web.json_response({"status": "ok", "protocol": wire.VERSION})
    entry = relay.gate.entry(request.transport)
    if entry is not None and entry.refused:
        resp.force_close()  # answered, but nothing more on a refused connection
    return resp


def create_app(cfg: Config, storage: Storage | None = None,
               clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    app = web.Application(client_max_size=1024)
    relay = Relay(cfg, storage, clock, monotonic)
    app[RELAY_KEY] = relay
    app.router.add_get("/v1/ws", ws_endpoint)
    app.router.add_get("/health", health)

    async def on_startup(_: web.Application) -> None:
        await relay.start()

    async def on_shutdown(_: web.Application) -> None:
        relay.closing = True
        relay.gate.closing = True
        relay.gate.close_unhanded()
        for conn in list(relay.connections):
            await conn.close(_CLOSE_GOING_AWAY)

    async def on_cleanup(_: web.Application) -> None:
        await relay.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
