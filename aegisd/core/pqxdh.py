"""PQXDH (Signal's specification, revision 3) with X25519, SHA-256 and ML-KEM-768.

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   DH4 = DH(EK_A, OPK_B)
    (CT, SS) = ML-KEM-768.Encaps(PQPK_B)
    SK = HKDF(salt = 32 zero bytes, ikm = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4] || SS, info, 32)
    AD = Encode(IK_A) || Encode(IK_B)

Beyond the specification, the first-contact message is *sealed*: a second key derived from the
parts the responder can compute before knowing the sender (DH2, DH3, DH4, SS) encrypts the
sender's identity, so the relay never sees it (see docs/protocol.md, "Sealed first contact").
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from . import wire
from .errors import BundleError, DecryptionError
from .identity import IdentityKeyPair, PublicIdentity
from .prekeys import PrekeyStore
from .primitives import Entropy

KDF_INFO = b"AegisLink_CURVE25519_SHA-256_ML-KEM-768"
SEAL_INFO = b"AegisLink_CURVE25519_SHA-256_ML-KEM-768_seal"
_F = b"\xff" * 32
_SALT = bytes(32)


@dataclass(frozen=True)
class VerifiedBundle:
    """A prekey bundle whose every signature verified."""

    identity: PublicIdentity
    spk_id: int
    spk_pub: bytes
    pqpk_id: int
    pqpk_ek: bytes
    pqpk_one_time: bool
    opk_id: int  # 0: none
    opk_pub: bytes | None


def verify_bundle(
    base: bytes,
    one_time_x25519: bytes | None = None,
    one_time_mlkem: bytes | None = None,
    expected: PublicIdentity | None = None,
) -> VerifiedBundle:
    """Parse and verify a fetched bundle; with `expected`, also require that identity.

    Raises DecodeError for malformed bytes and BundleError for any failed check.
    """
    b = wire.BundleBase.from_bytes(base)
    identity = PublicIdentity.from_record(b.identity)
    if expected is not None and not identity.same_keys(expected):
        raise BundleError("bundle identity does not match the expected identity")
    # Every signature in the bundle is checked, including the last-resort key's when a
    # one-time KEM key is used instead: a bundle is valid as a whole or not at all.
    signed = [
        (b.spk_sig, wire.KIND_BUNDLE_BASE, b.spk_id, wire.encode_x25519(b.spk_pub)),
        (b.lrk_sig, wire.KIND_BUNDLE_BASE, b.lrk_id, wire.encode_mlkem(b.lrk_ek)),
    ]
    pqpk_id, pqpk_ek = b.lrk_id, b.lrk_ek
    if one_time_mlkem is not None:
        otk = wire.OneTimeMlkem.from_bytes(one_time_mlkem)
        pqpk_id, pqpk_ek = otk.prekey_id, otk.ek
        signed.append((otk.sig, wire.KIND_ONE_TIME_MLKEM, otk.prekey_id, wire.encode_mlkem(otk.ek)))
    for sig, kind, prekey_id, encoded in signed:
        if not identity.verify(sig, wire.prekey_signature_message(kind, prekey_id, encoded)):
            raise BundleError("prekey signature does not verify")
    opk_id, opk_pub = 0, None
    if one_time_x25519 is not None:
        opk = wire.OneTimeX25519.from_bytes(one_time_x25519)
        opk_id, opk_pub = opk.prekey_id, opk.pub
    return VerifiedBundle(
        identity, b.spk_id, b.spk_pub, pqpk_id, pqpk_ek, one_time_mlkem is not None, opk_id, opk_pub
    )


@dataclass(frozen=True)
class InitiatorKeys:
    prefix: wire.FirstContactPrefix
    seal_key: bytes
    sk: bytes
    ad: bytes


def _derive(dh1: bytes, rest: bytes) -> tuple[bytes, bytes]:
    """(SK, seal key). `rest` = DH2 || DH3 [|| DH4] || SS."""
    sk = p.hkdf(_F + dh1 + rest, _SALT, KDF_INFO, 32)
    seal_key = p.hkdf(_F + rest, _SALT, SEAL_INFO, 32)
    return sk, seal_key


def associated_data(initiator: PublicIdentity, responder: PublicIdentity) -> bytes:
    return initiator.encode() + responder.encode()


def initiate(entropy: Entropy, identity: IdentityKeyPair, bundle: VerifiedBundle) -> InitiatorKeys:
    ek = entropy.x25519_private()
    try:
        dh1 = identity.dh(bundle.spk_pub)
        dh2 = p.dh(ek, bundle.identity.x_pub)
        dh3 = p.dh(ek, bundle.spk_pub)
        dh4 = p.dh(ek, bundle.opk_pub) if bundle.opk_pub is not None else b""
        ss, ct = entropy.encapsulate(p.mlkem_load_ek(bundle.pqpk_ek))
    except DecryptionError:  # a low-order X25519 key or a malformed ML-KEM key in the bundle
        raise BundleError("bundle holds an unusable key") from None
    sk, seal_key = _derive(dh1, dh2 + dh3 + dh4 + ss)
    prefix = wire.FirstContactPrefix(
        p.x25519_public(ek), bundle.spk_id, bundle.pqpk_id, bundle.opk_id, ct
    )
    return InitiatorKeys(prefix, seal_key, sk, associated_data(identity.public, bundle.identity))


@dataclass(frozen=True)
class ResponderKeys:
    """Stage one of the responder: what it can compute before it knows the sender."""

    prefix: wire.FirstContactPrefix
    seal_key: bytes
    spk: X25519PrivateKey
    rest: bytes  # DH2 || DH3 [|| DH4] || SS
    pq_last_resort: bool

    def session_key(self, store: PrekeyStore, sender: PublicIdentity) -> tuple[bytes, bytes]:
        """Stage two, once the sender's identity is unsealed: (SK, AD)."""
        dh1 = p.dh(self.spk, sender.x_pub)
        sk = p.hkdf(_F + dh1 + self.rest, _SALT, KDF_INFO, 32)
        return sk, associated_data(sender, store.identity.public)


def respond(store: PrekeyStore, prefix: wire.FirstContactPrefix) -> ResponderKeys:
    """Raises DecryptionError when a named prekey is unknown, retired or already used."""
    spk = store.signed_prekey(prefix.spk_id)
    pq_priv, last_resort = store.pq_prekey(prefix.pqpk_id)
    dh2 = store.identity.dh(prefix.ephemeral_pub)
    dh3 = p.dh(spk, prefix.ephemeral_pub)
    dh4 = p.dh(store.one_time_prekey(prefix.opk_id), prefix.ephemeral_pub) if prefix.opk_id else b""
    ss = p.mlkem_decapsulate(pq_priv, prefix.kem_ct)
    rest = dh2 + dh3 + dh4 + ss
    seal_key = p.hkdf(_F + rest, _SALT, SEAL_INFO, 32)
    return ResponderKeys(prefix, seal_key, spk, rest, last_resort)
