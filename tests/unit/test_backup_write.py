"""The backup file is written atomically, with mode 0600, never over an existing file without
force, also on a file system without hard links (FAT on a USB stick: link() fails with EPERM),
and a failed write leaves nothing behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from aegisd.services import backup


def _no_links(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("links", [True, False])
def test_write_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool) -> None:
    if not links:  # what vfat answers to link(): the file system, not a real failure
        monkeypatch.setattr(backup.os, "link", _no_links)
    target = tmp_path / "profile.aegisbackup"
    backup._write_atomic(target, b"first", force=False)
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        backup._write_atomic(target, b"second", force=False)
    assert target.read_bytes() == b"first"
    backup._write_atomic(target, b"third", force=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.aegisbackup"]  # no temp file


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backup.os, "fsync", full)
    with pytest.raises(OSError):
        backup._write_atomic(tmp_path / "b.bak", b"data", force=False)
    assert list(tmp_path.iterdir()) == []
