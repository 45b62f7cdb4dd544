"""One WebSocket client of the relay (Connection): the handshake, the read loop and the frame
dispatch (to relay/handlers.py), the outgoing queue and its writer, flow control (conn_buffer),
the fair share of the storage writer, and the connection's deliveries.

Nothing here logs or prints an address, a port, an ID, a time or a count. Log lines are fixed
strings; exceptions are reduced to their type name; clients only ever see error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, cast

from aiohttp import WSMsgType, web
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey

from . import pow as pow_
from . import wire
from .handlers import _FAST, _HANDLERS, _STORING, _unqueue_removed
from .state import RANDOM, Denied, MailboxState, Subscription, TokenBucket
from .storage import WRITER_OWNER, QueueFull, StorageError, StorageFull, TooMany, owner_key

if TYPE_CHECKING:
    from .app import Relay

log = logging.getLogger("aegis.relay")

_DUMMY_VERIFY = VerifyKey(bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"))
_CLOSE_PROTOCOL = 1002
_CLOSE_GOING_AWAY = 1001
# Bytes waiting for a client that does not read (Config.conn_buffer, here "high"): above it the
# relay stops reading its requests and stops pushing to it from storage; it resumes below a
# quarter of it. (One subscription's window, 32 blocks, stays below the default 2 MiB: a
# single-mailbox subscriber is never throttled.)


class Connection:
    """One WebSocket client: handshake, request dispatch, outgoing queue, its deliveries."""

    def __init__(self, relay: Relay, ws: web.WebSocketResponse,
                 transport: asyncio.BaseTransport | None = None) -> None:
        self.relay = relay
        self.cfg = relay.cfg
        self.ws = ws
        # Duck-typed: uvloop's transports are not asyncio.WriteTransport subclasses, and the
        # bound on what waits for this client (waiting()) must count their buffer too.
        self._transport = (cast(asyncio.WriteTransport, transport)
                           if hasattr(transport, "get_write_buffer_size") else None)
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
        # The last deposit that took the slow path (handlers.h_deposit), done once it queued
        # its block for storage or failed: deposits read after it are queued after it.
        self._deposit_turn: asyncio.Future[None] | None = None

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

    def deposit_loading(self) -> bool:
        """A deposit read earlier is still looking up its mailbox (its block not yet queued)."""
        return self._deposit_turn is not None and not self._deposit_turn.done()

    def take_deposit_turn(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """For a deposit on the slow path: the turn of the one before it (to wait for before
        queueing its block) and its own (to complete once queued, or failed)."""
        before = self._deposit_turn
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deposit_turn = turn
        return before, turn

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
        mb.writing -= 1
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
        if isinstance(exc, QueueFull):
            self.error(rid, wire.E_QUEUE_FULL)  # a shared store's limit (handlers._enqueue)
            return
        if isinstance(exc, StorageFull | TooMany):
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

    async def owner(self, frame: wire.Frame, min_args: int, max_args: int,
                    delete: bool = False) -> tuple[MailboxState, bytes, bytes]:
        """Authorise an owner command; a missing mailbox and a bad signature look the same.
        `delete`: a DELETE, which the mailbox's delete key signs as well as its owner key."""
        owner_id, args, sig = wire.split_signed(frame.body, min_args, max_args)
        mb = await self.mailbox(okey=owner_key(owner_id))
        signed = wire.auth_message(self.challenge,
                                   wire.encode(frame.type, frame.rid, frame.body[:-wire.SIG_LEN]))
        live = mb is not None and not mb.deleted
        keys = [mb.verify if mb is not None and live else _DUMMY_VERIFY]
        if delete:  # always two checks: the time does not say whether there is a delete key
            keys.append(mb.del_verify if mb is not None and live and mb.del_verify is not None
                        else _DUMMY_VERIFY)
        good = False
        for key in keys:
            try:
                key.verify(signed, sig)
                good = True
            except (BadSignatureError, ValueError, CryptoError):
                pass
        if not good:
            raise Denied()
        if mb is None or mb.deleted:
            raise Denied()
        if mb.used < self.relay.use_period():
            await self.relay.touch([mb])
        return mb, owner_id, args
