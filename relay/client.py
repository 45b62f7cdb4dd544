"""A reference asyncio client of the relay protocol (docs/relay-protocol.md).

Used by the tests and the benchmark, and usable by the daemon's transport. It holds no long-term
keys of its own: the caller passes the per-mailbox Ed25519 signing key and X25519 box key.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey

from . import pow as pow_
from . import wire


class RelayError(Exception):
    """The relay answered with an error frame."""

    def __init__(self, code: int) -> None:
        super().__init__(f"relay error {code}: {wire.ERROR_TEXT.get(code, 'unknown')}")
        self.code = code


class RelayClosed(Exception):
    """The connection ended."""


class HandshakeFailed(Exception):
    """No relay connection could be set up at the URL: the server answered the WebSocket
    upgrade with an HTTP status (``status``: 404, nothing at this path; 503, a relay that is
    full or stopping), or accepted it but did not answer ``HELLO`` with a ``HELLO_OK`` of this
    protocol (not an AegisLink relay, or another version). The message says which, and holds
    no URL."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def _refuse_redirect(session: Any, ctx: Any, params: Any) -> None:
    # A relay never redirects. Following one would let whoever answers the upgrade send the
    # connection anywhere (a local port, a private address) past every check made on the URL.
    raise HandshakeFailed(
        f"the server answered {params.response.status} (a redirect): not an AegisLink relay",
        params.response.status,
    )


#: Sessions the client makes itself refuse every redirect (aiohttp's ws_connect has no
#: allow_redirects: the trace fires before the redirect is followed).
_NO_REDIRECTS = aiohttp.TraceConfig()
_NO_REDIRECTS.on_request_redirect.append(_refuse_redirect)
_NO_REDIRECTS.freeze()


@dataclass(frozen=True)
class Created:
    owner_id: bytes
    deposit_id: bytes
    relay_box_pub: bytes


@dataclass(frozen=True)
class Message:
    owner_id: bytes
    msg_id: bytes
    sealed: bytes

    def open(self, owner_box_key: PrivateKey, relay_box_pub: bytes) -> bytes:
        """Undo the relay's re-encryption: the block as deposited."""
        return bytes(Box(owner_box_key, PublicKey(relay_box_pub)).decrypt(self.sealed))


@dataclass
class _Pending:
    future: asyncio.Future[wire.Frame]
    msgs: list[Message]


class RelayClient:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 own_session: bool) -> None:
        self._session = session
        self._own_session = own_session
        self.ws = ws
        self.hello: wire.HelloOk | None = None
        self._rids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.ended: asyncio.Queue[bytes] = asyncio.Queue()
        self.errors: list[int] = []  # unsolicited error codes (rid 0)
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.request_timeout: float | None = None
        self.garbled = False  # the server sent text or a frame that does not decode
        self.other_version: int | None = None  # ... or a frame of another protocol version

    @classmethod
    async def connect(cls, url: str, *, local_addr: tuple[str, int] | None = None,
                      session: aiohttp.ClientSession | None = None,
                      connector: aiohttp.BaseConnector | None = None,
                      max_frame: int = 1 << 20, heartbeat: float | None = None,
                      request_timeout: float | None = None) -> RelayClient:
        """``heartbeat``: seconds between pings, so a half-open connection is noticed;
        ``request_timeout``: seconds a request may wait for its answer (TimeoutError);
        ``connector``: for a session of the client's own (closed with it), e.g. a SOCKS proxy's."""
        own = session is None
        if session is None:
            if connector is None:
                connector = aiohttp.TCPConnector(local_addr=local_addr, limit=0)
            session = aiohttp.ClientSession(connector=connector, trace_configs=[_NO_REDIRECTS])
        try:
            ws = await session.ws_connect(url, max_msg_size=max_frame, autoping=True,
                                          compress=0, heartbeat=heartbeat)
        except aiohttp.WSServerHandshakeError as exc:
            # An HTTP answer instead of the upgrade (404: no relay at this path), or a broken
            # upgrade: whatever it is, it is not a relay at this URL.
            if own:
                await session.close()
            raise HandshakeFailed(_handshake_text(exc.status), exc.status) from None
        except BaseException:
            if own:
                await session.close()
            raise
        client = cls(session, ws, own)
        client.request_timeout = request_timeout
        client._reader = asyncio.ensure_future(client._read())
        try:
            client.hello = await client._hello()
        except BaseException:  # cancelled or refused during HELLO: never leave the socket open
            await client.close()
            raise
        return client

    async def _hello(self) -> wire.HelloOk:
        """HELLO, and a HELLO_OK of this protocol (HandshakeFailed for anything else: an echo,
        text, frames that do not decode, another version or block size)."""
        fail = HandshakeFailed
        try:
            frame = await self.request(wire.HELLO, b"")
        except RelayClosed:
            if self.other_version is not None:
                raise fail(f"the relay speaks version {self.other_version} of the relay "
                           f"protocol, not {wire.VERSION}") from None
            if wire.E_BAD_VERSION in self.errors:  # its answer to a version it does not speak
                raise fail(f"the relay does not speak version {wire.VERSION} of the relay "
                           "protocol") from None
            if self.garbled:
                raise fail("the server at this URL does not speak the relay protocol "
                           "(not an AegisLink relay)") from None
            raise
        if frame.type != wire.HELLO_OK:
            raise fail("the server at this URL answered HELLO with something else "
                       "(not an AegisLink relay)")
        try:
            hello = wire.HelloOk.parse(frame.body)
        except wire.FrameError:
            raise fail("the server at this URL sent a malformed HELLO_OK "
                       "(not an AegisLink relay of this version)") from None
        if hello.block_size != wire.BLOCK_SIZE:
            raise fail(f"the relay uses blocks of {hello.block_size} bytes, not "
                       f"{wire.BLOCK_SIZE} (an incompatible relay)")
        return hello

    @property
    def challenge(self) -> bytes:
        assert self.hello is not None
        return self.hello.challenge

    @property
    def mailbox_ttl(self) -> int:
        """Seconds without use after which this relay deletes a mailbox (HELLO_OK)."""
        assert self.hello is not None
        return self.hello.mailbox_ttl

    @property
    def blob_ttl(self) -> int:
        """Seconds after which this relay deletes an unfetched blob (HELLO_OK)."""
        assert self.hello is not None
        return self.hello.blob_ttl

    async def close(self) -> None:
        """Close the connection and everything it holds. A cancellation of the caller that
        arrives meanwhile is raised once the socket is closed, never swallowed: a loop that
        closes connections must stop when it is cancelled."""
        interrupted = False
        try:
            await self.ws.close()
        except asyncio.CancelledError:
            interrupted = True
        except Exception:  # noqa: S110 (already broken: closing is all that is left)
            pass
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass  # the reader's own, or ours: told apart below
            except Exception:  # noqa: S110
                pass
        if self._own_session:
            await self._session.close()
        task = asyncio.current_task()
        if interrupted or (task is not None and task.cancelling()):
            raise asyncio.CancelledError

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.garbled = True  # a relay sends binary frames only (§2): not a relay
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    frame = wire.decode(msg.data)
                except wire.FrameError as exc:
                    self.garbled = True
                    if exc.code == wire.E_BAD_VERSION:
                        self.other_version = msg.data[0]
                    break  # not a relay we can talk to: treat as closed
                self._dispatch(frame)
        finally:
            self.closed.set()
            for p in self._pending.values():
                if not p.future.done():
                    p.future.set_exception(RelayClosed())
            self._pending.clear()

    def _dispatch(self, frame: wire.Frame) -> None:
        if frame.type == wire.MSG:
            body = frame.body
            m = Message(body[:16], body[16:32], body[32:])
            p = self._pending.get(frame.rid) if frame.rid else None
            if p is not None:
                p.msgs.append(m)
            else:
                self.messages.put_nowait(m)
            return
        if frame.type == wire.END:
            self.ended.put_nowait(frame.body)
            return
        p = self._pending.pop(frame.rid, None)
        if p is None:
            if frame.type == wire.ERROR:
                self.errors.append(wire.parse_error(frame.body))
            return
        if frame.type == wire.ERROR:
            p.future.set_exception(RelayError(wire.parse_error(frame.body)))
        else:
            p.future.set_result(frame)

    def next_rid(self) -> int:
        return next(self._rids)

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def request(self, ftype: int, body: bytes, rid: int | None = None,
                      collect: list[Message] | None = None) -> wire.Frame:
        if self.closed.is_set():
            raise RelayClosed()
        rid = self.next_rid() if rid is None else rid
        fut: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(fut, collect if collect is not None else [])
        try:
            await self.ws.send_bytes(wire.encode(ftype, rid, body))
            return await asyncio.wait_for(fut, self.request_timeout)
        finally:
            self._pending.pop(rid, None)

    async def signed(self, ftype: int, key: SigningKey, owner_id: bytes, args: bytes = b"",
                     collect: list[Message] | None = None) -> wire.Frame:
        rid = self.next_rid()
        unsigned = owner_id + args
        sig = key.sign(wire.auth_message(self.challenge, wire.encode(ftype, rid, unsigned)))
        return await self.request(ftype, unsigned + sig.signature, rid=rid, collect=collect)

    # --- owner commands ---------------------------------------------------------------------

    async def create(self, key: SigningKey, box_pub: bytes, public: bool = False,
                     delete_pub: bytes | None = None) -> Created:
        """CREATE, paid with a proof of work bound to the keys (§4, §6); `delete_pub`: the
        mailbox's delete-only key (§4.1), if it gets one."""
        assert self.hello is not None
        sig_pub = bytes(key.verify_key)
        flags = (wire.CREATE_PUBLIC if public else 0) | (
            wire.CREATE_DELETE_KEY if delete_pub is not None else 0)
        nonce = await self._pow(self.hello.pow_create_bits, wire.POW_CREATE, pow_.ZERO_TARGET,
                                wire.create_pow_hash(sig_pub, box_pub, flags, delete_pub))
        rid = self.next_rid()
        unsigned = sig_pub + box_pub + bytes([flags]) + (delete_pub or b"") + nonce
        sig = key.sign(wire.auth_message(self.challenge,
                                         wire.encode(wire.CREATE, rid, unsigned))).signature
        f = await self.request(wire.CREATE, unsigned + sig, rid=rid)
        b = f.body
        return Created(b[:16], b[16:32], b[32:64])

    async def subscribe(self, owner_id: bytes, key: SigningKey) -> None:
        await self.signed(wire.SUBSCRIBE, key, owner_id)

    async def unsubscribe(self, owner_id: bytes, key: SigningKey) -> None:
        await self.signed(wire.UNSUBSCRIBE, key, owner_id)

    async def fetch(self, owner_id: bytes, key: SigningKey, n: int = 32) -> list[Message]:
        got: list[Message] = []
        await self.signed(wire.FETCH, key, owner_id, bytes([n]), collect=got)
        return got

    async def ack(self, msg_ids: list[bytes]) -> None:
        await self.request(wire.ACK, b"".join(msg_ids))

    async def delete(self, owner_id: bytes, key: SigningKey) -> None:
        await self.signed(wire.DELETE, key, owner_id)

    async def token_add(self, owner_id: bytes, key: SigningKey, token: bytes) -> None:
        await self.signed(wire.TOKEN_ADD, key, owner_id, hashlib.sha256(token).digest())

    async def token_del(self, owner_id: bytes, key: SigningKey, token: bytes) -> None:
        await self.signed(wire.TOKEN_DEL, key, owner_id, hashlib.sha256(token).digest())

    async def bundle_base(self, owner_id: bytes, key: SigningKey, base: bytes) -> None:
        await self.signed(wire.BUNDLE_BASE, key, owner_id, base)

    async def bundle_add(self, owner_id: bytes, key: SigningKey, kind: int,
                         items: list[bytes]) -> tuple[int, int]:
        f = await self.signed(wire.BUNDLE_ADD, key, owner_id, wire.encode_items(kind, items))
        x, m = struct.unpack(">HH", f.body)
        return x, m

    async def bundle_status(self, owner_id: bytes, key: SigningKey) -> tuple[int, int]:
        f = await self.signed(wire.BUNDLE_STATUS, key, owner_id)
        x, m = struct.unpack(">HH", f.body)
        return x, m

    # --- anonymous commands -------------------------------------------------------------------

    async def _pow(self, bits: int, purpose: int, target: bytes, payload_hash: bytes) -> bytes:
        """The proof of work, searched in a thread; a cancelled caller stops the search (so a
        daemon told to stop mid-proof exits at once instead of after the search)."""
        if bits <= 0:
            return bytes(wire.NONCE_LEN)
        stop = threading.Event()
        try:
            return await asyncio.to_thread(pow_.solve, bits, self.challenge, purpose, target,
                                           payload_hash, stop)  # fmt: skip
        finally:
            stop.set()

    async def bundle_fetch(self, deposit_id: bytes) -> tuple[bytes, bytes | None, bytes | None]:
        assert self.hello is not None
        nonce = await self._pow(self.hello.pow_bundle_bits, wire.POW_BUNDLE,
                                deposit_id, pow_.ZERO_HASH)
        f = await self.request(wire.BUNDLE_FETCH, deposit_id + nonce)
        return wire.parse_bundle(f.body)

    async def deposit(self, deposit_id: bytes, block: bytes, token: bytes | None = None) -> None:
        """Deposit one block with a send token, or (token None) with a proof of work."""
        assert self.hello is not None
        if token is not None:
            auth = bytes([wire.AUTH_TOKEN]) + token
        else:
            nonce = await self._pow(self.hello.pow_deposit_bits, wire.POW_DEPOSIT, deposit_id,
                                    hashlib.sha256(block).digest())
            auth = bytes([wire.AUTH_POW]) + nonce
        await self.request(wire.DEPOSIT, deposit_id + auth + block)

    async def blob_quota(self, blocks: int = wire.BLOB_POW_UNIT) -> int:
        """A quota of `blocks` blob uploads (default: 256, the most one unit of proof of work
        buys); the proof of work grows with it (§4.5), so ask for what will be uploaded."""
        assert self.hello is not None
        bits = wire.blob_pow_bits(self.hello.pow_blob_bits, blocks)
        nonce = await self._pow(bits, wire.POW_BLOB, wire.blob_pow_target(blocks),
                                pow_.ZERO_HASH)
        f = await self.request(wire.BLOB_QUOTA, struct.pack(">I", blocks) + nonce)
        quota: int = struct.unpack(">I", f.body)[0]
        return quota

    async def blob_put(self, blob_id: bytes, cap: bytes, block: bytes) -> None:
        await self.request(wire.BLOB_PUT, blob_id + cap + block)

    async def blob_get(self, blob_id: bytes, cap: bytes, key: PrivateKey) -> bytes:
        f = await self.request(wire.BLOB_GET, blob_id + cap + bytes(key.public_key))
        return bytes(SealedBox(key).decrypt(f.body))

    async def blob_del(self, blob_id: bytes, cap: bytes) -> None:
        await self.request(wire.BLOB_DEL, blob_id + cap)


def _handshake_text(status: int) -> str:
    if status == 101:
        return "the server at this URL broke the WebSocket upgrade (not an AegisLink relay)"
    if status == 503:
        return "the relay answered 503: it is full or shutting down"
    return f"the relay answered {status}: not an AegisLink relay at this URL"


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def run(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))
