"""Small asyncio helpers the daemon's services share. Standard library only."""

from __future__ import annotations

import asyncio
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
