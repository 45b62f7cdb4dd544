"""The relay's small pieces of state: the in-memory view of a mailbox and of its subscription,
token buckets, the pool of random bytes ids and nonces are drawn from, the one `denied` error.

Nothing here logs or prints an address, a port, an ID, a time or a count.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

from nacl.bindings import (
    crypto_box_beforenm,
    crypto_box_easy_afternm,
    crypto_box_open_easy_afternm,
)
from nacl.public import Box
from nacl.signing import VerifyKey

from . import wire
from .config import Config
from .storage import MailboxRow

if TYPE_CHECKING:
    from .connection import Connection

_DUMMY_HASH = bytes(32)


class Denied(wire.FrameError):
    def __init__(self) -> None:
        super().__init__(wire.E_DENIED)


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def settle(self, now: float) -> None:
        """Add what the rate earned since the last call (before the rate changes)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.settle(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def empty(self, now: float) -> bool:
        """Whether `take` would refuse now (takes nothing)."""
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate) < 1.0


def _ct_member(candidate: bytes, hashes: tuple[bytes, ...]) -> bool:
    """Constant-time membership: compares against every entry, whatever matches."""
    found = False
    for h in hashes:
        found |= hmac.compare_digest(candidate, h)
    if not hashes:
        hmac.compare_digest(candidate, _DUMMY_HASH)
    return found


class RandomPool:
    """Random bytes from os.urandom drawn 4 KiB at a time: one system call per few hundred ids
    and nonces instead of one each (the system call was a visible share of a deposit's cost)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf = os.urandom(4096)
            self._pos = 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out


RANDOM = RandomPool()


class MailboxState:
    """The in-memory view of one mailbox (rebuilt from storage when needed)."""

    __slots__ = ("_box_keys", "_key", "bundle_bucket", "del_verify", "deleted", "deposit_bucket",
                 "dkey", "id", "okey", "public", "queued", "sub", "tokens", "used", "verify",
                 "writing")

    def __init__(self, row: MailboxRow, cfg: Config, now: float, nodes: int = 1) -> None:
        self.id = row.id
        self.okey = row.owner_key
        self.dkey = row.deposit_key
        self.verify = VerifyKey(row.sig_pub)
        # A key that signs DELETE and nothing else (relay-protocol.md §4.1), if it has one.
        self.del_verify = VerifyKey(row.del_pub) if row.del_pub is not None else None
        # The NaCl box's Curve25519 shared key, computed at the first seal: a SUBSCRIBE of an
        # empty mailbox seals nothing, and the key (about 80 µs) was a tenth of a connection's
        # set-up under a connection flood (bench/attack.py 3t).
        self._box_keys = (row.owner_box_pub, row.box_secret)
        self._key: bytes | None = None
        self.public = row.public
        self.tokens = row.tokens
        self.queued = row.queued
        # Deposits whose write is in flight: the cache keeps the mailbox until they land, or
        # the write's push (Relay.stored) would act on an object a SUBSCRIBE no longer sees.
        self.writing = 0
        self.used = row.used
        self.deposit_bucket = TokenBucket(cfg.deposit_rate, cfg.deposit_burst, now)
        self.bundle_bucket = TokenBucket(cfg.bundle_fetch_rate, cfg.bundle_fetch_burst, now)
        if nodes > 1:
            self.share(cfg, nodes, now)
        self.sub: Subscription | None = None
        self.deleted = False

    def share(self, cfg: Config, nodes: int, now: float) -> None:
        """This node's share of the mailbox's rates when `nodes` nodes serve it (a shared
        store, docs/relay-protocol.md §8.1): a client reaching every node gets the configured
        rate in all, not that many times it. Burst too (at least one: a deposit stays
        possible). What the buckets earned until `now` is earned at the old rate."""
        for bucket, rate, burst in ((self.deposit_bucket, cfg.deposit_rate, cfg.deposit_burst),
                                    (self.bundle_bucket, cfg.bundle_fetch_rate,
                                     cfg.bundle_fetch_burst)):
            bucket.settle(now)
            bucket.rate = rate / nodes
            bucket.burst = min(float(burst), max(1.0, burst / nodes))
            bucket.tokens = min(bucket.tokens, bucket.burst)

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = crypto_box_beforenm(*self._box_keys)
        return self._key

    def seal(self, block: bytes) -> bytes:
        """Re-encrypt a block for the owner: nonce(24) | crypto_box(block) (§4.3). Called once
        for the copy kept at rest and once for every delivery, each with a fresh nonce, so no
        two of them (nor the deposit) share bytes."""
        nonce = RANDOM.take(Box.NONCE_SIZE)
        return nonce + crypto_box_easy_afternm(block, nonce, self.key)

    def unseal(self, sealed: bytes) -> bytes:
        """The block kept at rest, opened to be sealed afresh for a delivery (the relay holds
        the box key it was sealed with). CryptoError if the stored bytes were altered."""
        nonce = sealed[:Box.NONCE_SIZE]
        return crypto_box_open_easy_afternm(sealed[Box.NONCE_SIZE:], nonce, self.key)


class Subscription:
    __slots__ = ("active", "again", "backlog", "conn", "gen", "mb", "owner_id", "pumping")

    def __init__(self, conn: Connection, mb: MailboxState, owner_id: bytes) -> None:
        self.conn = conn
        self.mb = mb
        self.owner_id = owner_id
        self.backlog = True
        self.gen = 0
        self.pumping = False
        self.again = False
        self.active = True
