"""Thin wrappers over pyca/cryptography: the only place the core touches primitives.

Randomness is injected through `Entropy`, so the whole protocol is deterministic under test.
ML-KEM encapsulation is part of `Entropy` because pyca/cryptography exposes no way to pass the
encapsulation randomness (FIPS 203 `Encaps_internal`); injecting the whole operation keeps the
core exact under test (the test suite replays recorded encapsulations byte for byte).
"""

from __future__ import annotations

import hmac as _hmac
import os
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import DecryptionError

X25519_LEN = 32
ED25519_LEN = 32
SIGNATURE_LEN = 64
MLKEM_EK_LEN = 1184
MLKEM_CT_LEN = 1088
MLKEM_SEED_LEN = 64
MLKEM_SS_LEN = 32
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16

_ZERO_NONCE = bytes(NONCE_LEN)
_ZERO_DH = bytes(X25519_LEN)


class Entropy(Protocol):
    """Every source of randomness the core uses."""

    def random(self, n: int) -> bytes: ...

    def x25519_private(self) -> X25519PrivateKey: ...

    def ed25519_private(self) -> Ed25519PrivateKey: ...

    def mlkem_private(self) -> MLKEM768PrivateKey: ...

    def encapsulate(self, ek: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        """Return (shared_secret, ciphertext)."""
        ...


class SystemEntropy:
    """Production entropy: the operating system's CSPRNG, via OpenSSL and os.urandom."""

    def random(self, n: int) -> bytes:
        return os.urandom(n)

    def x25519_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.generate()

    def ed25519_private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.generate()

    def mlkem_private(self) -> MLKEM768PrivateKey:
        return MLKEM768PrivateKey.generate()

    def encapsulate(self, ek: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        return ek.encapsulate()


# --- X25519 -----------------------------------------------------------------------------------


def x25519_from_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_public(priv: X25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes_raw()


def x25519_private_raw(priv: X25519PrivateKey) -> bytes:
    return priv.private_bytes_raw()


def dh(priv: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 with the all-zero output (a small-order peer key) rejected."""
    try:
        out = priv.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise DecryptionError() from None
    if _hmac.compare_digest(out, _ZERO_DH):
        raise DecryptionError()
    return out


# --- Ed25519 ----------------------------------------------------------------------------------


def ed25519_from_private(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def ed25519_public(priv: Ed25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes_raw()


def ed25519_private_raw(priv: Ed25519PrivateKey) -> bytes:
    return priv.private_bytes_raw()


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- ML-KEM-768 -------------------------------------------------------------------------------


def mlkem_from_seed(seed: bytes) -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.from_seed_bytes(seed)


def mlkem_seed(priv: MLKEM768PrivateKey) -> bytes:
    return priv.private_bytes_raw()


def mlkem_ek(priv: MLKEM768PrivateKey) -> bytes:
    return priv.public_key().public_bytes_raw()


def mlkem_load_ek(ek: bytes) -> MLKEM768PublicKey:
    try:
        return MLKEM768PublicKey.from_public_bytes(ek)
    except ValueError:
        raise DecryptionError() from None


def mlkem_decapsulate(priv: MLKEM768PrivateKey, ct: bytes) -> bytes:
    # ML-KEM decapsulation never fails on a well-sized ciphertext (implicit rejection); a bad
    # ciphertext yields an unrelated secret and the following AEAD check fails.
    try:
        return priv.decapsulate(ct)
    except ValueError:
        raise DecryptionError() from None


# --- KDFs and MACs ----------------------------------------------------------------------------


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return _hmac.digest(key, data, "sha256")


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


# --- AEAD (AES-256-GCM) -----------------------------------------------------------------------


def aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def seal_once(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD under a key that is used exactly once, so the nonce is fixed at zero."""
    return AESGCM(key).encrypt(_ZERO_NONCE, plaintext, ad)


def open_once(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag:
        raise DecryptionError() from None


def open_with(cipher: AESGCM, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    """Trial decryption: None when the tag does not verify (used to find a header key)."""
    try:
        return cipher.decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        return None
