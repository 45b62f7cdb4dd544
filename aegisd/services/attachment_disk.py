"""The profile's encrypted copies of files (docs/protocol.md §22.4, §22.5): a file encrypted
into a spool of blocks, blocks read and written at their offsets, and the stored blocks
checked and decrypted to a target. No network and no store here (attachments.py does the
transfers, group_files.py the copies for a group); nothing here logs a name, path or key."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aegisd.core import wire
from aegisd.core.attachment import CHUNK_LEN, FileKeys, chunk_of
from aegisd.core.errors import DecryptionError
from aegisd.store.attachments import AttachmentRow

BLOCK = wire.BLOCK_SIZE


class Corrupt(Exception):
    """A block that does not open (stored, or fetched again and again: attachments.py), or a
    digest that does not match."""


class TooLarge(Exception):
    """The file grew past the limit between its check and its reading."""


class LocalIOError(Exception):
    """The profile's disk failed (not the network): not something a retry over the network
    fixes. Kept apart from OSError, which the relay link counts as 'unavailable'."""


T = TypeVar("T")


def local(op: Callable[[], T]) -> T:
    try:
        return op()
    except OSError as exc:
        raise LocalIOError() from exc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (else a power loss may undo it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(f: Any, index: int, count: int) -> bytes:
    f.seek(index * BLOCK)
    data: bytes = f.read(count * BLOCK)
    if len(data) != count * BLOCK:
        raise OSError("short spool")
    return data


def write_at(f: Any, index: int, data: bytes) -> None:
    f.seek(index * BLOCK)
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


@dataclass(frozen=True)
class Spooled:
    """A file encrypted into a spool of its own (`Attachments.spool`), its row not yet
    committed."""

    id: str
    seed: bytes
    size: int
    digest: bytes
    name: str  # cleaned

    def __repr__(self) -> str:  # the seed is key material
        return f"Spooled(id={self.id!r})"

    def row(self, contact_id: int, relay_url: str, now: int) -> AttachmentRow:
        return AttachmentRow(self.id, contact_id, "out", self.name, self.size,
                             wire.attachment_blocks(self.size), self.digest, self.seed,
                             relay_url, "uploading", 0, None, now, now, now)  # fmt: skip


def encrypt_to_spool(src: Path, dst: Path, seed: bytes, limit: int) -> tuple[int, bytes]:
    """Read the file once, streaming: hash it and write its blocks (padded count) to the
    spool. The block count is bound into every block, so it is fixed from the size the
    open file has; a file that changes size while it is read is refused."""
    keys = FileKeys(seed)
    sha = hashlib.sha256()
    tmp = dst.with_suffix(".part")
    # Non-blocking open and a check of what was opened: a path swapped for a FIFO after
    # the stat must not hang this thread. The source is opened first: no descriptor of
    # the spool leaks when it cannot be.
    f = open(os.open(src, os.O_RDONLY | os.O_NONBLOCK), "rb")  # noqa: SIM115 (with below)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except BaseException:
        f.close()
        raise
    try:
        with f, os.fdopen(fd, "wb") as out:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            size = st.st_size
            if size > limit:
                raise TooLarge()
            total = wire.attachment_blocks(size)
            read = 0
            for i in range(total):
                want = min(CHUNK_LEN, size - read)
                chunk = f.read(want) if want > 0 else b""
                if len(chunk) != max(0, want):
                    raise ValueError("the file changed while it was read")
                read += len(chunk)
                sha.update(chunk)
                out.write(keys.seal(i, total, chunk))
            if read != size or f.read(1):
                raise ValueError("the file changed while it was read")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)  # the row that names it commits next
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return size, sha.digest()


def verify(path: Path, keys: FileKeys, row: AttachmentRow) -> bool:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in plaintext(f, keys, row):
            sha.update(chunk)
    return hmac.compare_digest(sha.digest(), row.digest)


def write_plain(stored: Path, row: AttachmentRow, target: Path, overwrite: bool) -> bool:
    """Decrypt the stored blocks to `target` through a temporary file, checking every block
    and the digest; False if the stored copy is damaged or gone."""
    keys = FileKeys(row.seed)
    # A short name of its own: the file's name may already be 255 bytes (NAME_MAX).
    tmp = target.with_name(f".aegis-{os.urandom(8).hex()}.part")
    sha = hashlib.sha256()
    try:
        src = open(stored, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return False  # the stored copy is gone: damaged, as far as the user can tell
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except BaseException:
        src.close()
        raise
    try:
        with src, os.fdopen(fd, "wb") as out:
            try:
                for chunk in plaintext(src, keys, row):
                    sha.update(chunk)
                    out.write(chunk)
            except Corrupt:  # a stored block no longer opens (bit rot, truncation)
                ok = False
            else:
                ok = hmac.compare_digest(sha.digest(), row.digest)
            if ok:
                out.flush()
                os.fsync(out.fileno())
        if not ok:
            tmp.unlink()
            return False
        if overwrite:
            os.replace(tmp, target)
        else:
            # link() fails if the name exists (also a dangling symlink, also one made
            # since the check above): never replaces what the user did not allow.
            try:
                os.link(tmp, target, follow_symlinks=False)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links (FAT): check, then rename
                if os.path.lexists(target):
                    raise FileExistsError() from None
                os.replace(tmp, target)
            else:
                tmp.unlink()
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return True


def plaintext(f: Any, keys: FileKeys, row: AttachmentRow) -> Any:
    """The file's bytes, block by block, from the stored blocks in the open file f (filler
    blocks are opened too: a relay cannot swap them for anything else unnoticed)."""
    for i in range(row.blocks):
        block = f.read(BLOCK)
        try:
            chunk = keys.open(i, row.blocks, block)
        except DecryptionError:
            raise Corrupt() from None
        _, n = chunk_of(row.size, i)
        if n:
            yield chunk[:n]


