"""A full disk (issue 15, item 2): storing more is answered `full` (not `internal`), owners can
still fetch, acknowledge and delete, and the relay stores again by itself once there is room.

The first test fills a database capped with `--max-db-bytes` (SQLite's max_page_count: no mount
needed, so it always runs); the second a real small tmpfs (needs root's mount)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import wire
from relay.client import RelayClient, RelayError
from relay.storage import RESERVE_NAME, SQLiteStorage

from .conftest import RelayProcess, run
from .helpers import Owner, block, new_owner


async def fill(c: RelayClient, o: Owner, token: bytes, most: int) -> int:
    """Deposit until the relay answers an error; that error must be `full`."""
    for n in range(most):
        try:
            await c.deposit(o.deposit_id, block(), token=token)
        except RelayError as e:
            assert e.code == wire.E_FULL, e.code
            return n
    raise AssertionError("the relay never filled up")


async def drain(c: RelayClient, o: Owner) -> int:
    """Fetch and acknowledge everything queued (every ACK must succeed)."""
    total = 0
    while True:
        msgs = await o.fetch(c)
        if not msgs:
            return total
        await c.ack([m.msg_id for m in msgs])
        total += len(msgs)


async def stores_again(c: RelayClient, o: Owner, token: bytes, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await c.deposit(o.deposit_id, block(), token=token)
            return
        except RelayError as e:
            assert e.code == wire.E_FULL, e.code
            assert time.monotonic() < deadline, "the relay did not recover by itself"
            await asyncio.sleep(0.2)


async def full_cycle(url: str, most: int) -> None:
    c = await RelayClient.connect(url)
    token = os.urandom(32)
    o = await new_owner(c, token=token)
    stored = await fill(c, o, token, most)
    assert stored > 0
    # Full stays full: another deposit, and a new mailbox, are refused the same way.
    with pytest.raises(RelayError) as e:
        await c.deposit(o.deposit_id, block(), token=token)
    assert e.value.code == wire.E_FULL
    with pytest.raises(RelayError) as e:
        await new_owner(c)
    assert e.value.code == wire.E_FULL
    # The owner drains its queue: every acknowledgement goes through.
    assert await drain(c, o) == stored
    await stores_again(c, o, token)
    await c.close()


def test_full_database_answers_full_drains_and_recovers(
        relay_factory: Callable[..., RelayProcess]) -> None:
    rp = relay_factory(max_db_bytes=2 * 1024 * 1024)
    run(full_cycle(rp.url, most=1000))
    assert "storage error" not in rp.output() and "Traceback" not in rp.output()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs (skipped only where mount is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, check=False)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[:200]
        pytest.skip(f"SKIPPED, the real full disk is untested: mounting a tmpfs failed ({why})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_tmpfs_answers_full_drains_and_recovers(small_disk: Path) -> None:
    # A storage budget far above the disk, so the disk fills first (the default budget, half
    # the free space at start, would answer `full` before the disk is).
    rp = RelayProcess(small_disk, {"--disk-reserve": str(3 * 1024 * 1024),
                                   "--storage-budget": str(1 << 30)})
    try:
        rp.data = small_disk / "data"
        rp.log_path = small_disk.parent / "relay-output.log"
        rp.start()
        run(full_cycle(rp.url, most=2000))
        # Full again after recovering, and again it recovers.
        run(full_cycle(rp.url, most=2000))
        assert "Traceback" not in rp.output()
    finally:
        rp.close()
        with contextlib.suppress(OSError):
            os.unlink(small_disk / "data" / "relay.sqlite3")


def test_no_reserve_full_does_not_flap_and_recovers_once_freed(small_disk: Path) -> None:
    """--disk-reserve 0 (review, item 8): once SQLite found the disk full the relay stays
    `full` (one warning, not two a second) until a margin of disk is free again; then it
    stores again by itself."""
    ballast = small_disk / "ballast"  # something else on the disk, freed later by its operator
    with open(ballast, "wb") as f:
        f.write(os.urandom(7 * 1024 * 1024))
    rp = RelayProcess(small_disk, {"--disk-reserve": "0", "--storage-budget": str(1 << 30)})
    try:
        rp.data = small_disk / "data"
        rp.log_path = small_disk.parent / "relay-output.log"
        rp.start()

        async def body() -> None:
            c = await RelayClient.connect(rp.url)
            token = os.urandom(32)
            o = await new_owner(c, token=token)
            assert await fill(c, o, token, most=2000) > 0
            # Deposits for a few seconds (recover() runs every second): all refused.
            until = time.monotonic() + 4
            while time.monotonic() < until:
                with pytest.raises(RelayError) as e:
                    await c.deposit(o.deposit_id, block(), token=token)
                assert e.value.code == wire.E_FULL
                await asyncio.sleep(0.1)
            assert rp.output().count("storage full") == 1, rp.output()
            os.unlink(ballast)
            await stores_again(c, o, token)
            await c.close()

        run(body())
        assert "Traceback" not in rp.output()
    finally:
        rp.close()
        with contextlib.suppress(OSError):
            os.unlink(small_disk / "data" / "relay.sqlite3")


def test_reserve_without_fallocate_holds_real_bytes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk reserve where posix_fallocate is missing (macOS) or unsupported (ZFS): random
    bytes that a compressing filesystem cannot store as nothing, and no AttributeError (review,
    item 7)."""
    size = 1024 * 1024
    for how in ("missing", "unsupported"):
        d = tmp_path / how
        d.mkdir()
        with monkeypatch.context() as m:
            if how == "missing":
                m.delattr(os, "posix_fallocate")
            else:
                def unsupported(fd: int, offset: int, length: int) -> None:
                    raise OSError(errno.EOPNOTSUPP, "not supported")
                m.setattr(os, "posix_fallocate", unsupported)
            storage = SQLiteStorage(str(d), reserve_bytes=8 * size)
            assert storage._make_reserve()
        data = (d / RESERVE_NAME).read_bytes()
        assert len(data) == size
        assert data.count(0) < size // 64, "the reserve is zeros: compressed to nothing"
        assert os.stat(d / RESERVE_NAME).st_blocks * 512 >= size


def test_free_space_unknown_keeps_the_writer_alive(tmp_path: Path) -> None:
    """A failing look at the disk (statvfs on a data directory renamed away) once killed the
    writer thread: every caller then waited forever, shutdown too. Now the look counts as room
    (SQLite still reports a full disk itself) and storing goes on."""
    data, moved = tmp_path / "data", tmp_path / "moved"

    async def main() -> None:
        s = SQLiteStorage(str(data), reserve_bytes=8 * 1024 * 1024)
        await s.open()
        try:
            box = await s.create_mailbox(b"k" * 32, b"d" * 32, b"s" * 32, b"b" * 32, b"o" * 32,
                                         False)
            os.rename(data, moved)
            with pytest.raises(OSError):
                os.statvfs(data)
            for i in range(3):
                await asyncio.wait_for(s.enqueue(box, 1000, b"m%d" % i), 30)
            assert await asyncio.wait_for(s.queued_count(), 30) == 3
        finally:
            await asyncio.wait_for(s.close(), 30)

    asyncio.run(main())
