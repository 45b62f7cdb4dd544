"""Every page of a SQLCipher database as SQLCipher keeps it, decrypted with its raw key: the
main file's pages (free pages included) and each frame of its WAL. For tests that check what
a deletion leaves on disk, below what SQL can see.

The layout is SQLCipher 4's defaults, which the store uses (aegisd/store/db.py sets only a
raw key): 4096-byte pages, AES-256-CBC under the raw key itself, and at the end of each page
a reserve of 80 bytes, the page's 16-byte IV followed by its HMAC-SHA512. The first 16 bytes
of the file are the salt (not encrypted), so page 1's encrypted part starts there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE = 4096
RESERVE = 80  # IV (16) + HMAC-SHA512 (64)
WAL_HEADER = 32
FRAME_HEADER = 24


def _decrypt(key: bytes, page: bytes, first: bool) -> bytes:
    start = 16 if first else 0
    iv = page[PAGE - RESERVE : PAGE - RESERVE + 16]
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(page[start : PAGE - RESERVE]) + dec.finalize()


def pages(path: Path, key: bytes) -> Iterator[bytes]:
    """The decrypted pages of the database file, then of its WAL (if any)."""
    data = path.read_bytes()
    assert len(data) % PAGE == 0, "not a SQLCipher file of 4096-byte pages"
    for n in range(len(data) // PAGE):
        yield _decrypt(key, data[n * PAGE : (n + 1) * PAGE], first=n == 0)
    wal = Path(str(path) + "-wal")
    if wal.exists():
        raw = wal.read_bytes()
        at = WAL_HEADER
        while at + FRAME_HEADER + PAGE <= len(raw):
            number = int.from_bytes(raw[at : at + 4], "big")
            frame = raw[at + FRAME_HEADER : at + FRAME_HEADER + PAGE]
            yield _decrypt(key, frame, first=number == 1)
            at += FRAME_HEADER + PAGE


def holds(path: Path, key: bytes, needle: bytes) -> bool:
    """Whether any decrypted page (free ones, and the WAL's, included) holds ``needle``."""
    return any(needle in page for page in pages(path, key))
