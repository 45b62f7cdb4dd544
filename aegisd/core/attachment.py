"""The encrypted file format of attachments (docs/protocol.md §22). Pure: no I/O.

A file is cut into chunks of CHUNK_LEN bytes; each chunk becomes one blob block of exactly
BLOCK_SIZE bytes, ``version(1) || AES-256-GCM(chunk)``, so its only cleartext byte is the version
byte, as in a ratchet block: the relay cannot tell a blob block from a message block. The
number of blocks is padded with Padmé; filler blocks are encryptions of zeros under the same key
(indistinguishable from data blocks, and checked like them).

Everything per file comes from one random 32-byte seed that travels inside the ratchet with the
descriptor: the AEAD key, and each block's blob ID and relay capability. The descriptor stays
small whatever the file's size, and a resumed upload re-derives the same IDs.
"""

from __future__ import annotations

import struct
import unicodedata

from . import primitives, wire
from .errors import DecryptionError

SEED_LEN = 32
DIGEST_LEN = 32  # SHA-256 of the plaintext file
BLOB_ID_LEN = 16
CAP_LEN = 32
CHUNK_LEN = wire.ATTACHMENT_CHUNK_LEN  # 16367 plaintext bytes per block
#: The relay's upload quota per proof of work (docs/relay-protocol.md §4.5): a file's padded
#: block count never exceeds it, so one quota carries any file.
MAX_BLOCKS = wire.ATTACHMENT_MAX_BLOCKS
#: The largest file whose padded block count fits MAX_BLOCKS (Padmé keeps powers of two).
MAX_FILE_SIZE = MAX_BLOCKS * CHUNK_LEN  # 134_078_464 bytes

_INFO_KEY = b"AegisLink attachment key"
_INFO_ID = b"AegisLink attachment blob id"
_INFO_CAP = b"AegisLink attachment capability"
_AD = b"AegisLink attachment block"
_VERSION = bytes((wire.VERSION,))
_ZEROS = bytes(CHUNK_LEN)


padme = wire.padme


def data_blocks(size: int) -> int:
    """Blocks carrying the file's bytes (an empty file still takes one)."""
    if size < 0:
        raise ValueError("negative size")
    return max(1, -(-size // CHUNK_LEN))


padded_blocks = wire.attachment_blocks


class FileKeys:
    """Everything one file's seed yields. Holds key material: never log or repr it."""

    __slots__ = ("_cipher", "_key", "_seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_LEN:
            raise ValueError("an attachment seed is 32 bytes")
        self._seed = seed
        self._key = primitives.hkdf(seed, b"", _INFO_KEY, 32)
        self._cipher = primitives.aead(self._key)

    def __repr__(self) -> str:
        return "FileKeys(<secret>)"

    def blob_id(self, index: int) -> bytes:
        return primitives.hmac_sha256(self._seed, _INFO_ID + struct.pack(">I", index))[
            :BLOB_ID_LEN
        ]

    def capability(self, index: int) -> bytes:
        return primitives.hmac_sha256(self._seed, _INFO_CAP + struct.pack(">I", index))

    @staticmethod
    def _nonce_ad(index: int, total: int) -> tuple[bytes, bytes]:
        # The key is used for this one file; each index is sealed once: the index is the nonce.
        # The index and the block count are bound in, so blocks cannot be swapped, and a
        # file cannot be cut short or lengthened by the relay.
        return struct.pack(">4xQ", index), _AD + _VERSION + struct.pack(">II", index, total)

    def seal(self, index: int, total: int, chunk: bytes) -> bytes:
        """One blob block: chunk (at most CHUNK_LEN bytes; zero-filled) -> BLOCK_SIZE bytes."""
        if not 0 <= index < total <= MAX_BLOCKS:
            raise ValueError("block index out of range")
        if len(chunk) > CHUNK_LEN:
            raise ValueError("chunk too long")
        nonce, ad = self._nonce_ad(index, total)
        body = self._cipher.encrypt(nonce, chunk + _ZEROS[len(chunk) :], ad)
        block = _VERSION + body
        assert len(block) == wire.BLOCK_SIZE
        return block

    def open(self, index: int, total: int, block: bytes) -> bytes:
        """A blob block -> its CHUNK_LEN plaintext bytes; any failure is DecryptionError."""
        if len(block) != wire.BLOCK_SIZE or block[:1] != _VERSION or not 0 <= index < total:
            raise DecryptionError()
        nonce, ad = self._nonce_ad(index, total)
        out = primitives.open_with(self._cipher, nonce, block[1:], ad)
        if out is None:
            raise DecryptionError()
        return out


def chunk_of(data_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of block `index`'s bytes in a file of data_size bytes; length 0 for
    filler blocks."""
    start = index * CHUNK_LEN
    if start >= data_size:
        return start, 0
    return start, min(CHUNK_LEN, data_size - start)


def clean_file_name(name: str) -> str:
    """A file name chosen by someone else, made safe to show and to use as a default name: the
    last path component only, no control/format/separator characters, no leading dots, at most
    wire.MAX_FILE_NAME_BYTES bytes of UTF-8."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(
        ch for ch in name if not unicodedata.category(ch).startswith(("C", "Z")) or ch == " "
    )
    kept = " ".join(kept.split()).lstrip(".").strip()
    out = kept.encode()[: wire.MAX_FILE_NAME_BYTES].decode("utf-8", "ignore")
    return out or "file"
