"""What the relay sees, recorded in front of it; and the per-user forwarders that feed it.

    daemon (in its namespace) -> 127.0.0.1:PORT there = a listening socket of ours
      -> UserForwarder: connects from 127.0.0.N (direct) or a fresh random 127.a.b.c (hidden)
      -> Tap on 127.0.0.1:TAP (host namespace): records, forwards
      -> the relay on 127.0.0.1:RELAY

The Tap knows exactly what the relay process knows of a connection: its source address and
port, when it opened and closed, and every relay frame each way (RFC 6455 WebSocket frames:
masked from the client, plain from the relay; only the first bytes of each are unmasked and
kept: the relay frame header and the ids that follow). The forwarders know which user each
connection belongs to: that is ground truth, kept apart (`Network.labels`) and never given
to the adversary.

Everything runs on one asyncio loop in a thread of its own (`Network`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from relay import wire

PREFIX = 6 + 16 * 64  # header + up to 64 ids (an ACK lists at most `window` = 32 by default)


@dataclass(slots=True)
class Frame:
    """One relay frame as seen at the relay."""

    t: float  # time.time() when its header and first bytes arrived
    conn: int
    up: bool  # client -> relay
    type: int
    rid: int
    size: int  # the relay frame's length in bytes (header included)
    mailbox: bytes = b""  # owner_id (owner commands, MSG, END, CREATED) or deposit_id (DEPOSIT)
    other: bytes = b""  # CREATED: deposit_id; MSG: msg_id; ACK: the msg_ids; CREATE: flags


@dataclass(slots=True)
class Conn:
    id: int
    src: tuple[str, int]  # source address and port, as the relay sees them
    opened: float
    closed: float | None = None


@dataclass
class Capture:
    """The relay's view of a run: connections and frames, in order of arrival."""

    conns: list[Conn] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)

    def cut(self, end: float) -> Capture:
        """What had been seen by `end`: later frames dropped, later closes undone."""
        conns = [Conn(c.id, c.src, c.opened, c.closed if c.closed is not None and c.closed <= end
                      else None) for c in self.conns if c.opened <= end]  # fmt: skip
        return Capture(conns, [f for f in self.frames if f.t <= end])


def parse(t: float, conn: int, up: bool, data: bytes, size: int) -> Frame | None:
    """A relay frame from its first bytes (`data`, up to PREFIX) and full length."""
    if len(data) < wire.HEADER_LEN or data[0] != wire.VERSION:
        return None
    ftype, rid = data[1], struct.unpack_from(">I", data, 2)[0]
    body = data[wire.HEADER_LEN :]
    f = Frame(t, conn, up, ftype, rid, size)
    if up:
        if ftype in wire.SIGNED_OWNER_TYPES or ftype in (wire.DEPOSIT, wire.BUNDLE_FETCH):
            f.mailbox = body[:16]
        elif ftype == wire.CREATE and len(body) > 64:
            f.other = body[64:65]
        elif ftype == wire.ACK:
            f.other = body
    elif ftype == wire.CREATED or ftype == wire.MSG:
        f.mailbox, f.other = body[:16], body[16:32]
    elif ftype == wire.END:
        f.mailbox = body[:16]
    elif ftype == wire.ERROR:
        f.other = body[:2]
    return f


class WsDecoder:
    """One direction of a WebSocket connection, after its HTTP head; feeds relay frames to
    `sink`. Keeps at most PREFIX bytes of each message: the rest is counted and skipped."""

    def __init__(self, conn: int, up: bool, sink: list[Frame]) -> None:
        self.conn, self.up, self.sink = conn, up, sink
        self.buf = bytearray()
        self.in_head = True  # the HTTP request or response, up to the blank line
        self.skip = 0  # payload bytes of the current frame still to pass over
        self.msg: bytearray | None = None  # the current binary message's first bytes
        self.msg_len = 0
        self.msg_t = 0.0

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf
        buf += data
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    buf.clear()
                return
            del buf[: end + 4]
            self.in_head = False
        while buf:
            if self.skip:
                n = min(self.skip, len(buf))
                del buf[:n]
                self.skip -= n
                continue
            if len(buf) < 2:
                return
            b0, b1 = buf[0], buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = struct.unpack_from(">H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = struct.unpack_from(">Q", buf, 2)[0], 10
            mask = b""
            if b1 & 0x80:
                if len(buf) < pos + 4:
                    return
                mask, pos = bytes(buf[pos : pos + 4]), pos + 4
            keep = min(n, PREFIX)
            if len(buf) < pos + keep:
                return
            head = bytes(buf[pos : pos + keep])
            if mask:
                m = (mask * (keep // 4 + 1))[:keep]
                head = (int.from_bytes(head, "big") ^ int.from_bytes(m, "big")).to_bytes(
                    keep, "big")  # fmt: skip
            del buf[: pos + keep]
            self.skip = n - keep
            self._frame(b0 & 0x80 != 0, b0 & 0x0F, head, n, now)

    def _frame(self, fin: bool, opcode: int, head: bytes, n: int, now: float) -> None:
        if opcode == 0x2:  # binary: a relay frame (or its first fragment)
            self.msg, self.msg_len, self.msg_t = bytearray(head), n, now
        elif opcode == 0x0 and self.msg is not None:  # continuation
            self.msg += head[: max(0, PREFIX - len(self.msg))]
            self.msg_len += n
        else:  # text, close, ping, pong: not relay frames
            return
        if fin and self.msg is not None:
            f = parse(self.msg_t, self.conn, self.up, bytes(self.msg), self.msg_len)
            if f is not None:
                self.sink.append(f)
            self.msg = None


@dataclass(slots=True)
class Label:
    """Ground truth for one connection: which user's forwarder made it."""

    user: str
    src: tuple[str, int]
    t: float


def random_loopback(rng: random.Random, used: set[str]) -> str:
    """A fresh address in 127.1.0.0-127.254.255.254 (never a per-user 127.0.0.N)."""
    while True:
        a = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if a not in used:
            used.add(a)
            return a


class Network:
    """The tap and the per-user forwarders, on one asyncio loop in a thread."""

    def __init__(self, relay_port: int, seed: int) -> None:
        self.relay_port = relay_port
        self.capture = Capture()
        self.labels: list[Label] = []
        self.errors: list[str] = []
        self._rng = random.Random(seed ^ 0x5EED)
        self._used: set[str] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkage-net",
                                        daemon=True)  # fmt: skip
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_conn = 0
        self.tap_port = 0
        self._thread.start()
        self._call(self._start_tap())

    def _call(self, coro: object, timeout: float = 30.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # --- the tap, in front of the relay -----------------------------------------------------

    async def _start_tap(self) -> None:
        server = await asyncio.start_server(self._tap, "127.0.0.1", 0, backlog=1024)
        self.tap_port = server.sockets[0].getsockname()[1]
        self._servers.append(server)

    async def _tap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        now = time.time()
        peer = writer.get_extra_info("peername")[:2]
        with self._lock:
            cid = self._next_conn
            self._next_conn += 1
            conn = Conn(cid, (str(peer[0]), int(peer[1])), now)
            self.capture.conns.append(conn)
        upstream: asyncio.StreamWriter | None = None
        try:
            ur, upstream = await asyncio.open_connection("127.0.0.1", self.relay_port)
            frames = self.capture.frames  # appended on this loop's thread only
            await asyncio.gather(
                self._pipe(reader, upstream, WsDecoder(cid, True, frames), conn),
                self._pipe(ur, writer, WsDecoder(cid, False, frames), conn),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): not re-raised (see tests/recorder.py)
        finally:
            if conn.closed is None:
                conn.closed = time.time()
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, dec: WsDecoder,
                    conn: Conn) -> None:  # fmt: skip
        try:
            while data := await src.read(262144):
                dec.feed(data, time.time())
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            # The first side to end ends the connection, as the relay would see it.
            if conn.closed is None:
                conn.closed = time.time()
            dst.close()

    # --- per-user forwarders ----------------------------------------------------------------

    def add_user(self, user: str, listener: socket.socket, source: str | None) -> None:
        """Serve `listener` (in the user's namespace): connections go on to the tap from
        `source`, or from a fresh random loopback address each when `source` is None."""

        async def go() -> None:
            server = await asyncio.start_server(
                lambda r, w: self._forward(user, source, r, w), sock=listener
            )
            self._servers.append(server)

        self._call(go())

    async def _forward(self, user: str, source: str | None, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:  # fmt: skip
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            with self._lock:
                src = source or random_loopback(self._rng, self._used)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setblocking(False)
                s.bind((src, 0))
                with self._lock:
                    self.labels.append(Label(user, (src, s.getsockname()[1]), time.time()))
                await self._loop.sock_connect(s, ("127.0.0.1", self.tap_port))
            except BaseException:
                s.close()
                raise
            ur, upstream = await asyncio.open_connection(sock=s)

            async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
                try:
                    while data := await a.read(262144):
                        b.write(data)
                        await b.drain()
                except OSError:
                    pass
                finally:
                    b.close()

            await asyncio.gather(pipe(reader, upstream), pipe(ur, writer))
        except OSError as exc:
            self.errors.append(f"{user}: {exc}")
        except asyncio.CancelledError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    # --- the end ----------------------------------------------------------------------------

    def snapshot(self, end: float) -> tuple[Capture, list[Label]]:
        with self._lock:
            cap = Capture(list(self.capture.conns), list(self.capture.frames))
            labels = list(self.labels)
        return cap.cut(end), labels

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for s in self._servers:
                s.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
