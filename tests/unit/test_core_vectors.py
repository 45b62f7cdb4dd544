"""Known-answer vectors (tests/vectors/protocol_v1.json, test-only keys) replayed byte for byte."""

from __future__ import annotations

import json

import pytest

from aegisd.core import wire
from aegisd.core.errors import DecryptionError
from aegisd.core.session import Session
from tests.support.entropy import DeterministicEntropy
from tests.vectors.scenario import SEED, VECTOR_FILE, run_scenario


def load() -> dict:
    return json.loads(VECTOR_FILE.read_text())


def test_vectors_replay_byte_for_byte() -> None:
    vectors = load()
    assert bytes.fromhex(vectors["seed"]) == SEED
    replayed = run_scenario(DeterministicEntropy(SEED, replay=vectors["encapsulations"]))
    for key, expected in vectors.items():
        assert replayed[key] == expected, key


def test_vector_blocks_have_the_one_size_and_version() -> None:
    vectors = load()
    blocks = [vectors["first_contact_block"]] + [m["block"] for m in vectors["messages"]]
    for hex_block in blocks:
        block = bytes.fromhex(hex_block)
        assert len(block) == wire.BLOCK_SIZE
        assert block[0] == wire.VERSION


def test_vector_messages_open_from_stored_session() -> None:
    """Bob's stored post-handshake state (vector bytes) opens Alice's later recorded messages,
    and refuses Bob's own outgoing ones."""
    vectors = load()
    bob = Session.from_bytes(bytes.fromhex(vectors["bob_session_after_handshake"]))
    entropy = DeterministicEntropy(b"another stream: only Bob's next sending keys depend on it")
    with pytest.raises(DecryptionError):
        bob.decrypt(entropy, bytes.fromhex(vectors["messages"][0]["block"]))
    from_alice = [m for m in vectors["messages"] if m["from"] == "alice"]
    assert from_alice
    for m in from_alice:
        fragment = bob.decrypt(entropy, bytes.fromhex(m["block"]))
        assert fragment.data == bytes.fromhex(m["content"])
