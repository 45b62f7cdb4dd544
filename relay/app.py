"""The relay: an aiohttp application serving the frames of relay/wire.py over one WebSocket.

Nothing here logs or prints an address, a port, an ID, a time or a count. Log lines are fixed
strings; exceptions are reduced to their type name; clients only ever see error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import logging
import math
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web
from nacl.bindings import crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import VerifyKey

from . import memory, wire
from . import pow as pow_
from .config import Config
from .gate import Gate
from .storage import (
    WRITER_OWNER,
    MailboxRow,
    SQLiteStorage,
    Storage,
    StorageError,
    StorageFull,
    blob_key,
    deposit_key,
    owner_key,
)

log = logging.getLogger("aegis.relay")

RELAY_KEY: web.AppKey[Relay] = web.AppKey("relay")
_DUMMY_VERIFY = VerifyKey(bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"))
_DUMMY_HASH = bytes(32)
_CLOSE_PROTOCOL = 1002
_CLOSE_POLICY = 1008
_CLOSE_GOING_AWAY = 1001
# Bytes waiting for a client that does not read (Config.conn_buffer, here "high"): above it the
# relay stops reading its requests and stops pushing to it from storage; it resumes below a
# quarter of it. (One subscription's window, 32 blocks, stays below the default 2 MiB: a
# single-mailbox subscriber is never throttled.)


class Denied(wire.FrameError):
    def __init__(self) -> None:
        super().__init__(wire.E_DENIED)


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def empty(self, now: float) -> bool:
        """Whether `take` would refuse now (takes nothing)."""
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate) < 1.0


def _ct_member(candidate: bytes, hashes: tuple[bytes, ...]) -> bool:
    """Constant-time membership: compares against every entry, whatever matches."""
    found = False
    for h in hashes:
        found |= hmac.compare_digest(candidate, h)
    if not hashes:
        hmac.compare_digest(candidate, _DUMMY_HASH)
    return found


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome (its failure needs no answer)."""
    if not fut.cancelled():
        fut.exception()


class RandomPool:
    """Random bytes from os.urandom drawn 4 KiB at a time: one system call per few hundred ids
    and nonces instead of one each (the system call was a visible share of a deposit's cost)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf = os.urandom(4096)
            self._pos = 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out


RANDOM = RandomPool()


class MailboxState:
    """The in-memory view of one mailbox (rebuilt from storage when needed)."""

    __slots__ = ("bundle_bucket", "deleted", "deposit_bucket", "dkey", "id", "key", "okey",
                 "public", "queued", "sub", "tokens", "used", "verify")

    def __init__(self, row: MailboxRow, cfg: Config, now: float) -> None:
        self.id = row.id
        self.okey = row.owner_key
        self.dkey = row.deposit_key
        self.verify = VerifyKey(row.sig_pub)
        # NaCl box with the Curve25519 shared key computed once per mailbox.
        self.key = Box(PrivateKey(row.box_secret), PublicKey(row.owner_box_pub)).shared_key()
        self.public = row.public
        self.tokens = row.tokens
        self.queued = row.queued
        self.used = row.used
        self.deposit_bucket = TokenBucket(cfg.deposit_rate, cfg.deposit_burst, now)
        self.bundle_bucket = TokenBucket(cfg.bundle_fetch_rate, cfg.bundle_fetch_burst, now)
        self.sub: Subscription | None = None
        self.deleted = False

    def seal(self, block: bytes) -> bytes:
        """Re-encrypt a block for the owner: nonce(24) | crypto_box(block) (§4.3). Called once
        for the copy kept at rest and once for every delivery, each with a fresh nonce, so no
        two of them (nor the deposit) share bytes."""
        nonce = RANDOM.take(Box.NONCE_SIZE)
        return nonce + crypto_box_easy_afternm(block, nonce, self.key)

    def unseal(self, sealed: bytes) -> bytes:
        """The block kept at rest, opened to be sealed afresh for a delivery (the relay holds
        the box key it was sealed with). CryptoError if the stored bytes were altered."""
        nonce = sealed[:Box.NONCE_SIZE]
        return crypto_box_open_easy_afternm(sealed[Box.NONCE_SIZE:], nonce, self.key)


class Subscription:
    __slots__ = ("active", "again", "backlog", "conn", "gen", "mb", "owner_id", "pumping")

    def __init__(self, conn: Connection, mb: MailboxState, owner_id: bytes) -> None:
        self.conn = conn
        self.mb = mb
        self.owner_id = owner_id
        self.backlog = True
        self.gen = 0
        self.pumping = False
        self.again = False
        self.active = True


# Seconds the wall clock may gain on the monotonic clock between two sweeps before it counts as
# a jump (NTP slewing gains at most 0.5 ms a second).
_CLOCK_SLACK = 60.0
# Queued blocks one expiry call deletes at most (with secure_delete, each is a 16 KiB write):
# the writer is shared, and one sweep must not hold it long (review of issue 15, item 6).
_EXPIRY_BLOCKS = 1024


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
        self.storage: Storage = storage or SQLiteStorage(
            cfg.data_dir, cfg.max_batch, clock, cfg.mailbox_use_granularity,
            reserve_bytes=cfg.disk_reserve, max_db_bytes=cfg.max_db_bytes,
            max_batch_bytes=cfg.max_batch_bytes)
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
        self.budget_blocks = 0
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
        budget = self.cfg.storage_budget
        if budget <= 0:
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
                if now >= next_sweep:
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
                    mb = MailboxState(row, self.cfg, time.monotonic())
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
                if old.sub is None:
                    self._uncache(old)
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


class Connection:
    """One WebSocket client: handshake, request dispatch, outgoing queue, its deliveries."""

    def __init__(self, relay: Relay, ws: web.WebSocketResponse,
                 transport: asyncio.BaseTransport | None = None) -> None:
        self.relay = relay
        self.cfg = relay.cfg
        self.ws = ws
        self._transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        self.challenge = os.urandom(wire.CHALLENGE_LEN)
        self.hello = False
        self.delivered: dict[bytes, tuple[MailboxState, int]] = {}
        self.out_rows: dict[int, set[int]] = {}
        self.subs: dict[int, Subscription] = {}
        self.created = 0
        self.bundle_fetches = 0
        self.pow_seen: set[bytes] = set()
        self.blob_quota = 0  # blob uploads left, reserved in relay.blob_reserved
        self.blob_released = False
        self.blob_quota_granted = 0.0  # monotonic: when the quota was granted, ...
        self.blob_quota_used = 0.0  # ... and last used by a put
        self._out: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()
        self._drained: asyncio.Future[None] | None = None
        self._out_bytes = 0
        self.push_deferred = False
        self._lookups = TokenBucket(self.cfg.lookup_rate, self.cfg.lookup_burst, time.monotonic())
        self._inflight = 0
        self._room: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_frame = time.monotonic()
        # Last frame or WebSocket ping from the client (a subscribed connection's liveness).
        self.last_seen = self.last_frame
        self._frames = TokenBucket(self.cfg.frame_rate, self.cfg.frame_burst, self.last_frame)
        self._closed = False
        self._high = self.cfg.conn_buffer
        self._low = self.cfg.conn_buffer // 4
        self._congested_since: float | None = None
        self.pump_lock = asyncio.Lock()

    # --- output ----------------------------------------------------------------------------------

    def send(self, frame: bytes, close_code: int = 0) -> None:
        if not self._closed:
            self._out.put_nowait((frame, close_code))
            self._out_bytes += len(frame)
            if close_code:
                self._closed = True

    def error(self, rid: int, code: int) -> None:
        fatal = code in wire.FATAL_ERRORS
        self.send(wire.error_frame(rid, code), _CLOSE_PROTOCOL if fatal else 0)

    def waiting(self) -> int:
        """Bytes waiting for the client: the relay's queue and the transport's buffer (what
        aiohttp handed to the socket and the kernel did not take)."""
        t = self._transport
        return self._out_bytes + (t.get_write_buffer_size() if t is not None else 0)

    def congested(self) -> bool:
        if self.waiting() > self._high:
            if self._congested_since is None:
                self._congested_since = time.monotonic()
            return True
        return False

    def room_blocks(self) -> int:
        """Blocks that fit under the bound now (at least one)."""
        return max(1, (self._high - self.waiting()) // wire.BLOCK_SIZE + 1)

    def stalled(self, now: float) -> bool:
        """Above the bound since stall_timeout: the client does not read."""
        if self._congested_since is None:
            return False
        if self.waiting() <= self._high:
            self._congested_since = None
            return False
        return now - self._congested_since > self.cfg.stall_timeout

    def abort(self) -> None:
        """Drop the connection at once (it does not read: no close handshake)."""
        if self._transport is not None:
            self._transport.abort()
        self.send(b"", _CLOSE_GOING_AWAY)  # wakes the writer, which then ends
        self._closed = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def kick(self) -> None:
        """Resume deferred pushes once the output is low again. The writer does this after
        each frame it sends; this is for output that drained from the socket's buffer alone."""
        if self.push_deferred and not self._closed and self.waiting() <= self._low:
            self._on_drained()

    async def _writer(self) -> None:
        try:
            while True:
                frame, close_code = await self._out.get()
                self._out_bytes -= len(frame)
                if frame:
                    await self.ws.send_bytes(frame)
                if close_code:
                    await self.ws.close(code=close_code)
                    return
                if self.waiting() <= self._low and (self._drained or self.push_deferred):
                    self._on_drained()
        except (TimeoutError, ConnectionError, RuntimeError):
            return
        finally:
            self._closed = True
            self._on_drained()

    def _on_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self.push_deferred:
            self.push_deferred = False
            for sub in self.subs.values():
                if sub.backlog and not sub.pumping:
                    self.relay.spawn(self.relay.pump(sub))

    async def _until_drained(self) -> None:
        # Reading resumes below a quarter of conn_buffer (not just under it), so a client
        # reading slowly is not switched on and off at every frame (§2).
        while self.waiting() > self._low and not self._closed:
            self._drained = asyncio.get_running_loop().create_future()
            # Look again now and then: the socket's buffer drains without a frame of ours.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained, 0.5)
        self._drained = None

    async def close(self, code: int) -> None:
        self.send(b"", code)

    def outstanding(self, mailbox: int) -> int:
        rows = self.out_rows.get(mailbox)
        return len(rows) if rows else 0

    def push(self, owner_id: bytes, mb: MailboxState, rowid: int, block: bytes, rid: int) -> None:
        """Deliver a block: a fresh msg_id and a fresh seal, whichever delivery of the block
        this is (first push, FETCH, redelivery after a reconnection or a moved subscription),
        so two deliveries of one block share no bytes and cannot be matched by content."""
        msg_id = RANDOM.take(wire.ID_LEN)
        self.delivered[msg_id] = (mb, rowid)
        self.out_rows.setdefault(mb.id, set()).add(rowid)
        self.send(wire.encode(wire.MSG, rid, owner_id + msg_id + mb.seal(block)))

    def push_stored(self, owner_id: bytes, mb: MailboxState, rowid: int, stored: bytes,
                    rid: int) -> bool:
        """Deliver a block read from storage (kept sealed at rest); False if it did not open."""
        try:
            block = mb.unseal(stored)
        except CryptoError:
            self.relay.undeliverable(mb, rowid)
            return False
        self.push(owner_id, mb, rowid, block, rid)
        return True

    def withdraw(self, mb: MailboxState) -> None:
        """Forget this connection's unacknowledged deliveries of `mb` (its subscription moved
        away): an ACK of their ids is `unknown_message`, and they no longer fill its window."""
        for msg_id in [i for i, (m, _) in self.delivered.items() if m is mb]:
            del self.delivered[msg_id]
        self.out_rows.pop(mb.id, None)

    # --- the read loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        # Every storage operation started from here (and from the tasks it spawns, which copy
        # the context) is this connection's turn at the writer (relay/storage.py).
        WRITER_OWNER.set(self)
        writer = asyncio.ensure_future(self._writer())
        try:
            await self._read_loop()
        finally:
            for sub in list(self.subs.values()):
                self.relay.end_subscription(sub, notify=False)
            self.release_quota()
            self.blob_released = True
            for task in list(self._tasks):
                task.cancel()
            if not writer.done():
                # Let queued frames (an error before a close) go out, then stop.
                self.send(b"", _CLOSE_GOING_AWAY)
                try:
                    await asyncio.wait_for(writer, 5)
                except (TimeoutError, asyncio.CancelledError):
                    writer.cancel()
            self.delivered.clear()
            self.out_rows.clear()
            if self._congested_since is not None:
                self.relay.trim_wanted = True

    async def _read_loop(self) -> None:
        ws = self.ws
        while not self._closed:
            if self.congested():
                await self._until_drained()
                continue
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                self.last_frame = self.last_seen = time.monotonic()
                self.relay.gate.heard(self._transport)
                await self._frame(msg.data)
                # One frame per turn: aiohttp hands over a whole read's frames without yielding,
                # so without this one connection's pipelined requests run back to back while
                # every other connection waits (issue 15, item 8).
                await asyncio.sleep(0)
            elif msg.type == WSMsgType.PING:
                # Answered here (autoping off) so a client's ping counts as a sign of life; the
                # relay's own pings' answers (PONG) do not: any library sends those unasked.
                self.last_seen = time.monotonic()
                self.relay.gate.heard(self._transport)
                await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                continue
            elif msg.type == WSMsgType.TEXT:
                self.error(0, wire.E_BAD_FRAME)
                return
            else:  # CLOSE, CLOSING, CLOSED, or ERROR (oversized: aiohttp closes with 1009)
                return

    async def _frame(self, data: bytes) -> None:
        rid = 0
        try:
            frame = wire.decode(data)
            rid = frame.rid
            if frame.type not in wire.CLIENT_TYPES:
                raise wire.FrameError(wire.E_UNKNOWN_TYPE)
            if not self.hello:
                if frame.type != wire.HELLO:
                    raise wire.FrameError(wire.E_OUT_OF_ORDER)
                if frame.body:
                    raise wire.FrameError(wire.E_BAD_FRAME)
                self.hello = True
                self.send(wire.encode(wire.HELLO_OK, rid, self._hello_ok().encode_body()))
                return
            if frame.type == wire.HELLO:
                raise wire.FrameError(wire.E_OUT_OF_ORDER)
            if not self._frames.take(self.last_frame):
                raise wire.FrameError(wire.E_RATE_LIMITED)
        except wire.FrameError as exc:
            self.error(rid, exc.code)
            return
        if frame.type in _STORING and self.over_share():
            await self._wait_share()  # this frame, and reading, wait for its own writes
        if self._inflight >= self.cfg.max_inflight:
            await self._wait_room()
        self._inflight += 1
        fast = _FAST.get(frame.type)
        if fast is not None:
            try:
                if fast(self, frame):
                    return  # in progress: its callback releases the slot
            except wire.FrameError as exc:
                self._release()
                self.error(frame.rid, exc.code)
                return
            except Exception as exc:  # never a crash, never a trace to the client
                self._release()
                log.error("internal error: %s", type(exc).__name__)
                self.error(frame.rid, wire.E_INTERNAL)
                return
        task = asyncio.ensure_future(self._handle(frame))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _wait_room(self) -> None:
        """Stop reading while max_inflight requests are in progress."""
        while self._inflight >= self.cfg.max_inflight:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        self._room = None

    def _release(self) -> None:
        self._inflight -= 1
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._release()

    def busy(self) -> bool:
        return self._inflight > 0

    def over_share(self) -> bool:
        """Loaded (Config.fair_load writes waiting relay-wide) and this connection holding its
        fair share of them (Config.fair_share) already: its next storing request waits."""
        cfg = self.cfg
        if cfg.fair_load <= 0:
            return False
        storage = self.relay.storage
        return storage.pending >= cfg.fair_load and storage.pending_of(self) >= cfg.fair_share

    async def _wait_share(self) -> None:
        """Stop reading while over its share: what it sends meanwhile waits in its socket, not
        in the event loop or the writer. Not `busy`: a refusal would be resent at once, and
        a client that pipelines deposits (the tests, any bulk sender) would see errors."""
        while self.over_share() and not self._closed:
            self._room = asyncio.get_running_loop().create_future()
            # Woken by its own requests' ends (_release); the timeout for writes of its own
            # that hold no request slot (a touch, a pump's), or a load gone meanwhile.
            await asyncio.wait({self._room}, timeout=0.5)
        self._room = None

    def release_quota(self) -> None:
        """Give what is left of the blob quota back to the area and the budget."""
        self.relay.blob_reserved = max(0, self.relay.blob_reserved - self.blob_quota)
        self.blob_quota = 0

    def quota_expired(self, now: float) -> bool:
        """Idle too long, or held too long in all (Config.blob_quota_idle, _lifetime)."""
        cfg = self.cfg
        return self.blob_quota > 0 and (now - self.blob_quota_used > cfg.blob_quota_idle
                                        or now - self.blob_quota_granted
                                        > cfg.blob_quota_lifetime)

    def _deposit_done(self, rid: int, mb: MailboxState, block: bytes,
                      fut: asyncio.Future[int]) -> None:
        self._release()
        self._deposit_result(rid, mb, block, fut)

    def _deposit_result(self, rid: int, mb: MailboxState, block: bytes,
                        fut: asyncio.Future[int]) -> None:
        """A deposit's outcome: counted, answered (if the connection is still there), pushed."""
        relay = self.relay
        if fut.cancelled():
            relay.unqueued(mb, 1)
            return
        exc = fut.exception()
        if exc is not None:
            relay.unqueued(mb, 1)
            self.storage_error(rid, exc)
            return
        rowid = fut.result()
        self.ok(rid)
        if mb.deleted:
            relay.storage.remove(mb.id, [rowid]).add_done_callback(
                functools.partial(_unqueue_removed, relay, mb))
            return
        relay.stored(mb, rowid, block)

    def _ack_done(self, rid: int, mb: MailboxState, rowids: list[int],
                  fut: asyncio.Future[int]) -> None:
        self._release()
        rows = self.out_rows.get(mb.id)
        if rows is not None:
            rows.difference_update(rowids)
            if not rows:
                del self.out_rows[mb.id]
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.storage_error(rid, exc)
            return
        self.relay.unqueued(mb, fut.result())
        self.ok(rid)
        sub = self.subs.get(mb.id)
        if sub is not None and sub.backlog and not sub.pumping:
            self.relay.spawn(self.relay.pump(sub))

    def _hello_ok(self) -> wire.HelloOk:
        c = self.cfg
        return wire.HelloOk(self.challenge, wire.BLOCK_SIZE, c.max_frame, c.pow_deposit_bits,
                            c.pow_bundle_bits, c.pow_blob_bits, c.message_ttl, c.window,
                            c.max_inflight, c.pow_create_bits, c.mailbox_ttl, c.blob_ttl)

    async def _handle(self, frame: wire.Frame) -> None:
        handler = _HANDLERS[frame.type]
        try:
            await handler(self, frame)
        except wire.FrameError as exc:
            self.error(frame.rid, exc.code)
        except StorageError as exc:
            self.storage_error(frame.rid, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a crash, never a trace to the client
            log.error("internal error: %s", type(exc).__name__)
            self.error(frame.rid, wire.E_INTERNAL)

    # --- helpers ---------------------------------------------------------------------------------

    def ok(self, rid: int, body: bytes = b"") -> None:
        self.send(wire.encode(wire.OK, rid, body))

    def storage_error(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, StorageFull):
            self.error(rid, wire.E_FULL)  # logged once by the storage, not per request
            return
        log.warning("storage error: %s", type(exc).__name__)
        self.error(rid, wire.E_INTERNAL)

    def check_room(self) -> None:
        """Before storing more: `full` while the disk is full, `busy` while the writer is
        saturated. Saturated means max_pending_writes in all; then only a connection with
        nothing waiting of its own is still let in, so a flooder cannot lock everyone else out
        (each connection has at most max_inflight operations waiting; issue 15, item 8)."""
        storage = self.relay.storage
        if storage.full:
            raise wire.FrameError(wire.E_FULL)
        limit = self.cfg.max_pending_writes
        if storage.pending >= limit and (storage.pending >= 2 * limit
                                         or storage.pending_of(self) > 0):
            raise wire.FrameError(wire.E_BUSY)

    def _check_pow(self, bits: int, purpose: int, target: bytes, payload_hash: bytes,
                   nonce: bytes) -> None:
        if bits <= 0:
            return
        if not pow_.check(bits, self.challenge, purpose, target, payload_hash, nonce):
            raise wire.FrameError(wire.E_BAD_POW)
        seen = bytes([purpose]) + target + payload_hash[:8] + nonce
        if seen in self.pow_seen:
            raise wire.FrameError(wire.E_BAD_POW)
        if len(self.pow_seen) >= self.cfg.pow_per_connection:
            raise wire.FrameError(wire.E_LIMIT)
        self.pow_seen.add(seen)

    async def mailbox(self, *, okey: bytes | None = None,
                      dkey: bytes | None = None) -> MailboxState | None:
        """A mailbox lookup; those that miss the cache cost a token of the connection's lookup
        bucket, so nobody can keep the storage busy with lookups of made-up ids.

        An empty bucket refuses every lookup, cached or not: were a cached (live) mailbox still
        answered, a prober could empty the bucket with made-up ids and tell a live mailbox
        (answered) from a deleted or never-created one (`rate_limited`) (issue 15 review)."""
        relay = self.relay
        now = time.monotonic()
        if self._lookups.empty(now):
            raise wire.FrameError(wire.E_RATE_LIMITED)
        cached = relay.by_okey.get(okey) if okey is not None else relay.by_dkey.get(dkey or b"")
        if cached is not None:
            return cached
        self._lookups.take(now)
        return await relay.mailbox(okey=okey, dkey=dkey)

    async def owner(self, frame: wire.Frame, min_args: int,
                    max_args: int) -> tuple[MailboxState, bytes, bytes]:
        """Authorise an owner command; a missing mailbox and a bad signature look the same."""
        owner_id, args, sig = wire.split_signed(frame.body, min_args, max_args)
        mb = await self.mailbox(okey=owner_key(owner_id))
        signed = wire.auth_message(self.challenge,
                                   wire.encode(frame.type, frame.rid, frame.body[:-wire.SIG_LEN]))
        verify = mb.verify if mb is not None and not mb.deleted else _DUMMY_VERIFY
        try:
            verify.verify(signed, sig)
        except (BadSignatureError, ValueError, CryptoError):
            raise Denied() from None
        if mb is None or mb.deleted:
            raise Denied()
        if mb.used < self.relay.use_period():
            await self.relay.touch([mb])
        return mb, owner_id, args


# --- handlers ------------------------------------------------------------------------------------

Handler = Callable[[Connection, wire.Frame], Awaitable[None]]


async def h_create(c: Connection, f: wire.Frame) -> None:
    sig_pub, box_pub, flags, nonce, sig = wire.parse_create(f.body)
    c._check_pow(c.cfg.pow_create_bits, wire.POW_CREATE, pow_.ZERO_TARGET,
                 wire.create_pow_hash(sig_pub, box_pub, flags), nonce)
    try:
        VerifyKey(sig_pub).verify(
            wire.auth_message(c.challenge, wire.encode(f.type, f.rid, f.body[:-wire.SIG_LEN])),
            sig)
        secret = PrivateKey.generate()
        Box(secret, PublicKey(box_pub))  # rejects keys NaCl cannot use
    except (BadSignatureError, ValueError, CryptoError):
        raise wire.FrameError(wire.E_DENIED) from None
    relay = c.relay
    if c.created >= c.cfg.creates_per_connection:
        raise wire.FrameError(wire.E_LIMIT)
    if relay.mailboxes >= c.cfg.max_mailboxes:
        raise wire.FrameError(wire.E_FULL)  # relay-wide: not this connection's doing
    c.created += 1
    relay.mailboxes += 1
    owner_id, deposit_id = os.urandom(wire.ID_LEN), os.urandom(wire.ID_LEN)
    fut = relay.storage.create_mailbox(owner_key(owner_id), deposit_key(deposit_id), sig_pub,
                                       bytes(secret), box_pub, bool(flags & 1),
                                       relay.use_period())
    fut.add_done_callback(functools.partial(_created, relay))
    await asyncio.shield(fut)  # the connection may end meanwhile: the count follows the write
    c.send(wire.encode(wire.CREATED, f.rid, owner_id + deposit_id + bytes(secret.public_key)))


async def h_subscribe(c: Connection, f: wire.Frame) -> None:
    mb, owner_id, _ = await c.owner(f, 0, 0)
    relay = c.relay
    old = mb.sub
    if old is not None and old.conn is c:
        c.ok(f.rid)
        return
    if len(c.subs) >= c.cfg.subscriptions_per_connection:
        raise wire.FrameError(wire.E_LIMIT)
    if old is not None:
        relay.end_subscription(old, notify=True)
    sub = Subscription(c, mb, owner_id)
    mb.sub = sub
    c.subs[mb.id] = sub
    c.ok(f.rid)
    await relay.pump(sub)


async def h_unsubscribe(c: Connection, f: wire.Frame) -> None:
    mb, _, _ = await c.owner(f, 0, 0)
    sub = c.subs.get(mb.id)
    if sub is not None:
        c.relay.end_subscription(sub, notify=False)
    c.ok(f.rid)


async def h_fetch(c: Connection, f: wire.Frame) -> None:
    mb, owner_id, args = await c.owner(f, 1, 1)
    sent = 0
    left = False
    # One read of the connection at a time (with its pumps), sized after what the previous
    # one pushed: without the lock 64 concurrent FETCHes each read a window's worth before any
    # was pushed, 32 MiB in memory for one connection (issue 15 review, item 1).
    async with c.pump_lock:
        out = c.out_rows.get(mb.id, set())
        want = min(args[0], c.cfg.window - len(out), c.room_blocks())
        if want > 0 and not c.congested():
            rows = await c.relay.storage.queued(mb.id, out, want)
            out = c.out_rows.get(mb.id, set())
            fresh = [r for r in rows if r[0] not in out][:want]
            for rowid, sealed in fresh:
                if c.congested():  # the rest stays queued: FETCH again once this is read
                    left = True
                    break
                sent += c.push_stored(owner_id, mb, rowid, sealed, f.rid)
            del fresh, rows
        elif want > 0:
            left = mb.queued > len(out)
    if sent == 0 and left:
        # Nothing sent although blocks wait (this connection's output is above conn_buffer):
        # `OK 0` would read as an empty mailbox.
        raise wire.FrameError(wire.E_BUSY)
    c.ok(f.rid, struct.pack(">H", sent))


async def h_ack(c: Connection, f: wire.Frame) -> None:
    ids = wire.parse_ack(f.body, c.cfg.window)
    if len(set(ids)) != len(ids) or any(i not in c.delivered for i in ids):
        raise wire.FrameError(wire.E_UNKNOWN_MESSAGE)
    by_mb: dict[int, tuple[MailboxState, list[int]]] = {}
    for i in ids:
        mb, rowid = c.delivered.pop(i)
        by_mb.setdefault(mb.id, (mb, []))[1].append(rowid)
    try:
        for mb, rowids in by_mb.values():
            fut = c.relay.storage.remove(mb.id, rowids)
            # Counted when the deletion is done, even if this connection ends before.
            fut.add_done_callback(functools.partial(_unqueue_removed, c.relay, mb))
            await asyncio.shield(fut)
    finally:
        for mb, rowids in by_mb.values():
            rows = c.out_rows.get(mb.id)
            if rows is not None:
                rows.difference_update(rowids)
                if not rows:
                    del c.out_rows[mb.id]
    c.ok(f.rid)
    for mb, _ in by_mb.values():
        sub = c.subs.get(mb.id)
        if sub is not None and sub.backlog:
            await c.relay.pump(sub)


async def h_delete(c: Connection, f: wire.Frame) -> None:
    mb, _, _ = await c.owner(f, 0, 0)
    relay = c.relay
    mb.deleted = True
    if mb.sub is not None:
        relay.end_subscription(mb.sub, notify=mb.sub.conn is not c)
    relay._uncache(mb)
    fut = relay.storage.delete_mailbox(mb.id)
    fut.add_done_callback(functools.partial(_mailbox_deleted, relay))
    await asyncio.shield(fut)
    c.ok(f.rid)


async def h_token_add(c: Connection, f: wire.Frame) -> None:
    mb, _, token_hash = await c.owner(f, wire.HASH_LEN, wire.HASH_LEN)
    if token_hash not in mb.tokens:
        if len(mb.tokens) >= c.cfg.tokens_per_mailbox:
            raise wire.FrameError(wire.E_LIMIT)
        mb.tokens = (*mb.tokens, token_hash)
        await c.relay.storage.set_tokens(mb.id, mb.tokens)
    c.ok(f.rid)


async def h_token_del(c: Connection, f: wire.Frame) -> None:
    mb, _, token_hash = await c.owner(f, wire.HASH_LEN, wire.HASH_LEN)
    if token_hash in mb.tokens:
        mb.tokens = tuple(t for t in mb.tokens if t != token_hash)
        await c.relay.storage.set_tokens(mb.id, mb.tokens)
    c.ok(f.rid)


def _counts(counts: tuple[int, int]) -> bytes:
    return struct.pack(">HH", *counts)


async def h_bundle_base(c: Connection, f: wire.Frame) -> None:
    mb, _, base = await c.owner(f, 0, wire.MAX_BASE_LEN)
    await c.relay.storage.set_bundle_base(mb.id, base)
    c.ok(f.rid)


async def h_bundle_add(c: Connection, f: wire.Frame) -> None:
    kind, items = wire.parse_items(wire.split_signed(f.body, 2, c.cfg.max_frame)[1])
    mb, _, _ = await c.owner(f, 2, c.cfg.max_frame)
    counts = await c.relay.storage.add_bundle_items(mb.id, kind, items,
                                                    c.cfg.bundle_items_per_kind)
    if counts is None:
        raise wire.FrameError(wire.E_LIMIT)
    c.send(wire.encode(wire.BUNDLE_COUNT, f.rid, _counts(counts)))


async def h_bundle_status(c: Connection, f: wire.Frame) -> None:
    mb, _, _ = await c.owner(f, 0, 0)
    counts = await c.relay.storage.bundle_counts(mb.id)
    c.send(wire.encode(wire.BUNDLE_COUNT, f.rid, _counts(counts)))


async def h_bundle_fetch(c: Connection, f: wire.Frame) -> None:
    body = wire.exact(f.body, wire.ID_LEN + wire.NONCE_LEN)
    deposit_id, nonce = body[:wire.ID_LEN], body[wire.ID_LEN:]
    c._check_pow(c.cfg.pow_bundle_bits, wire.POW_BUNDLE, deposit_id, pow_.ZERO_HASH, nonce)
    if c.bundle_fetches >= c.cfg.bundle_fetches_per_connection:
        raise wire.FrameError(wire.E_LIMIT)
    c.bundle_fetches += 1
    # Not through the connection's lookup bucket: its proof of work and the per-connection cap
    # already bound the storage reads, and a fetch must never be `rate_limited` (§4.4).
    mb = await c.relay.mailbox(dkey=deposit_key(deposit_id))
    if mb is None or mb.deleted:
        raise Denied()
    # The per-mailbox bucket rations the one-time items, not the answers: past it a fetch gets
    # the base alone (the client falls back to the last-resort keys, docs/protocol.md §7). So
    # one fetcher draining the bucket refuses nobody else a bundle, and a mailbox that exists
    # without a bundle answers exactly as one that never existed or was deleted: `denied`,
    # however often it is asked (never `rate_limited`, which would say it exists).
    with_items = mb.bundle_bucket.take(time.monotonic())
    kinds = (wire.ITEM_X25519, wire.ITEM_MLKEM) if with_items else ()
    bundle = await c.relay.storage.take_bundle(mb.id, kinds)
    if bundle is None:
        raise Denied()
    c.send(wire.encode(wire.BUNDLE, f.rid, wire.encode_bundle(*bundle)))


# The counters of what is stored change when the writer has done the work, in callbacks on the
# storage future: a handler awaiting it is cancelled when its connection ends, while the write,
# already queued, still happens (review of issue 15, item 1).


def _unqueue_removed(relay: Relay, mb: MailboxState, fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        relay.unqueued(mb, fut.result())


def _created(relay: Relay, fut: asyncio.Future[int]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        relay.mailboxes -= 1  # counted before the write, so two CREATEs cannot pass the cap


def _mailbox_deleted(relay: Relay, fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        relay.queued_blocks = max(0, relay.queued_blocks - fut.result())
        relay.mailboxes = max(0, relay.mailboxes - 1)


def _deposit_pow(c: Connection, deposit_id: bytes, kind: int, auth: bytes, block: bytes) -> None:
    if kind == wire.AUTH_POW:
        c._check_pow(c.cfg.pow_deposit_bits, wire.POW_DEPOSIT, deposit_id,
                     hashlib.sha256(block).digest(), auth)


def _deposit_auth(c: Connection, mb: MailboxState | None, kind: int,
                  auth: bytes) -> MailboxState:
    """Token or public mailbox; then the mailbox's rate and queue. One answer for all denials."""
    if kind == wire.AUTH_TOKEN:
        allowed = _ct_member(hashlib.sha256(auth).digest(), mb.tokens if mb else ())
    else:
        allowed = mb is not None and mb.public
    if mb is None or mb.deleted or not allowed:
        raise Denied()
    if not mb.deposit_bucket.take(c.last_frame):
        raise wire.FrameError(wire.E_RATE_LIMITED)
    if mb.queued >= c.cfg.queue_limit:
        raise wire.FrameError(wire.E_QUEUE_FULL)
    if c.relay.full():
        raise wire.FrameError(wire.E_FULL)
    if mb.queued >= c.cfg.crowded_queue_limit and c.relay.crowded():
        raise wire.FrameError(wire.E_QUEUE_FULL)  # this queue, not the relay: others still fit
    c.check_room()
    return mb


def fast_deposit(c: Connection, f: wire.Frame) -> bool:
    """DEPOSIT to a mailbox in the cache: no task, a callback on the storage future."""
    deposit_id, kind, auth, block = wire.parse_deposit(f.body)
    if len(block) != wire.BLOCK_SIZE:
        raise wire.FrameError(wire.E_BAD_BLOCK)
    cached = c.relay.by_dkey.get(deposit_key(deposit_id))
    if cached is None or c._lookups.empty(time.monotonic()):
        return False  # h_deposit loads the mailbox (or answers an empty lookup bucket alike)
    _deposit_pow(c, deposit_id, kind, auth, block)
    mb = _deposit_auth(c, cached, kind, auth)
    # Re-encrypt for the owner: the stored bytes share nothing with the deposit (and each
    # delivery is sealed afresh: Connection.push).
    fut = c.relay.storage.enqueue(mb.id, c.relay.expiry(), mb.seal(block))
    mb.queued += 1
    c.relay.queued_blocks += 1
    fut.add_done_callback(functools.partial(c._deposit_done, f.rid, mb, block))
    return True


async def h_deposit(c: Connection, f: wire.Frame) -> None:
    deposit_id, kind, auth, block = wire.parse_deposit(f.body)
    if len(block) != wire.BLOCK_SIZE:
        raise wire.FrameError(wire.E_BAD_BLOCK)
    _deposit_pow(c, deposit_id, kind, auth, block)
    relay = c.relay
    mb = _deposit_auth(c, await c.mailbox(dkey=deposit_key(deposit_id)), kind, auth)
    sealed = mb.seal(block)
    mb.queued += 1
    relay.queued_blocks += 1
    fut = relay.storage.enqueue(mb.id, relay.expiry(), sealed)
    # As fast_deposit: the answer and the counts follow the write, which happens even if this
    # connection ends first; the task waits (holding its request slot) without cancelling it.
    fut.add_done_callback(functools.partial(c._deposit_result, f.rid, mb, block))
    await asyncio.wait({fut})


def fast_ack(c: Connection, f: wire.Frame) -> bool:
    """ACK of blocks of one mailbox (the usual case): no task, a callback on the deletion."""
    ids = wire.parse_ack(f.body, c.cfg.window)
    if len(set(ids)) != len(ids) or any(i not in c.delivered for i in ids):
        raise wire.FrameError(wire.E_UNKNOWN_MESSAGE)
    mb = c.delivered[ids[0]][0]
    if any(c.delivered[i][0] is not mb for i in ids):
        return False  # several mailboxes: h_ack
    rowids = [c.delivered.pop(i)[1] for i in ids]
    fut = c.relay.storage.remove(mb.id, rowids)
    fut.add_done_callback(functools.partial(c._ack_done, f.rid, mb, rowids))
    return True


async def h_blob_quota(c: Connection, f: wire.Frame) -> None:
    """A quota of `blocks` uploads, paid in proportion (§6) and reserved at once against the
    blob area and the storage budget, so uploads in flight are counted; what the connection
    leaves unused is released when it ends, by its next quota, after blob_quota_idle seconds
    without a put, or blob_quota_lifetime seconds after the grant (Connection.quota_expired)."""
    body = wire.exact(f.body, 4 + wire.NONCE_LEN)
    (blocks,) = struct.unpack_from(">I", body)
    nonce = body[4:]
    if blocks == 0:
        raise wire.FrameError(wire.E_BAD_FRAME)
    if blocks > c.cfg.blob_quota_blocks:
        raise wire.FrameError(wire.E_LIMIT)
    c._check_pow(wire.blob_pow_bits(c.cfg.pow_blob_bits, blocks), wire.POW_BLOB,
                 wire.blob_pow_target(blocks), pow_.ZERO_HASH, nonce)
    relay = c.relay
    c.release_quota()  # a new quota replaces what is left of the last (even if refused)
    area = c.cfg.blob_max_bytes // wire.BLOCK_SIZE
    if relay.blob_blocks + relay.blob_reserved + blocks > area or relay.full(blocks):
        raise wire.FrameError(wire.E_FULL)
    c.blob_quota = blocks
    c.blob_quota_granted = c.blob_quota_used = time.monotonic()
    relay.blob_reserved += blocks
    c.ok(f.rid, struct.pack(">I", c.blob_quota))


def _blob_secret(cap: bytes) -> tuple[bytes, SecretBox]:
    """The stored check value of a capability, and the key its blob is kept under at rest."""
    check = hashlib.sha256(b"AEGIS-RELAY-1 BLOB CHECK\x00" + cap).digest()
    key = hashlib.sha256(b"AEGIS-RELAY-1 BLOB KEY\x00" + cap).digest()
    return check, SecretBox(key)


async def h_blob_put(c: Connection, f: wire.Frame) -> None:
    body = f.body
    if len(body) < wire.ID_LEN + wire.HASH_LEN:
        raise wire.FrameError(wire.E_BAD_FRAME)
    blob_id, cap = body[:wire.ID_LEN], body[wire.ID_LEN:wire.ID_LEN + wire.HASH_LEN]
    block = body[wire.ID_LEN + wire.HASH_LEN:]
    if len(block) != wire.BLOCK_SIZE:
        raise wire.FrameError(wire.E_BAD_BLOCK)
    relay = c.relay
    now = time.monotonic()
    if c.quota_expired(now):  # the reaper may not have seen it yet
        c.release_quota()
    if c.blob_quota <= 0:  # the quota was reserved in the blob area when it was granted
        raise wire.FrameError(wire.E_LIMIT)
    c.check_room()
    c.blob_quota -= 1
    c.blob_quota_used = now
    relay.blob_reserved -= 1
    relay.blob_blocks += 1
    # At rest the block is encrypted under a key only the capability yields: the disk alone
    # tells nothing, and the stored bytes differ from the uploaded ones.
    check, box = _blob_secret(cap)
    fut = relay.storage.put_blob(blob_key(blob_id), check, relay.blob_expiry(),
                                 bytes(box.encrypt(block)))
    fut.add_done_callback(functools.partial(_put_done, c, f.rid))
    await asyncio.wait({fut})  # never cancels the put: it is queued, it will be stored


def _put_done(c: Connection, rid: int, fut: asyncio.Future[bool]) -> None:
    """A put's outcome, counted whether or not its connection is still there."""
    if fut.cancelled():
        _unput(c)
        return
    exc = fut.exception()
    if exc is not None:
        _unput(c)
        c.storage_error(rid, exc)
    elif not fut.result():
        _unput(c)
        c.error(rid, wire.E_EXISTS)
    else:
        c.ok(rid)


def _unput(c: Connection) -> None:
    """A put that stored nothing: its block goes back to the quota (or, with the connection
    gone and its reservation released, to nobody)."""
    c.relay.blob_blocks -= 1
    if not c.blob_released:
        c.blob_quota += 1
        c.relay.blob_reserved += 1


async def _blob(c: Connection, blob_id: bytes, cap: bytes) -> bytes:
    """The blob's block if `cap` is its capability; a missing blob and a wrong cap look alike."""
    found = await c.relay.storage.get_blob(blob_key(blob_id))
    check, box = _blob_secret(cap)
    match = hmac.compare_digest(check, found[0] if found else _DUMMY_HASH)
    if found is None or not match:
        raise Denied()
    try:
        return bytes(box.decrypt(found[1]))
    except CryptoError:
        raise Denied() from None


async def h_blob_get(c: Connection, f: wire.Frame) -> None:
    body = wire.exact(f.body, wire.ID_LEN + wire.HASH_LEN + wire.KEY_LEN)
    blob_id, cap = body[:wire.ID_LEN], body[wire.ID_LEN:wire.ID_LEN + wire.HASH_LEN]
    block = await _blob(c, blob_id, cap)
    try:
        sealed = SealedBox(PublicKey(body[-wire.KEY_LEN:])).encrypt(block)
    except (ValueError, CryptoError):
        raise wire.FrameError(wire.E_BAD_FRAME) from None
    c.send(wire.encode(wire.BLOB, f.rid, bytes(sealed)))


async def h_blob_del(c: Connection, f: wire.Frame) -> None:
    body = wire.exact(f.body, wire.ID_LEN + wire.HASH_LEN)
    blob_id, cap = body[:wire.ID_LEN], body[wire.ID_LEN:]
    await _blob(c, blob_id, cap)
    fut = c.relay.storage.delete_blob(blob_key(blob_id))
    fut.add_done_callback(functools.partial(_blob_deleted, c.relay))
    await asyncio.shield(fut)
    c.ok(f.rid)


def _blob_deleted(relay: Relay, fut: asyncio.Future[bool]) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result():
        relay.blob_blocks = max(0, relay.blob_blocks - 1)


async def h_hello(c: Connection, f: wire.Frame) -> None:  # handled in _frame; never reached
    raise wire.FrameError(wire.E_OUT_OF_ORDER)


#: Requests that store: held over a connection's fair share (Connection.over_share).
_STORING = frozenset({wire.DEPOSIT, wire.BLOB_PUT})

_FAST: dict[int, Callable[[Connection, wire.Frame], bool]] = {
    wire.DEPOSIT: fast_deposit,
    wire.ACK: fast_ack,
}

_HANDLERS: dict[int, Handler] = {
    wire.HELLO: h_hello,
    wire.CREATE: h_create,
    wire.SUBSCRIBE: h_subscribe,
    wire.UNSUBSCRIBE: h_unsubscribe,
    wire.FETCH: h_fetch,
    wire.ACK: h_ack,
    wire.DELETE: h_delete,
    wire.TOKEN_ADD: h_token_add,
    wire.TOKEN_DEL: h_token_del,
    wire.BUNDLE_BASE: h_bundle_base,
    wire.BUNDLE_ADD: h_bundle_add,
    wire.BUNDLE_STATUS: h_bundle_status,
    wire.BUNDLE_FETCH: h_bundle_fetch,
    wire.DEPOSIT: h_deposit,
    wire.BLOB_QUOTA: h_blob_quota,
    wire.BLOB_PUT: h_blob_put,
    wire.BLOB_GET: h_blob_get,
    wire.BLOB_DEL: h_blob_del,
}
assert set(_HANDLERS) == set(wire.CLIENT_TYPES)


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
    return web.json_response({"status": "ok", "protocol": wire.VERSION})


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
        for conn in list(relay.connections):
            await conn.close(_CLOSE_GOING_AWAY)

    async def on_cleanup(_: web.Application) -> None:
        await relay.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
