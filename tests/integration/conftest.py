"""Integration tests: the client library, the echo bot, the bridge and the service units,
each against real daemons (and, where messages flow, a real relay) on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

# Fixtures shared with the other suites (pytest finds fixtures imported into a conftest).
from tests.daemon.conftest import DaemonProc, short_tmp, spawn
from tests.functional.conftest import Peer, connect, peers, relay_proc, tmp_short

__all__ = [
    "DaemonProc",
    "Peer",
    "connect",
    "peers",
    "relay_proc",
    "run",
    "short_tmp",
    "spawn",
    "tmp_short",
    "until",
]

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 120) -> T:
    """Run one scenario on a fresh event loop, with an overall bound."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
