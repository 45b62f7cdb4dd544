"""Small asyncio helpers the daemon's services share. Standard library only."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` and wait until each has ended, ignoring how they end; a cancellation of
    the caller that arrives meanwhile is raised, never swallowed (a loop that stops its helpers
    must itself stop when it is cancelled)."""
    running = [t for t in tasks if t is not None]
    for t in running:
        t.cancel()
    for t in running:
        try:
            await t
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise
        except Exception:  # noqa: S110 (the task's own failure: it is being stopped anyway)
            pass


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds passed, whichever comes first.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on CPython 3.11 that swallows a cancel
    which arrives as the event is set (it returns the event's result instead), so a loop
    cancelled at a lock ran on and the lock waited for it for ever (seen with the delete-keys
    loop, which the lock itself wakes). ``asyncio.timeout`` tells its own timeout from a cancel.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
