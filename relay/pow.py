"""Hashcash-style proof of work, bound to the connection challenge and to what it pays for.

digest = SHA-256(POW_CONTEXT | challenge(32) | purpose(1) | target(16) | payload_hash(32)
                 | nonce(16))
The work is sufficient when `digest` starts with at least `bits` zero bits. Hand-written because
it is ten lines and must match the documented preimage byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import threading

from . import wire

ZERO_TARGET = bytes(wire.ID_LEN)
ZERO_HASH = bytes(wire.HASH_LEN)


def _prefix(challenge: bytes, purpose: int, target: bytes, payload_hash: bytes) -> bytes:
    return wire.POW_CONTEXT + challenge + bytes([purpose]) + target + payload_hash


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def check(bits: int, challenge: bytes, purpose: int, target: bytes, payload_hash: bytes,
          nonce: bytes) -> bool:
    if len(nonce) != wire.NONCE_LEN:
        return False
    if bits <= 0:
        return True
    digest = hashlib.sha256(_prefix(challenge, purpose, target, payload_hash) + nonce).digest()
    return leading_zero_bits(digest) >= bits


class SolveStopped(Exception):
    """A search stopped from outside (its caller went away) before it found a nonce."""


def solve(bits: int, challenge: bytes, purpose: int, target: bytes = ZERO_TARGET,
          payload_hash: bytes = ZERO_HASH, stop: threading.Event | None = None) -> bytes:
    """Find a nonce (client side). Expected cost: 2**bits hashes. ``stop`` set ends the search
    (SolveStopped) within a few milliseconds: a thread searching for a cancelled caller would
    otherwise hold up the process's exit for as long as the search takes (minutes)."""
    base = hashlib.sha256(_prefix(challenge, purpose, target, payload_hash))
    start = int.from_bytes(os.urandom(8), "big")
    limit = 1 << (256 - bits) if bits > 0 else 1 << 256
    i = 0
    while True:
        nonce = (start + i).to_bytes(16, "big")
        h = base.copy()
        h.update(nonce)
        if int.from_bytes(h.digest(), "big") < limit:
            return nonce
        i += 1
        if not i & 0x3FFF and stop is not None and stop.is_set():
            raise SolveStopped()
