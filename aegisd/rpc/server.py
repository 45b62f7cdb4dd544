"""JSON-RPC 2.0 over a Unix socket: one JSON text per line, in both directions.

Dispatch of single requests is jsonrpcserver's (the brief's choice). Three things are done
here instead, because jsonrpcserver 5 does them differently from the specification or not at
all:

* batches: jsonrpcserver validates a batch as a whole and answers ``[1, 2, 3]`` or a batch
  with one bad member with a single error object; JSON-RPC 2.0 wants an array with one
  response per member. We split the batch and dispatch each member on its own.
* parse errors: we parse once (rejecting NaN/Infinity, which are not JSON) and answer -32700.
* the size limit: a line over MAX_REQUEST_BYTES is answered with -32600 as soon as the limit
  is passed, and the rest of the line is discarded without being buffered.

Each connection is served by its own task and writes through its own lock, so a client that
is slow to read, or gone, holds up nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonrpcserver import async_dispatch_to_serializable

from ..paths import check_socket_path, ensure_private_dir
from .errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    PERMISSION_DENIED,
    error_object,
)
from .methods import CallContext, Registry

log = logging.getLogger("aegisd.rpc")

MAX_REQUEST_BYTES = 1 << 20  # 1 MiB, newline excluded
_READ_CHUNK = 1 << 16


# -- peer credentials ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred | None:
    """SO_PEERCRED of a connected Unix socket (Linux), or None when unavailable."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def peer_allowed(cred: PeerCred | None, daemon_uid: int) -> bool:
    """Only the daemon's own user may talk to it. Unknown credentials are refused."""
    return cred is not None and cred.uid == daemon_uid


# -- socket activation --------------------------------------------------------------------

#: The first inherited file descriptor (sd_listen_fds(3)).
LISTEN_FDS_START = 3


class InheritedSocketError(Exception):
    """LISTEN_FDS names a descriptor that is not a listening Unix stream socket."""


def inherited_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket a supervisor handed over (systemd socket activation), or None.

    The protocol of sd_listen_fds(3), which is a few lines of environment parsing, so it is
    written here rather than pulled in from a library: LISTEN_PID must be our pid (else the
    variables were meant for a parent), LISTEN_FDS counts descriptors from 3. The variables are
    removed so that no child of the daemon takes them for its own.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    if pid != os.getpid() or count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if count > 1:
        log.warning("socket activation: using the first of %d inherited sockets", count)
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise InheritedSocketError(
            f"LISTEN_FDS: descriptor {LISTEN_FDS_START} is not a socket ({exc.strerror})"
        ) from None
    sock.set_inheritable(False)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise InheritedSocketError(
            f"LISTEN_FDS: descriptor {LISTEN_FDS_START} is not a listening Unix stream socket"
        )
    return sock


# -- framing ------------------------------------------------------------------------------


async def read_lines(
    reader: asyncio.StreamReader, limit: int = MAX_REQUEST_BYTES
) -> AsyncIterator[bytes | None]:
    """Yield each line (without its newline), or None once for a line longer than ``limit``,
    whose remaining bytes are then skipped without being kept in memory."""
    buf = bytearray()
    discarding = False
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            if buf and not discarding:
                yield bytes(buf)
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not discarding:
                    buf += chunk[start:]
                    if len(buf) > limit:
                        buf.clear()
                        discarding = True
                        yield None
                break
            piece = chunk[start:nl]
            start = nl + 1
            if discarding:
                discarding = False
                continue
            buf += piece
            if len(buf) > limit:
                yield None
            else:
                yield bytes(buf)
            buf.clear()


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error_object(code, message, data), "id": None}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# -- connections --------------------------------------------------------------------------


class Connection:
    """One client. Requests are handled in order; notifications may interleave."""

    def __init__(self, server: RpcServer, reader: Any, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self._wlock = asyncio.Lock()
        self.closed = False
        #: Run once the response to the current line is written (or, for a notification,
        #: once it is handled): subscriptions start delivering, daemon.stop stops.
        self.after_reply: list[Callable[[], None]] = []

    async def send(self, obj: Any) -> None:
        """Write one line; raises ConnectionError once the client is gone."""
        if self.closed:
            raise ConnectionResetError("connection closed")
        data = encode(obj)
        async with self._wlock:
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                self.closed = True
                raise

    async def serve(self) -> None:
        async for line in read_lines(self.reader, self.server.max_request_bytes):
            if line is None:
                reply: Any = _error(
                    INVALID_REQUEST,
                    f"Invalid Request: a request line may hold at most "
                    f"{self.server.max_request_bytes} bytes",
                    {"error": "request_too_large", "limit": self.server.max_request_bytes},
                )
            else:
                try:
                    reply = await self.server.handle(line, self)
                except Exception as exc:  # a bug; keep serving, say nothing of the content
                    log.error("failed to handle a request: %s", type(exc).__name__)
                    reply = _error(INTERNAL_ERROR, "Internal error", {"error": "internal"})
            try:
                if reply is not None:
                    await self.send(reply)
            finally:
                callbacks, self.after_reply = self.after_reply, []
                for callback in callbacks:
                    callback()


class RpcServer:
    """Serves a Registry on a Unix socket."""

    def __init__(
        self,
        registry: Registry,
        socket_path: Path,
        *,
        app: Any = None,
        on_disconnect: Callable[[Connection], None] | None = None,
        get_peer_cred: Callable[[socket.socket], PeerCred | None] = peer_cred,
        uid: int | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        sock: socket.socket | None = None,
    ) -> None:
        self.registry = registry
        self.socket_path = socket_path
        self.app = app
        self.on_disconnect = on_disconnect
        self.get_peer_cred = get_peer_cred
        self.uid = os.getuid() if uid is None else uid
        self.max_request_bytes = max_request_bytes
        self._methods = registry.for_jsonrpcserver()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[Connection] = set()
        #: An inherited listening socket (socket activation): its owner made it, binds it,
        #: sets its mode and removes it; the server only accepts on it.
        self.sock = sock

    @property
    def address(self) -> str:
        """Where clients connect."""
        if self.sock is not None:
            name = self.sock.getsockname()
            return name if isinstance(name, str) and name else repr(name)
        return str(self.socket_path)

    async def start(self) -> None:
        """Bind the socket: parent directory 0700, socket 0600, path checked for length.
        With an inherited socket, accept on it instead."""
        if self.sock is not None:
            self._server = await asyncio.start_unix_server(
                self._accept, sock=self.sock, limit=_READ_CHUNK
            )
            return
        path = self.socket_path
        check_socket_path(path)
        ensure_private_dir(path.parent)
        if path.is_socket():
            if _socket_answers(path):
                raise OSError(errno.EADDRINUSE, "another daemon is listening on this socket")
            path.unlink()  # stale: left by a daemon that was killed
        old = os.umask(0o177)  # the socket is born 0600; no window with a looser mode
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(path), limit=_READ_CHUNK
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.closed = True
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.sock is None:  # an inherited socket's path belongs to whoever made it
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        try:
            sock = writer.get_extra_info("socket")
            cred = self.get_peer_cred(sock) if sock is not None else None
            if not peer_allowed(cred, self.uid):
                log.warning("refused a connection from another user")
                with contextlib.suppress(Exception):
                    await conn.send(
                        _error(
                            PERMISSION_DENIED,
                            "permission denied: this daemon serves only its own user",
                            {"error": "permission_denied"},
                        )
                    )
                return
            self._conns.add(conn)
            await conn.serve()
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            conn.closed = True
            self._conns.discard(conn)
            if self.on_disconnect is not None:
                self.on_disconnect(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- dispatch -----------------------------------------------------------------------

    async def handle(self, line: bytes, conn: Connection) -> Any:
        """The response to one line (an object, a list, or None for no response)."""
        if not line.strip():
            return None  # blank lines (keep-alives, a stray CR) are ignored
        try:
            doc = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _error(PARSE_ERROR, "Parse error: the line is not one valid JSON text")
        if isinstance(doc, list):
            if not doc:
                return _error(INVALID_REQUEST, "Invalid Request: empty batch")
            replies = [await self._dispatch_one(member, conn) for member in doc]
            answered = [r for r in replies if r is not None]
            return answered or None
        return await self._dispatch_one(doc, conn)

    async def _dispatch_one(self, request: Any, conn: Connection) -> Any:
        if not isinstance(request, dict):
            return _error(INVALID_REQUEST, "Invalid Request: a request must be a JSON object")
        ctx = CallContext(app=self.app, connection=conn)
        reply = await async_dispatch_to_serializable(
            json.dumps(request), methods=self._methods, context=ctx
        )
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            # jsonrpcserver's own errors (-32600, -32601) carry a string: give them the one
            # shape of every error (docs/api.md, "Errors").
            err = reply["error"]
            reply["error"] = error_object(err.get("code"), err.get("message"), err.get("data"))
        return reply
