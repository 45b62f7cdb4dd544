"""A TCP forwarder that records which process opened each connection it accepts.

Every connection from tor arrives from 127.0.0.1, the exit's as well as a daemon's own, so an
address says nothing about who connected. The recorder asks the kernel instead: at accept time,
while the connection is certainly open, it finds the client end's socket in /proc/net/tcp(6)
(local address = our peer, remote address = our listening address), and the process holding
that socket among /proc/*/fd. Only processes we may inspect are found (all of ours; everyone's
as root); the connection is then recorded with pid None.

    with Recorder(listen_port=net.exit_ports[0], target_port=relay.port) as rec:
        ...  # clients connect to 127.0.0.1:net.exit_ports[0]
    assert {c.pid for c in rec.connections} == {net.exit_pid}

`target_port=None` makes a trap: connections are recorded and closed at once.
Linux only; standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import struct
import threading
import time
from pathlib import Path

Endpoint = tuple[str, int]

# /proc/net/tcp "st" column: 01 ESTABLISHED, 0A LISTEN.
_LISTEN = "0A"


@dataclasses.dataclass
class Connection:
    """One accepted connection: who opened it, when, and how much went each way."""

    peer: Endpoint  # the client end's address and port, as we saw them
    pid: int | None  # the process holding the client end (None: not found)
    program: str | None  # its name (/proc/PID/comm), e.g. "tor" or "python3"
    opened: float  # time.time() at accept
    closed: float | None = None
    bytes_from_client: int = 0
    bytes_to_client: int = 0


# ---- /proc ------------------------------------------------------------------------------------


def _address(hex_address: str) -> Endpoint:
    """'0100007F:1F90' -> ('127.0.0.1', 8080); IPv4-mapped IPv6 becomes IPv4."""
    host, port = hex_address.split(":")
    # The kernel prints each 32-bit word of the address as a host-order integer.
    raw = b"".join(struct.pack("=I", int(host[i : i + 8], 16)) for i in range(0, len(host), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _normal(endpoint: Endpoint) -> Endpoint:
    ip = ipaddress.ip_address(endpoint[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), endpoint[1]


def sockets(protocol: str = "tcp") -> list[tuple[Endpoint, Endpoint, str, int]]:
    """The sockets of this network namespace: (local, remote, state, inode) per socket.

    `protocol` is "tcp" or "udp" (IPv4 and IPv6 both). The state is the kernel's hex code
    ("01" established, "0A" listening for TCP).
    """
    found = []
    for name in (protocol, protocol + "6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path("/proc/net", name).read_text().splitlines()[1:]:
                f = line.split()
                found.append((_address(f[1]), _address(f[2]), f[3], int(f[9])))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets that process `pid` holds (empty if it is gone or not ours)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def inode_owner(inode: int) -> int | None:
    """The lowest pid of a process holding socket `inode`, or None."""
    for entry in sorted(os.scandir("/proc"), key=lambda e: int(e.name) if e.name.isdigit() else 0):
        if entry.name.isdigit() and inode in socket_inodes(int(entry.name)):
            return int(entry.name)
    return None


def program(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def connection_owner(local: Endpoint, remote: Endpoint) -> int | None:
    """The pid holding the TCP socket whose own address is `local` and peer is `remote`."""
    local, remote = _normal(local), _normal(remote)
    for sock_local, sock_remote, state, inode in sockets("tcp"):
        if sock_local == local and sock_remote == remote and state != _LISTEN and inode:
            return inode_owner(inode)
    return None


def process_endpoints(pid: int) -> list[tuple[str, Endpoint, Endpoint]]:
    """Every TCP and UDP socket of process `pid`: (protocol, local, remote)."""
    mine = socket_inodes(pid)
    return [
        (protocol, local, remote)
        for protocol in ("tcp", "udp")
        for local, remote, _state, inode in sockets(protocol)
        if inode in mine
    ]


# ---- the forwarder ----------------------------------------------------------------------------


class Recorder:
    """Listens on host:listen_port (0: any free port; see `port`), forwards to host:target_port.

    Runs its own asyncio loop in a thread, so synchronous tests can use it as they are.
    """

    def __init__(
        self, listen_port: int, target_port: int | None, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.port = listen_port
        self.target_port = target_port
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> list[Connection]:
        """A snapshot of every connection accepted so far, oldest first."""
        with self._lock:
            return [dataclasses.replace(c) for c in self._connections]

    def wait(self, count: int, timeout: float = 30.0) -> list[Connection]:
        """Wait until at least `count` connections were accepted; return them all."""
        deadline = time.monotonic() + timeout
        while len(found := self.connections) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} connections to port {self.port}")
            time.sleep(0.02)
        return found

    def start(self) -> Recorder:
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                error.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"recorder:{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        """Stop listening and close every connection still open."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(10)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")[:2]
        here = writer.get_extra_info("sockname")[:2]
        # Now, before a byte is read or sent: the client end is open (it may close at any
        # moment once it has its answer). A blocking /proc scan, on this recorder's own loop.
        pid = connection_owner(peer, here)
        conn = Connection(peer, pid, program(pid) if pid else None, time.time())
        with self._lock:
            self._connections.append(conn)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.target_port is None:
                return  # a trap: recorded, and closed
            target_reader, upstream = await asyncio.open_connection(self.host, self.target_port)
            await asyncio.gather(
                self._pipe(reader, upstream, conn, "bytes_from_client"),
                self._pipe(target_reader, writer, conn, "bytes_to_client"),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() with the connection open. Not re-raised: asyncio's stream server (Python
            # 3.11) calls task.exception() on a handler that ends cancelled, which raises and
            # is logged as an error.
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            conn.closed = time.time()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection, counter: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                # Counted before it is written: the other end may read it, and a test look at
                # the count, before this thread runs another line.
                setattr(conn, counter, getattr(conn, counter) + len(data))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # a half-close goes through as a half-close
        except OSError:
            writer.close()
