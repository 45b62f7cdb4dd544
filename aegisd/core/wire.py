"""Every binary format of the protocol, in one module (see docs/protocol.md).

Each format starts with a version byte; versioned objects that are not blocks also carry a kind
byte. Parsers are strict: exact lengths, bounded counts, known tags, no trailing bytes. Every
parse failure raises `DecodeError` (or its subclass `UnsupportedVersion`) and nothing else.

This module holds raw bytes only; it imports no cryptographic primitive.
"""

from __future__ import annotations

import base64
import itertools
import struct
from dataclasses import dataclass, field, replace

from .errors import DecodeError, UnsupportedVersion

VERSION = 1
BLOCK_SIZE = 16384  # bytes; every envelope that leaves a device is exactly this long

X25519_LEN = 32
ED25519_LEN = 32
SIG_LEN = 64
MLKEM_EK_LEN = 1184
MLKEM_CT_LEN = 1088
MLKEM_SEED_LEN = 64
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
PREKEY_ID_LEN = 4
MSG_ID_LEN = 8

# Type tags of public-key encodings: distinct tags and distinct lengths, so the encodings of the
# three key types are pairwise disjoint (no byte string is a valid encoding of two types).
TAG_X25519 = 0x21
TAG_ED25519 = 0x22
TAG_MLKEM768 = 0x23

# Kind bytes of versioned objects other than blocks (blocks carry no kind: one look for all).
KIND_BUNDLE_BASE = 0x10
KIND_ONE_TIME_X25519 = 0x11
KIND_ONE_TIME_MLKEM = 0x12
KIND_RATCHET_STATE = 0x20
KIND_SESSION = 0x21
KIND_PREKEY_STORE = 0x22

# --- sizes derived from the constants above ---------------------------------------------------

HEADER_LEN = X25519_LEN + MLKEM_EK_LEN + 1 + MLKEM_CT_LEN + 4 + 4  # 2313
ENC_HEADER_LEN = NONCE_LEN + HEADER_LEN + TAG_LEN  # 2341
IDENTITY_LEN = ED25519_LEN + X25519_LEN + SIG_LEN  # 128
FRAGMENT_HEADER_LEN = MSG_ID_LEN + 2 + 2 + 2  # 14

# Ratchet block: version || enc_header || body_ct
RATCHET_BODY_CT_LEN = BLOCK_SIZE - 1 - ENC_HEADER_LEN
RATCHET_BODY_PT_LEN = RATCHET_BODY_CT_LEN - TAG_LEN

# First-contact block: version || EK || spk_id || pqpk_id || opk_id || kem_ct || sealed
FIRST_CONTACT_PREFIX_LEN = 1 + X25519_LEN + 3 * PREKEY_ID_LEN + MLKEM_CT_LEN  # 1133
FIRST_CONTACT_INNER_LEN = BLOCK_SIZE - FIRST_CONTACT_PREFIX_LEN - TAG_LEN
FIRST_CONTACT_BODY_CT_LEN = FIRST_CONTACT_INNER_LEN - IDENTITY_LEN - ENC_HEADER_LEN
FIRST_CONTACT_BODY_PT_LEN = FIRST_CONTACT_BODY_CT_LEN - TAG_LEN

# How much content one fragment can carry.
RATCHET_CAPACITY = RATCHET_BODY_PT_LEN - FRAGMENT_HEADER_LEN
FIRST_CONTACT_CAPACITY = FIRST_CONTACT_BODY_PT_LEN - FRAGMENT_HEADER_LEN
MAX_FRAGMENTS = 4096  # one logical message may span at most this many blocks

_MAX_LIST = 100_000  # bound on any count field in stored state


# --- strict reader and a small writer ---------------------------------------------------------


class Reader:
    """Bounds-checked cursor over bytes; every overrun is a DecodeError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise DecodeError("truncated input")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise DecodeError("flag byte out of range")
        return value == 1

    def optional(self, n: int) -> bytes | None:
        return self.take(n) if self.flag() else None

    def varbytes(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise DecodeError("length field out of range")
        return self.take(n)

    def count(self) -> int:
        n = self.u32()
        if n > _MAX_LIST:
            raise DecodeError("count field out of range")
        return n

    def left(self) -> int:
        """Bytes not read yet (for a field that is present or absent at the end)."""
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError("trailing bytes")


class Writer:
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def raw(self, b: bytes) -> Writer:
        self._parts.append(b)
        return self

    def u8(self, v: int) -> Writer:
        return self.raw(struct.pack(">B", v))

    def u16(self, v: int) -> Writer:
        return self.raw(struct.pack(">H", v))

    def u32(self, v: int) -> Writer:
        return self.raw(struct.pack(">I", v))

    def u64(self, v: int) -> Writer:
        return self.raw(struct.pack(">Q", v))

    def flag(self, v: bool) -> Writer:
        return self.u8(1 if v else 0)

    def optional(self, b: bytes | None, n: int) -> Writer:
        if b is None:
            return self.u8(0)
        _expect_len(b, n)
        return self.u8(1).raw(b)

    def fixed(self, b: bytes, n: int) -> Writer:
        _expect_len(b, n)
        return self.raw(b)

    def varbytes(self, b: bytes) -> Writer:
        return self.u32(len(b)).raw(b)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


def _expect_len(b: bytes, n: int) -> None:
    if len(b) != n:
        raise ValueError("field has the wrong length")


def _versioned(reader: Reader, kind: int) -> None:
    version = reader.u8()
    if version != VERSION:
        raise UnsupportedVersion("unsupported format version")
    if reader.u8() != kind:
        raise DecodeError("unexpected object kind")


def _header(kind: int) -> Writer:
    return Writer().u8(VERSION).u8(kind)


def check_block(block: bytes) -> None:
    """A block is exactly BLOCK_SIZE bytes and starts with the supported version byte."""
    if len(block) != BLOCK_SIZE:
        raise DecodeError("block has the wrong size")
    if block[0] != VERSION:
        raise UnsupportedVersion("unsupported block version")


# --- public key encodings ---------------------------------------------------------------------


def encode_x25519(pub: bytes) -> bytes:
    _expect_len(pub, X25519_LEN)
    return bytes((TAG_X25519,)) + pub


def encode_ed25519(pub: bytes) -> bytes:
    _expect_len(pub, ED25519_LEN)
    return bytes((TAG_ED25519,)) + pub


def encode_mlkem(ek: bytes) -> bytes:
    _expect_len(ek, MLKEM_EK_LEN)
    return bytes((TAG_MLKEM768,)) + ek


# --- identity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityRecord:
    """A public identity: Ed25519 key, X25519 key, and the Ed25519 signature binding them."""

    ed_pub: bytes
    x_pub: bytes
    binding_sig: bytes

    def to_bytes(self) -> bytes:
        return (
            Writer()
            .fixed(self.ed_pub, ED25519_LEN)
            .fixed(self.x_pub, X25519_LEN)
            .fixed(self.binding_sig, SIG_LEN)
            .bytes()
        )

    @classmethod
    def read(cls, r: Reader) -> IdentityRecord:
        return cls(r.take(ED25519_LEN), r.take(X25519_LEN), r.take(SIG_LEN))

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityRecord:
        r = Reader(data)
        out = cls.read(r)
        r.done()
        return out


# --- prekey bundle parts (published by the owner; the relay stores them as opaque items) ------


@dataclass(frozen=True)
class BundleBase:
    identity: IdentityRecord
    spk_id: int
    spk_pub: bytes
    spk_sig: bytes
    lrk_id: int
    lrk_ek: bytes
    lrk_sig: bytes

    def to_bytes(self) -> bytes:
        return (
            _header(KIND_BUNDLE_BASE)
            .raw(self.identity.to_bytes())
            .u32(self.spk_id)
            .fixed(self.spk_pub, X25519_LEN)
            .fixed(self.spk_sig, SIG_LEN)
            .u32(self.lrk_id)
            .fixed(self.lrk_ek, MLKEM_EK_LEN)
            .fixed(self.lrk_sig, SIG_LEN)
            .bytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleBase:
        r = Reader(data)
        _versioned(r, KIND_BUNDLE_BASE)
        identity = IdentityRecord.read(r)
        spk_id, spk_pub, spk_sig = _nonzero_id(r.u32()), r.take(X25519_LEN), r.take(SIG_LEN)
        lrk_id, lrk_ek, lrk_sig = _nonzero_id(r.u32()), r.take(MLKEM_EK_LEN), r.take(SIG_LEN)
        r.done()
        return cls(identity, spk_id, spk_pub, spk_sig, lrk_id, lrk_ek, lrk_sig)


@dataclass(frozen=True)
class OneTimeX25519:
    """A one-time X25519 prekey (unsigned, as in Signal's PQXDH)."""

    prekey_id: int
    pub: bytes

    def to_bytes(self) -> bytes:
        return _header(KIND_ONE_TIME_X25519).u32(self.prekey_id).fixed(self.pub, X25519_LEN).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> OneTimeX25519:
        r = Reader(data)
        _versioned(r, KIND_ONE_TIME_X25519)
        out = cls(_nonzero_id(r.u32()), r.take(X25519_LEN))
        r.done()
        return out


@dataclass(frozen=True)
class OneTimeMlkem:
    """A signed one-time ML-KEM-768 prekey."""

    prekey_id: int
    ek: bytes
    sig: bytes

    def to_bytes(self) -> bytes:
        return (
            _header(KIND_ONE_TIME_MLKEM)
            .u32(self.prekey_id)
            .fixed(self.ek, MLKEM_EK_LEN)
            .fixed(self.sig, SIG_LEN)
            .bytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> OneTimeMlkem:
        r = Reader(data)
        _versioned(r, KIND_ONE_TIME_MLKEM)
        out = cls(_nonzero_id(r.u32()), r.take(MLKEM_EK_LEN), r.take(SIG_LEN))
        r.done()
        return out


def _nonzero_id(value: int) -> int:
    if value == 0:
        raise DecodeError("prekey id 0 is reserved")
    return value


def prekey_signature_message(kind: int, prekey_id: int, encoded_key: bytes) -> bytes:
    """What the identity's Ed25519 key signs for a prekey (domain-separated, kind-bound)."""
    return b"AegisLink-v1 prekey" + struct.pack(">BI", kind, prekey_id) + encoded_key


IDENTITY_BINDING_LABEL = b"AegisLink-v1 identity binding"


# --- ratchet header ---------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built for every received message, and frozen init is slow
class RatchetHeader:
    dh_pub: bytes
    kem_ek: bytes
    kem_ct: bytes | None
    prev_n: int
    n: int

    def to_bytes(self) -> bytes:
        return header_prefix(self.dh_pub, self.kem_ek, self.kem_ct) + struct.pack(
            ">II", self.prev_n, self.n
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetHeader:
        # Fixed layout, parsed by offset: this runs for every received message.
        if len(data) != HEADER_LEN:
            raise DecodeError("header has the wrong size")
        flag = data[_FLAG_OFF]
        kem_ct = data[_FLAG_OFF + 1 : _FLAG_OFF + 1 + MLKEM_CT_LEN]
        if flag > 1 or (flag == 0 and kem_ct != _ZERO_CT):
            raise DecodeError("malformed KEM ciphertext field")
        prev_n, n = struct.unpack_from(">II", data, HEADER_LEN - 8)
        return cls(
            data[:X25519_LEN], data[X25519_LEN:_FLAG_OFF], kem_ct if flag else None, prev_n, n
        )


_FLAG_OFF = X25519_LEN + MLKEM_EK_LEN
_ZERO_CT = bytes(MLKEM_CT_LEN)


def header_prefix(dh_pub: bytes, kem_ek: bytes, kem_ct: bytes | None) -> bytes:
    """The part of a header that is the same for every message of one sending chain."""
    _expect_len(dh_pub, X25519_LEN)
    _expect_len(kem_ek, MLKEM_EK_LEN)
    if kem_ct is None:
        return dh_pub + kem_ek + b"\x00" + _ZERO_CT
    _expect_len(kem_ct, MLKEM_CT_LEN)
    return dh_pub + kem_ek + b"\x01" + kem_ct


def pack_counters(prev_n: int, n: int) -> bytes:
    return struct.pack(">II", prev_n, n)


# --- first-contact block prefix ---------------------------------------------------------------


@dataclass(frozen=True)
class FirstContactPrefix:
    ephemeral_pub: bytes
    spk_id: int
    pqpk_id: int
    opk_id: int  # 0: no one-time X25519 prekey was used
    kem_ct: bytes

    def to_bytes(self) -> bytes:
        return (
            Writer()
            .u8(VERSION)
            .fixed(self.ephemeral_pub, X25519_LEN)
            .u32(self.spk_id)
            .u32(self.pqpk_id)
            .u32(self.opk_id)
            .fixed(self.kem_ct, MLKEM_CT_LEN)
            .bytes()
        )

    @classmethod
    def from_block(cls, block: bytes) -> FirstContactPrefix:
        check_block(block)
        r = Reader(block[1:FIRST_CONTACT_PREFIX_LEN])
        out = cls(
            r.take(X25519_LEN),
            _nonzero_id(r.u32()),
            _nonzero_id(r.u32()),
            r.u32(),
            r.take(MLKEM_CT_LEN),
        )
        r.done()
        return out


# --- fragments and padding (inside the encrypted body) ----------------------------------------


@dataclass(slots=True)  # not frozen: built for every message (see RatchetHeader)
class Fragment:
    """One block's share of a logical message.

    Body layout: msg_id (8) || index (u16) || count (u16) || length (u16) || data || zeros.
    The explicit length makes padding removal unambiguous and O(1); the zeros are checked.
    """

    msg_id: bytes
    index: int
    count: int
    data: bytes

    def to_body(self, length: int) -> bytes:
        if FRAGMENT_HEADER_LEN + len(self.data) > length:
            raise ValueError("fragment does not fit the body")
        return (
            self.msg_id
            + struct.pack(">HHH", self.index, self.count, len(self.data))
            + self.data
            + bytes(length - FRAGMENT_HEADER_LEN - len(self.data))
        )

    @classmethod
    def from_body(cls, body: bytes) -> Fragment:
        if len(body) < FRAGMENT_HEADER_LEN:
            raise DecodeError("truncated fragment")
        msg_id = body[:MSG_ID_LEN]
        index, count, length = struct.unpack_from(">HHH", body, MSG_ID_LEN)
        if count == 0 or count > MAX_FRAGMENTS or index >= count:
            raise DecodeError("fragment position out of range")
        end = FRAGMENT_HEADER_LEN + length
        if end > len(body):
            raise DecodeError("fragment length out of range")
        if body[end:] != bytes(len(body) - end):
            raise DecodeError("non-zero padding")
        return cls(msg_id, index, count, body[FRAGMENT_HEADER_LEN:end])


# --- stored state -----------------------------------------------------------------------------


@dataclass
class RatchetStateRecord:
    """Raw bytes of a Double Ratchet state (private keys as raw scalars / ML-KEM seeds)."""

    root_key: bytes
    dh_self_priv: bytes
    dh_remote: bytes | None
    kem_self_seed: bytes | None
    kem_ct_out: bytes | None
    send_ck: bytes | None
    recv_ck: bytes | None
    send_n: int
    recv_n: int
    prev_n: int
    hk_send: bytes | None
    hk_recv: bytes | None
    nhk_send: bytes | None
    nhk_recv: bytes | None
    skipped: dict[bytes, dict[int, bytes]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        w = (
            _header(KIND_RATCHET_STATE)
            .fixed(self.root_key, KEY_LEN)
            .fixed(self.dh_self_priv, X25519_LEN)
            .optional(self.dh_remote, X25519_LEN)
            .optional(self.kem_self_seed, MLKEM_SEED_LEN)
            .optional(self.kem_ct_out, MLKEM_CT_LEN)
            .optional(self.send_ck, KEY_LEN)
            .optional(self.recv_ck, KEY_LEN)
            .u32(self.send_n)
            .u32(self.recv_n)
            .u32(self.prev_n)
            .optional(self.hk_send, KEY_LEN)
            .optional(self.hk_recv, KEY_LEN)
            .optional(self.nhk_send, KEY_LEN)
            .optional(self.nhk_recv, KEY_LEN)
            .u32(len(self.skipped))
        )
        for hk, keys in self.skipped.items():
            w.fixed(hk, KEY_LEN).u32(len(keys))
            for n, mk in keys.items():
                w.u32(n).fixed(mk, KEY_LEN)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetStateRecord:
        r = Reader(data)
        _versioned(r, KIND_RATCHET_STATE)
        out = cls(
            root_key=r.take(KEY_LEN),
            dh_self_priv=r.take(X25519_LEN),
            dh_remote=r.optional(X25519_LEN),
            kem_self_seed=r.optional(MLKEM_SEED_LEN),
            kem_ct_out=r.optional(MLKEM_CT_LEN),
            send_ck=r.optional(KEY_LEN),
            recv_ck=r.optional(KEY_LEN),
            send_n=r.u32(),
            recv_n=r.u32(),
            prev_n=r.u32(),
            hk_send=r.optional(KEY_LEN),
            hk_recv=r.optional(KEY_LEN),
            nhk_send=r.optional(KEY_LEN),
            nhk_recv=r.optional(KEY_LEN),
        )
        for _ in range(r.count()):
            hk = r.take(KEY_LEN)
            keys: dict[int, bytes] = {}
            for _ in range(r.count()):
                n = r.u32()
                if n in keys:
                    raise DecodeError("malformed skipped-key table")
                keys[n] = r.take(KEY_LEN)
            if hk in out.skipped or not keys:
                raise DecodeError("malformed skipped-key table")
            out.skipped[hk] = keys
        r.done()
        return out


@dataclass(frozen=True)
class SessionRecord:
    ad: bytes
    remote: IdentityRecord
    ratchet: bytes  # RatchetStateRecord bytes

    def to_bytes(self) -> bytes:
        return (
            _header(KIND_SESSION)
            .varbytes(self.ad)
            .raw(self.remote.to_bytes())
            .varbytes(self.ratchet)
            .bytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        r = Reader(data)
        _versioned(r, KIND_SESSION)
        out = cls(r.varbytes(1024), IdentityRecord.read(r), r.varbytes(len(data)))
        r.done()
        return out


@dataclass
class SignedPrekeyRecord:
    prekey_id: int
    secret: bytes  # X25519 scalar (signed prekey) or ML-KEM seed (KEM prekeys)
    sig: bytes
    created: int
    replaced: int  # 0 while current; otherwise when it stopped being published


@dataclass
class PrekeyStoreRecord:
    ed_priv: bytes
    x_priv: bytes
    binding_sig: bytes
    signed: list[SignedPrekeyRecord]
    last_resort: list[SignedPrekeyRecord]
    one_time_x25519: list[tuple[int, bytes]]
    one_time_mlkem: list[SignedPrekeyRecord]
    replay_cache: dict[int, list[bytes]]

    def to_bytes(self) -> bytes:
        w = (
            _header(KIND_PREKEY_STORE)
            .fixed(self.ed_priv, ED25519_LEN)
            .fixed(self.x_priv, X25519_LEN)
            .fixed(self.binding_sig, SIG_LEN)
        )
        _write_signed(w, self.signed, X25519_LEN)
        _write_signed(w, self.last_resort, MLKEM_SEED_LEN)
        w.u32(len(self.one_time_x25519))
        for pid, secret in self.one_time_x25519:
            w.u32(pid).fixed(secret, X25519_LEN)
        _write_signed(w, self.one_time_mlkem, MLKEM_SEED_LEN)
        w.u32(len(self.replay_cache))
        for lrk_id, digests in self.replay_cache.items():
            w.u32(lrk_id).u32(len(digests))
            for d in digests:
                w.fixed(d, KEY_LEN)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyStoreRecord:
        r = Reader(data)
        _versioned(r, KIND_PREKEY_STORE)
        ed_priv, x_priv, binding_sig = r.take(ED25519_LEN), r.take(X25519_LEN), r.take(SIG_LEN)
        signed = _read_signed(r, X25519_LEN)
        last_resort = _read_signed(r, MLKEM_SEED_LEN)
        one_time_x = [(_nonzero_id(r.u32()), r.take(X25519_LEN)) for _ in range(r.count())]
        one_time_kem = _read_signed(r, MLKEM_SEED_LEN)
        replay: dict[int, list[bytes]] = {}
        for _ in range(r.count()):
            lrk_id = r.u32()
            if lrk_id in replay:
                raise DecodeError("malformed replay cache")
            replay[lrk_id] = [r.take(KEY_LEN) for _ in range(r.count())]
        r.done()
        if not signed or not last_resort:
            raise DecodeError("prekey store lacks a signed or last-resort prekey")
        # One encoding per store (docs/protocol.md §13.3): IDs are unique across the four kinds
        # (they are drawn that way), the replay cache has exactly one entry per last-resort key
        # in the same order, and its digests are strictly ascending.
        ids = [it.prekey_id for it in (*signed, *last_resort, *one_time_kem)]
        ids += [pid for pid, _ in one_time_x]
        if len(set(ids)) != len(ids):
            raise DecodeError("a prekey ID appears twice")
        if list(replay) != [it.prekey_id for it in last_resort]:
            raise DecodeError("malformed replay cache")
        if any(d != sorted(set(d)) for d in replay.values()):
            raise DecodeError("malformed replay cache")
        return cls(
            ed_priv, x_priv, binding_sig, signed, last_resort, one_time_x, one_time_kem, replay
        )


def _write_signed(w: Writer, items: list[SignedPrekeyRecord], secret_len: int) -> None:
    w.u32(len(items))
    for it in items:
        w.u32(it.prekey_id).fixed(it.secret, secret_len).fixed(it.sig, SIG_LEN)
        w.u64(it.created).u64(it.replaced)


def _read_signed(r: Reader, secret_len: int) -> list[SignedPrekeyRecord]:
    return [
        SignedPrekeyRecord(
            _nonzero_id(r.u32()), r.take(secret_len), r.take(SIG_LEN), r.u64(), r.u64()
        )
        for _ in range(r.count())
    ]


# --- groups (docs/protocol.md §25): stored state, signed state, changes ------------------------
#
# A group exists only inside the pairwise sessions of its members; none of these bytes ever
# reaches a relay outside a ratchet block. The wire module checks structure (lengths, ranges,
# canonical order, text rules); aegisd/core/group.py checks signatures and authority.

KIND_GROUP_STATE = 0x23
KIND_GROUP_LOG = 0x24
GROUP_ID_LEN = 32
GROUP_HASH_LEN = 32  # SHA-256 of a signed change: the state's head after it
MAX_GROUP_NAME_BYTES = 128
MAX_GROUP_DESCRIPTION_BYTES = 1024
#: The protocol's ceiling on members (docs/protocol.md §25.1): the same for every member, or
#: members would disagree on whether an add is valid. A daemon setting may only lower what
#: its own user creates or adds.
MAX_GROUP_MEMBERS = 256
#: Versions are below 2^63 (a state at 2^63 - 1 takes no change): the +1 of a change never
#: overflows the u64, and a peer's record cannot be made to.
GROUP_VERSION_LIMIT = 2**63
MAX_INVITE_CHANGES = 64  # changes after the signed base an invitation may carry
MAX_GROUP_LOG_CHANGES = 4096  # stored changes of one group's log (window and held back)
ROLE_MEMBER = 1
ROLE_ADMIN = 2
ROLE_OWNER = 3
GROUP_ROLES = (ROLE_MEMBER, ROLE_ADMIN, ROLE_OWNER)
CHANGE_ADD = 1
CHANGE_REMOVE = 2
CHANGE_ROLE = 3
CHANGE_RENAME = 4
CHANGE_LEAVE = 5
GROUP_CHANGE_OPS = (CHANGE_ADD, CHANGE_REMOVE, CHANGE_ROLE, CHANGE_RENAME, CHANGE_LEAVE)
GROUP_STATE_LABEL = b"AegisLink-v1 group state"
GROUP_CHANGE_LABEL = b"AegisLink-v1 group change"
# Refused in group names and descriptions: a fixed list rather than a Unicode category, so
# that members on different Python (Unicode) versions judge a rename the same way. C0 and C1
# controls, DEL, line/paragraph separators, bidi marks, embeddings, overrides and isolates,
# zero-width characters, word joiner and BOM. A description may hold LF and tab.
_FORBIDDEN_TEXT = frozenset(
    [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
    + list("\u061c\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e")
    + list("\u2060\u2066\u2067\u2068\u2069\ufeff")
)
_DESCRIPTION_CONTROLS = frozenset("\n\t")


def _bad_text_char(ch: str, allowed: frozenset[str]) -> bool:
    return ch in _FORBIDDEN_TEXT and ch not in allowed


def check_group_name(name: str) -> None:
    """1 to 128 bytes of UTF-8 without a control character (the list above). Raises
    ValueError (a local caller's mistake; decoders turn it into DecodeError)."""
    raw = name.encode("utf-8", "strict")
    if not 0 < len(raw) <= MAX_GROUP_NAME_BYTES:
        raise ValueError("a group name is 1 to 128 bytes")
    if any(_bad_text_char(ch, frozenset()) for ch in name):
        raise ValueError("a group name holds no control character")


def check_group_description(description: str) -> None:
    """At most 1024 bytes of UTF-8; line feeds and tabs allowed, no other control character."""
    if len(description.encode("utf-8", "strict")) > MAX_GROUP_DESCRIPTION_BYTES:
        raise ValueError("a group description is at most 1024 bytes")
    if any(_bad_text_char(ch, _DESCRIPTION_CONTROLS) for ch in description):
        raise ValueError("a group description holds no control character but LF and tab")


def _read_group_name(r: Reader) -> str:
    name = _utf8(_short(r, MAX_GROUP_NAME_BYTES))
    try:
        check_group_name(name)
    except ValueError:
        raise DecodeError("malformed group name") from None
    return name


def _read_group_description(r: Reader) -> str:
    n = r.u16()
    if n > MAX_GROUP_DESCRIPTION_BYTES:
        raise DecodeError("length field out of range")
    description = _utf8(r.take(n))
    try:
        check_group_description(description)
    except ValueError:
        raise DecodeError("malformed group description") from None
    return description


def _write_group_text(w: Writer, name: str, description: str) -> None:
    check_group_name(name)
    check_group_description(description)
    _put_short(w, name.encode(), MAX_GROUP_NAME_BYTES)
    raw = description.encode()
    w.raw(struct.pack(">H", len(raw))).raw(raw)


def _read_role(r: Reader) -> int:
    role = r.u8()
    if role not in GROUP_ROLES:
        raise DecodeError("unknown group role")
    return role


@dataclass(frozen=True)
class GroupMemberRecord:
    identity: IdentityRecord
    role: int


@dataclass(frozen=True)
class GroupStateRecord:
    """A group's state at one version. Members strictly ascending by Ed25519 key (one
    encoding per state), 1 to MAX_GROUP_MEMBERS of them, at least one owner."""

    group_id: bytes
    version: int
    head: bytes  # hash of the change that made this version; zeros(32) at creation
    name: str
    description: str
    members: tuple[GroupMemberRecord, ...]

    def __repr__(self) -> str:  # neither the group ID nor its name in a log line
        return f"GroupStateRecord(version={self.version}, members={len(self.members)})"

    def write(self, w: Writer) -> Writer:
        keys = [m.identity.ed_pub for m in self.members]
        if keys != sorted(set(keys)) or not 0 < len(keys) <= MAX_GROUP_MEMBERS:
            raise ValueError("members must be 1 to 256, strictly ascending by key")
        if not any(m.role == ROLE_OWNER for m in self.members):
            raise ValueError("a group has an owner")
        w.u8(VERSION).u8(KIND_GROUP_STATE)
        w.fixed(self.group_id, GROUP_ID_LEN).u64(self.version).fixed(self.head, GROUP_HASH_LEN)
        _write_group_text(w, self.name, self.description)
        w.raw(struct.pack(">H", len(self.members)))
        for m in self.members:
            if m.role not in GROUP_ROLES:
                raise ValueError("unknown group role")
            w.raw(m.identity.to_bytes()).u8(m.role)
        return w

    def to_bytes(self) -> bytes:
        return self.write(Writer()).bytes()

    @classmethod
    def read(cls, r: Reader) -> GroupStateRecord:
        _versioned(r, KIND_GROUP_STATE)
        group_id, version, head = r.take(GROUP_ID_LEN), r.u64(), r.take(GROUP_HASH_LEN)
        if version >= GROUP_VERSION_LIMIT:
            raise DecodeError("group version out of range")
        name, description = _read_group_name(r), _read_group_description(r)
        count = r.u16()
        if not 0 < count <= MAX_GROUP_MEMBERS:
            raise DecodeError("member count out of range")
        members = tuple(GroupMemberRecord(IdentityRecord.read(r), _read_role(r))
                        for _ in range(count))  # fmt: skip
        keys = [m.identity.ed_pub for m in members]
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise DecodeError("members not strictly ascending")
        if not any(m.role == ROLE_OWNER for m in members):
            raise DecodeError("a group without an owner")
        return cls(group_id, version, head, name, description, members)

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupStateRecord:
        r = Reader(data)
        out = cls.read(r)
        r.done()
        return out


@dataclass(frozen=True)
class SignedGroupState:
    """A state signed by one of its owners or admins: the base an invitation starts from.
    Signature input: GROUP_STATE_LABEL || state record."""

    state: GroupStateRecord
    signer: bytes  # Ed25519 public key of a member of `state`
    sig: bytes

    def write(self, w: Writer) -> Writer:
        return self.state.write(w).fixed(self.signer, ED25519_LEN).fixed(self.sig, SIG_LEN)

    @classmethod
    def read(cls, r: Reader) -> SignedGroupState:
        return cls(GroupStateRecord.read(r), r.take(ED25519_LEN), r.take(SIG_LEN))

    def signature_message(self) -> bytes:
        return GROUP_STATE_LABEL + self.state.to_bytes()


@dataclass(frozen=True)
class GroupChangeRecord:
    """One signed membership change. `body()` is what is signed (after GROUP_CHANGE_LABEL);
    `to_bytes()` (body || sig) is what is sent and hashed."""

    group_id: bytes
    parent_version: int
    parent_hash: bytes
    author: bytes  # Ed25519 public key of the author
    op: int
    identity: IdentityRecord | None = None  # CHANGE_ADD
    target: bytes = b""  # CHANGE_REMOVE, CHANGE_ROLE: Ed25519 key of the member
    role: int = 0  # CHANGE_ADD, CHANGE_ROLE
    name: str = ""  # CHANGE_RENAME
    description: str = ""  # CHANGE_RENAME
    sig: bytes = b""

    def __repr__(self) -> str:  # neither the group ID nor a name in a log line
        return f"GroupChangeRecord(op={self.op}, parent_version={self.parent_version})"

    def body(self) -> bytes:
        w = Writer().u8(VERSION).fixed(self.group_id, GROUP_ID_LEN).u64(self.parent_version)
        w.fixed(self.parent_hash, GROUP_HASH_LEN).fixed(self.author, ED25519_LEN).u8(self.op)
        if self.op == CHANGE_ADD:
            if self.identity is None or self.role not in (ROLE_MEMBER, ROLE_ADMIN):
                raise ValueError("an add names an identity and the role member or admin")
            w.raw(self.identity.to_bytes()).u8(self.role)
        elif self.op == CHANGE_REMOVE:
            w.fixed(self.target, ED25519_LEN)
        elif self.op == CHANGE_ROLE:
            if self.role not in GROUP_ROLES:
                raise ValueError("unknown group role")
            w.fixed(self.target, ED25519_LEN).u8(self.role)
        elif self.op == CHANGE_RENAME:
            _write_group_text(w, self.name, self.description)
        elif self.op != CHANGE_LEAVE:
            raise ValueError("unknown group change")
        return w.bytes()

    def signature_message(self) -> bytes:
        return GROUP_CHANGE_LABEL + self.body()

    def to_bytes(self) -> bytes:
        return self.body() + _fixed_sig(self.sig)

    @classmethod
    def read(cls, r: Reader) -> GroupChangeRecord:
        if r.u8() != VERSION:
            raise UnsupportedVersion("unsupported group change version")
        group_id, parent_version = r.take(GROUP_ID_LEN), r.u64()
        parent_hash, author, op = r.take(GROUP_HASH_LEN), r.take(ED25519_LEN), r.u8()
        out = cls(group_id, parent_version, parent_hash, author, op)
        if op == CHANGE_ADD:
            identity = IdentityRecord.read(r)
            role = _read_role(r)
            if role == ROLE_OWNER:
                raise DecodeError("an add gives the role member or admin")
            out = cls(group_id, parent_version, parent_hash, author, op, identity=identity,
                      role=role)  # fmt: skip
        elif op == CHANGE_REMOVE:
            out = cls(group_id, parent_version, parent_hash, author, op, target=r.take(ED25519_LEN))
        elif op == CHANGE_ROLE:
            target = r.take(ED25519_LEN)
            out = cls(group_id, parent_version, parent_hash, author, op, target=target,
                      role=_read_role(r))  # fmt: skip
        elif op == CHANGE_RENAME:
            name, description = _read_group_name(r), _read_group_description(r)
            out = cls(group_id, parent_version, parent_hash, author, op, name=name,
                      description=description)  # fmt: skip
        elif op != CHANGE_LEAVE:
            raise DecodeError("unknown group change")
        return replace(out, sig=r.take(SIG_LEN))

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupChangeRecord:
        r = Reader(data)
        out = cls.read(r)
        r.done()
        return out


def _fixed_sig(sig: bytes) -> bytes:
    _expect_len(sig, SIG_LEN)
    return sig


@dataclass(frozen=True)
class GroupLogRecord:
    """Stored: a group's final base state, the canonical chain of changes after it in order,
    then the held-back changes (docs/protocol.md §25.2)."""

    base: GroupStateRecord
    changes: tuple[GroupChangeRecord, ...]

    def to_bytes(self) -> bytes:
        if len(self.changes) > MAX_GROUP_LOG_CHANGES:
            raise ValueError("too many stored group changes")
        w = _header(KIND_GROUP_LOG)
        self.base.write(w)
        w.u32(len(self.changes))
        for c in self.changes:
            w.varbytes(c.to_bytes())
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupLogRecord:
        r = Reader(data)
        _versioned(r, KIND_GROUP_LOG)
        base = GroupStateRecord.read(r)
        n = r.u32()
        if n > MAX_GROUP_LOG_CHANGES:
            raise DecodeError("count field out of range")
        changes = tuple(GroupChangeRecord.from_bytes(r.varbytes(_MAX_CHANGE_LEN))
                        for _ in range(n))  # fmt: skip
        r.done()
        return cls(base, changes)


# The longest change: a rename with the longest name and description.
_MAX_CHANGE_LEN = 1 + GROUP_ID_LEN + 8 + GROUP_HASH_LEN + ED25519_LEN + 1 + (
    1 + MAX_GROUP_NAME_BYTES + 2 + MAX_GROUP_DESCRIPTION_BYTES
) + SIG_LEN


# --- application payloads (the content a Session encrypts) -------------------------------------
#
# content = version (1) || type (1) || fields. Every kind of payload travels in the same
# fixed-size blocks, so the relay cannot tell a receipt from a text.

PAYLOAD_TEXT = 0x01
PAYLOAD_RECEIPT = 0x02
PAYLOAD_HELLO = 0x03
PAYLOAD_MAILBOX = 0x04
PAYLOAD_MAILBOX_ACK = 0x05
PAYLOAD_CALL = 0x06  # call set-up (docs/protocol.md §21)
PAYLOAD_CALL_SEALED = 0x07  # call signaling sealed under the per-call keys (§21)
PAYLOAD_ATTACHMENT = 0x08  # 0x08-0x09: attachments (§22)
PAYLOAD_RENEW = 0x0A  # session renewal after a backup import (docs/protocol.md §23)
PAYLOAD_COVER = 0x0B  # cover traffic: dropped by the recipient (docs/protocol.md §24)
PAYLOAD_GROUP_INVITE = 0x0C  # 0x0C-0x11: groups (docs/protocol.md §25)
PAYLOAD_GROUP_ANSWER = 0x0D
PAYLOAD_GROUP_CHANGE = 0x0E
PAYLOAD_GROUP_MESSAGE = 0x0F
PAYLOAD_GROUP_INTRODUCTION = 0x10
PAYLOAD_GROUP_FILE = 0x11  # a file's descriptor to a group (docs/protocol.md §25.10)
PAYLOAD_REPLY = 0x12  # 0x12-0x15: replies, reactions, edits, deletions (docs/protocol.md §26)
PAYLOAD_REACTION = 0x13
PAYLOAD_EDIT = 0x14
PAYLOAD_DELETE = 0x15
PAYLOAD_TIMER = 0x16  # a conversation's disappearing-message timer (docs/protocol.md §27)
PAYLOAD_ATTACHMENT_EXTRA = 0x17  # a descriptor with a caption and its place in a batch (§22.3)
PAYLOAD_TYPING = 0x18  # typing indicators and the sender's choice of them (§22.6)
PAYLOAD_GROUP_ACTION = 0x19  # a reply, reaction, edit, deletion or timer in a group (§25.11)
PAYLOAD_GROUP_FILE_EXTRA = 0x1A  # a group file with a caption (§25.10)
# 0x40-0x43: several devices (docs/protocol.md §28). Their formats are core/devices.py's (the
# device list's with them), decoded by devices.decode_device_payload: decode_payload refuses
# them, so a service that takes only the payloads above never sees one by mistake.
PAYLOAD_DEVICE_LIST = 0x40
PAYLOAD_DEVICE_HELLO = 0x41
PAYLOAD_DEVICE_LIST_ACK = 0x42
PAYLOAD_DEVICE_LIST_REQUEST = 0x43
DEVICE_PAYLOAD_TYPES = frozenset(
    {PAYLOAD_DEVICE_LIST, PAYLOAD_DEVICE_HELLO, PAYLOAD_DEVICE_LIST_ACK,
     PAYLOAD_DEVICE_LIST_REQUEST}
)  # fmt: skip


# 0x44-0x47: sync between one's own devices (docs/protocol.md §28.6, §28.7), core/sync.py's
# formats, taken only in a sync session (services/own_sync.py); decode_payload and
# devices.decode_device_payload refuse them.
PAYLOAD_SYNC_SENT = 0x44
PAYLOAD_SYNC_READ = 0x45
PAYLOAD_SYNC_CONTACT = 0x46
PAYLOAD_SYNC_DELETE_KEYS = 0x47  # a device's mailboxes' delete capabilities (§28.7)
PAYLOAD_SYNC_ACTION = 0x48  # 0x48-0x49: core/sync_actions.py's
PAYLOAD_SYNC_SETTINGS = 0x49
SYNC_PAYLOAD_TYPES = frozenset({PAYLOAD_SYNC_SENT, PAYLOAD_SYNC_READ, PAYLOAD_SYNC_CONTACT,
                                PAYLOAD_SYNC_DELETE_KEYS, PAYLOAD_SYNC_ACTION,
                                PAYLOAD_SYNC_SETTINGS})


def is_sync_payload(data: bytes) -> bool:
    """Whether `data` claims to be a sync payload (0x44-0x47: sync.decode_sync_payload; 0x48,
    0x49: sync_actions.decode)."""
    return len(data) >= 2 and data[0] == VERSION and data[1] in SYNC_PAYLOAD_TYPES


# 0x4A: a group's state or a group message sent, between one's own devices (docs/protocol.md
# §28.6), core/sync_groups.py's format, taken only in a sync session like 0x44-0x46.
PAYLOAD_SYNC_GROUP = 0x4A


def is_sync_group_payload(data: bytes) -> bool:
    """Whether `data` claims to be a group sync payload (0x4A, sync_groups.decode)."""
    return len(data) >= 2 and data[0] == VERSION and data[1] == PAYLOAD_SYNC_GROUP


def is_device_payload(data: bytes) -> bool:
    """Whether `data` claims to be a device payload (0x40-0x43, devices.decode_device_payload)."""
    return len(data) >= 2 and data[0] == VERSION and data[1] in DEVICE_PAYLOAD_TYPES


RECEIPT_DELIVERED = 1
RECEIPT_READ = 2

MESSAGE_ID_LEN = 16
#: A disappearing-message timer: 0 (off) or TIMER_MIN_S..TIMER_MAX_S seconds (§27).
TIMER_MIN_S = 1
TIMER_MAX_S = 4 * 7 * 86_400
MAX_TEXT_BYTES = 64 * 1024
#: A reaction: at most this many bytes of UTF-8 and REACTION_MAX_CHARS code points (a kiss
#: with two skin tones, 35 bytes, and a family of four with skin tones, 41, fit; a sentence
#: does not), docs/protocol.md §26.2.
MAX_REACTION_BYTES = 64
REACTION_MAX_CHARS = 16
MAX_RECEIPT_IDS = 512
MAX_NAME_BYTES = 64
MAX_URL_BYTES = 255
MAX_MAILBOX_FIELD = 64
#: What the relay protocol takes (docs/relay-protocol.md): a deposit id or bundle address is 16
#: bytes, a send token 32 (or none). A peer's field of another length is refused when decoded:
#: sent to the relay it would be `bad_frame`, which closes the (shared) connection, again at
#: every retry (issue 15 review).
RELAY_ID_LEN = 16
RELAY_TOKEN_LEN = 32
MAX_FILE_NAME_BYTES = 255
MAX_CAPTION_BYTES = 2048  # a file's caption, UTF-8 (§22.3)
MAX_BATCH_FILES = 32  # files sent together in one batch (§22.3)
BATCH_ID_LEN = MESSAGE_ID_LEN
TYPING_ENABLED = 0x01  # payload 0x18's flags: the sender has typing indicators on
TYPING_NOW = 0x02  # ... and is typing now (only with TYPING_ENABLED)
ATTACHMENT_SEED_LEN = 32
ATTACHMENT_DIGEST_LEN = 32
ATTACHMENT_CHUNK_LEN = BLOCK_SIZE - 1 - TAG_LEN  # plaintext bytes per blob block
ATTACHMENT_MAX_BLOCKS = 8192  # the relay's blob quota per proof of work


def padme(n: int) -> int:
    """Padmé (Nikitin et al., PETS 2019) of a block count n >= 1: round n up so that only its
    top floor(log2(floor(log2 n))) + 1 bits may be non-zero. Overhead at most 12 %; the padded
    count leaks O(log log n) bits about n instead of O(log n)."""
    if n < 1:
        raise ValueError("a block count is at least 1")
    if n <= 2:
        return n
    e = n.bit_length() - 1  # floor(log2 n)
    s = e.bit_length()  # floor(log2 e) + 1
    mask = (1 << (e - s)) - 1
    return (n + mask) & ~mask


def attachment_blocks(size: int) -> int:
    """The padded block count of a file of `size` bytes (an empty file takes one block)."""
    if size < 0:
        raise ValueError("negative size")
    return padme(max(1, -(-size // ATTACHMENT_CHUNK_LEN)))


def _short(r: Reader, limit: int) -> bytes:
    n = r.u8()
    if n > limit:
        raise DecodeError("length field out of range")
    return r.take(n)


def _put_short(w: Writer, b: bytes, limit: int) -> Writer:
    if len(b) > limit:
        raise ValueError("field too long")
    return w.u8(len(b)).raw(b)


def _relay_id(r: Reader) -> bytes:
    """A deposit id or bundle address: exactly RELAY_ID_LEN bytes."""
    b = _short(r, MAX_MAILBOX_FIELD)
    if len(b) != RELAY_ID_LEN:
        raise DecodeError("a relay id is 16 bytes")
    return b


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None


@dataclass(frozen=True)
class MailboxAddress:
    """Where to deposit blocks for someone: relay URL, deposit ID and send-capability token."""

    relay_url: str
    deposit_id: bytes
    send_token: bytes  # empty: the mailbox takes a proof-of-work instead

    def write(self, w: Writer) -> Writer:
        if not self.relay_url or len(self.deposit_id) != RELAY_ID_LEN:
            raise ValueError("a mailbox address needs a relay URL and a 16-byte deposit ID")
        if len(self.send_token) not in (0, RELAY_TOKEN_LEN):
            raise ValueError("a send token is 32 bytes (or none)")
        _put_short(w, self.relay_url.encode(), MAX_URL_BYTES)
        _put_short(w, self.deposit_id, MAX_MAILBOX_FIELD)
        return _put_short(w, self.send_token, MAX_MAILBOX_FIELD)

    @classmethod
    def read(cls, r: Reader) -> MailboxAddress:
        url = _utf8(_short(r, MAX_URL_BYTES))
        if not url:
            raise DecodeError("empty relay URL")
        deposit_id = _relay_id(r)
        token = _short(r, MAX_MAILBOX_FIELD)
        if len(token) not in (0, RELAY_TOKEN_LEN):
            raise DecodeError("a send token is 32 bytes (or none)")
        return cls(url, deposit_id, token)


@dataclass(frozen=True)
class TextPayload:
    message_id: bytes
    sent_at_ms: int
    text: str


@dataclass(frozen=True)
class ReplyPayload:
    """A text quoting a message of the same conversation by its wire id (§26.1)."""

    message_id: bytes
    sent_at_ms: int
    quoted_id: bytes
    text: str


@dataclass(frozen=True)
class ReactionPayload:
    """The sender's one reaction to a message; empty: its reaction removed (§26.2)."""

    target_id: bytes
    emoji: str


@dataclass(frozen=True)
class EditPayload:
    """A new text for one of the sender's own texts (§26.3)."""

    target_id: bytes
    edited_at_ms: int
    text: str


@dataclass(frozen=True)
class DeletePayload:
    """Delete for everyone: one of the sender's own messages (§26.4)."""

    target_id: bytes


ActionPayload = ReplyPayload | ReactionPayload | EditPayload | DeletePayload


#: The code points a reaction may hold (§26.2), as inclusive ranges: the blocks where Unicode
#: puts emoji, taken whole so that emoji newer than any table this code has pass, and nothing
#: that spells words in a script. A fixed list, so every implementation, whatever its Unicode
#: version, accepts and refuses the same strings.
REACTION_RANGES: tuple[tuple[int, int], ...] = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049),
    (0x2122, 0x2122), (0x2139, 0x2139), (0x2194, 0x21FF), (0x2300, 0x23FF),
    (0x24C2, 0x24C2), (0x25A0, 0x27BF), (0x2900, 0x297F), (0x2B00, 0x2BFF),
    (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
    # U+1F100-1F1FF is mostly enclosed letters and digits (a peer could spell words with
    # them): only its emoji pass (🅰 🅱 🅾 🅿 🆎 🆑-🆚); regional indicators only as one flag.
    (0x1F000, 0x1F0FF), (0x1F170, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A), (0x1F200, 0x1FAFF), (0x1FC00, 0x1FFFD),
)  # fmt: skip
_ZWJ, _VS16, _KEYCAP = 0x200D, 0xFE0F, 0x20E3
_KEYCAP_BASES = frozenset(b"#*0123456789")
_BLACK_FLAG, _TAG_CANCEL = 0x1F3F4, 0xE007F
#: Tag characters of a subdivision flag: lowercase a-z and 0-9 (gbsct, usca, ...).
_FLAG_TAGS = frozenset(range(0xE0061, 0xE007B)) | frozenset(range(0xE0030, 0xE003A))
_RI_FIRST, _RI_LAST = 0x1F1E6, 0x1F1FF
_TONE_FIRST, _TONE_LAST = 0x1F3FB, 0x1F3FF


def _reaction_symbol(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in REACTION_RANGES)


def check_reaction(emoji: str) -> None:
    """A reaction is empty (removal) or ONE emoji, checked against the fixed grammar of
    docs/protocol.md §26.2 (code point ranges, no Unicode database: the result must not depend
    on the interpreter's Unicode version). A bound on what a peer can make the screen show
    (no word spelled with symbols), not a check that the sequence is a recommended emoji."""
    if not emoji:
        return
    if len(emoji) > REACTION_MAX_CHARS or len(emoji.encode()) > MAX_REACTION_BYTES:
        raise ValueError("reaction too long")
    cps = [ord(ch) for ch in emoji]
    n = len(cps)
    if cps[0] in _KEYCAP_BASES:
        if cps[1:] != [_VS16, _KEYCAP]:
            raise ValueError("reaction holds letters, digits or punctuation")
        return
    if _RI_FIRST <= cps[0] <= _RI_LAST:
        if n != 2 or not _RI_FIRST <= cps[1] <= _RI_LAST:
            raise ValueError("reaction holds regional indicators that are not one flag")
        return
    if cps[0] == _BLACK_FLAG and n > 1 and cps[1] in _FLAG_TAGS:
        if not 4 <= n <= 8 or cps[-1] != _TAG_CANCEL or not set(cps[1:-1]) <= _FLAG_TAGS:
            raise ValueError("reaction holds a malformed tag sequence")
        return
    # Symbols joined by U+200D, each optionally followed by U+FE0F or a skin tone.
    i = 0
    while True:
        if not _reaction_symbol(cps[i]) or _TONE_FIRST <= cps[i] <= _TONE_LAST:
            raise ValueError("reaction holds a character that is not an emoji")
        i += 1
        if i < n and (cps[i] == _VS16 or _TONE_FIRST <= cps[i] <= _TONE_LAST):
            i += 1
        if i == n:
            return
        if cps[i] != _ZWJ or i + 1 == n:
            raise ValueError("reaction holds more than one emoji or a misplaced mark")
        i += 1


@dataclass(frozen=True)
class TimerPayload:
    """The conversation's disappearing-message timer from now on (§27): ``seconds`` 0 is off;
    ``changed_at_ms`` orders concurrent changes."""

    changed_at_ms: int
    seconds: int


def timer_ok(seconds: int) -> bool:
    return seconds == 0 or TIMER_MIN_S <= seconds <= TIMER_MAX_S


@dataclass(frozen=True)
class GroupActionPayload:
    """A reply, reaction, edit, deletion or timer change in a group (§25.11): the group, the
    sender's version, the author of the message it names (a reply's quoted message; zeros for
    a timer, which names none) and the one-to-one payload itself (§26, §27), whose 16-byte ids
    are the group message ids of ``author``'s messages."""

    group_id: bytes
    version: int
    author: bytes
    action: ActionPayload | TimerPayload

    def __repr__(self) -> str:  # no text, no group ID and no key in a log line
        return f"GroupActionPayload(version={self.version}, {type(self.action).__name__})"


@dataclass(frozen=True)
class ReceiptPayload:
    kind: int  # RECEIPT_DELIVERED or RECEIPT_READ
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class HelloPayload:
    """Opens a contact: where to answer, what to call the sender, which invitation it uses."""

    reply_to: MailboxAddress
    display_name: str
    invitation_id: bytes  # empty when not answering a one-time invitation


# A hello's invitation_id carrying this (14 bytes: never a 16-byte invitation ID) opens a
# device session (docs/protocol.md §28.4): set only by a device without a list opening a
# session with a contact's or group member's listed device, never by a contact request.
DEVICE_SESSION = b"device-session"


@dataclass(frozen=True)
class MailboxPayload:
    """A rotated mailbox: deposit here from now on (after acknowledging `rotation_id`)."""

    rotation_id: bytes
    mailbox: MailboxAddress


@dataclass(frozen=True)
class MailboxAckPayload:
    rotation_id: bytes


@dataclass(frozen=True)
class AttachmentPayload:
    """A file descriptor (§22): where its blocks are and how to open them. Sent only after
    the upload completed. `message_id` names the file and its message."""

    message_id: bytes
    sent_at_ms: int
    seed: bytes  # 32 bytes: the file's key, blob ids and capabilities derive from it
    size: int  # bytes of the plaintext file
    blocks: int  # padded block count: must equal padme(ceil(size / chunk))
    digest: bytes  # SHA-256 of the plaintext file
    relay_url: str
    name: str
    #: Payload 0x17 only (0x08 carries none): the caption shown with the file, and the file's
    #: place among files sent together (``batch_id`` empty: not part of a batch).
    caption: str = ""
    batch_id: bytes = b""
    batch_index: int = 0
    batch_count: int = 1

    @property
    def extra(self) -> bool:
        """Needs payload 0x17: a caption, or a place in a batch."""
        return bool(self.caption) or bool(self.batch_id)

    def __repr__(self) -> str:  # the seed is a key: never in a log or a traceback
        return f"AttachmentPayload(size={self.size}, blocks={self.blocks})"


@dataclass(frozen=True)
class RenewPayload:
    """A restored profile asks for a new session (docs/protocol.md §23). Travels only in a
    renewal block (aegisd/core/renewal.py), never inside a ratchet session."""

    renew_id: bytes
    created_at_ms: int
    reply_to: MailboxAddress  # where the contact deposits its first-contact block
    bundle_address: bytes  # the prekey bundle, served by reply_to's relay
    display_name: str


# Call set-up kinds (PAYLOAD_CALL) and reasons (docs/protocol.md §21).
CALL_INVITE = 1
CALL_ACCEPT = 2
CALL_REJECT = 3
CALL_CANCEL = 4
CALL_RINGING = 5
CALL_KINDS = (CALL_INVITE, CALL_ACCEPT, CALL_REJECT, CALL_CANCEL, CALL_RINGING)
CALL_REASON_REJECTED = 1
CALL_REASON_BUSY = 2
CALL_REASON_ANSWERED_ELSEWHERE = 3  # CANCEL only: another device of the callee answered
CALL_ID_LEN = 16
CALL_KEY_LEN = 32
CALL_NONCE_LEN = 24
MAX_CALL_SEALED = 16384  # a sealed SDP with its candidates stays far below this


@dataclass(frozen=True)
class CallPayload:
    """Call set-up. INVITE: key (the caller's per-call X25519 public key), video, sent_at_ms.
    ACCEPT: key (the callee's). REJECT: reason. CANCEL: reason 0 (the caller gave up: no byte)
    or CALL_REASON_ANSWERED_ELSEWHERE (another device of the callee took the call)."""

    call_id: bytes
    kind: int
    key: bytes = b""
    video: bool = False
    sent_at_ms: int = 0
    reason: int = 0


@dataclass(frozen=True)
class CallSealedPayload:
    """Call signaling sealed with NaCl box under the two per-call keys (aegisd/calls)."""

    call_id: bytes
    nonce: bytes
    box: bytes  # crypto_box ciphertext (tag included)


@dataclass(frozen=True)
class TypingPayload:
    """Typing indicators (§22.6): ``enabled`` tells the contact the sender has them on (False:
    switched off, stop sending); ``typing``: typing now (True) or stopped (False)."""

    enabled: bool
    typing: bool


@dataclass(frozen=True)
class CoverPayload:
    """Cover traffic (§24): an ordinary ratchet message in an ordinary block, with nothing in
    it; the recipient drops it silently (no event, no history, no receipt)."""


MAX_LINK_BYTES = 1024  # a contact link's bytes inside a group payload (the longest is 526)


@dataclass(frozen=True)
class GroupInvitePayload:
    """An invitation into a group (§25.7): a signed base state and the changes after it, up
    to the state in which the invitee is a member. A request the invitee's user answers."""

    invite_id: bytes
    sent_at_ms: int
    base: SignedGroupState
    changes: tuple[GroupChangeRecord, ...]

    def __repr__(self) -> str:  # no invitation ID, group ID or member keys in a log line
        return f"GroupInvitePayload(changes={len(self.changes)})"


@dataclass(frozen=True)
class IntroductionOffer:
    """Where `member` (an existing member, by Ed25519 key) may open a session with the one who
    made the offer: a one-time invitation link of that newcomer's."""

    member: bytes
    link: ContactLink

    def __repr__(self) -> str:  # the link holds a send token: never in a log line
        return "IntroductionOffer()"


@dataclass(frozen=True)
class GroupAnswerPayload:
    """The invitee's answer. Accepting carries one offer per member to be introduced."""

    invite_id: bytes
    group_id: bytes
    accepted: bool
    offers: tuple[IntroductionOffer, ...] = ()

    def __repr__(self) -> str:  # no group ID, invitation ID or send token in a log line
        return f"GroupAnswerPayload(accepted={self.accepted}, offers={len(self.offers)})"


@dataclass(frozen=True)
class GroupChangePayload:
    change: GroupChangeRecord


@dataclass(frozen=True)
class GroupMessagePayload:
    group_id: bytes
    version: int  # the sender's view of the group's version when it sent
    message_id: bytes
    sent_at_ms: int
    text: str

    def __repr__(self) -> str:  # no text and no group ID in a log line
        return f"GroupMessagePayload(version={self.version})"


@dataclass(frozen=True)
class GroupIntroductionPayload:
    """Passed by an introducer inside its session with a member: the newcomer's one-time
    invitation link (identity to check against, mailbox, bundle address, invitation ID)."""

    group_id: bytes
    link: ContactLink

    def __repr__(self) -> str:  # no group ID and no send token in a log line
        return "GroupIntroductionPayload()"


@dataclass(frozen=True)
class GroupFilePayload:
    """A file to a group (§25.10): the group, the sender's version, and a descriptor (§22.3)
    of a copy uploaded for this member alone. `file.message_id` is the group message's."""

    group_id: bytes
    version: int
    file: AttachmentPayload

    def __repr__(self) -> str:  # no group ID and no seed in a log line
        return f"GroupFilePayload(version={self.version}, {self.file!r})"


def _write_link(w: Writer, link: ContactLink) -> None:
    if link.kind != LINK_INVITATION:
        raise ValueError("an introduction carries a one-time invitation link")
    raw = link.to_bytes()
    if len(raw) > MAX_LINK_BYTES:
        raise ValueError("link too long")
    w.raw(struct.pack(">H", len(raw))).raw(raw)


def _read_link(r: Reader) -> ContactLink:
    n = r.u16()
    if n > MAX_LINK_BYTES:
        raise DecodeError("length field out of range")
    link = ContactLink.from_bytes(r.take(n))
    if link.kind != LINK_INVITATION:
        raise DecodeError("an introduction carries a one-time invitation link")
    return link


def _encode_group(w: Writer, payload: GroupPayload) -> None:
    if isinstance(payload, GroupInvitePayload):
        if len(payload.changes) > MAX_INVITE_CHANGES:
            raise ValueError("too many changes in an invitation")
        w.u8(PAYLOAD_GROUP_INVITE).fixed(payload.invite_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms)
        payload.base.write(w).u8(len(payload.changes))
        for change in payload.changes:
            w.raw(change.to_bytes())
    elif isinstance(payload, GroupAnswerPayload):
        members = [o.member for o in payload.offers]
        if members != sorted(set(members)) or len(members) >= MAX_GROUP_MEMBERS or (
            members and not payload.accepted
        ):
            raise ValueError("offers: distinct members, ascending, fewer than 256, on accepting")
        w.u8(PAYLOAD_GROUP_ANSWER).fixed(payload.invite_id, MESSAGE_ID_LEN)
        w.fixed(payload.group_id, GROUP_ID_LEN).flag(payload.accepted)
        w.raw(struct.pack(">H", len(members)))
        for offer in payload.offers:
            w.fixed(offer.member, ED25519_LEN)
            _write_link(w, offer.link)
    elif isinstance(payload, GroupChangePayload):
        w.u8(PAYLOAD_GROUP_CHANGE).raw(payload.change.to_bytes())
    elif isinstance(payload, GroupMessagePayload):
        text = payload.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError("text too long")
        w.u8(PAYLOAD_GROUP_MESSAGE).fixed(payload.group_id, GROUP_ID_LEN).u64(payload.version)
        w.fixed(payload.message_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms).raw(text)
    elif isinstance(payload, GroupFilePayload):
        # with a caption (or a batch place): the fields of a 0x17 descriptor, as 0x1A
        kind = PAYLOAD_GROUP_FILE_EXTRA if payload.file.extra else PAYLOAD_GROUP_FILE
        w.u8(kind).fixed(payload.group_id, GROUP_ID_LEN).u64(payload.version)
        (_write_extra if payload.file.extra else _write_attachment)(w, payload.file)
    else:
        w.u8(PAYLOAD_GROUP_INTRODUCTION).fixed(payload.group_id, GROUP_ID_LEN)
        _write_link(w, payload.link)


def _decode_group(kind: int, r: Reader, total: int) -> GroupPayload:
    if kind == PAYLOAD_GROUP_INVITE:
        invite_id, sent, base = r.take(MESSAGE_ID_LEN), r.u64(), SignedGroupState.read(r)
        n = r.u8()
        if n > MAX_INVITE_CHANGES:
            raise DecodeError("too many changes in an invitation")
        return GroupInvitePayload(invite_id, sent, base,
                                  tuple(GroupChangeRecord.read(r) for _ in range(n)))  # fmt: skip
    if kind == PAYLOAD_GROUP_ANSWER:
        invite_id, group_id = r.take(MESSAGE_ID_LEN), r.take(GROUP_ID_LEN)
        accepted, n = r.flag(), r.u16()
        if n >= MAX_GROUP_MEMBERS or (n and not accepted):
            raise DecodeError("introduction offer count out of range")
        offers = tuple(IntroductionOffer(r.take(ED25519_LEN), _read_link(r)) for _ in range(n))
        if any(a.member >= b.member for a, b in itertools.pairwise(offers)):
            raise DecodeError("offers not strictly ascending")
        return GroupAnswerPayload(invite_id, group_id, accepted, offers)
    if kind == PAYLOAD_GROUP_CHANGE:
        return GroupChangePayload(GroupChangeRecord.read(r))
    if kind == PAYLOAD_GROUP_MESSAGE:
        group_id, version = r.take(GROUP_ID_LEN), r.u64()
        mid, sent = r.take(MESSAGE_ID_LEN), r.u64()
        text = r.take(total - 2 - GROUP_ID_LEN - 8 - MESSAGE_ID_LEN - 8)
        if len(text) > MAX_TEXT_BYTES:
            raise DecodeError("text too long")
        return GroupMessagePayload(group_id, version, mid, sent, _utf8(text))
    if kind == PAYLOAD_GROUP_FILE:
        group_id, version = r.take(GROUP_ID_LEN), r.u64()
        return GroupFilePayload(group_id, version, _read_attachment(r))
    if kind == PAYLOAD_GROUP_FILE_EXTRA:
        group_id, version = r.take(GROUP_ID_LEN), r.u64()
        return GroupFilePayload(group_id, version, _read_extra(r))
    return GroupIntroductionPayload(r.take(GROUP_ID_LEN), _read_link(r))


GroupPayload = (
    GroupInvitePayload
    | GroupAnswerPayload
    | GroupChangePayload
    | GroupMessagePayload
    | GroupIntroductionPayload
    | GroupFilePayload
)
_GROUP_PAYLOAD_TYPES = (
    PAYLOAD_GROUP_INVITE,
    PAYLOAD_GROUP_ANSWER,
    PAYLOAD_GROUP_CHANGE,
    PAYLOAD_GROUP_MESSAGE,
    PAYLOAD_GROUP_INTRODUCTION,
    PAYLOAD_GROUP_FILE,
    PAYLOAD_GROUP_FILE_EXTRA,
)


Payload = (
    CoverPayload
    | TextPayload
    | TimerPayload
    | ReceiptPayload
    | HelloPayload
    | MailboxPayload
    | MailboxAckPayload
    | AttachmentPayload
    | RenewPayload
    | CallPayload
    | CallSealedPayload
    | GroupPayload
    | ActionPayload
    | GroupActionPayload
    | TypingPayload
)


def _write_attachment(w: Writer, payload: AttachmentPayload) -> None:
    """A descriptor's fields (§22.3), in payload 0x08 and in a group's 0x11."""
    if payload.extra:  # a caption or a batch travels only in 0x17 (never silently dropped)
        raise ValueError("a caption or a batch needs payload 0x17")
    if payload.size < 0 or payload.blocks != attachment_blocks(payload.size) or (
        payload.blocks > ATTACHMENT_MAX_BLOCKS
    ):
        raise ValueError("attachment size and block count do not match")
    if not payload.name or not payload.relay_url:
        raise ValueError("an attachment needs a name and a relay URL")
    w.fixed(payload.message_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms)
    w.fixed(payload.seed, ATTACHMENT_SEED_LEN).u64(payload.size).u32(payload.blocks)
    w.fixed(payload.digest, ATTACHMENT_DIGEST_LEN)
    _put_short(w, payload.relay_url.encode(), MAX_URL_BYTES)
    _put_short(w, payload.name.encode(), MAX_FILE_NAME_BYTES)


def _check_extra(caption: bytes, batch_id: bytes, index: int, count: int) -> None:
    if len(caption) > MAX_CAPTION_BYTES:
        raise ValueError("caption too long")
    if len(batch_id) != BATCH_ID_LEN or not 1 <= count <= MAX_BATCH_FILES or index >= count:
        raise ValueError("malformed batch")


def _write_extra(w: Writer, payload: AttachmentPayload) -> None:
    """Payload 0x17: the descriptor's fields, then its caption and batch (§22.3)."""
    caption = payload.caption.encode()
    batch_id = payload.batch_id or payload.message_id  # a lone captioned file: its own batch
    _check_extra(caption, batch_id, payload.batch_index, payload.batch_count)
    _write_attachment(w, replace(payload, caption="", batch_id=b""))
    w.u16(len(caption)).raw(caption)
    w.fixed(batch_id, BATCH_ID_LEN).u8(payload.batch_index).u8(payload.batch_count)


def _read_extra(r: Reader) -> AttachmentPayload:
    base = _read_attachment(r)
    n = r.u16()
    if n > MAX_CAPTION_BYTES:  # refused on its length, before its bytes are taken
        raise DecodeError("malformed attachment caption or batch")
    caption = r.take(n)
    batch_id, index, count = r.take(BATCH_ID_LEN), r.u8(), r.u8()
    try:
        _check_extra(caption, batch_id, index, count)
    except ValueError:
        raise DecodeError("malformed attachment caption or batch") from None
    return replace(base, caption=_utf8(caption), batch_id=batch_id, batch_index=index,
                   batch_count=count)  # fmt: skip


def _read_attachment(r: Reader) -> AttachmentPayload:
    mid, sent = r.take(MESSAGE_ID_LEN), r.u64()
    seed, size, blocks = r.take(ATTACHMENT_SEED_LEN), r.u64(), r.u32()
    digest = r.take(ATTACHMENT_DIGEST_LEN)
    url = _utf8(_short(r, MAX_URL_BYTES))
    name = _utf8(_short(r, MAX_FILE_NAME_BYTES))
    if (
        size > ATTACHMENT_MAX_BLOCKS * ATTACHMENT_CHUNK_LEN
        or blocks != attachment_blocks(size)
        or not url
        or not name
    ):
        raise DecodeError("malformed attachment descriptor")
    return AttachmentPayload(mid, sent, seed, size, blocks, digest, url, name)


def encode_payload(payload: Payload) -> bytes:
    w = Writer().u8(VERSION)
    if isinstance(payload, TextPayload):
        text = payload.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError("text too long")
        w.u8(PAYLOAD_TEXT).fixed(payload.message_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms)
        w.raw(text)
    elif isinstance(payload, ReceiptPayload):
        if payload.kind not in (RECEIPT_DELIVERED, RECEIPT_READ):
            raise ValueError("unknown receipt kind")
        if not 0 < len(payload.message_ids) <= MAX_RECEIPT_IDS:
            raise ValueError("receipt id count out of range")
        w.u8(PAYLOAD_RECEIPT).u8(payload.kind).raw(struct.pack(">H", len(payload.message_ids)))
        for mid in payload.message_ids:
            w.fixed(mid, MESSAGE_ID_LEN)
    elif isinstance(payload, HelloPayload):
        w.u8(PAYLOAD_HELLO)
        payload.reply_to.write(w)
        _put_short(w, payload.display_name.encode(), MAX_NAME_BYTES)
        _put_short(w, payload.invitation_id, MAX_MAILBOX_FIELD)
    elif isinstance(payload, MailboxPayload):
        w.u8(PAYLOAD_MAILBOX).fixed(payload.rotation_id, MESSAGE_ID_LEN)
        payload.mailbox.write(w)
    elif isinstance(payload, AttachmentPayload):
        if payload.extra:
            _write_extra(w.u8(PAYLOAD_ATTACHMENT_EXTRA), payload)
        else:
            _write_attachment(w.u8(PAYLOAD_ATTACHMENT), payload)
    elif isinstance(payload, TypingPayload):
        if payload.typing and not payload.enabled:
            raise ValueError("typing needs typing indicators on")
        flags = (TYPING_ENABLED if payload.enabled else 0) | (TYPING_NOW if payload.typing else 0)
        w.u8(PAYLOAD_TYPING).u8(flags)
    elif isinstance(payload, RenewPayload):
        w.u8(PAYLOAD_RENEW).fixed(payload.renew_id, MESSAGE_ID_LEN).u64(payload.created_at_ms)
        payload.reply_to.write(w)
        if len(payload.bundle_address) != RELAY_ID_LEN:
            raise ValueError("a renewal needs a 16-byte bundle address")
        _put_short(w, payload.bundle_address, MAX_MAILBOX_FIELD)
        _put_short(w, payload.display_name.encode(), MAX_NAME_BYTES)
    elif isinstance(payload, MailboxAckPayload):
        w.u8(PAYLOAD_MAILBOX_ACK).fixed(payload.rotation_id, MESSAGE_ID_LEN)
    elif isinstance(payload, CoverPayload):
        w.u8(PAYLOAD_COVER)
    elif isinstance(payload, TimerPayload):
        if not timer_ok(payload.seconds):
            raise ValueError("timer out of range")
        w.u8(PAYLOAD_TIMER).u64(payload.changed_at_ms).u32(payload.seconds)
    elif isinstance(payload, CallPayload):
        _encode_call(w, payload)
    elif isinstance(payload, GroupPayload):
        _encode_group(w, payload)
    elif isinstance(payload, ActionPayload):
        _encode_action(w, payload)
    elif isinstance(payload, GroupActionPayload):
        _encode_group_action(w, payload)
    else:
        if not 0 < len(payload.box) <= MAX_CALL_SEALED:
            raise ValueError("sealed call signaling out of range")
        w.u8(PAYLOAD_CALL_SEALED).fixed(payload.call_id, CALL_ID_LEN)
        w.fixed(payload.nonce, CALL_NONCE_LEN).raw(struct.pack(">H", len(payload.box)))
        w.raw(payload.box)
    return w.bytes()


def _text_bytes(text: str) -> bytes:
    b = text.encode()
    if len(b) > MAX_TEXT_BYTES:
        raise ValueError("text too long")
    return b


def _encode_action(w: Writer, p: ActionPayload) -> None:
    if isinstance(p, ReplyPayload):
        w.u8(PAYLOAD_REPLY).fixed(p.message_id, MESSAGE_ID_LEN).u64(p.sent_at_ms)
        w.fixed(p.quoted_id, MESSAGE_ID_LEN).raw(_text_bytes(p.text))
    elif isinstance(p, ReactionPayload):
        check_reaction(p.emoji)
        w.u8(PAYLOAD_REACTION).fixed(p.target_id, MESSAGE_ID_LEN)
        _put_short(w, p.emoji.encode(), MAX_REACTION_BYTES)
    elif isinstance(p, EditPayload):
        w.u8(PAYLOAD_EDIT).fixed(p.target_id, MESSAGE_ID_LEN).u64(p.edited_at_ms)
        w.raw(_text_bytes(p.text))
    else:
        w.u8(PAYLOAD_DELETE).fixed(p.target_id, MESSAGE_ID_LEN)


def _rest_text(r: Reader, n: int) -> str:
    if n > MAX_TEXT_BYTES:
        raise DecodeError("text too long")
    return _utf8(r.take(n))


def _decode_action(kind: int, r: Reader, total: int) -> ActionPayload:
    if kind == PAYLOAD_REPLY:
        mid, sent, quoted = r.take(MESSAGE_ID_LEN), r.u64(), r.take(MESSAGE_ID_LEN)
        return ReplyPayload(mid, sent, quoted, _rest_text(r, total - 2 - 2 * MESSAGE_ID_LEN - 8))
    if kind == PAYLOAD_REACTION:
        target = r.take(MESSAGE_ID_LEN)
        emoji = _utf8(_short(r, MAX_REACTION_BYTES))
        try:
            check_reaction(emoji)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        return ReactionPayload(target, emoji)
    if kind == PAYLOAD_EDIT:
        target, at = r.take(MESSAGE_ID_LEN), r.u64()
        return EditPayload(target, at, _rest_text(r, total - 2 - MESSAGE_ID_LEN - 8))
    return DeletePayload(r.take(MESSAGE_ID_LEN))


_NO_AUTHOR = bytes(ED25519_LEN)
#: Before a group action's inner payload type: version, type, group ID, version, author.
_GROUP_ACTION_PREFIX = 2 + GROUP_ID_LEN + 8 + ED25519_LEN


def _encode_group_action(w: Writer, p: GroupActionPayload) -> None:
    timer = isinstance(p.action, TimerPayload)
    if timer != (p.author == _NO_AUTHOR):
        raise ValueError("a group action names an author unless it is a timer")
    w.u8(PAYLOAD_GROUP_ACTION).fixed(p.group_id, GROUP_ID_LEN).u64(p.version)
    w.fixed(p.author, ED25519_LEN)
    if isinstance(p.action, TimerPayload):
        if not timer_ok(p.action.seconds):
            raise ValueError("timer out of range")
        w.u8(PAYLOAD_TIMER).u64(p.action.changed_at_ms).u32(p.action.seconds)
    else:
        _encode_action(w, p.action)


def _decode_group_action(r: Reader, total: int) -> GroupActionPayload:
    group_id, version, author = r.take(GROUP_ID_LEN), r.u64(), r.take(ED25519_LEN)
    kind = r.u8()
    action: ActionPayload | TimerPayload
    if kind == PAYLOAD_TIMER:
        changed, seconds = r.u64(), r.u32()
        if not timer_ok(seconds):
            raise DecodeError("timer out of range")
        action = TimerPayload(changed, seconds)
    elif kind in (PAYLOAD_REPLY, PAYLOAD_REACTION, PAYLOAD_EDIT, PAYLOAD_DELETE):
        # the inner payload's length as _decode_action counts it: with a version byte and
        # its type, as if it stood alone
        action = _decode_action(kind, r, total - _GROUP_ACTION_PREFIX - 1 + 2)
    else:
        raise DecodeError("unknown group action")
    if (kind == PAYLOAD_TIMER) != (author == _NO_AUTHOR):
        raise DecodeError("a group action names an author unless it is a timer")
    return GroupActionPayload(group_id, version, author, action)


def _encode_call(w: Writer, p: CallPayload) -> None:
    w.u8(PAYLOAD_CALL).fixed(p.call_id, CALL_ID_LEN).u8(p.kind)
    if p.kind == CALL_INVITE:
        w.fixed(p.key, CALL_KEY_LEN).flag(p.video).u64(p.sent_at_ms)
    elif p.kind == CALL_ACCEPT:
        w.fixed(p.key, CALL_KEY_LEN)
    elif p.kind == CALL_REJECT:
        if p.reason not in (CALL_REASON_REJECTED, CALL_REASON_BUSY):
            raise ValueError("unknown call reject reason")
        w.u8(p.reason)
    elif p.kind == CALL_CANCEL:
        if p.reason not in (0, CALL_REASON_ANSWERED_ELSEWHERE):
            raise ValueError("unknown call cancel reason")
        if p.reason:
            w.u8(p.reason)
    elif p.kind != CALL_RINGING:
        raise ValueError("unknown call kind")


def _decode_call(r: Reader) -> CallPayload:
    call_id, kind = r.take(CALL_ID_LEN), r.u8()
    if kind == CALL_INVITE:
        key, video, sent = r.take(CALL_KEY_LEN), r.flag(), r.u64()
        return CallPayload(call_id, kind, key=key, video=video, sent_at_ms=sent)
    if kind == CALL_ACCEPT:
        return CallPayload(call_id, kind, key=r.take(CALL_KEY_LEN))
    if kind == CALL_REJECT:
        reason = r.u8()
        if reason not in (CALL_REASON_REJECTED, CALL_REASON_BUSY):
            raise DecodeError("unknown call reject reason")
        return CallPayload(call_id, kind, reason=reason)
    if kind == CALL_CANCEL and r.left():
        if r.u8() != CALL_REASON_ANSWERED_ELSEWHERE:
            raise DecodeError("unknown call cancel reason")
        return CallPayload(call_id, kind, reason=CALL_REASON_ANSWERED_ELSEWHERE)
    if kind in (CALL_CANCEL, CALL_RINGING):
        return CallPayload(call_id, kind)
    raise DecodeError("unknown call kind")


def decode_payload(data: bytes) -> Payload:
    r = Reader(data)
    if r.u8() != VERSION:
        raise UnsupportedVersion("unsupported payload version")
    kind = r.u8()
    out: Payload
    if kind == PAYLOAD_TEXT:
        mid, sent = r.take(MESSAGE_ID_LEN), r.u64()
        text = r.take(len(data) - 2 - MESSAGE_ID_LEN - 8)
        if len(text) > MAX_TEXT_BYTES:
            raise DecodeError("text too long")
        out = TextPayload(mid, sent, _utf8(text))
    elif kind == PAYLOAD_RECEIPT:
        receipt_kind, count = r.u8(), r.u16()
        if (
            receipt_kind not in (RECEIPT_DELIVERED, RECEIPT_READ)
            or not 0 < count <= MAX_RECEIPT_IDS
        ):
            raise DecodeError("malformed receipt")
        out = ReceiptPayload(receipt_kind, tuple(r.take(MESSAGE_ID_LEN) for _ in range(count)))
    elif kind == PAYLOAD_HELLO:
        reply_to = MailboxAddress.read(r)
        name = _utf8(_short(r, MAX_NAME_BYTES))
        out = HelloPayload(reply_to, name, _short(r, MAX_MAILBOX_FIELD))
    elif kind == PAYLOAD_MAILBOX:
        out = MailboxPayload(r.take(MESSAGE_ID_LEN), MailboxAddress.read(r))
    elif kind == PAYLOAD_MAILBOX_ACK:
        out = MailboxAckPayload(r.take(MESSAGE_ID_LEN))
    elif kind == PAYLOAD_ATTACHMENT:
        out = _read_attachment(r)
    elif kind == PAYLOAD_ATTACHMENT_EXTRA:
        out = _read_extra(r)
    elif kind == PAYLOAD_TYPING:
        flags = r.u8()
        if flags & ~(TYPING_ENABLED | TYPING_NOW) or flags == TYPING_NOW:
            raise DecodeError("malformed typing flags")
        out = TypingPayload(bool(flags & TYPING_ENABLED), bool(flags & TYPING_NOW))
    elif kind == PAYLOAD_RENEW:
        renew_id, created = r.take(MESSAGE_ID_LEN), r.u64()
        reply_to = MailboxAddress.read(r)
        bundle_address = _relay_id(r)
        out = RenewPayload(renew_id, created, reply_to, bundle_address,
                           _utf8(_short(r, MAX_NAME_BYTES)))  # fmt: skip
    elif kind == PAYLOAD_COVER:
        out = CoverPayload()
    elif kind == PAYLOAD_TIMER:
        changed, seconds = r.u64(), r.u32()
        if not timer_ok(seconds):
            raise DecodeError("timer out of range")
        out = TimerPayload(changed, seconds)
    elif kind == PAYLOAD_CALL:
        out = _decode_call(r)
    elif kind in _GROUP_PAYLOAD_TYPES:
        out = _decode_group(kind, r, len(data))
    elif kind in (PAYLOAD_REPLY, PAYLOAD_REACTION, PAYLOAD_EDIT, PAYLOAD_DELETE):
        out = _decode_action(kind, r, len(data))
    elif kind == PAYLOAD_GROUP_ACTION:
        out = _decode_group_action(r, len(data))
    elif kind == PAYLOAD_CALL_SEALED:
        call_id, nonce, n = r.take(CALL_ID_LEN), r.take(CALL_NONCE_LEN), r.u16()
        if not 0 < n <= MAX_CALL_SEALED:
            raise DecodeError("sealed call signaling out of range")
        out = CallSealedPayload(call_id, nonce, r.take(n))
    else:
        raise DecodeError("unknown payload type")
    r.done()
    return out


# --- contact links (shared out of band: text, QR code) -----------------------------------------
#
# "aegis:" + base64url (no padding) of:
#   version (1) || kind (1) || identity record (128) || mailbox address (where to send the first
#   contact) || bundle address (u8 length + bytes: where the relay serves the prekey bundle) ||
#   invitation id (u8 length + bytes; empty for a long-term address) || expires (u64, 0 = never)
# The identity inside lets the joiner check the bundle the relay serves (a malicious relay
# cannot substitute its own keys). The bundle is served by the relay of the mailbox address.
# This parser checks structure only: the caller verifies the identity's binding signature
# (identity.PublicIdentity.from_record) before trusting the link.

LINK_SCHEME = "aegis:"
LINK_INVITATION = 1
LINK_ADDRESS = 2


@dataclass(frozen=True)
class ContactLink:
    kind: int
    identity: IdentityRecord
    mailbox: MailboxAddress
    bundle_address: bytes
    invitation_id: bytes
    expires: int  # seconds since the Unix epoch (UTC); 0: never

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).u8(self.kind).raw(self.identity.to_bytes())
        self.mailbox.write(w)
        if len(self.bundle_address) != RELAY_ID_LEN:
            raise ValueError("a link needs a 16-byte bundle address")
        _put_short(w, self.bundle_address, MAX_MAILBOX_FIELD)
        _put_short(w, self.invitation_id, MAX_MAILBOX_FIELD)
        return w.u64(self.expires).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ContactLink:
        r = Reader(data)
        if r.u8() != VERSION:
            raise UnsupportedVersion("unsupported link version")
        kind = r.u8()
        if kind not in (LINK_INVITATION, LINK_ADDRESS):
            raise DecodeError("unknown link kind")
        out = cls(
            kind,
            IdentityRecord.read(r),
            MailboxAddress.read(r),
            _relay_id(r),
            _short(r, MAX_MAILBOX_FIELD),
            r.u64(),
        )
        r.done()
        if (kind == LINK_INVITATION) != bool(out.invitation_id):
            raise DecodeError("invitation id must be present exactly in invitations")
        return out

    def to_text(self) -> str:
        return LINK_SCHEME + base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode()

    @classmethod
    def from_text(cls, text: str) -> ContactLink:
        text = text.strip()
        if not text.startswith(LINK_SCHEME) or len(text) > 2048:
            raise DecodeError("not an AegisLink contact link")
        body = text[len(LINK_SCHEME) :]
        if not body or not all(c.isalnum() or c in "-_" for c in body) or not body.isascii():
            raise DecodeError("not an AegisLink contact link")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise DecodeError("not an AegisLink contact link") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
            raise DecodeError("non-canonical link encoding")
        return cls.from_bytes(raw)
