"""What the services take from the daemon: a narrow, typed context instead of the whole
``Daemon``.

The daemon (aegisd/daemon.py) imports the services; the services must not import it back
(not even for a type). They receive an object that satisfies ``ServiceContext``: the daemon
does, structurally, and a test may pass a stand-in with just these members. This module
imports neither the daemon nor any service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aegisd.store import Store

if TYPE_CHECKING:  # types only: importing the daemon stays light
    from aegisd.paths import ProfilePaths
    from aegisd.transport.network import Network

#: Run after the store opens / before it closes (start and stop services there).
Hook = Callable[[Store], Awaitable[None]]


class EventSink(Protocol):
    """The event bus, as far as a service uses it: persist and publish one event (inside a
    store transaction, it commits with the rest)."""

    def emit(self, type: str, data: dict[str, Any] | None = None) -> Any: ...

    def emit_live(self, type: str, data: dict[str, Any] | None = None) -> None:
        """To the subscriptions open now only, never stored (what must not reach the disk)."""


class ServiceContext(Protocol):
    """The daemon, as far as the services use it."""

    #: The open store, or None while the profile is locked.
    store: Store | None

    @property
    def paths(self) -> ProfilePaths: ...

    @property
    def events(self) -> EventSink: ...

    #: Held while the store opens or closes and while settings restart services.
    auth: asyncio.Lock
    on_unlock: list[Hook]
    on_lock: list[Hook]
    #: Whether the profile's relay link is up (set by the relay link's owner).
    relay_connected: bool
    #: aegisd --test-methods: test plumbing is honoured.
    test_methods: bool

    def network(self) -> Network:
        """How relays are reached now (the network mode, the managed Tor)."""
        ...

    def network_mode(self) -> str:
        """The effective network mode: direct, proxy or tor."""
        ...

    async def reconfigure(self) -> None:
        """After a change of the network or relay settings: Tor, then every connection."""
        ...

    async def restart_links(self) -> None:
        """Make every relay connection anew (the network settings changed)."""
        ...

    async def move_relay(self, url: str, insecure_plaintext: bool) -> tuple[int, int]:
        """Point the profile at another relay: (invitations revoked, contacts moving)."""
        ...
