"""The relay's request handlers: one `h_*` coroutine per client frame type, the `fast_*` paths
that answer a DEPOSIT or an ACK without a task, the callbacks that count what the storage writer
did, and the dispatch tables Connection._frame reads (_HANDLERS, _FAST, _STORING).

Nothing here logs or prints an address, a port, an ID, a time or a count; clients only ever see
error codes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import VerifyKey

from . import pow as pow_
from . import wire
from .state import _DUMMY_HASH, Denied, MailboxState, Subscription, _ct_member
from .storage import blob_key, deposit_key, owner_key

if TYPE_CHECKING:
    from .app import Relay
    from .connection import Connection

Handler = Callable[["Connection", wire.Frame], Awaitable[None]]


async def h_create(c: Connection, f: wire.Frame) -> None:
    sig_pub, box_pub, flags, del_pub, nonce, sig = wire.parse_create(f.body)
    if del_pub is not None and not c.cfg.delete_keys:
        raise wire.FrameError(wire.E_BAD_FRAME)  # --delete-keys false: as an older relay
    c._check_pow(c.cfg.pow_create_bits, wire.POW_CREATE, pow_.ZERO_TARGET,
                 wire.create_pow_hash(sig_pub, box_pub, flags, del_pub), nonce)
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
                                       bytes(secret), box_pub,
                                       bool(flags & wire.CREATE_PUBLIC), relay.use_period(),
                                       del_pub)
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
    # Another node holding the mailbox's subscription ends it there (END): it moved here.
    relay.storage.announce("s", mb.id)
    if mb.queued <= 0 and not relay.storage.shared:
        # Nothing stored nor being stored (deposits count before their write): no read of the
        # queue. A connection flood subscribes empty mailboxes by the thousand, and each read
        # waited in the writer's queue beside everyone's deposits (bench/attack.py 3t).
        sub.backlog = False
        return
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
    # The one command the mailbox's delete key (if it has one) authorises too (§4.1).
    mb, _, _ = await c.owner(f, 0, 0, delete=True)
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
    # Several nodes: this node's count of the queue misses the others' deposits and acks, so
    # the store checks the limit in the writing transaction (_enqueue).
    shared = c.relay.storage.shared
    if not shared and mb.queued >= c.cfg.queue_limit:
        raise wire.FrameError(wire.E_QUEUE_FULL)
    if c.relay.full():
        raise wire.FrameError(wire.E_FULL)
    if not shared and mb.queued >= c.cfg.crowded_queue_limit and c.relay.crowded():
        raise wire.FrameError(wire.E_QUEUE_FULL)  # this queue, not the relay: others still fit
    c.check_room()
    return mb


def _enqueue(c: Connection, mb: MailboxState, block: bytes) -> asyncio.Future[int]:
    """Store a deposit sealed for the owner. A shared store checks the queue's limit itself
    (the one a crowded budget lowers), where _deposit_auth could not."""
    storage = c.relay.storage
    if not storage.shared:
        return storage.enqueue(mb.id, c.relay.expiry(), mb.seal(block))
    limit = c.cfg.crowded_queue_limit if c.relay.crowded() else c.cfg.queue_limit
    return storage.enqueue(mb.id, c.relay.expiry(), mb.seal(block), limit)


def fast_deposit(c: Connection, f: wire.Frame) -> bool:
    """DEPOSIT to a mailbox in the cache: no task, a callback on the storage future."""
    deposit_id, kind, auth, block = wire.parse_deposit(f.body)
    if len(block) != wire.BLOCK_SIZE:
        raise wire.FrameError(wire.E_BAD_BLOCK)
    if c.deposit_loading():
        return False  # behind a deposit whose mailbox is loading: stored after it (h_deposit)
    cached = c.relay.by_dkey.get(deposit_key(deposit_id))
    if cached is None or c._lookups.empty(time.monotonic()):
        return False  # h_deposit loads the mailbox (or answers an empty lookup bucket alike)
    _deposit_pow(c, deposit_id, kind, auth, block)
    mb = _deposit_auth(c, cached, kind, auth)
    # Re-encrypt for the owner: the stored bytes share nothing with the deposit (and each
    # delivery is sealed afresh: Connection.push).
    fut = _enqueue(c, mb, block)
    mb.queued += 1
    mb.writing += 1
    c.relay.queued_blocks += 1
    fut.add_done_callback(functools.partial(c._deposit_done, f.rid, mb, block))
    return True


async def h_deposit(c: Connection, f: wire.Frame) -> None:
    # A connection's deposits are stored in the order they arrived, also when this one has to
    # load its mailbox first: those read after it wait for it (and take this path), so that
    # a client may pipeline a mailbox's blocks (the daemon's outbox does) and keep their order.
    before, turn = c.take_deposit_turn()
    try:
        deposit_id, kind, auth, block = wire.parse_deposit(f.body)
        if len(block) != wire.BLOCK_SIZE:
            raise wire.FrameError(wire.E_BAD_BLOCK)
        _deposit_pow(c, deposit_id, kind, auth, block)
        relay = c.relay
        dkey = deposit_key(deposit_id)
        found = await c.mailbox(dkey=dkey)
        if before is not None and not before.done():
            await asyncio.wait({before})
        # While this waited, a full cache may have let the mailbox go (no write pinned it yet)
        # and the owner's SUBSCRIBE loaded another object for it: the write must count and push
        # on the object cached now (from the synchronous steps below on, `writing` pins it).
        # Loaded again if none is cached, at the relay's cost (no lookup token of the client).
        for _ in range(3):
            if found is None or found.deleted or relay.by_id.get(found.id) is found:
                break
            found = relay.by_id.get(found.id) or await relay.mailbox(dkey=dkey)
        mb = _deposit_auth(c, found, kind, auth)
        # Queued first (as fast_deposit): one refused at once ("storage closed") counts nothing.
        fut = _enqueue(c, mb, block)
        mb.queued += 1
        mb.writing += 1
        relay.queued_blocks += 1
    finally:
        turn.set_result(None)
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
    # Several nodes (a shared store): each reserves at most 1/N of the free area, so quotas
    # granted on all the nodes together fit in it (§8.1).
    reserved = (relay.blob_reserved + blocks) * relay.nodes
    if relay.blob_blocks + reserved > area or relay.full(blocks):
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
    relay.blob_writing += 1
    # At rest the block is encrypted under a key only the capability yields: the disk alone
    # tells nothing, and the stored bytes differ from the uploaded ones.
    check, box = _blob_secret(cap)
    fut = relay.storage.put_blob(blob_key(blob_id), check, relay.blob_expiry(),
                                 bytes(box.encrypt(block)))
    fut.add_done_callback(functools.partial(_put_done, c, f.rid))
    await asyncio.wait({fut})  # never cancels the put: it is queued, it will be stored


def _put_done(c: Connection, rid: int, fut: asyncio.Future[bool]) -> None:
    """A put's outcome, counted whether or not its connection is still there."""
    c.relay.blob_writing -= 1
    c.relay.blob_settled += 1
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
