"""aegisd/aio.py: a loop waiting on an event with a timeout stops when cancelled, also when
the cancel arrives as the event is set (asyncio.wait_for swallowed it on CPython 3.11: the
daemon's lock then waited for the delete-keys loop for ever)."""

from __future__ import annotations

import asyncio

from aegisd.aio import wait_event


def test_a_cancel_that_comes_as_the_event_is_set_stops_the_loop() -> None:
    async def main() -> str:
        event = asyncio.Event()

        async def loop() -> None:
            while True:
                await wait_event(event, 30)
                event.clear()
                await asyncio.sleep(0)  # the loop's work

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        event.set()
        await asyncio.sleep(0)  # the event's waiter is woken, its task not run yet
        task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except asyncio.CancelledError:
            return "cancelled"
        except TimeoutError:
            task.cancel()
            return "the cancel was swallowed"
        return "ended"

    assert asyncio.run(main()) == "cancelled"


def test_it_returns_at_the_timeout_or_when_set() -> None:
    async def main() -> None:
        event = asyncio.Event()
        await wait_event(event, 0.01)  # the timeout: returns, raises nothing
        event.set()
        await wait_event(event, 30)  # set: at once

    asyncio.run(asyncio.wait_for(main(), 5))
