"""The known-answer scenario behind tests/vectors/protocol_v1.json. TEST-ONLY keys.

Run `python -m tests.vectors.scenario` from the repository root to regenerate the file (only when
the protocol changes on purpose; the version byte must change with it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aegisd.core import pqxdh
from aegisd.core.identity import IdentityKeyPair, safety_number
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.session import accept_first_contact, initiate_session
from tests.support.entropy import DeterministicEntropy

VECTOR_FILE = Path(__file__).with_name("protocol_v1.json")
SEED = b"AegisLink test vector seed v1 -- public, test-only"
NOW = 1_700_000_000
LABEL = "TEST VECTORS ONLY: every key here derives from a public fixed seed. Never use them."
STEPS = [
    ("bob", b"reply one (bob steps the ratchet: DH + ML-KEM)"),
    ("bob", b"reply two (same chain)"),
    ("alice", b"alice answers (PQ ratchet step)"),
    ("alice", b""),
    ("bob", b"bob again"),
]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def run_scenario(entropy: DeterministicEntropy) -> dict[str, Any]:
    alice = IdentityKeyPair.generate(entropy)
    bob = IdentityKeyPair.generate(entropy)
    store = PrekeyStore.create(entropy, bob, NOW)
    xs, kems = store.generate_one_time(entropy, 2)
    base = store.bundle_base().to_bytes()
    bundle = pqxdh.verify_bundle(base, xs[0].to_bytes(), kems[0].to_bytes(), bob.public)
    first = b"first contact from alice"
    alice_session, fc_block = initiate_session(entropy, alice, bundle, first)
    fc = accept_first_contact(entropy, store, fc_block)
    if fc.fragment.data != first:
        raise AssertionError("first contact did not round-trip")
    bob_session = fc.session
    bob_after_handshake = bob_session.to_bytes()
    messages = []
    for who, text in STEPS:
        sender, receiver = (
            (alice_session, bob_session) if who == "alice" else (bob_session, alice_session)
        )
        (block,) = sender.encrypt(entropy, text)
        if receiver.decrypt(entropy, block).data != text:
            raise AssertionError("message did not round-trip")
        messages.append({"from": who, "content": text.hex(), "block": block.hex()})
    return {
        "label": LABEL,
        "seed": SEED.hex(),
        "now": NOW,
        "alice_identity": alice.public.to_bytes().hex(),
        "bob_identity": bob.public.to_bytes().hex(),
        "safety_number": safety_number(alice.public, bob.public),
        "bundle_base": base.hex(),
        "one_time_x25519": xs[0].to_bytes().hex(),
        "one_time_mlkem": kems[0].to_bytes().hex(),
        "associated_data": alice_session.ad.hex(),
        "first_contact_content": first.hex(),
        "first_contact_block": fc_block.hex(),
        "bob_session_after_handshake": bob_after_handshake.hex(),
        "messages": messages,
        "alice_session_final_sha256": _sha(alice_session.to_bytes()),
        "bob_session_final_sha256": _sha(bob_session.to_bytes()),
        "bob_prekey_store_final_sha256": _sha(store.to_bytes()),
        "encapsulations": entropy.recorded,
    }


def main() -> None:
    vectors = run_scenario(DeterministicEntropy(SEED))
    VECTOR_FILE.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {VECTOR_FILE}")


if __name__ == "__main__":
    main()
