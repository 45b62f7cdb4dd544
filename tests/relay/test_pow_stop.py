"""A proof-of-work search stops when its caller goes away (relay/pow.py ``stop``,
relay/client.py ``_pow``). Without it, a daemon told to stop while it searched a CREATE proof
(2^28 hashes by default) kept its process alive until the search ended: the thread cannot be
cancelled, and the interpreter waits for it at exit (seen as a test's 30 s stop timeout)."""

from __future__ import annotations

import asyncio
import os
import threading
import types

import pytest

from relay import pow as pow_
from relay import wire
from relay.client import RelayClient


def test_a_search_stops_when_told() -> None:
    stop = threading.Event()
    outcome: list[BaseException | bytes] = []

    def search() -> None:
        try:  # 2^60 hashes: never found in this test's lifetime
            outcome.append(pow_.solve(60, os.urandom(32), wire.POW_CREATE, stop=stop))
        except pow_.SolveStopped as exc:
            outcome.append(exc)

    thread = threading.Thread(target=search)
    thread.start()
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], pow_.SolveStopped)


def test_a_cancelled_caller_leaves_no_search_running() -> None:
    """The client's proof: the task awaiting it cancelled, its thread ends (the executor's
    threads are joined at asyncio.run's end, which would otherwise wait for the search)."""
    client = RelayClient.__new__(RelayClient)  # only the hello's challenge is read by _pow
    client.hello = types.SimpleNamespace(challenge=os.urandom(32))  # type: ignore[assignment]
    before = threading.active_count()

    async def main() -> None:
        task = asyncio.ensure_future(client._pow(60, wire.POW_CREATE, pow_.ZERO_TARGET,
                                                 pow_.ZERO_HASH))  # fmt: skip
        await asyncio.sleep(0.2)  # the search is under way in its thread
        assert threading.active_count() > before
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # joins the default executor: returns only once the search stopped
    assert threading.active_count() == before
