"""A small synchronous JSON-RPC 2.0 client for aegisd's Unix socket. Standard library only.

Usable by any thin frontend (the CLI, the bridge, bots, tests)::

    with Client(resolve(home).socket) as c:
        print(c.call("status"))
        c.call("events.subscribe", {"since": last_seq})
        for note in c.notifications():   # blocks; yields {"method": "event", "params": {...}}
            ...
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

# One error hierarchy for every client (docs/api.md, "Errors"): the daemon's errors become the
# aegis_client classes (NotFound, Locked, ...), whose base this module calls RpcCallError.
from aegis_client.errors import DaemonNotRunning, from_error_object
from aegis_client.errors import RpcError as RpcCallError

__all__ = ["Client", "DaemonNotRunning", "RpcCallError"]


class Client:
    def __init__(self, path: Path | str, timeout: float | None = 60.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            self._sock.close()
            raise DaemonNotRunning(self.path) from None
        except OSError:
            self._sock.close()
            raise
        self._rfile = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._notes: collections.deque[dict[str, Any]] = collections.deque()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._rfile.close()
        self._sock.close()

    def send_raw(self, data: bytes) -> None:
        self._sock.sendall(data)

    def read_message(self) -> Any:
        """The next JSON text the daemon sends; ConnectionError when it hangs up."""
        line = self._rfile.readline()
        if not line:
            raise ConnectionResetError("the daemon closed the connection")
        return json.loads(line)

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Call ``method`` and return its result, or raise RpcCallError (a subclass of it by
        code and ``data.error``, with ``method`` and ``params`` set)."""
        rid = next(self._ids)
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            req["params"] = params
        self.send_raw(json.dumps(req).encode() + b"\n")
        while True:
            msg = self.read_message()
            if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                self._notes.append(msg)
                continue
            if not isinstance(msg, dict) or msg.get("id") not in (rid, None):
                continue
            if "error" in msg:
                exc = from_error_object(msg["error"])
                exc.set_call(method, params)
                raise exc
            return msg.get("result")

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Notifications (events), as they come; blocks while none is available."""
        while True:
            while self._notes:
                yield self._notes.popleft()
            msg = self.read_message()
            if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                yield msg
