"""The connection gate: every TCP connection is counted from the moment it is accepted, before
any HTTP is read, and shared fairly between sources (issue 15, item 3).

A *source* is the peer's address (an IPv6 peer: its /64, which one subscriber usually holds
whole), counted also under coarser prefixes (IPv6 /56 and /48, IPv4 /24): one party spread over
the /64s of its /48 is one group there. What is kept per prefix is a count and, at the finest,
the connections themselves, in memory only: never logged, never stored, gone with the prefix's
last connection. Behind a reverse proxy or Tor every client arrives from loopback, so a source
is no client there: loopback peers are exempt from the caps unless `source_cap_loopback` is
set, and fairness among them is by connection (below).

Admission of a new connection:

* its source already holds `source_connections`, or one of its coarser prefixes COARSE_FACTOR
  times that (0: no cap): refused;
* the relay holds `max_connections`: from the coarsest prefix down, the biggest group, if it
  holds at least two more than the newcomer's own group at that prefix, gives up a connection
  (of its biggest sub-prefix, down to one source); where the newcomer's own group is the
  biggest, this is looked for one prefix down inside it. Otherwise (one source holds everything,
  e.g. all clients via Tor) a connection that does least for anyone: one not yet upgraded to a
  WebSocket and accepted FRESH_MIN ago at least (one whose request head is incomplete first,
  then one whose head is complete and waits at the turnstile), else one without subscription
  silent for handshake_timeout at least, the longest silent. Subscribed connections are never
  evicted by a newcomer of the same source: each holds a mailbox of its own, and mailboxes have
  a price. If no connection qualifies, the newcomer is refused. Groups are bucketed by size and
  each source keeps its connections least recently heard from first, so a newcomer costs O(1)
  (SCAN_MAX at most).

A refused connection is answered `503` once it sends its request (and aborted if it does not
within `handshake_timeout`); beyond `REFUSED_MAX` refused ones waiting, new ones are aborted at
once. The gate admits a connection at the TCP accept, before aiohttp builds anything for it, and
aiohttp's handler takes it over only once its request head is complete (_Admission), and then
at the pace of the turnstile (relay/turnstile.py: setups_per_turn per turn of the loop). A
connection that has not upgraded to a WebSocket within `handshake_timeout` of being accepted is
aborted (slow or absent HTTP headers hold nothing for long)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from .config import Config
from .turnstile import Ticket, Turnstile

if TYPE_CHECKING:
    from aiohttp import web

#: Refused connections waiting for their request (to be answered 503) at most.
REFUSED_MAX = 1024
#: Bytes of a request's head held before aiohttp's handler takes the connection over; a bigger
#: head is answered 431 (the relay's requests are a few hundred bytes).
HEAD_MAX = 16 * 1024
HEAD_TOO_BIG = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")
#: Seconds before a refused connection's request is answered (held meanwhile, as one of
#: REFUSED_MAX): a client that retries at once, or a flood of full handshakes, goes at this pace.
REFUSE_DELAY = 1.0
#: The answer to a refused connection's request (relay.app's _busy, without aiohttp).
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n")


class Peer(Protocol):
    """What the gate needs of an upgraded connection (relay.connection.Connection)."""

    @property
    def subs(self) -> dict[int, Any]: ...

    @property
    def last_seen(self) -> float: ...

    def abort(self) -> None: ...


#: Coarser prefixes (an IPv6 /56 and /48, an IPv4 /24) may hold this many times
#: source_connections (a site, a campus: many users), the finest (/64, /32) source_connections.
COARSE_FACTOR = 4
#: Connections of one source looked at for a victim at most: a newcomer costs O(1), not O(n).
SCAN_MAX = 256
#: A newcomer takes the place of a connection of its own source that has not upgraded only once
#: that one is this old (seconds; at most half of handshake_timeout). Without it a source that
#: reopens each connection the relay closes (a half-open flood) churns thousands a second on a
#: full relay, each newcomer evicting the one before; with it the flood's newcomers are refused
#: and held (REFUSED_MAX) instead. Through Tor a client's request can follow its connection by a
#: circuit's round trip, so a young connection is not an idle one.
FRESH_MIN = 2.0


class Group:
    """The connections under one prefix: a count, its sub-prefixes bucketed by their counts
    (the biggest found at once), and at the finest prefix the connections themselves, those
    not yet upgraded apart (those whose request head is incomplete apart from those waiting at
    the turnstile), the upgraded ones least recently heard from first."""

    __slots__ = ("buckets", "children", "count", "fresh", "key", "top", "upgraded", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.count = 0
        self.children: dict[str, Group] = {}
        self.buckets: dict[int, dict[Group, None]] = {}
        self.top = 0
        self.fresh: dict[asyncio.BaseTransport, Entry] = {}
        self.waiting: dict[asyncio.BaseTransport, Entry] = {}
        self.upgraded: OrderedDict[asyncio.BaseTransport, Entry] = OrderedDict()

    def biggest(self) -> Group | None:
        bucket = self.buckets.get(self.top)
        return next(iter(bucket)) if bucket else None

    def grow(self, child: Group) -> None:
        c = child.count
        if c:
            self._unbucket(child, c)
        child.count = c + 1
        self.buckets.setdefault(c + 1, {})[child] = None
        self.top = max(self.top, c + 1)

    def shrink(self, child: Group) -> None:
        c = child.count
        self._unbucket(child, c)
        if self.top == c and c not in self.buckets:
            self.top = c - 1  # the child itself is there now (or nothing is left)
        child.count = c - 1
        if c - 1:
            self.buckets.setdefault(c - 1, {})[child] = None
        else:
            del self.children[child.key]

    def _unbucket(self, child: Group, c: int) -> None:
        bucket = self.buckets[c]
        del bucket[child]
        if not bucket:
            del self.buckets[c]


class Entry:
    __slots__ = ("conn", "path", "refused", "since", "source", "transport")

    def __init__(self, transport: asyncio.Transport, source: str, now: float) -> None:
        self.transport = transport
        self.source = source
        self.since = now
        self.conn: Peer | None = None
        self.refused = False
        self.path: list[Group] = []  # from the coarsest prefix to the finest (the leaf)


def source_chain(transport: asyncio.BaseTransport) -> tuple[list[str], bool]:
    """The prefixes of a peer, coarsest first (IPv6 /48, /56, /64; IPv4 /24, /32), and
    whether it is loopback (then one key: the address)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return ["local"], True  # a Unix socket: the machine itself
    host = str(peer[0])
    if host.count(".") == 3 and ":" not in host:
        # IPv4 as the kernel writes it (dotted quad, canonical): string work, not ipaddress,
        # which cost a tenth of the relay's time under a connection flood.
        if host.startswith("127."):
            return [host], True
        return [host.rpartition(".")[0] + ".0/24", host], False
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return ["unknown"], False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return [str(addr)], True
    if isinstance(addr, ipaddress.IPv6Address):
        return [str(ipaddress.IPv6Network((addr, n), strict=False)) for n in (48, 56, 64)], False
    return [str(ipaddress.IPv4Network((addr, 24), strict=False)), str(addr)], False


def source_of(transport: asyncio.BaseTransport) -> tuple[str, bool]:
    """The source key of a peer (an address, an IPv6 /64) and whether it is loopback."""
    keys, loopback = source_chain(transport)
    return keys[-1], loopback


class Gate:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.entries: dict[asyncio.BaseTransport, Entry] = {}
        self.root = Group("")
        self.admitted = 0
        self.refused = 0
        self.closing = False
        #: aiohttp's request handler -> its transport, from the hand-over to connection_lost.
        self.handed: dict[Any, asyncio.Transport] = {}
        #: Hand-overs to aiohttp wait here: cfg.setups_per_turn per turn of the event loop.
        self.turnstile = Turnstile(cfg.setups_per_turn)

    # --- aiohttp hooks ---------------------------------------------------------------------------

    def install(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory to serve with: each accepted connection passes the gate before
        aiohttp builds anything for it, so a connection aborted at once (a flood from a capped
        source) costs the accept and the abort only. Also hooks the lost callback of aiohttp's
        server (its request handlers call it last thing on a connection's end)."""
        lost = server.connection_lost

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            # By the transport recorded at the hand-over: aiohttp's force_close() clears
            # handler.transport before this runs (an error in a handler, shutdown).
            transport = self.handed.pop(handler, None) or handler.transport
            lost(handler, exc)
            if transport is not None:
                self.forget(transport)

        server.connection_lost = connection_lost  # type: ignore[method-assign]
        return lambda: _Admission(self, server)

    # --- admission -------------------------------------------------------------------------------

    def accept(self, transport: asyncio.Transport) -> bool:
        """Count a connection just accepted: False if it was aborted at once."""
        now = time.monotonic()
        self._bound_send_buffer(transport)
        keys, loopback = source_chain(transport)
        entry = Entry(transport, keys[-1], now)
        cap = self.cfg.source_connections
        capped = cap > 0 and (not loopback or self.cfg.source_cap_loopback)
        over = False
        node: Group | None = self.root
        for depth, key in enumerate(keys):
            node = node.children.get(key) if node is not None else None
            held = node.count if node is not None else 0
            limit = cap if depth == len(keys) - 1 else COARSE_FACTOR * cap
            over = over or (capped and held >= limit)
        if self.closing or over or (
                self.admitted >= self.cfg.max_connections and not self._evict(keys)):
            return self._refuse(entry)
        self.entries[transport] = entry
        node = self.root
        for key in keys:
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Group(key)
            node.grow(child)
            entry.path.append(child)
            node = child
        node.fresh[transport] = entry
        self.admitted += 1
        return True

    def _bound_send_buffer(self, transport: asyncio.Transport) -> None:
        """What the kernel holds for a client that does not read is memory too: bound it
        (auto-tuned, it grows to tcp_wmem's maximum per socket, and stays so while an aborted
        socket lingers unsent)."""
        size = self.cfg.conn_sndbuf
        sock = transport.get_extra_info("socket")
        if size > 0 and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _refuse(self, entry: Entry) -> bool:
        if self.refused >= REFUSED_MAX:
            entry.transport.abort()
            return False
        entry.refused = True
        self.refused += 1
        self.entries[entry.transport] = entry
        return True

    def _evict(self, keys: list[str]) -> bool:
        """Make room for a newcomer with prefixes `keys`: True if one was evicted.

        From the coarsest prefix down: where another group holds at least two more than the
        newcomer's own, the victim is in it (its biggest sub-prefix, down to one source);
        where the newcomer's own group is the biggest, fairness is looked for inside it. So
        one party spread over many /64s of a /48 (or many addresses of a /24) is one big group,
        and the honest holder of two connections is not the biggest source any more."""
        node = self.root
        depth = 0
        own = True
        while node.children:
            big = node.biggest()
            if big is None:
                break
            if own:
                mine = node.children.get(keys[depth]) if depth < len(keys) else None
                held = mine.count if mine is not None else 0
                if mine is not None and held >= node.top:
                    node, depth = mine, depth + 1
                    continue
                if big.count < held + 2:
                    break
                own = False
            node, depth = big, depth + 1
        victim = None
        if not own and not node.children:
            victim = self._victim(node, 0.0, subscribed_too=True)
        if victim is None:
            now = time.monotonic()
            quiet = now - self.cfg.handshake_timeout
            leaf = self._leaf(keys)
            if leaf is not None:
                young = now - min(FRESH_MIN, self.cfg.handshake_timeout / 2)
                victim = self._victim(leaf, quiet, subscribed_too=False, young=young)
        if victim is None:
            return False
        self.forget(victim.transport)
        if victim.conn is not None:
            victim.conn.abort()  # also wakes its read loop and writer
        else:
            victim.transport.abort()
        return True

    def _leaf(self, keys: list[str]) -> Group | None:
        node: Group | None = self.root
        for key in keys:
            node = node.children.get(key) if node is not None else None
        return node

    @staticmethod
    def _victim(leaf: Group, quiet: float, subscribed_too: bool,
                young: float | None = None) -> Entry | None:
        """The connection of a source that does least: not upgraded (accepted before
        `young`, when given), else unsubscribed and silent longest (only if silent since
        `quiet`, when not 0), else (if allowed) the one least recently heard from. Looks at
        SCAN_MAX connections at most."""
        # Half-open ones before those waiting at the turnstile: their request is whole, and
        # the wait is the relay's doing, not theirs.
        for pending in (leaf.fresh, leaf.waiting):
            if pending:
                oldest = next(iter(pending.values()))
                if young is None or oldest.since <= young:
                    return oldest
        for n, entry in enumerate(leaf.upgraded.values()):
            conn = entry.conn
            if n >= SCAN_MAX or conn is None or (quiet and conn.last_seen > quiet):
                break  # least recently heard from first: the rest were heard from later
            if not conn.subs:
                return entry
        if subscribed_too and leaf.upgraded:
            return next(iter(leaf.upgraded.values()))
        return None

    def upgraded(self, entry: Entry, conn: Peer) -> None:
        """The connection of `entry` is a WebSocket now."""
        entry.conn = conn
        if entry.path:
            leaf = entry.path[-1]
            if (leaf.fresh.pop(entry.transport, None) is not None
                    or leaf.waiting.pop(entry.transport, None) is not None):
                leaf.upgraded[entry.transport] = entry

    def head_complete(self, entry: Entry) -> None:
        """The connection of `entry` sent its request head and waits at the turnstile."""
        if entry.path and entry.path[-1].fresh.pop(entry.transport, None) is not None:
            entry.path[-1].waiting[entry.transport] = entry

    def heard(self, transport: asyncio.BaseTransport | None) -> None:
        """A frame or ping came from this connection: it goes last in its source's order."""
        if transport is None:
            return
        entry = self.entries.get(transport)
        if entry is not None and entry.path and transport in entry.path[-1].upgraded:
            entry.path[-1].upgraded.move_to_end(transport)

    def forget(self, transport: asyncio.BaseTransport) -> None:
        entry = self.entries.pop(transport, None)
        if entry is None:
            return
        if entry.refused:
            self.refused -= 1
            return
        self.admitted -= 1
        if not entry.path:
            return
        leaf = entry.path[-1]
        leaf.fresh.pop(transport, None)
        leaf.waiting.pop(transport, None)
        leaf.upgraded.pop(transport, None)
        parents = [self.root, *entry.path[:-1]]
        for parent, child in reversed(list(zip(parents, entry.path, strict=True))):
            parent.shrink(child)
        entry.path = []

    # --- the web handler's view ----------------------------------------------------------------

    def entry(self, transport: asyncio.BaseTransport | None) -> Entry | None:
        return self.entries.get(transport) if transport is not None else None

    def close_unhanded(self) -> None:
        """At shutdown: abort the connections aiohttp never took over (their request head is
        not complete, or their 503 is pending); aiohttp's shutdown does not know them."""
        for entry in list(self.entries.values()):
            if isinstance(entry.transport.get_protocol(), _Admission):
                self.forget(entry.transport)
                entry.transport.abort()

    def sweep(self, now: float) -> None:
        """Abort connections that did not upgrade within handshake_timeout of being accepted."""
        limit = self.cfg.handshake_timeout
        late = [e for e in self.entries.values()
                if e.conn is None and now - e.since > limit]
        for entry in late:
            self.forget(entry.transport)
            entry.transport.abort()


class _Admission(asyncio.Protocol):
    """A connection's first protocol: the gate decides at the accept, and aiohttp's request
    handler takes the transport over only once the request's head (up to its blank line) has
    arrived. Building that handler, and the task it starts, for a connection about to be
    aborted, or that sends part of a request and waits (held until handshake_timeout, or until a
    newcomer evicts it), was most of what a connection flood cost; here such a connection holds
    its bytes so far, at most HEAD_MAX (a bigger head is answered 431). A refused connection's
    request is answered here too (503, REFUSE_DELAY later), except a health check's."""

    __slots__ = ("answer", "gate", "head", "queued", "server", "ticket", "transport")

    def __init__(self, gate: Gate, server: web.Server) -> None:
        self.gate = gate
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.answer: asyncio.TimerHandle | None = None
        self.queued = False  # its head complete, waiting at the turnstile
        self.ticket: Ticket | None = None  # its place there

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A socket transport (uvloop's is not an asyncio.Transport subclass, so no isinstance).
        t = cast(asyncio.Transport, transport)
        if self.gate.accept(t):
            self.transport = t

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None or self.answer is not None:
            return  # aborted at the accept, or answered (or about to be)
        if self.queued:
            self.head += data  # arrived before the pause took effect: handed over with the head
            return
        start = max(0, len(self.head) - 3)
        self.head += data
        end = self.head.find(b"\r\n\r\n", start)
        if end < 0 and len(self.head) <= HEAD_MAX:
            return
        if end < 0 or end > HEAD_MAX:
            self._answer(HEAD_TOO_BIG, 0.0)
            return
        head, self.head = bytes(self.head), bytearray()
        entry = self.gate.entries.get(t)
        if entry is None:
            return  # forgotten meanwhile (evicted, timed out): being aborted
        if (entry.refused or self.gate.closing) and not _is_health_check(head):
            # Refused (limits, or shutdown): answered without building a handler for it, and
            # REFUSE_DELAY later (at once during shutdown): a client that retries a full relay
            # at once retries at that pace. Never later than the handshake timeout's sweep.
            left = entry.since + self.gate.cfg.handshake_timeout - time.monotonic() - 0.1
            delay = 0.0 if self.gate.closing else max(0.0, min(REFUSE_DELAY, left))
            self._answer(BUSY, delay)
            return
        # Set up at the turnstile's pace (relay/turnstile.py), reading nothing meanwhile.
        self.queued = True
        self.head = bytearray(head)
        t.pause_reading()
        self.gate.head_complete(entry)
        self.ticket = self.gate.turnstile.enter(self._hand_over)

    def _hand_over(self) -> bool:
        """The turnstile's turn: aiohttp's request handler takes the connection over."""
        self.ticket = None
        t = self.transport
        if t is None or t.is_closing() or self.gate.entries.get(t) is None:
            return False  # ended, evicted or timed out while it waited
        head, self.head = bytes(self.head), bytearray()
        handler = self.server()
        self.gate.handed[handler] = t
        t.set_protocol(handler)
        handler.connection_made(t)
        t.resume_reading()
        handler.data_received(head)
        return True

    def _answer(self, answer: bytes, delay: float) -> None:
        """Send `answer` and close, `delay` seconds from now; read nothing more meanwhile."""
        assert self.transport is not None
        self.transport.pause_reading()
        self.answer = asyncio.get_running_loop().call_later(delay, self._send, answer)

    def _send(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def eof_received(self) -> bool:
        # The client gave up before its request was whole: close; if it half-closed after a
        # request that is being answered, keep the connection for that answer.
        return self.answer is not None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.answer is not None:
            self.answer.cancel()
        if self.ticket is not None:  # ended while it waited at the turnstile
            self.gate.turnstile.cancel(self.ticket)
            self.ticket = None
        # Lost before aiohttp took over (evicted, timed out, reset): aiohttp's hook never runs.
        if self.transport is not None:
            self.gate.forget(self.transport)
            self.transport = None


def _is_health_check(head: bytes) -> bool:
    """A GET or HEAD of exactly /health (with a query or not): aiohttp answers those even for a
    refused connection (relay.app's health(), which closes such a connection after it)."""
    line = head.split(b"\r\n", 1)[0]
    method, _, rest = line.partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    return method in (b"GET", b"HEAD") and target == b"/health"
