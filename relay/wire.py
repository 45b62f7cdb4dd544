"""Every frame of the relay protocol, in one module (docs/relay-protocol.md is the contract).

A frame is one binary WebSocket message:

    version (1 byte, = 2) | type (1 byte) | request id (4 bytes, big-endian) | body

Parsers here are strict: exact lengths, bounded counts, no trailing bytes. Every parse failure
raises `FrameError` carrying the error code the relay answers with. This module is pure: no I/O,
no clock, no randomness; the relay and the reference client share it.

The relay is a separate program from the daemon and imports nothing from `aegisd`; its block
size is its own constant, kept equal to `aegisd.core.wire.BLOCK_SIZE` by a test.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

# 2 since issue 15 (CREATE pays proof of work, BLOB_QUOTA and HELLO_OK changed layout): a
# version-1 client gets `bad_version` in a frame of version 2 and can say so (docs §11).
VERSION = 2
BLOCK_SIZE = 16384
HEADER_LEN = 6
ID_LEN = 16
KEY_LEN = 32
SIG_LEN = 64
HASH_LEN = 32
NONCE_LEN = 16  # proof-of-work nonce
CHALLENGE_LEN = 32
BOX_OVERHEAD = 40  # NaCl box: 24-byte nonce + 16-byte Poly1305 tag
SEALED_BLOCK_LEN = BLOCK_SIZE + BOX_OVERHEAD
SEALEDBOX_OVERHEAD = 48  # NaCl sealed box: 32-byte ephemeral key + 16-byte tag
SEALED_BLOB_LEN = BLOCK_SIZE + SEALEDBOX_OVERHEAD

AUTH_CONTEXT = b"AEGIS-RELAY-1 AUTH\x00"
POW_CONTEXT = b"AEGIS-RELAY-1 POW\x00"

# --- frame types: client -> relay ----------------------------------------------------------------
HELLO = 0x01
CREATE = 0x02
SUBSCRIBE = 0x03
FETCH = 0x04
ACK = 0x05
DELETE = 0x06
TOKEN_ADD = 0x07
TOKEN_DEL = 0x08
BUNDLE_BASE = 0x09
BUNDLE_ADD = 0x0A
BUNDLE_STATUS = 0x0B
BUNDLE_FETCH = 0x0C
DEPOSIT = 0x0D
BLOB_QUOTA = 0x0E
BLOB_PUT = 0x0F
BLOB_GET = 0x10
BLOB_DEL = 0x11
UNSUBSCRIBE = 0x12

# --- frame types: relay -> client ----------------------------------------------------------------
OK = 0x80
HELLO_OK = 0x81
CREATED = 0x82
BUNDLE_COUNT = 0x84
BUNDLE = 0x85
BLOB = 0x86
MSG = 0x90
END = 0x91
ERROR = 0xFF

CLIENT_TYPES = frozenset(range(HELLO, UNSUBSCRIBE + 1))
# Owner commands: body = owner_id | args | signature (the last 64 bytes).
SIGNED_OWNER_TYPES = frozenset(
    {SUBSCRIBE, FETCH, DELETE, TOKEN_ADD, TOKEN_DEL, BUNDLE_BASE, BUNDLE_ADD, BUNDLE_STATUS,
     UNSUBSCRIBE}
)

# --- bundle item kinds ----------------------------------------------------------------------------
ITEM_X25519 = 1
ITEM_MLKEM = 2
ITEM_KINDS = (ITEM_X25519, ITEM_MLKEM)
MAX_BASE_LEN = 4096
MAX_ITEM_LEN = 2048

# --- deposit authorisation ------------------------------------------------------------------------
AUTH_TOKEN = 1
AUTH_POW = 2

# --- proof-of-work purposes (the type byte inside the hashed preimage) ----------------------------
POW_DEPOSIT = DEPOSIT
POW_BUNDLE = BUNDLE_FETCH
POW_BLOB = BLOB_QUOTA
POW_CREATE = CREATE
#: A blob quota's proof of work costs 2**pow_blob_bits hashes per started BLOB_POW_UNIT blocks
#: (4 MiB), rounded up to a power of two: the price grows with what is stored (§6).
BLOB_POW_UNIT = 256

# --- error codes ---------------------------------------------------------------------------------
E_BAD_FRAME = 1
E_BAD_VERSION = 2
E_TOO_LARGE = 3
E_OUT_OF_ORDER = 4
E_UNKNOWN_TYPE = 5
E_DENIED = 6
E_BAD_POW = 7
E_RATE_LIMITED = 8
E_QUEUE_FULL = 9
E_LIMIT = 10
E_UNKNOWN_MESSAGE = 11
E_BAD_BLOCK = 12
E_EXISTS = 13
E_TIMEOUT = 14
E_BUSY = 15
E_INTERNAL = 16
# Relay-wide storage exhausted: the storage budget, the mailbox table or the blob area (price);
# the same code and text as a full disk (conn). Nothing the client can do but wait.
E_FULL = 17

ERROR_TEXT = {
    E_BAD_FRAME: "malformed frame",
    E_BAD_VERSION: "unsupported protocol version",
    E_TOO_LARGE: "frame too large",
    E_OUT_OF_ORDER: "frame out of order",
    E_UNKNOWN_TYPE: "unknown frame type",
    E_DENIED: "no such object or not allowed",
    E_BAD_POW: "proof of work missing or insufficient",
    E_RATE_LIMITED: "rate limit exceeded",
    E_QUEUE_FULL: "mailbox queue full",
    E_LIMIT: "limit reached",
    E_UNKNOWN_MESSAGE: "unknown message id on this connection",
    E_BAD_BLOCK: "block must be exactly one block long",
    E_EXISTS: "id already in use",
    E_TIMEOUT: "timed out",
    E_BUSY: "relay busy",
    E_INTERNAL: "internal relay error",
    E_FULL: "relay storage full",
}
# Errors after which the relay closes the connection.
FATAL_ERRORS = frozenset({E_BAD_FRAME, E_BAD_VERSION, E_TOO_LARGE, E_OUT_OF_ORDER,
                          E_UNKNOWN_TYPE, E_TIMEOUT})

_HEADER = struct.Struct(">BBI")


class FrameError(Exception):
    """A frame that cannot be accepted; `code` is the error code to answer with."""

    def __init__(self, code: int) -> None:
        super().__init__(ERROR_TEXT.get(code, "error"))
        self.code = code


@dataclass(frozen=True, slots=True)
class Frame:
    version: int
    type: int
    rid: int
    body: bytes


def encode(ftype: int, rid: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(VERSION, ftype, rid) + body


def decode(data: bytes) -> Frame:
    """Split the header; checks the version but not the body."""
    if len(data) < HEADER_LEN:
        raise FrameError(E_BAD_FRAME)
    version, ftype, rid = _HEADER.unpack_from(data)
    if version != VERSION:
        raise FrameError(E_BAD_VERSION)
    return Frame(version, ftype, rid, bytes(data[HEADER_LEN:]))


def error_frame(rid: int, code: int) -> bytes:
    return encode(ERROR, rid, struct.pack(">H", code) + ERROR_TEXT[code].encode())


def parse_error(body: bytes) -> int:
    if len(body) < 2:
        raise FrameError(E_BAD_FRAME)
    code: int = struct.unpack_from(">H", body)[0]
    return code


def auth_message(challenge: bytes, frame_without_sig: bytes) -> bytes:
    """What an owner signs: context | connection challenge | the frame minus its signature."""
    return AUTH_CONTEXT + challenge + frame_without_sig


# --- HELLO_OK ------------------------------------------------------------------------------------

_HELLO_OK = struct.Struct(">32sIIBBBIHHBII")


@dataclass(frozen=True, slots=True)
class HelloOk:
    challenge: bytes
    block_size: int
    max_frame: int
    pow_deposit_bits: int
    pow_bundle_bits: int
    pow_blob_bits: int
    message_ttl: int
    window: int
    max_inflight: int
    pow_create_bits: int  # appended last: the fields before keep their offsets
    mailbox_ttl: int  # seconds without use before the relay deletes a mailbox
    blob_ttl: int  # seconds before an unfetched blob expires

    def encode_body(self) -> bytes:
        return _HELLO_OK.pack(self.challenge, self.block_size, self.max_frame,
                              self.pow_deposit_bits, self.pow_bundle_bits, self.pow_blob_bits,
                              self.message_ttl, self.window, self.max_inflight,
                              self.pow_create_bits, self.mailbox_ttl, self.blob_ttl)

    @classmethod
    def parse(cls, body: bytes) -> HelloOk:
        if len(body) != _HELLO_OK.size:
            raise FrameError(E_BAD_FRAME)
        return cls(*_HELLO_OK.unpack(body))


# --- body parsers (relay side) -------------------------------------------------------------------


def split_signed(body: bytes, min_args: int, max_args: int) -> tuple[bytes, bytes, bytes]:
    """owner_id | args | sig -> (owner_id, args, sig), with min_args <= len(args) <= max_args."""
    n = len(body) - ID_LEN - SIG_LEN
    if n < min_args or n > max_args:
        raise FrameError(E_BAD_FRAME)
    return body[:ID_LEN], body[ID_LEN:-SIG_LEN], body[-SIG_LEN:]


#: CREATE's flags: bit 0 public, bit 1 a delete key follows them (docs/relay-protocol.md §4).
CREATE_PUBLIC = 0x01
CREATE_DELETE_KEY = 0x02


def parse_create(body: bytes) -> tuple[bytes, bytes, int, bytes | None, bytes, bytes]:
    """sig_pub(32) | box_pub(32) | flags(1) | [del_pub(32) if flags bit 1] | nonce(16) | sig(64).

    A client that predates delete keys sends flags bit 1 clear and the shorter body."""
    if len(body) < 65:
        raise FrameError(E_BAD_FRAME)
    flags = body[64]
    if flags & ~(CREATE_PUBLIC | CREATE_DELETE_KEY):
        raise FrameError(E_BAD_FRAME)
    extra = KEY_LEN if flags & CREATE_DELETE_KEY else 0
    if len(body) != KEY_LEN * 2 + 1 + extra + NONCE_LEN + SIG_LEN:
        raise FrameError(E_BAD_FRAME)
    del_pub = body[65:65 + extra] if extra else None
    rest = body[65 + extra:]
    return body[:32], body[32:64], flags, del_pub, rest[:NONCE_LEN], rest[NONCE_LEN:]


def create_pow_hash(sig_pub: bytes, box_pub: bytes, flags: int,
                    del_pub: bytes | None = None) -> bytes:
    """The payload hash a CREATE's proof of work is bound to: the mailbox it pays for (with its
    delete key, when it has one)."""
    return hashlib.sha256(sig_pub + box_pub + bytes([flags]) + (del_pub or b"")).digest()


def blob_pow_bits(base_bits: int, blocks: int) -> int:
    """Difficulty of a quota of `blocks`: base + ceil(log2(ceil(blocks / BLOB_POW_UNIT)))."""
    if base_bits <= 0:
        return 0
    units = max(1, -(-blocks // BLOB_POW_UNIT))
    return base_bits + (units - 1).bit_length()


def blob_pow_target(blocks: int) -> bytes:
    """A quota's proof of work names its size: blocks(4) | 12 zero bytes."""
    return struct.pack(">I", blocks) + bytes(ID_LEN - 4)


def parse_deposit(body: bytes) -> tuple[bytes, int, bytes, bytes]:
    """deposit_id(16) | auth_kind(1) | token(32) or pow nonce(16) | block."""
    if len(body) < ID_LEN + 1:
        raise FrameError(E_BAD_FRAME)
    kind = body[ID_LEN]
    if kind == AUTH_TOKEN:
        alen = HASH_LEN
    elif kind == AUTH_POW:
        alen = NONCE_LEN
    else:
        raise FrameError(E_BAD_FRAME)
    start = ID_LEN + 1
    auth = body[start:start + alen]
    block = body[start + alen:]
    if len(auth) != alen:
        raise FrameError(E_BAD_FRAME)
    return body[:ID_LEN], kind, auth, block


def parse_ack(body: bytes, window: int) -> list[bytes]:
    """msg_id(16) * n, 1 <= n <= window."""
    n, rem = divmod(len(body), ID_LEN)
    if rem or n < 1 or n > window:
        raise FrameError(E_BAD_FRAME)
    return [body[i * ID_LEN:(i + 1) * ID_LEN] for i in range(n)]


def encode_items(kind: int, items: list[bytes]) -> bytes:
    out = [bytes([kind, len(items)])]
    for item in items:
        out.append(struct.pack(">H", len(item)) + item)
    return b"".join(out)


def parse_items(args: bytes) -> tuple[int, list[bytes]]:
    """kind(1) | count(1) | count * (len u16 | item); 1 <= len <= MAX_ITEM_LEN, count >= 1."""
    if len(args) < 2 or args[0] not in ITEM_KINDS or args[1] == 0:
        raise FrameError(E_BAD_FRAME)
    kind, count = args[0], args[1]
    pos = 2
    items = []
    for _ in range(count):
        if pos + 2 > len(args):
            raise FrameError(E_BAD_FRAME)
        (n,) = struct.unpack_from(">H", args, pos)
        pos += 2
        if n < 1 or n > MAX_ITEM_LEN or pos + n > len(args):
            raise FrameError(E_BAD_FRAME)
        items.append(args[pos:pos + n])
        pos += n
    if pos != len(args):
        raise FrameError(E_BAD_FRAME)
    return kind, items


def encode_bundle(base: bytes, x25519: bytes | None, mlkem: bytes | None) -> bytes:
    out = b""
    for part in (base, x25519 or b"", mlkem or b""):
        out += struct.pack(">H", len(part)) + part
    return out


def parse_bundle(body: bytes) -> tuple[bytes, bytes | None, bytes | None]:
    parts = []
    pos = 0
    for _ in range(3):
        if pos + 2 > len(body):
            raise FrameError(E_BAD_FRAME)
        (n,) = struct.unpack_from(">H", body, pos)
        pos += 2
        if pos + n > len(body):
            raise FrameError(E_BAD_FRAME)
        parts.append(body[pos:pos + n])
        pos += n
    if pos != len(body) or not parts[0]:
        raise FrameError(E_BAD_FRAME)
    return parts[0], parts[1] or None, parts[2] or None


def exact(body: bytes, n: int) -> bytes:
    if len(body) != n:
        raise FrameError(E_BAD_FRAME)
    return body
