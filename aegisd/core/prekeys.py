"""The owner's side of prekeys: generation, signing, rotation, retirement and the replay cache.

Rotation (times in seconds, `now` is injected):
- the signed X25519 prekey and the last-resort ML-KEM-768 prekey are replaced every
  `ROTATION_PERIOD` (7 days);
- a replaced key keeps working for `RETIREMENT_GRACE` (30 days) so that a first-contact message
  that was delayed in transit still opens; then it is retired (deleted);
- a first-contact message that used a last-resort ML-KEM key is remembered (a digest of its
  public prefix) until that key is retired, so a replay of it is rejected. One-time prekeys are
  deleted on first use, which makes replays of messages that used them fail by themselves.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from . import wire
from .errors import DecodeError, DecryptionError
from .identity import IdentityKeyPair
from .primitives import Entropy

ROTATION_PERIOD = 7 * 24 * 3600
RETIREMENT_GRACE = 30 * 24 * 3600
ONE_TIME_BATCH = 100
#: One-time private keys kept per kind beyond which the oldest go (prune_one_time): well past
#: what the relay may hold of them (its bundle_items_per_kind, 200 by default) and hands out
#: oldest first, so a key dropped here was handed out long ago.
ONE_TIME_KEEP = 1000
#: ...and only once they are this old (seconds): a first contact made with a key handed out
#: less than a day ago still finds it, however fast a drainer takes the others.
ONE_TIME_GRACE = 24 * 3600


@dataclass
class _SignedX25519:
    prekey_id: int
    priv: X25519PrivateKey
    pub: bytes
    sig: bytes
    created: int
    replaced: int = 0


@dataclass
class _SignedMlkem:
    prekey_id: int
    priv: MLKEM768PrivateKey
    ek: bytes
    sig: bytes
    created: int = 0
    replaced: int = 0


def _x_record(k: _SignedX25519) -> wire.SignedPrekeyRecord:
    return wire.SignedPrekeyRecord(
        k.prekey_id, p.x25519_private_raw(k.priv), k.sig, k.created, k.replaced
    )


def _kem_record(k: _SignedMlkem) -> wire.SignedPrekeyRecord:
    return wire.SignedPrekeyRecord(k.prekey_id, p.mlkem_seed(k.priv), k.sig, k.created, k.replaced)


def _kem_from_record(r: wire.SignedPrekeyRecord) -> _SignedMlkem:
    priv = p.mlkem_from_seed(r.secret)
    return _SignedMlkem(r.prekey_id, priv, p.mlkem_ek(priv), r.sig, r.created, r.replaced)


def replay_digest(block: bytes) -> bytes:
    """Digest of a first-contact block's public prefix (ephemeral key, prekey ids, KEM ct)."""
    return hashlib.sha256(block[: wire.FIRST_CONTACT_PREFIX_LEN]).digest()


class PrekeyStore:
    """All prekeys an identity owns, plus the last-resort replay cache."""

    def __init__(self, identity: IdentityKeyPair) -> None:
        self.identity = identity
        self.signed: dict[int, _SignedX25519] = {}
        self.last_resort: dict[int, _SignedMlkem] = {}
        self.one_time_x25519: dict[int, X25519PrivateKey] = {}
        self.one_time_mlkem: dict[int, _SignedMlkem] = {}
        self.replay_cache: dict[int, set[bytes]] = {}

    # --- creation and rotation ----------------------------------------------------------------

    @classmethod
    def create(cls, entropy: Entropy, identity: IdentityKeyPair, now: int) -> PrekeyStore:
        store = cls(identity)
        store._new_signed(entropy, now)
        store._new_last_resort(entropy, now)
        return store

    def _fresh_id(self, entropy: Entropy) -> int:
        used = (
            self.signed.keys()
            | self.last_resort.keys()
            | self.one_time_x25519.keys()
            | self.one_time_mlkem.keys()
        )
        while True:
            (candidate,) = struct.unpack(">I", entropy.random(4))
            if candidate != 0 and candidate not in used:
                return int(candidate)

    def _sign(self, kind: int, prekey_id: int, encoded: bytes) -> bytes:
        return self.identity.sign(wire.prekey_signature_message(kind, prekey_id, encoded))

    def _new_signed(self, entropy: Entropy, now: int) -> None:
        priv = entropy.x25519_private()
        pub = p.x25519_public(priv)
        pid = self._fresh_id(entropy)
        sig = self._sign(wire.KIND_BUNDLE_BASE, pid, wire.encode_x25519(pub))
        self.signed[pid] = _SignedX25519(pid, priv, pub, sig, now)

    def _new_kem(self, entropy: Entropy, kind: int, now: int) -> _SignedMlkem:
        priv = entropy.mlkem_private()
        ek = p.mlkem_ek(priv)
        pid = self._fresh_id(entropy)
        sig = self._sign(kind, pid, wire.encode_mlkem(ek))
        return _SignedMlkem(pid, priv, ek, sig, now)

    def _new_last_resort(self, entropy: Entropy, now: int) -> None:
        key = self._new_kem(entropy, wire.KIND_BUNDLE_BASE, now)
        self.last_resort[key.prekey_id] = key
        self.replay_cache[key.prekey_id] = set()

    def current_signed(self) -> _SignedX25519:
        return next(k for k in self.signed.values() if k.replaced == 0)

    def current_last_resort(self) -> _SignedMlkem:
        return next(k for k in self.last_resort.values() if k.replaced == 0)

    def rotate(self, entropy: Entropy, now: int) -> bool:
        """Replace due keys and retire expired ones. True when the published bundle changed."""
        changed = False
        spk = self.current_signed()
        if now - spk.created >= ROTATION_PERIOD:
            spk.replaced = now
            self._new_signed(entropy, now)
            changed = True
        lrk = self.current_last_resort()
        if now - lrk.created >= ROTATION_PERIOD:
            lrk.replaced = now
            self._new_last_resort(entropy, now)
            changed = True
        for pid in [
            k for k, v in self.signed.items() if v.replaced and now - v.replaced >= RETIREMENT_GRACE
        ]:
            del self.signed[pid]
        for pid in [
            k
            for k, v in self.last_resort.items()
            if v.replaced and now - v.replaced >= RETIREMENT_GRACE
        ]:
            del self.last_resort[pid]
            self.replay_cache.pop(pid, None)
        return changed

    def generate_one_time(
        self, entropy: Entropy, count: int = ONE_TIME_BATCH, now: int = 0
    ) -> tuple[list[wire.OneTimeX25519], list[wire.OneTimeMlkem]]:
        """Create `count` one-time prekeys of each kind; returns the public items to publish.
        `now` is kept with the ML-KEM keys (prune_one_time); keys made with 0 count as old."""
        xs: list[wire.OneTimeX25519] = []
        kems: list[wire.OneTimeMlkem] = []
        for _ in range(count):
            priv = entropy.x25519_private()
            pid = self._fresh_id(entropy)
            self.one_time_x25519[pid] = priv
            xs.append(wire.OneTimeX25519(pid, p.x25519_public(priv)))
            key = self._new_kem(entropy, wire.KIND_ONE_TIME_MLKEM, now)
            self.one_time_mlkem[key.prekey_id] = key
            kems.append(wire.OneTimeMlkem(key.prekey_id, key.ek, key.sig))
        return xs, kems

    def prune_one_time(
        self, now: int, keep: int = ONE_TIME_KEEP, grace: int = ONE_TIME_GRACE
    ) -> int:
        """Drop the oldest one-time private keys past the newest `keep` of each kind, those
        made more than `grace` seconds ago: anyone with the address link can make the daemon
        publish (and keep) new ones at the relay's rate for ever. The relay hands items out
        oldest first, so these were handed out long ago, to a fetcher that never used them or
        whose first contact has not arrived: such a first contact now fails as a one-time-key
        miss (docs/protocol.md §7). The two kinds are made, handed out and used in pairs, in
        the same order: the X25519 keys follow the ML-KEM ones (their records hold no time).
        Returns how many keys went."""
        dropped = 0
        excess = len(self.one_time_mlkem) - keep
        for pid, key in list(self.one_time_mlkem.items()):
            if excess <= 0 or now - key.created < grace:
                break
            del self.one_time_mlkem[pid]
            excess -= 1
            dropped += 1
        extra_x = len(self.one_time_x25519) - max(keep, len(self.one_time_mlkem))
        for pid in list(self.one_time_x25519)[: max(0, extra_x)]:
            del self.one_time_x25519[pid]
            dropped += 1
        return dropped

    def bundle_base(self) -> wire.BundleBase:
        spk, lrk = self.current_signed(), self.current_last_resort()
        return wire.BundleBase(
            self.identity.public.record(),
            spk.prekey_id,
            spk.pub,
            spk.sig,
            lrk.prekey_id,
            lrk.ek,
            lrk.sig,
        )

    # --- use by the handshake responder (lookups never mutate) --------------------------------

    def signed_prekey(self, prekey_id: int) -> X25519PrivateKey:
        key = self.signed.get(prekey_id)
        if key is None:
            raise DecryptionError()
        return key.priv

    def pq_prekey(self, prekey_id: int) -> tuple[MLKEM768PrivateKey, bool]:
        """The ML-KEM private key and whether it is a last-resort key."""
        if prekey_id in self.one_time_mlkem:
            return self.one_time_mlkem[prekey_id].priv, False
        if prekey_id in self.last_resort:
            return self.last_resort[prekey_id].priv, True
        raise DecryptionError()

    def one_time_prekey(self, prekey_id: int) -> X25519PrivateKey:
        key = self.one_time_x25519.get(prekey_id)
        if key is None:
            raise DecryptionError()
        return key

    def check_not_replayed(self, pqpk_id: int, digest: bytes) -> None:
        if digest in self.replay_cache.get(pqpk_id, ()):
            raise DecryptionError()

    def consume(self, opk_id: int, pqpk_id: int, digest: bytes) -> None:
        """Called only after a first-contact message authenticated: burn what it used."""
        self.one_time_x25519.pop(opk_id, None)
        if self.one_time_mlkem.pop(pqpk_id, None) is None and pqpk_id in self.last_resort:
            self.replay_cache.setdefault(pqpk_id, set()).add(digest)

    # --- persistence --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        ed_raw, x_raw = self.identity.raw_private()
        return wire.PrekeyStoreRecord(
            ed_priv=ed_raw,
            x_priv=x_raw,
            binding_sig=self.identity.public.binding_sig,
            signed=[_x_record(k) for k in self.signed.values()],
            last_resort=[_kem_record(k) for k in self.last_resort.values()],
            one_time_x25519=[
                (pid, p.x25519_private_raw(k)) for pid, k in self.one_time_x25519.items()
            ],
            one_time_mlkem=[_kem_record(k) for k in self.one_time_mlkem.values()],
            replay_cache={pid: sorted(d) for pid, d in self.replay_cache.items()},
        ).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyStore:
        rec = wire.PrekeyStoreRecord.from_bytes(data)
        store = cls(IdentityKeyPair.from_raw(rec.ed_priv, rec.x_priv, rec.binding_sig))
        for r in rec.signed:
            priv = p.x25519_from_private(r.secret)
            store.signed[r.prekey_id] = _SignedX25519(
                r.prekey_id, priv, p.x25519_public(priv), r.sig, r.created, r.replaced
            )
        store.last_resort = {r.prekey_id: _kem_from_record(r) for r in rec.last_resort}
        store.one_time_x25519 = {pid: p.x25519_from_private(s) for pid, s in rec.one_time_x25519}
        store.one_time_mlkem = {r.prekey_id: _kem_from_record(r) for r in rec.one_time_mlkem}
        store.replay_cache = {pid: set(d) for pid, d in rec.replay_cache.items()}
        for keys in (store.signed, store.last_resort):
            if sum(1 for k in keys.values() if k.replaced == 0) != 1:
                raise DecodeError("prekey store must hold exactly one current key of each kind")
        return store

    def __repr__(self) -> str:
        return "PrekeyStore(<private>)"
