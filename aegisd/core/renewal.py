"""Renewal blocks (docs/protocol.md §23): how a profile restored from a backup, which has its
identity keys but no ratchet session, asks a contact for a new session.

A renewal block looks like every other block (BLOCK_SIZE bytes, version byte, then bytes that
look random) and is deposited to the mailbox the contact gave for this conversation:

    block = version (1) || salt (32) || AES-256-GCM(key, nonce 0, content, ad = block[0..32])
    key   = HKDF-SHA256(ikm = DH(IK_sender.x, IK_recipient.x), salt,
                        info = LABEL || Encode(IK_sender) || Encode(IK_recipient))
    content = u16 length || payload || zero padding

(`block[0..32]` is inclusive, as in docs/protocol.md §1: the version and the salt, 33 bytes.)
The key is fresh for every block (a random salt), so the nonce is fixed. Only the holders of
the two identity keys can compute it: opening a renewal block under the stored contact's
identity authenticates the sender without a signature (deniable, as the ratchet is). The
direction is bound into `info`, so a block cannot be reflected back to its sender.
"""

from __future__ import annotations

import struct

from . import primitives as p
from . import wire
from .errors import DecodeError, DecryptionError
from .identity import IdentityKeyPair, PublicIdentity
from .primitives import Entropy

LABEL = b"AegisLink-v1 session renewal"
SALT_LEN = 32
PREFIX_LEN = 1 + SALT_LEN
CONTENT_LEN = wire.BLOCK_SIZE - PREFIX_LEN - wire.TAG_LEN
CAPACITY = CONTENT_LEN - 2


def _key(
    own: IdentityKeyPair, peer: PublicIdentity, sender: PublicIdentity, recipient: PublicIdentity,
    salt: bytes,
) -> bytes:  # fmt: skip
    shared = own.dh(peer.x_pub)
    return p.hkdf(shared, salt, LABEL + sender.encode() + recipient.encode(), 32)


def seal(entropy: Entropy, own: IdentityKeyPair, peer: PublicIdentity, payload: bytes) -> bytes:
    """A renewal block carrying ``payload`` (an encoded RenewPayload) from ``own`` to ``peer``."""
    if len(payload) > CAPACITY:
        raise ValueError("renewal payload too large")
    salt = entropy.random(SALT_LEN)
    prefix = bytes([wire.VERSION]) + salt
    content = struct.pack(">H", len(payload)) + payload
    content += bytes(CONTENT_LEN - len(content))
    key = _key(own, peer, own.public, peer, salt)
    block = prefix + p.seal_once(key, content, prefix)
    assert len(block) == wire.BLOCK_SIZE
    return block


def open_block(own: IdentityKeyPair, peer: PublicIdentity, block: bytes) -> bytes:
    """The payload of a renewal block ``peer`` sent to ``own``; DecryptionError otherwise."""
    if len(block) != wire.BLOCK_SIZE or block[0] != wire.VERSION:
        raise DecryptionError()
    prefix = block[:PREFIX_LEN]
    key = _key(own, peer, peer, own.public, block[1:PREFIX_LEN])
    content = p.open_once(key, block[PREFIX_LEN:], prefix)
    (n,) = struct.unpack(">H", content[:2])
    if n > CAPACITY or any(content[2 + n :]):
        raise DecryptionError()  # only the peer could produce this: treat it as unusable
    return content[2 : 2 + n]


def decode(payload: bytes) -> wire.RenewPayload:
    """The renewal request inside an opened block (DecodeError if it is anything else)."""
    out = wire.decode_payload(payload)
    if not isinstance(out, wire.RenewPayload):
        raise DecodeError("a renewal block must carry a renewal request")
    return out
