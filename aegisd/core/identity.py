"""Identity keys, addresses and safety numbers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from . import wire
from .errors import BundleError, DecodeError
from .primitives import Entropy

ADDRESS_LEN = 16  # a random 128-bit ID, unrelated to any key
SAFETY_NUMBER_ITERATIONS = 5200
SAFETY_NUMBER_VERSION = b"\x00\x01"
_SAFETY_LABEL = b"AegisLink-v1 safety number"


def new_address(entropy: Entropy) -> bytes:
    return entropy.random(ADDRESS_LEN)


def _binding_message(ed_pub: bytes, x_pub: bytes) -> bytes:
    return wire.IDENTITY_BINDING_LABEL + wire.encode_ed25519(ed_pub) + wire.encode_x25519(x_pub)


@dataclass(frozen=True)
class PublicIdentity:
    """Someone's public identity. Only constructed once the binding signature verified."""

    ed_pub: bytes
    x_pub: bytes
    binding_sig: bytes

    @classmethod
    def from_record(cls, rec: wire.IdentityRecord) -> PublicIdentity:
        if not p.ed25519_verify(
            rec.ed_pub, rec.binding_sig, _binding_message(rec.ed_pub, rec.x_pub)
        ):
            raise BundleError("identity binding signature does not verify")
        return cls(rec.ed_pub, rec.x_pub, rec.binding_sig)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        return cls.from_record(wire.IdentityRecord.from_bytes(data))

    def record(self) -> wire.IdentityRecord:
        return wire.IdentityRecord(self.ed_pub, self.x_pub, self.binding_sig)

    def to_bytes(self) -> bytes:
        return self.record().to_bytes()

    def encode(self) -> bytes:
        """Encode(IK): both key types, type-tagged. Used in the AD and the safety number."""
        return wire.encode_ed25519(self.ed_pub) + wire.encode_x25519(self.x_pub)

    def verify(self, signature: bytes, message: bytes) -> bool:
        return p.ed25519_verify(self.ed_pub, signature, message)

    def same_keys(self, other: PublicIdentity) -> bool:
        return p.constant_time_equal(self.encode(), other.encode())


def keys_of(data: bytes | None) -> bytes | None:
    """The keys of a stored identity record, Encode(IK), without its binding signature: what
    makes two records the same identity (the holder can sign its binding again, with another
    nonce, and get other bytes for the same keys). None for no or a malformed record."""
    if data is None:
        return None
    try:
        rec = wire.IdentityRecord.from_bytes(data)
    except (DecodeError, ValueError):
        return None
    return wire.encode_ed25519(rec.ed_pub) + wire.encode_x25519(rec.x_pub)


class IdentityKeyPair:
    """A device's identity: Ed25519 signing key and an independently generated X25519 key."""

    __slots__ = ("_ed", "_x", "public")

    def __init__(self, ed: Ed25519PrivateKey, x: X25519PrivateKey, binding_sig: bytes) -> None:
        self._ed = ed
        self._x = x
        self.public = PublicIdentity(p.ed25519_public(ed), p.x25519_public(x), binding_sig)

    @classmethod
    def generate(cls, entropy: Entropy) -> IdentityKeyPair:
        ed = entropy.ed25519_private()
        x = entropy.x25519_private()
        sig = ed.sign(_binding_message(p.ed25519_public(ed), p.x25519_public(x)))
        return cls(ed, x, sig)

    @classmethod
    def from_raw(cls, ed_priv: bytes, x_priv: bytes, binding_sig: bytes) -> IdentityKeyPair:
        pair = cls(p.ed25519_from_private(ed_priv), p.x25519_from_private(x_priv), binding_sig)
        PublicIdentity.from_record(pair.public.record())  # refuse a mismatched stored signature
        return pair

    def raw_private(self) -> tuple[bytes, bytes]:
        return p.ed25519_private_raw(self._ed), p.x25519_private_raw(self._x)

    def sign(self, message: bytes) -> bytes:
        return self._ed.sign(message)

    def dh(self, peer_public: bytes) -> bytes:
        return p.dh(self._x, peer_public)

    def __repr__(self) -> str:  # never show key material
        return "IdentityKeyPair(<private>)"


def _fingerprint(identity: PublicIdentity) -> bytes:
    # As Signal's numeric fingerprint: iterated SHA-512 over the key encoding, 30 bytes kept.
    key = identity.encode()
    digest = SAFETY_NUMBER_VERSION + _SAFETY_LABEL + key
    for _ in range(SAFETY_NUMBER_ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    return digest[:30]


def _digits(fingerprint: bytes) -> str:
    groups = []
    for i in range(0, 30, 5):
        chunk = int.from_bytes(fingerprint[i : i + 5], "big") % 100000
        groups.append(f"{chunk:05d}")
    return "".join(groups)


def safety_number(a: PublicIdentity, b: PublicIdentity) -> str:
    """60 digits from both parties' identity keys (all four keys), the same on both sides."""
    halves = sorted((_digits(_fingerprint(a)), _digits(_fingerprint(b))))
    return halves[0] + halves[1]


def format_safety_number(number: str) -> str:
    """Twelve groups of five digits, four per line, for reading aloud."""
    if len(number) != 60 or not number.isdigit():
        raise DecodeError("not a safety number")
    groups = [number[i : i + 5] for i in range(0, 60, 5)]
    return "\n".join(" ".join(groups[i : i + 4]) for i in range(0, 12, 4))
