"""WAL checkpoints run on a thread of their own, not inside a deposit's commit (issue 15, item 6).

In-process on a real SQLite file. The WAL here stays far below SQLite's automatic checkpoint
threshold, so pages reach the database file only if the background checkpointer copied them:
with it the file grows as blobs are written, without it (checkpoint_bytes 0) it does not."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from relay import storage as st
from relay import wire

BLOCKS = 48  # 48 x 16 KiB: about 0.8 MiB of WAL, a fraction of the automatic threshold


async def _fill(tmp: Path, checkpoint_bytes: int) -> tuple[int, int, int]:
    s = st.SQLiteStorage(str(tmp), checkpoint_bytes=checkpoint_bytes)
    await s.open()
    path = tmp / "relay.sqlite3"
    try:
        before = path.stat().st_size
        for _ in range(BLOCKS):  # one commit each, as deposits arriving one by one
            assert await s.put_blob(os.urandom(32), os.urandom(32), 0,
                                    os.urandom(wire.BLOCK_SIZE))
        runs = 0
        if checkpoint_bytes:
            deadline = time.monotonic() + 30
            while path.stat().st_size < before + BLOCKS * wire.BLOCK_SIZE // 2:
                assert time.monotonic() < deadline, "no background checkpoint copied the WAL"
                await asyncio.sleep(0.02)
        ckpt = s._checkpointer
        runs = ckpt.runs if ckpt is not None else 0
        return before, path.stat().st_size, runs
    finally:
        await s.close()


def test_background_checkpoints_copy_the_wal(tmp_path: Path) -> None:
    before, after, runs = asyncio.run(_fill(tmp_path, 128 * 1024))
    assert runs >= 1
    assert after >= before + BLOCKS * wire.BLOCK_SIZE // 2


def test_without_it_nothing_is_copied_below_the_threshold(tmp_path: Path) -> None:
    before, after, runs = asyncio.run(_fill(tmp_path, 0))
    assert runs == 0
    assert after < before + BLOCKS * wire.BLOCK_SIZE // 2


def test_close_stops_the_thread_and_keeps_every_write(tmp_path: Path) -> None:
    async def body() -> None:
        s = st.SQLiteStorage(str(tmp_path), checkpoint_bytes=16 * 1024)
        await s.open()
        keys = [os.urandom(32) for _ in range(20)]
        for k in keys:
            assert await s.put_blob(k, b"c" * 32, 0, os.urandom(wire.BLOCK_SIZE))
        await s.close()
        assert s._checkpointer is not None and s._checkpointer._thread is None
        s2 = st.SQLiteStorage(str(tmp_path))
        await s2.open()
        try:
            assert await s2.blob_count() == 20
            for k in keys:
                assert await s2.get_blob(k) is not None
        finally:
            await s2.close()

    asyncio.run(body())
