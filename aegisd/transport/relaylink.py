"""The daemon's connection to its relay: I/O only, no protocol decisions.

One long-lived WebSocket to the profile's own relay carries the subscriptions of every mailbox
the profile owns; it reconnects with exponential backoff and jitter and resubscribes. Deposits to
a contact's mailbox on the same relay go over that connection; deposits to another relay use a
short-lived connection of their own. (Issue 5 will separate deposits from subscriptions and give
each mailbox its own connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp
from nacl.signing import SigningKey

from relay.client import Message, RelayClient, RelayClosed, RelayError

log = logging.getLogger("aegisd.relay")

Handler = Callable[[RelayClient, Message], Awaitable[None]]
Subscriptions = Callable[[], list[tuple[bytes, SigningKey]]]
StateCallback = Callable[[bool, str | None], None]

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0  # a relay that does not answer a request is treated as unreachable
HEARTBEAT = 20.0  # WebSocket pings: a half-open connection is noticed within ~2 of these

#: Exceptions that mean "the relay is not reachable right now".
UNAVAILABLE = (RelayClosed, OSError, aiohttp.ClientError, asyncio.TimeoutError)


class RelayUnavailable(Exception):
    """There is no working connection to the relay at the moment."""


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter, so reconnecting clients do not move in step."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)


class RelayLink:
    def __init__(
        self,
        url: str,
        *,
        handler: Handler,
        subscriptions: Subscriptions,
        on_state: StateCallback,
    ) -> None:
        self.url = url
        self._handler = handler
        self._subscriptions = subscriptions
        self._on_state = on_state
        self.client: RelayClient | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay-link")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop()

    async def _drop(self) -> None:
        client, self.client = self.client, None
        self.connected.clear()
        if client is not None:
            await client.close()

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                client = await asyncio.wait_for(_connect(self.url), CONNECT_TIMEOUT)
            except (*UNAVAILABLE, RelayError) as exc:
                self._on_state(False, _reason(exc))
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            self.client = client
            try:
                refused = 0
                for owner_id, key in self._subscriptions():
                    try:
                        await client.subscribe(owner_id, key)
                    except RelayError:  # one mailbox refused (e.g. a limit): not the others
                        refused += 1
                if refused:
                    log.warning("the relay refused %d subscription(s)", refused)
                self.connected.set()
                self._on_state(True, None)
                attempt = 0
                await self._receive(client)
                reason = "the relay closed the connection"
            except (*UNAVAILABLE, RelayError, RelayUnavailable) as exc:
                reason = _reason(exc)
            except Exception as exc:  # never let the link die: reconnect after a pause
                log.error("relay link failed: %s", type(exc).__name__)
                reason = "internal error"
            await self._drop()
            if self._stopping:
                return
            self._on_state(False, reason)
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _receive(self, client: RelayClient) -> None:
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            while True:
                getter = asyncio.ensure_future(client.messages.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return
                # One block at a time, in arrival order: the handler commits, then acks.
                await self._handler(client, getter.result())
        finally:
            closed.cancel()

    def require(self) -> RelayClient:
        client = self.client
        if client is None or not self.connected.is_set():
            raise RelayUnavailable()
        return client

    async def subscribe(self, owner_id: bytes, key: SigningKey) -> None:
        """Subscribe a new mailbox now (it is also resubscribed after every reconnect)."""
        client = self.client
        if client is not None and self.connected.is_set():
            await client.subscribe(owner_id, key)


async def with_relay(url: str, own: RelayLink | None) -> tuple[RelayClient, bool]:
    """A client for `url`: the link's own connection when it is that relay, else a new one
    (the second value says whether the caller must close it)."""
    if own is not None and own.url == url:
        return own.require(), False
    try:
        client = await asyncio.wait_for(_connect(url), CONNECT_TIMEOUT)
    except UNAVAILABLE:
        raise RelayUnavailable() from None
    return client, True


async def _connect(url: str) -> RelayClient:
    return await RelayClient.connect(url, heartbeat=HEARTBEAT, request_timeout=REQUEST_TIMEOUT)


def _reason(exc: BaseException) -> str:
    # Never the address or the URL: only the kind of failure.
    if isinstance(exc, RelayError):
        return f"relay refused: error {exc.code}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, RelayClosed):
        return "connection closed"
    return "relay unreachable"
