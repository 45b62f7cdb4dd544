"""A one-to-one send's spools (services/attachments.py send_many) in-process, the spooling
function made slow or failing: a send cancelled while a file is being encrypted (a thread,
which cannot be stopped) and a send whose second file fails mid-way leave no spool in the
profile (review of issue 17, finding 7)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from aegisd.core.attachment import FileKeys
from aegisd.rpc import AppError
from aegisd.services import attachment_disk
from aegisd.services import attachments as attachments_mod
from tests.daemon.test_group_file_spools import Host


class SendHost(Host):
    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.store.get_session = lambda cid: b"session"  # type: ignore[attr-defined]
        self.contacts = SimpleNamespace(by_name=lambda n: SimpleNamespace(id=7, blocked=False))


@contextlib.contextmanager
def monkeypatched_seal(src: Path) -> Iterator[None]:
    """The source shrinks once the first block is sealed and written: the real reader finds
    a short block and fails mid-way, its partial spool written."""
    class Shrinking(FileKeys):
        def seal(self, index: int, total: int, chunk: bytes) -> bytes:
            if index == 0:
                src.write_bytes(b"x" * 10)
            return bytes(super().seal(index, total, chunk))

    setattr(attachment_disk, "FileKeys", Shrinking)  # noqa: B010 (not exported)
    try:
        yield
    finally:
        setattr(attachment_disk, "FileKeys", FileKeys)  # noqa: B010


class Spooling:
    """encrypt_to_spool, held until released; the call numbered ``fail`` writes part of its
    spool and then fails as a source that changed while it was read."""

    def __init__(self, fail: int | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = fail
        self.calls = 0
        self.ended = 0

    def __call__(self, src: Path, dst: Path, seed: bytes, limit: int) -> tuple[int, bytes]:
        n, self.calls = self.calls, self.calls + 1
        try:
            self.started.set()
            assert self.release.wait(10)
            if n == self.fail:
                with monkeypatched_seal(src):
                    return attachment_disk.encrypt_to_spool(src, dst, seed, limit)
            return attachment_disk.encrypt_to_spool(src, dst, seed, limit)
        finally:
            self.ended += 1


def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          spooling: Spooling) -> tuple[attachments_mod.Attachments, list[str], Path]:  # fmt: skip
    monkeypatch.setattr(attachments_mod, "encrypt_to_spool", spooling)
    (tmp_path / "home").mkdir()
    host = SendHost(tmp_path / "home")
    paths = []
    for i in range(2):
        src = tmp_path / f"f{i}.bin"
        src.write_bytes(b"x" * 40_000)
        paths.append(str(src))
    return host.attachments, paths, tmp_path / "home" / "attachments"


async def settled(spooling: Spooling, spools: Path, calls: int) -> list[str]:
    """The files left once every spooling thread ended and the loop ran its callbacks."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if spooling.ended == calls:
            await asyncio.sleep(0.2)
            left = sorted(p.name for p in spools.iterdir())
            if not left:
                return left
        await asyncio.sleep(0.05)
    return sorted(p.name for p in spools.iterdir())


def test_a_send_cancelled_while_spooling_leaves_no_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spooling = Spooling()
    files, paths, spools = setup(tmp_path, monkeypatch, spooling)

    async def run() -> list[str]:
        task = asyncio.create_task(files.send_many("bob", paths))
        while not spooling.started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        spooling.release.set()  # the thread goes on and writes its spool after the cancel
        return await settled(spooling, spools, 1)

    assert asyncio.run(run()) == []
    assert spooling.calls == 1


def test_a_file_failing_mid_way_discards_the_spools_of_the_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spooling = Spooling(fail=1)
    spooling.release.set()
    files, paths, spools = setup(tmp_path, monkeypatch, spooling)

    async def run() -> list[str]:
        with pytest.raises(AppError) as e:
            await files.send_many("bob", paths)
        assert e.value.message == "the file cannot be read"
        return await settled(spooling, spools, 2)

    assert asyncio.run(run()) == []
    assert spooling.calls == 2


