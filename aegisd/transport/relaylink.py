"""The daemon's connection to its relay: I/O only, no protocol decisions.

Every connection goes through ``_connect`` with the profile's network settings (network.py):
through the SOCKS5 proxy when one is configured, never around it.

Shared mode (isolation off): one long-lived WebSocket to the profile's own relay carries the
subscriptions of every mailbox the profile owns and the owner commands; deposits to that relay
go over it too, deposits to another relay over a short-lived connection.

Isolated mode (isolation on, the default with a proxy): every receiving mailbox has a long-lived
connection of its own, owner commands (create, tokens, bundles, delete) and deposits each use a
short-lived connection, and through a proxy every connection has its own SOCKS credentials (its
own Tor circuit). Each connection reconnects with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp_socks
from nacl.signing import SigningKey

from aegisd.netmode import Unreachable
from aegisd.relayurl import RelayUrlError, relay_endpoint
from relay import wire
from relay.client import HandshakeFailed, Message, RelayClient, RelayClosed, RelayError

from .network import Network, ProxyUnavailable, raise_descriptor_limit
from .tor import TorUnavailable

log = logging.getLogger("aegisd.relay")

Handler = Callable[[RelayClient, Message], Awaitable[None]]
Subscriptions = Callable[[], list[tuple[bytes, SigningKey]]]
StateCallback = Callable[[bool, str | None], None]
#: A subscription the relay refused: (owner id, error code) -> True if the caller accounted
#: for it (then the link does not log it: a known refusal would repeat on every reconnect).
RefusedCallback = Callable[[bytes, int], bool]

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0  # a relay that does not answer a request is treated as unreachable
HEARTBEAT = 20.0  # WebSocket pings: a half-open connection is noticed within ~2 of these
RECONCILE_INTERVAL = 10.0  # isolated mode: how often the per-mailbox connections are checked
# Isolated mode: mailbox connections being set up at once (Tor builds a circuit for each and
# keeps at most 32 pending by default: MaxClientCircuitsPending); 200 mailboxes start in waves.
DIAL_CONCURRENCY = 16
#: stop(finish=True) (a reconnect, new network settings): how long a block being handled may
#: take to commit and be acknowledged before it is cancelled anyway (a handler waits for the
#: messenger's lock and may make a mailbox: a proof of work of seconds).
STOP_GRACE = 30.0

#: Exceptions that mean "the relay is not reachable right now".
UNAVAILABLE = (
    RelayClosed,
    HandshakeFailed,  # an HTTP error (404: no relay at this path) or not the relay protocol
    OSError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    # aiohttp-socks' own exceptions derive from none of the above
    aiohttp_socks.ProxyError,
    aiohttp_socks.ProxyConnectionError,
    aiohttp_socks.ProxyTimeoutError,
    # mode tor: the managed Tor is not (yet) bootstrapped; a relay this mode may not reach;
    # mode proxy without a proxy
    TorUnavailable,
    Unreachable,
    ProxyUnavailable,
)


class RelayUnavailable(Exception):
    """There is no working connection to the relay at the moment."""


class RelayRefused(RelayUnavailable):
    """The relay was chosen by someone else (a contact, a stranger, a file's sender) and its
    URL fails relayurl.check_peer_relay_url: no connection is made, now or later (a URL
    stored before the policy, or by an older version, is held to it here)."""


#: Seconds before trying again what a relay refused as `full` (error 17): each try pays a
#: proof of work again (a CREATE's 2**22 hashes, an upload's blob quota 2**25 and more), and a
#: full relay rarely has room a minute later (issue 15 review item 5).
FULL_BACKOFF = 600.0


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter, so reconnecting clients do not move in step."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)


class RelayLink:
    """The profile's relay connections. Shared mode (no isolation): one long-lived connection
    carries every subscription and the owner commands. Isolated mode: one long-lived connection
    per receiving mailbox, and owner commands on short-lived connections of their own.
    Deposits (``with_relay``) never use a subscription connection in isolated mode."""

    def __init__(
        self,
        url: str,
        *,
        handler: Handler,
        subscriptions: Subscriptions,
        on_state: StateCallback,
        network: Network | None = None,
        on_refused: RefusedCallback | None = None,
        name: str = "relay",
    ) -> None:
        self.url = url
        #: How the log names this link's relay: "relay" (the profile's), "old relay" (a relay
        #: move's drain link). Never the URL or an address.
        self.name = name
        self._on_refused = on_refused
        # The link's relay is the user's own by construction (the profile's, or the old one of
        # a move): its dials use the plain connector and pass no peer check, whatever the
        # settings the network was made from hold (equality is unchanged: compare=False).
        self.network = (network or Network()).with_own(url)
        self._handler = handler
        self._subscriptions = subscriptions
        self._on_state = on_state
        self._client: RelayClient | None = None  # shared mode
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Isolated mode: one task and connection per mailbox, and their states.
        self._serving: dict[bytes, asyncio.Task[None]] = {}
        self._clients: dict[bytes, RelayClient] = {}
        self._failing: dict[bytes, str] = {}
        self._refused: set[bytes] = set()
        self._retired: set[bytes] = set()
        #: Tasks of retired mailboxes finishing their last block: kept, so that stop() can
        #: cancel and await them too (a task nobody holds can outlive the link).
        self._retiring: set[asyncio.Task[None]] = set()
        self._busy: set[bytes] = set()
        #: The tasks handling a block right now (both modes): stop(finish=True) waits for them.
        self._handling: set[asyncio.Task[Any]] = set()
        self._probe_ok = False
        self._up = False
        self._dialing = asyncio.Semaphore(DIAL_CONCURRENCY)
        self.hello_ttl: int | None = None
        #: The relay's mailbox_ttl (HELLO_OK; None from a relay that does not say it).
        self.mailbox_ttl: int | None = None
        self._logged: str | None = None  # the failure last written to the log
        self._logged_up = False  # the log's last word on this link: connected
        #: Mailboxes another connection took (the relay sent END: a copy of this profile
        #: running elsewhere subscribed them). Not subscribed again by this link, so that two
        #: copies do not take them from each other in a loop; a new link (unlock, changed
        #: network settings, restart) tries again.
        self._taken: set[bytes] = set()
        self._taken_logged = False

    @property
    def isolated(self) -> bool:
        return self.network.isolation

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def client(self) -> RelayClient | None:
        if not self.isolated:
            return self._client
        return next(iter(self._clients.values()), None)

    def start(self) -> None:
        if self.isolated:
            raise_descriptor_limit()
        run = self._run_isolated if self.isolated else self._run
        self._task = asyncio.create_task(run(), name="relay-link")

    async def stop(self, finish: bool = False) -> None:
        """Close every connection. With ``finish`` (a reconnect, not a lock), a block being
        handled first finishes (commits, is acknowledged), as a retired mailbox's does, rather
        than be cancelled mid-way (bounded by STOP_GRACE); no new block is taken meanwhile."""
        self._stopping = True
        busy = self._handling - {asyncio.current_task()}
        if finish and busy:
            await asyncio.wait(busy, timeout=STOP_GRACE)
        tasks = [t for t in (self._task, *self._serving.values(), *self._retiring) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._serving.clear()
        for c in list(self._clients.values()):
            await c.close()
        self._clients.clear()
        await self._drop()
        if self._logged_up:  # closed on purpose (a lock, a stop, new network settings)
            log.info("%s connection closed", self.name)
            self._logged_up = False

    def _state(self, up: bool, reason: str | None) -> None:
        """Report the link's state, and log it in this one place: a line when the connection
        comes up and one when it is lost (once per change), and why it cannot connect once
        per reason (again only when the reason changes, never on every retry); stop() adds
        the line of a connection closed on purpose."""
        if up:
            if not self._logged_up:
                log.info("%s connected", self.name)
                self._logged_up = True
            self._logged = None
        elif reason is not None:
            if self._logged_up:
                log.warning("%s connection lost: %s", self.name, reason)
                self._logged_up = False
                self._logged = reason
            elif reason != self._logged:
                log.warning("cannot reach the %s: %s", self.name, reason)
                self._logged = reason
        self._on_state(up, reason)

    async def _on_end(self, client: RelayClient, owner_id: bytes) -> bool:
        """The relay sent END on ``client``: another connection subscribed this mailbox, or
        deleted it (relay-protocol.md §4.3). Its unacknowledged deliveries here were withdrawn
        and come again where the mailbox is held. True if it is held elsewhere: then this link
        stops subscribing it (never taken back in a loop) and the log says so, once per link.
        A mailbox deleted (by this profile on another connection, e.g. an isolated owner
        command, or by a restored copy) is not "taken": an owner command without side
        effects tells the two apart, and the link's reconcile or a refused subscription deal
        with it as before."""
        key = dict(self._subscriptions()).get(owner_id)
        if key is None:
            return False  # no longer ours (deleted, retired): nothing to say
        try:
            await client.bundle_status(owner_id, key)
        except RelayError:
            return False  # it no longer exists: deleted, not taken
        self._taken.add(owner_id)
        if not self._taken_logged:  # once per link: not a line per mailbox or per END
            log.warning("another connection took over this profile's mailboxes at the %s: "
                        "is a copy of the profile running elsewhere?", self.name)
            self._taken_logged = True
        return True

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        if client is not None:
            await client.close()

    async def _dial(self, url: str | None = None) -> RelayClient:
        if self._stopping:  # a stopped link (settings changed, locked) makes no connection
            raise RelayUnavailable()
        await self.network.ready(url or self.url)  # mode tor: until Tor has bootstrapped
        client = await asyncio.wait_for(_connect(url or self.url, self.network), CONNECT_TIMEOUT)
        if self._stopping:  # stopped while dialing (wait_for can return a result it raced)
            await client.close()
            raise RelayUnavailable()
        if client.hello is not None:
            self.hello_ttl = int(client.hello.message_ttl)
            ttl = getattr(client.hello, "mailbox_ttl", None)
            self.mailbox_ttl = int(ttl) if ttl else None
        return client

    async def _dial_or_unavailable(self) -> RelayClient:
        try:
            return await self._dial()
        except (*UNAVAILABLE, RelayError):
            raise RelayUnavailable() from None

    # --- shared mode ----------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                client = await self._dial()
            except (*UNAVAILABLE, RelayError) as exc:
                self._state(False, _reason(exc, self.network.mode == "tor"))
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            except Exception as exc:  # never let the link die silently: say so, and retry
                self._state(False, _failed(exc))
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            self._client = client
            try:
                refused = 0
                for owner_id, key in self._subscriptions():
                    if owner_id in self._taken:
                        continue  # another connection holds it (END): not taken back
                    try:
                        await client.subscribe(owner_id, key)
                    except RelayError as exc:  # one mailbox refused (e.g. a limit): not the others
                        if not self._refused_known(owner_id, exc.code):
                            refused += 1
                if refused:
                    log.warning("the relay refused %d subscription(s)", refused)
                self.connected.set()
                self._state(True, None)
                attempt = 0
                await self._receive(client)
                reason = "the relay closed the connection"
            except (*UNAVAILABLE, RelayError, RelayUnavailable) as exc:
                reason = _reason(exc, self.network.mode == "tor")
            except Exception as exc:  # never let the link die: reconnect after a pause
                reason = _failed(exc)
            await self._drop()
            if self._stopping:
                return
            self._state(False, reason)
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _receive(self, client: RelayClient, owner_id: bytes | None = None) -> None:
        """Handle the blocks ``client`` receives until it closes; an END of the mailbox
        ``owner_id`` (isolated mode: the connection's only one) also ends it."""
        closed = asyncio.ensure_future(client.closed.wait())
        getter: asyncio.Future[Message] | None = None
        ended: asyncio.Future[bytes] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(client.messages.get())
                if ended is None:
                    ended = asyncio.ensure_future(client.ended.get())
                waiting: set[asyncio.Future[Any]] = {getter, ended, closed}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    gone, ended = ended.result(), None
                    if await self._on_end(client, gone) and gone == owner_id:
                        return  # isolated: this connection's one mailbox is held elsewhere
                    continue
                if getter not in done:
                    return
                msg, getter = getter.result(), None
                if self._stopping:  # left unacknowledged: delivered again on the next link
                    return
                # One block at a time, in arrival order: the handler commits, then acks.
                if owner_id is not None:
                    self._busy.add(owner_id)
                task = asyncio.current_task()
                if task is not None:
                    self._handling.add(task)
                try:
                    await self._handler(client, msg)
                finally:
                    if owner_id is not None:
                        self._busy.discard(owner_id)
                    if task is not None:
                        self._handling.discard(task)
                if self._stopping or (owner_id is not None and owner_id in self._retired):
                    return
        finally:
            # Every helper, also when this task is cancelled while it waits (a lock, a stop,
            # a reconnect): a getter left waiting on the dropped client's queue was collected
            # pending ("Task was destroyed but it is pending!" in the log).
            closed.cancel()
            for helper in (getter, ended):
                if helper is not None:
                    helper.cancel()

    def require(self) -> RelayClient:
        client = self._client
        if self.isolated or client is None or not self.connected.is_set():
            raise RelayUnavailable()
        return client

    @contextlib.asynccontextmanager
    async def owner(self) -> AsyncIterator[RelayClient]:
        """A connection for owner commands (create, tokens, bundles, delete): the shared one,
        or, isolated, a short-lived one of their own that no other mailbox uses."""
        if not self.isolated:
            yield self.require()
            return
        if not self.connected.is_set():
            raise RelayUnavailable()
        client = await self._dial_or_unavailable()
        try:
            yield client
        finally:
            await client.close()
            self._reconcile()  # a mailbox may just have been deleted

    @contextlib.asynccontextmanager
    async def owner_of(self, owner_id: bytes | None) -> AsyncIterator[RelayClient]:
        """Owner commands about the mailbox ``owner_id`` alone: isolated, on the connection
        that holds its subscription (the relay already sees that connection own it: a new
        one would only add a connection, on the caller's schedule); else as ``owner``."""
        client = self._clients.get(owner_id) if self.isolated and owner_id else None
        if client is not None and self.connected.is_set():
            yield client
            return
        async with self.owner() as client:
            yield client

    async def subscribe(self, owner_id: bytes, key: SigningKey) -> None:
        """Subscribe a new mailbox now (it is also resubscribed after every reconnect)."""
        if self.isolated:
            self._reconcile()
            return
        client = self._client
        if client is not None:  # also while the reconnect subscribes the others (a list taken
            await client.subscribe(owner_id, key)  # before this mailbox existed)

    # --- isolated mode --------------------------------------------------------------------

    async def _run_isolated(self) -> None:
        """Start and retire the per-mailbox connections; with no mailbox, probe the relay."""
        attempt = 0
        while not self._stopping:
            self._reconcile()
            if not self._serving and not self._probe_ok:
                try:
                    await (await self._dial()).close()
                except (*UNAVAILABLE, RelayError) as exc:
                    self._set_state(False, _reason(exc, self.network.mode == "tor"))
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                except Exception as exc:  # never let the link die silently: say so, and retry
                    self._set_state(False, _failed(exc))
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                self._probe_ok = True
                self._update()
            await asyncio.sleep(RECONCILE_INTERVAL)

    def _reconcile(self) -> None:
        if self._stopping:
            return
        wanted = dict(self._subscriptions())
        for owner_id, key in wanted.items():
            if (
                owner_id not in self._serving
                and owner_id not in self._refused
                and owner_id not in self._taken
            ):
                self._serving[owner_id] = asyncio.create_task(self._serve(owner_id, key))
        for owner_id in [o for o in self._serving if o not in wanted]:
            task = self._serving.pop(owner_id)
            self._failing.pop(owner_id, None)
            if owner_id in self._busy:  # let its block finish and be acknowledged first
                self._retired.add(owner_id)
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            else:
                task.cancel()
        self._refused &= set(wanted)
        self._taken &= set(wanted)
        self._update()

    async def _serve(self, owner_id: bytes, key: SigningKey) -> None:
        attempt = 0
        try:
            while not self._stopping:
                try:
                    async with self._dialing:
                        client = await self._dial()
                except (*UNAVAILABLE, RelayError) as exc:
                    self._fail(owner_id, _reason(exc, self.network.mode == "tor"))
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                except Exception as exc:  # never let the link die silently: say so, and retry
                    self._fail(owner_id, _failed(exc))
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                try:
                    try:
                        await client.subscribe(owner_id, key)
                    except RelayError as exc:  # refused (deleted, a limit): not the others
                        if not self._refused_known(owner_id, exc.code):
                            log.warning("the relay refused a subscription")
                        self._refused.add(owner_id)
                        self._serving.pop(owner_id, None)
                        self._failing.pop(owner_id, None)
                        self._update()
                        return
                    self._clients[owner_id] = client
                    self._failing.pop(owner_id, None)
                    attempt = 0
                    self._update()
                    await self._receive(client, owner_id)
                    if owner_id in self._taken:  # END: another connection holds it now
                        self._serving.pop(owner_id, None)
                        self._failing.pop(owner_id, None)
                        self._clients.pop(owner_id, None)
                        self._update()
                        return  # (the connection is closed below)
                    reason = "the relay closed the connection"
                except (*UNAVAILABLE, RelayError, RelayUnavailable) as exc:
                    reason = _reason(exc, self.network.mode == "tor")
                except Exception as exc:  # never let the link die: reconnect after a pause
                    reason = _failed(exc)
                finally:
                    self._clients.pop(owner_id, None)
                    await client.close()
                if self._stopping or owner_id in self._retired:
                    return
                self._fail(owner_id, reason)
                await asyncio.sleep(backoff(attempt))
                attempt += 1
        finally:
            self._retired.discard(owner_id)
            self._clients.pop(owner_id, None)

    def _refused_known(self, owner_id: bytes, code: int) -> bool:
        return self._on_refused is not None and self._on_refused(owner_id, code)

    def _fail(self, owner_id: bytes, reason: str) -> None:
        if owner_id in self._serving:
            self._failing[owner_id] = reason
        self._update()

    def _update(self) -> None:
        """Up when every mailbox has its connection (or, with none, a probe got through);
        down as soon as one cannot connect."""
        if self._stopping:
            return
        if self._failing:
            self._set_state(False, next(iter(self._failing.values())))
        elif all(o in self._clients for o in self._serving) and (self._serving or self._probe_ok):
            self._set_state(True, None)

    def _set_state(self, up: bool, reason: str | None) -> None:
        was = self._up
        self._up = up
        if up:
            self.connected.set()
            if not was:
                self._state(True, None)
        else:
            self.connected.clear()
            self._probe_ok = False
            self._state(False, reason)


async def acknowledge(client: RelayClient, msg_id: bytes) -> bool:
    """ACK one delivery. False if the relay no longer knows its id: the subscription moved to
    another connection (END), which withdrew it (relay-protocol.md §4.3). That is harmless:
    the block comes again on the connection that holds the subscription, and a copy already
    processed is dropped end to end; so it is neither an error nor a reason to reconnect."""
    try:
        await client.ack([msg_id])
    except RelayError as exc:
        if exc.code != wire.E_UNKNOWN_MESSAGE:
            raise
        return False
    return True


async def with_relay(
    url: str, own: RelayLink | None, network: Network
) -> tuple[RelayClient, bool]:
    """A client for `url` (deposits, bundle fetches): the link's shared connection when it is
    that relay and not isolated, else a new short-lived one through ``network``, the
    profile's settings now (the second value says whether the caller must close it)."""
    if own is not None:
        if own.stopping or own.network != network:
            raise RelayUnavailable()  # settings are changing: nothing under the old ones
        ours = relay_endpoint(own.url) == relay_endpoint(url)  # with or without the /v1/ws
        if ours and not own.isolated:
            return own.require(), False
        if ours and not own.connected.is_set():
            raise RelayUnavailable()  # our relay is down: no dial that would fail anyway
    try:
        network.check_chosen_by_other(url)
    except RelayUrlError:
        raise RelayRefused() from None
    try:
        await network.ready(url)
        client = await asyncio.wait_for(_connect(url, network), CONNECT_TIMEOUT)
    except UNAVAILABLE:
        raise RelayUnavailable() from None
    return client, True


async def _connect(url: str, network: Network) -> RelayClient:
    # Every relay connection of the daemon is made here: through Tor or the proxy in those
    # modes (no fallback to a direct connection), with a connector (and credentials) of its
    # own, and only to a relay the mode may reach.
    # A URL stored without a path (made before the path was optional) means /v1/ws.
    # A relay someone else chose is checked by with_relay (its policy) and, directly, by the
    # connector (where its name resolves; IP literals; RelayClient refuses redirects).
    network.check(url)
    return await RelayClient.connect(
        relay_endpoint(url),
        connector=network.connector(url),
        heartbeat=HEARTBEAT,
        request_timeout=REQUEST_TIMEOUT,
    )


def _reason(exc: BaseException, tor: bool = False) -> str:
    # Never the address or the URL: only the kind of failure.
    if isinstance(exc, (TorUnavailable, Unreachable, ProxyUnavailable)):
        return str(exc)  # what Tor is doing, or why this mode may not reach the relay
    proxy = "Tor" if tor else "the proxy"
    if isinstance(exc, aiohttp_socks.ProxyTimeoutError):
        return f"{proxy} timed out"
    if isinstance(exc, aiohttp_socks.ProxyConnectionError):
        return "Tor's SOCKS port is unreachable" if tor else "proxy unreachable"
    if isinstance(exc, aiohttp_socks.ProxyError):
        return f"{proxy} could not reach the relay"
    if isinstance(exc, HandshakeFailed):
        return str(exc)  # e.g. "the relay answered 404: not an AegisLink relay at this URL"
    if isinstance(exc, RelayError):
        if exc.code == wire.E_BAD_VERSION:
            return "the relay speaks another version of the relay protocol"
        return f"relay refused: error {exc.code}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, RelayClosed):
        return "connection closed"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS: the relay's certificate is not trusted ({_cert_problem(exc)})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS: the handshake with the relay failed (is it a TLS port?)"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the relay's host name could not be resolved (DNS)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering (not an AegisLink relay?)"
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, OSError):
        if os_error.errno == errno.ECONNREFUSED:
            return "connection refused: nothing listens at the relay's address and port"
        if os_error.errno is not None:  # the system's words, never the address
            return f"relay unreachable: {os.strerror(os_error.errno)}"
    return "relay unreachable"


def _cert_problem(exc: aiohttp.ClientConnectorCertificateError) -> str:
    # OpenSSL's verify codes; its message may name the host, which status does not repeat.
    code = getattr(exc.certificate_error, "verify_code", None)
    return {
        10: "expired",
        18: "self-signed",
        19: "self-signed certificate in the chain",
        20: "unknown issuer",
        62: "issued for another host name",
    }.get(code or 0, "verification failed")


def _failed(exc: BaseException) -> str:
    # A fault of the daemon's: its type (never its text) in the reason, which is logged once.
    return f"internal error ({type(exc).__name__})"
