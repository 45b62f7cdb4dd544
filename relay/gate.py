"""The connection gate: every TCP connection is counted from the moment it is accepted, before
any HTTP is read, and shared fairly between sources (issue 15, item 3).

A *source* is the peer's address (an IPv6 peer: its /64, which one subscriber usually holds
whole). What is kept per source is a count and the connections themselves, in memory only: never
logged, never stored, gone with the last connection of the source. Behind a reverse proxy or Tor
every client arrives from loopback, so a source is no client there: loopback peers are exempt
from the per-source cap unless `source_cap_loopback` is set, and fairness among them is by
connection (below).

Admission of a new connection:

* its source already holds `source_connections` (0: no cap): refused;
* the relay holds `max_connections`: the newcomer evicts one connection of the source holding
  the most, if that source holds at least two more than the newcomer's; otherwise (one source
  holds everything, e.g. all clients via Tor) a connection that does least for anyone: one not
  yet upgraded to a WebSocket, else one without subscription silent for handshake_timeout at
  least, the longest silent. Subscribed
  connections are never evicted by a newcomer of the same source: each holds a mailbox of its
  own, and mailboxes have a price. If no connection qualifies, the newcomer is refused.

A refused connection is answered `503` once it sends its request (and aborted if it does not
within `handshake_timeout`); beyond `REFUSED_MAX` refused ones waiting, new ones are aborted at
once. A connection that has not upgraded to a WebSocket within `handshake_timeout` of being
accepted is aborted (slow or absent HTTP headers hold nothing for long).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config

if TYPE_CHECKING:
    from aiohttp import web

#: Refused connections waiting for their request (to be answered 503) at most.
REFUSED_MAX = 256


class Peer(Protocol):
    """What the gate needs of an upgraded connection (relay.app.Connection)."""

    @property
    def subs(self) -> dict[int, Any]: ...

    @property
    def last_seen(self) -> float: ...

    def abort(self) -> None: ...


class Entry:
    __slots__ = ("conn", "refused", "since", "source", "transport")

    def __init__(self, transport: asyncio.Transport, source: str, now: float) -> None:
        self.transport = transport
        self.source = source
        self.since = now
        self.conn: Peer | None = None
        self.refused = False


def source_of(transport: asyncio.BaseTransport) -> tuple[str, bool]:
    """The source key of a peer (an address, an IPv6 /64) and whether it is loopback."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return "local", True  # a Unix socket: the machine itself
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return "unknown", False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv6Address) and not addr.is_loopback:
        return str(ipaddress.IPv6Network((addr, 64), strict=False)), False
    return str(addr), addr.is_loopback


class Gate:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.entries: dict[asyncio.BaseTransport, Entry] = {}
        self.by_source: dict[str, dict[asyncio.BaseTransport, Entry]] = {}
        self.admitted = 0
        self.refused = 0
        self.closing = False

    # --- aiohttp hooks ---------------------------------------------------------------------------

    def install(self, server: web.Server) -> None:
        """Hook the accepted/lost callbacks of aiohttp's server (its request handlers call them
        on the server object, first thing on a new connection and last on its end)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.accept(transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            transport = handler.transport
            lost(handler, exc)
            if transport is not None:
                self.forget(transport)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    # --- admission -------------------------------------------------------------------------------

    def accept(self, transport: asyncio.Transport) -> None:
        now = time.monotonic()
        self._bound_send_buffer(transport)
        source, loopback = source_of(transport)
        entry = Entry(transport, source, now)
        cap = self.cfg.source_connections
        mine = self.by_source.get(source)
        held = len(mine) if mine else 0
        capped = cap > 0 and (not loopback or self.cfg.source_cap_loopback)
        if self.closing or (capped and held >= cap) or (
                self.admitted >= self.cfg.max_connections and not self._evict(source, held)):
            self._refuse(entry)
            return
        self.entries[transport] = entry
        self.by_source.setdefault(source, {})[transport] = entry
        self.admitted += 1

    def _bound_send_buffer(self, transport: asyncio.Transport) -> None:
        """What the kernel holds for a client that does not read is memory too: bound it
        (auto-tuned, it grows to tcp_wmem's maximum per socket, and stays so while an aborted
        socket lingers unsent)."""
        size = self.cfg.conn_sndbuf
        sock = transport.get_extra_info("socket")
        if size > 0 and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _refuse(self, entry: Entry) -> None:
        if self.refused >= REFUSED_MAX:
            entry.transport.abort()
            return
        entry.refused = True
        self.refused += 1
        self.entries[entry.transport] = entry

    def _evict(self, source: str, held: int) -> bool:
        """Make room for a newcomer from `source` (holding `held`): True if one was evicted."""
        if not self.by_source:
            return False
        biggest = max(self.by_source, key=lambda s: len(self.by_source[s]))
        group = self.by_source[biggest]
        victim = None
        if biggest != source and len(group) >= held + 2:
            victim = self._victim(group, 0.0, subscribed_too=True)
        if victim is None:
            quiet = time.monotonic() - self.cfg.handshake_timeout
            victim = self._victim(self.by_source.get(source) or {}, quiet, subscribed_too=False)
        if victim is None:
            return False
        self.forget(victim.transport)
        if victim.conn is not None:
            victim.conn.abort()  # also wakes its read loop and writer
        else:
            victim.transport.abort()
        return True

    @staticmethod
    def _victim(group: dict[asyncio.BaseTransport, Entry], quiet: float,
                subscribed_too: bool) -> Entry | None:
        """The connection of `group` that does least: not upgraded, else unsubscribed and
        silent longest (only if silent since `quiet`, when not 0), else (if allowed) the
        newest."""
        best: Entry | None = None
        best_key = 0.0
        for entry in group.values():
            conn = entry.conn
            if conn is None:
                return entry
            if quiet and conn.last_seen > quiet:
                continue
            if not conn.subs and (best is None or conn.last_seen < best_key):
                best, best_key = entry, conn.last_seen
        if best is None and subscribed_too and group:
            best = group[next(reversed(group))]
        return best

    def forget(self, transport: asyncio.BaseTransport) -> None:
        entry = self.entries.pop(transport, None)
        if entry is None:
            return
        if entry.refused:
            self.refused -= 1
            return
        self.admitted -= 1
        group = self.by_source.get(entry.source)
        if group is not None:
            group.pop(transport, None)
            if not group:
                del self.by_source[entry.source]

    # --- the web handler's view ----------------------------------------------------------------

    def entry(self, transport: asyncio.BaseTransport | None) -> Entry | None:
        return self.entries.get(transport) if transport is not None else None

    def sweep(self, now: float) -> None:
        """Abort connections that did not upgrade within handshake_timeout of being accepted."""
        limit = self.cfg.handshake_timeout
        late = [e for e in self.entries.values()
                if e.conn is None and now - e.since > limit]
        for entry in late:
            self.forget(entry.transport)
            entry.transport.abort()
