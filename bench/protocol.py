"""Protocol-core benchmark: each figure beside the floor measured in the same run.

    .venv/bin/python bench/protocol.py [N]            (or: make bench, which also runs the peer)

Prints microseconds per message (encrypt + decrypt, both sides) for
  burst     N messages one way: 200-byte text, header encryption and block padding included,
            no public-key operation;
  pingpong  N messages strictly alternating: a DH and an ML-KEM ratchet step every message;
  handshake the full PQXDH handshake, both sides, sealed first message included;
and beside each the floor: the summed median cost of exactly the primitives that step needs,
each measured here with pyca/cryptography directly and listed by name with its count.
The machine is shared and noisy: every figure is a median over several rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aegisd.core import pqxdh, wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session

ROUNDS = 7
TEXT = b"x" * 200


def _median_us(fn: Callable[[], object], number: int, rounds: int = ROUNDS) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples)


# --- the primitives, each measured on its own ---------------------------------------------------


def measure_primitives(n: int = 2000, rounds: int = ROUNDS) -> dict[str, float]:
    x_priv = X25519PrivateKey.generate()
    x_pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
    ed = Ed25519PrivateKey.generate()
    ed_pub = ed.public_key().public_bytes_raw()
    sig = ed.sign(b"m" * 100)
    kem = MLKEM768PrivateKey.generate()
    ek = kem.public_key().public_bytes_raw()
    _, ct = kem.public_key().encapsulate()
    key = os.urandom(32)
    gcm = AESGCM(key)
    nonce = os.urandom(12)
    header = os.urandom(wire.HEADER_LEN)
    header_ct = gcm.encrypt(nonce, header, b"a" * 133)
    body = bytes(wire.RATCHET_BODY_PT_LEN)
    body_ct = gcm.encrypt(nonce, body, b"a" * 2474)
    sealed = bytes(wire.FIRST_CONTACT_INNER_LEN)
    sealed_ct = gcm.encrypt(nonce, sealed, b"a" * 1133)
    bad_ct = bytes(len(header_ct))

    def hkdf96() -> bytes:
        return HKDF(hashes.SHA256(), 96, key, b"info").derive(key * 2)

    def header_decrypt_fail() -> None:
        with contextlib.suppress(Exception):
            gcm.decrypt(nonce, bad_ct, b"a" * 133)

    def median_us(fn: Callable[[], object], number: int) -> float:
        return _median_us(fn, number, rounds)

    return {
        "X25519 keygen+encode": median_us(
            lambda: X25519PrivateKey.generate().public_key().public_bytes_raw(), n
        ),
        "X25519 load+DH": median_us(
            lambda: x_priv.exchange(X25519PublicKey.from_public_bytes(x_pub)), n
        ),
        "Ed25519 load+verify": median_us(
            lambda: Ed25519PublicKey.from_public_bytes(ed_pub).verify(sig, b"m" * 100), n
        ),
        "ML-KEM-768 keygen+encode": median_us(
            lambda: MLKEM768PrivateKey.generate().public_key().public_bytes_raw(), n
        ),
        "ML-KEM-768 load+encaps": median_us(
            lambda: MLKEM768PublicKey.from_public_bytes(ek).encapsulate(), n
        ),
        "ML-KEM-768 decaps": median_us(lambda: kem.decapsulate(ct), n),
        "HKDF-SHA256": median_us(hkdf96, n),
        "HMAC-SHA256": median_us(lambda: hmac.digest(key, b"\x01", "sha256"), n * 5),
        "SHA-256 (1133 B)": median_us(lambda: hashlib.sha256(sealed[:1133]).digest(), n),
        "random 12 B": median_us(lambda: os.urandom(12), n * 5),
        "AES-GCM key setup": median_us(lambda: AESGCM(key), n * 5),
        "AES-GCM enc header": median_us(lambda: gcm.encrypt(nonce, header, b"a" * 133), n * 5),
        "AES-GCM dec header": median_us(lambda: gcm.decrypt(nonce, header_ct, b"a" * 133), n * 5),
        "AES-GCM failed trial": median_us(header_decrypt_fail, n * 5),
        "AES-GCM enc body": median_us(lambda: gcm.encrypt(nonce, body, b"a" * 2474), n * 5),
        "AES-GCM dec body": median_us(lambda: gcm.decrypt(nonce, body_ct, b"a" * 2474), n * 5),
        "AES-GCM enc sealed": median_us(lambda: gcm.encrypt(nonce, sealed, b"a" * 1133), n),
        "AES-GCM dec sealed": median_us(lambda: gcm.decrypt(nonce, sealed_ct, b"a" * 1133), n),
    }


# Exactly what each measured step needs, by name and count (docs/protocol.md explains each).
BURST_NEEDS = {
    "HMAC-SHA256": 4,  # KDF_CK on each side: chain key and message key
    "random 12 B": 2,  # header nonce, message id
    "AES-GCM key setup": 2,  # the one-time message key on each side
    "AES-GCM enc header": 1,
    "AES-GCM dec header": 1,
    "AES-GCM enc body": 1,
    "AES-GCM dec body": 1,
}
PINGPONG_NEEDS = {
    **BURST_NEEDS,
    "AES-GCM key setup": 3,  # + the next header key, tried after the current one fails
    "AES-GCM failed trial": 1,  # the current receiving header key does not open a new chain
    "X25519 keygen+encode": 1,
    "X25519 load+DH": 2,  # receiving step and sending step
    "ML-KEM-768 keygen+encode": 1,
    "ML-KEM-768 load+encaps": 1,
    "ML-KEM-768 decaps": 1,
    "HKDF-SHA256": 2,  # KDF_RK for the receiving and the sending chain
}
HANDSHAKE_NEEDS = {
    # initiator: bundle check, PQXDH, ratchet init, first message, seal
    # responder: PQXDH, unseal, identity check, ratchet step (receive + own sending step)
    "Ed25519 load+verify": 5,  # bundle: binding, SPK, last-resort, one-time KEM; sender
    "X25519 keygen+encode": 3,  # EK_A, Alice's ratchet key, Bob's ratchet key
    "X25519 load+DH": 11,  # DH1-4 on both sides, Alice's first ratchet DH, Bob's two
    "ML-KEM-768 keygen+encode": 2,  # Alice's ratchet KEM key, Bob's ratchet KEM key
    "ML-KEM-768 load+encaps": 2,  # to the one-time prekey; Bob's ratchet step to Alice's key
    "ML-KEM-768 decaps": 1,
    "HKDF-SHA256": 9,  # SK and seal key on each side (4), SK split (2), KDF_RK (1 + 2)
    "HMAC-SHA256": 4,
    "SHA-256 (1133 B)": 1,  # replay digest
    "random 12 B": 3,  # header nonce, two message ids
    "AES-GCM key setup": 8,  # seal x2, message key x2, Bob's trial NHK, header keys A:1 B:2
    "AES-GCM enc header": 1,
    "AES-GCM dec header": 1,
    "AES-GCM enc body": 1,
    "AES-GCM dec body": 1,
    "AES-GCM enc sealed": 1,
    "AES-GCM dec sealed": 1,
}


def floor_of(needs: dict[str, int], prims: dict[str, float]) -> float:
    return sum(prims[name] * count for name, count in needs.items())


def describe(needs: dict[str, int]) -> str:
    return ", ".join(f"{count}x {name}" for name, count in needs.items())


# --- the protocol -------------------------------------------------------------------------------


def open_sessions(entropy: SystemEntropy) -> tuple[Session, Session]:
    alice = IdentityKeyPair.generate(entropy)
    bob = IdentityKeyPair.generate(entropy)
    store = PrekeyStore.create(entropy, bob, 0)
    bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes(), expected=bob.public)
    sa, block = initiate_session(entropy, alice, bundle, TEXT)
    return sa, accept_first_contact(entropy, store, block).session


PEER = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "peer_doubleratchet.py"


def run_peer(n: int) -> tuple[float, float] | None:
    """One run of the peer `doubleratchet` package: (burst, ping-pong) microseconds."""
    if not PEER.exists():
        return None
    out = subprocess.run(
        [sys.executable, str(PEER), str(n)], capture_output=True, text=True, check=False
    )
    match = re.search(r"burst_us_per_msg=([\d.]+) pingpong_us_per_msg=([\d.]+)", out.stdout)
    if match is None:
        print("peer benchmark did not run (pip install doubleratchet):", out.stderr.strip()[-200:])
        return None
    return float(match.group(1)), float(match.group(2))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    entropy = SystemEntropy()
    sa, sb = open_sessions(entropy)

    def burst_one() -> None:
        (block,) = sa.encrypt(entropy, TEXT)
        sb.decrypt(entropy, block)

    turn = [0]

    def pingpong_one() -> None:
        a, b = (sa, sb) if turn[0] % 2 else (sb, sa)
        turn[0] += 1
        (block,) = a.encrypt(entropy, TEXT)
        b.decrypt(entropy, block)

    alice = IdentityKeyPair.generate(entropy)
    bob = IdentityKeyPair.generate(entropy)
    store = PrekeyStore.create(entropy, bob, 0)

    def handshake_us() -> float:
        xs, kems = store.generate_one_time(entropy, 1)  # publishing happens ahead of time
        base = store.bundle_base().to_bytes()
        t0 = time.perf_counter()
        bundle = pqxdh.verify_bundle(base, xs[0].to_bytes(), kems[0].to_bytes(), bob.public)
        _, block = initiate_session(entropy, alice, bundle, TEXT)
        accept_first_contact(entropy, store, block)
        return (time.perf_counter() - t0) * 1e6

    # The machine is shared and noisy: each round measures the primitives and then the protocol
    # steps right after, and the ratio is taken within the round; medians over the rounds.
    needs = {"burst": BURST_NEEDS, "pingpong": PINGPONG_NEEDS, "handshake": HANDSHAKE_NEEDS}
    values: dict[str, list[float]] = {k: [] for k in needs}
    floors: dict[str, list[float]] = {k: [] for k in needs}
    all_prims: list[dict[str, float]] = []
    per_round = max(n // ROUNDS, 50)
    peer_runs: list[tuple[float, float]] = []
    peer_ok = True
    for _ in range(ROUNDS):
        if peer_ok:  # the peer runs in the same round, so both see the same load
            result = run_peer(per_round)
            peer_ok = result is not None
            if result is not None:
                peer_runs.append(result)
        prims = measure_primitives(max(per_round // 2, 50), rounds=3)
        all_prims.append(prims)
        values["burst"].append(_median_us(burst_one, per_round, 3))
        values["pingpong"].append(_median_us(pingpong_one, max(per_round // 4, 20), 3))
        values["handshake"].append(statistics.median(handshake_us() for _ in range(15)))
        for k, need in needs.items():
            floors[k].append(floor_of(need, prims))

    print(f"AegisLink protocol core, block {wire.BLOCK_SIZE} B, text {len(TEXT)} B, N={n}")
    med_prims = {k: statistics.median(p[k] for p in all_prims) for k in all_prims[0]}
    print("primitive medians (us): " + ", ".join(f"{k} {v:.2f}" for k, v in med_prims.items()))
    for k, need in needs.items():
        value = statistics.median(values[k])
        fl = statistics.median(floors[k])
        ratio = statistics.median(v / f for v, f in zip(values[k], floors[k], strict=True))
        print(
            f"{k:9s} {value:8.1f} us   floor {fl:8.1f} us   ratio {ratio:5.2f}x (median of rounds)"
        )
        print(f"          floor = {describe(need)}")
    if peer_runs:
        speedups = [p[0] / b for p, b in zip(peer_runs, values["burst"], strict=False)]
        print(
            "peer doubleratchet (no PQ step, no header encryption), same rounds: burst "
            f"{statistics.median(p[0] for p in peer_runs):.1f} us, pingpong "
            f"{statistics.median(p[1] for p in peer_runs):.1f} us"
        )
        print(
            f"burst speed-up over the peer: {statistics.median(speedups):.2f}x "
            "(median of per-round ratios; target >= 4x)"
        )


if __name__ == "__main__":
    main()
