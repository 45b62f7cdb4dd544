"""The storage writer is shared fairly (issue 15, item 8): one client with hundreds of writes
waiting does not make another's single write wait behind all of them.

In-process on a real SQLite file: operations are tagged with their owner the way the relay tags
them (`WRITER_OWNER`, set per connection), and the order in which they complete is recorded."""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import storage as st
from relay import wire

FLOOD = 600


def as_owner(owner: object, fn: Callable[[], Any]) -> Any:
    ctx = contextvars.copy_context()

    def call() -> Any:
        st.WRITER_OWNER.set(owner)
        return fn()

    return ctx.run(call)


def test_one_write_does_not_wait_behind_a_flood(tmp_path: Path) -> None:
    async def body() -> list[str]:
        s = st.SQLiteStorage(str(tmp_path), max_batch=16)
        await s.open()
        done: list[str] = []
        try:
            futs = []
            sealed = os.urandom(wire.BLOCK_SIZE)
            for _ in range(FLOOD):
                fut = as_owner("flooder", lambda: s.enqueue(1, 0, sealed))
                fut.add_done_callback(lambda _f: done.append("flooder"))
                futs.append(fut)
            fut = as_owner("other", lambda: s.enqueue(2, 0, sealed))
            fut.add_done_callback(lambda _f: done.append("other"))
            futs.append(fut)
            # While the flooder has writes waiting, the other's is counted apart (what
            # check_room lets in while the writer is saturated).
            assert s.pending_of("other") == 1
            assert s.pending_of("flooder") > FLOOD // 2
            assert s.pending == s.pending_of("flooder") + 1
            await fut
            assert s.pending_of("other") == 0
            assert s.pending_of("flooder") > 0, "the other's write waited for the whole flood"
            await asyncio.gather(*futs)
            assert s.pending == 0 and s.pending_of("flooder") == 0
        finally:
            await s.close()
        return done

    done = asyncio.run(body())
    # FIFO would finish it last (after 600); round-robin within the next batch or two
    # (what the writer took while the flood was still being queued comes first).
    assert done.index("other") < FLOOD // 2, done.index("other")



def test_a_batch_ends_at_max_batch_bytes(tmp_path: Path) -> None:
    """However many deposits wait, one commit writes about max_batch_bytes (1 MiB: 64 blocks),
    so what a newcomer waits for (the commit under way) stays short."""
    sizes: list[int] = []

    class Recording(st.SQLiteStorage):
        def _run_batch(self, db: Any, loop: Any, batch: list[Any]) -> None:
            sizes.append(len(batch))
            super()._run_batch(db, loop, batch)

    async def body() -> None:
        s = Recording(str(tmp_path))
        await s.open()
        try:
            sealed = os.urandom(wire.BLOCK_SIZE)
            await asyncio.gather(*(s.enqueue(1, 0, sealed) for _ in range(FLOOD)))
        finally:
            await s.close()

    asyncio.run(body())
    assert sum(sizes) >= FLOOD
    assert max(sizes) <= (1 << 20) // wire.BLOCK_SIZE, max(sizes)


def test_reads_end_a_batch_at_max_batch_bytes(tmp_path: Path) -> None:
    """A read of a window is sized by what it brings into memory (review, item 1): 512 such
    reads in one batch were 256 MiB at once."""
    sizes: list[int] = []

    class Recording(st.SQLiteStorage):
        def _run_batch(self, db: Any, loop: Any, batch: list[Any]) -> None:
            sizes.append(len(batch))
            super()._run_batch(db, loop, batch)

    async def body() -> None:
        s = Recording(str(tmp_path))
        await s.open()
        try:
            sealed = os.urandom(wire.BLOCK_SIZE)
            await asyncio.gather(*(s.enqueue(1, 0, sealed) for _ in range(32)))
            # The writer busy a moment, so that the 64 reads wait together for its next batch.
            busy = s._submit(lambda _db: time.sleep(0.5))
            await asyncio.sleep(0.1)
            sizes.clear()
            got = await asyncio.gather(*(s.queued(1, (), 32) for _ in range(64)))
            await busy
            assert all(len(rows) == 32 for rows in got)
        finally:
            await s.close()

    asyncio.run(body())
    # 1 MiB a batch: two reads of 32 blocks (512 KiB) each at most.
    assert max(sizes) <= 2, sizes
