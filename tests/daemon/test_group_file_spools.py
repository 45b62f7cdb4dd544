"""A group send's copies (services/group_files.py) in-process, with the spooling function
made to fail: whatever happens to the send (a copy that cannot be written, the call
cancelled), no spool is left in the profile, including those of copies still being written
when the send gave up (review of the group files, finding 3)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.core.primitives import SystemEntropy
from aegisd.rpc import AppError
from aegisd.services import attachments as attachments_mod
from aegisd.services.attachments import Attachments
from aegisd.services.group_files import GroupFiles

MEMBERS = (11, 12, 13)  # contact ids: three copies, two written at once (SPOOL_PARALLEL)


class FakeStore:
    def get_setting(self, key: str, default: Any = None) -> Any:
        return default


class Host:
    def __init__(self, home: Path) -> None:
        self.ctx = SimpleNamespace(paths=SimpleNamespace(home=home))
        self.store = FakeStore()
        self.entropy = SystemEntropy()
        self.lock = asyncio.Lock()
        self.mailboxes = SimpleNamespace(relay_url=lambda: "ws://127.0.0.1:9/v1/ws")
        self.attachments = Attachments(self)  # type: ignore[arg-type]

    def check_usable(self) -> None:
        pass


class Files(GroupFiles):
    """The group's log and members stand in: three members, all reachable."""

    def _load(self, ref: int) -> Any:
        return None, SimpleNamespace(head=SimpleNamespace(member=lambda key: object()))

    def _me(self) -> bytes:
        return b"me"

    def _targets(self, state: Any) -> Any:
        return [SimpleNamespace(contact=SimpleNamespace(id=i)) for i in MEMBERS], {}, []


class Spooling:
    """encrypt_to_spool, the first call failing once the second is under way, the others
    slowed (still writing when the first fails)."""

    def __init__(self) -> None:
        self.real = attachments_mod.encrypt_to_spool
        self.mutex = threading.Lock()
        self.calls = 0
        self.finished = 0
        self.second = threading.Event()
        self.fail_first = True

    def __call__(self, src: Path, dst: Path, seed: bytes, limit: int) -> tuple[int, bytes]:
        with self.mutex:
            n = self.calls
            self.calls += 1
        try:
            if n == 0 and self.fail_first:
                assert self.second.wait(10)
                raise OSError("the source went away")
            self.second.set()
            time.sleep(0.3)
            return self.real(src, dst, seed, limit)
        finally:
            with self.mutex:
                self.finished += 1


def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Files, Spooling, Path, Path]:
    spooling = Spooling()
    monkeypatch.setattr(attachments_mod, "encrypt_to_spool", spooling)
    host = Host(tmp_path / "home")
    (tmp_path / "home").mkdir()
    src = tmp_path / "photo.jpg"
    src.write_bytes(b"x" * 5000)
    return Files(host), spooling, src, tmp_path / "home" / "attachments"


async def settled(spooling: Spooling, spools: Path) -> list[str]:
    """The spools left once every copy's thread has ended (and the loop ran callbacks)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if spooling.finished == spooling.calls == len(MEMBERS):
            await asyncio.sleep(0.2)  # callbacks scheduled by the last thread's end
            left = sorted(p.name for p in spools.iterdir())
            if not left:
                return left
        await asyncio.sleep(0.05)
    return sorted(p.name for p in spools.iterdir())


def test_a_copy_that_fails_leaves_no_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, spooling, src, spools = setup(tmp_path, monkeypatch)

    async def run() -> list[str]:
        with pytest.raises(AppError) as e:
            await files.send(1, str(src))
        assert e.value.message == "the file cannot be read"
        return await settled(spooling, spools)

    assert asyncio.run(run()) == []
    assert spooling.calls == len(MEMBERS)


def test_a_cancelled_send_leaves_no_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, spooling, src, spools = setup(tmp_path, monkeypatch)
    spooling.fail_first = False

    async def run() -> list[str]:
        task = asyncio.create_task(files.send(1, str(src)))
        while not spooling.second.is_set():  # copies are being written
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await settled(spooling, spools)

    assert asyncio.run(run()) == []
