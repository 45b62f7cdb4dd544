"""Deterministic entropy for tests and test vectors. TEST-ONLY: never use outside tests.

Keys come from a seeded HMAC-SHA256 counter stream. ML-KEM encapsulation cannot be seeded through
pyca/cryptography, so in "record" mode each encapsulation runs for real and is recorded, and in
"replay" mode the recorded (shared secret, ciphertext) pairs are handed back in order, after
checking that they are for the same encapsulation key. That makes a whole protocol run exact.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


class DeterministicEntropy:
    def __init__(self, seed: bytes, replay: list[dict[str, str]] | None = None) -> None:
        self._seed = seed
        self._counter = 0
        self._replay = list(replay) if replay is not None else None
        self.recorded: list[dict[str, str]] = []

    def random(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self._counter += 1
            out += hmac.digest(self._seed, struct.pack(">Q", self._counter), "sha256")
        return out[:n]

    def x25519_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.random(32))

    def ed25519_private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.random(32))

    def mlkem_private(self) -> MLKEM768PrivateKey:
        return MLKEM768PrivateKey.from_seed_bytes(self.random(64))

    def encapsulate(self, ek: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        ek_digest = hashlib.sha256(ek.public_bytes_raw()).hexdigest()
        if self._replay is not None:
            if not self._replay:
                raise AssertionError("no recorded encapsulation left to replay")
            item = self._replay.pop(0)
            if item["ek_sha256"] != ek_digest:
                raise AssertionError("replayed encapsulation is for another key")
            ss, ct = bytes.fromhex(item["shared_secret"]), bytes.fromhex(item["ciphertext"])
        else:
            ss, ct = ek.encapsulate()
        self.recorded.append(
            {"ek_sha256": ek_digest, "shared_secret": ss.hex(), "ciphertext": ct.hex()}
        )
        return ss, ct
