"""Tampering, replay, forward secrecy and post-compromise recovery."""

from __future__ import annotations

import pytest

from aegisd.core import pqxdh, wire
from aegisd.core import primitives as p
from aegisd.core.errors import BundleError, DecodeError, DecryptionError
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import RETIREMENT_GRACE, ROTATION_PERIOD, PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session
from tests.support.parties import NOW, bob_with_store, make_pair


def flipped(block: bytes, i: int) -> bytes:
    return block[:i] + bytes((block[i] ^ 0x01,)) + block[i + 1 :]


def test_every_byte_of_a_ratchet_block_is_authenticated() -> None:
    """A block that carries a PQ ratchet step (DH key, ML-KEM key and ciphertext in its
    encrypted header): flipping any one of its bytes is rejected and changes no state."""
    pair = make_pair()
    (block,) = pair.b.encrypt(pair.entropy, b"a ratchet step from Bob")  # new chain: KEM ct
    before = pair.a.to_bytes()
    for i in range(wire.BLOCK_SIZE):
        with pytest.raises(DecryptionError):
            pair.a.decrypt(pair.entropy, flipped(block, i))
    assert pair.a.to_bytes() == before
    assert pair.a.decrypt(pair.entropy, block).data == b"a ratchet step from Bob"


def test_tampered_in_chain_block_rejected() -> None:
    pair = make_pair()
    pair.b.encrypt(pair.entropy, b"one")  # advance Bob's chain; this block is dropped
    (block,) = pair.b.encrypt(pair.entropy, b"two")
    before = pair.a.to_bytes()
    for i in list(range(0, wire.ENC_HEADER_LEN + 1)) + list(
        range(wire.ENC_HEADER_LEN + 1, wire.BLOCK_SIZE, 97)
    ):
        with pytest.raises(DecryptionError):
            pair.a.decrypt(pair.entropy, flipped(block, i))
    assert pair.a.to_bytes() == before
    assert pair.a.decrypt(pair.entropy, block).data == b"two"


def _first_contact(
    one_time: bool = True,
) -> tuple[SystemEntropy, IdentityKeyPair, PrekeyStore, bytes]:
    entropy = SystemEntropy()
    alice = IdentityKeyPair.generate(entropy)
    _bob, store, xs, kems = bob_with_store(entropy)
    bundle = pqxdh.verify_bundle(
        store.bundle_base().to_bytes(), xs[0] if one_time else None, kems[0] if one_time else None
    )
    _, block = initiate_session(entropy, alice, bundle, b"hi")
    return entropy, alice, store, block


def test_every_region_of_a_first_contact_block_is_authenticated() -> None:
    entropy, _, store, block = _first_contact()
    before = store.to_bytes()
    inner = wire.FIRST_CONTACT_PREFIX_LEN
    positions = (
        list(range(inner))  # version, ephemeral key, prekey ids, KEM ciphertext
        + list(range(inner, inner + wire.IDENTITY_LEN + 64))  # sealed identity and signature
        + list(range(inner + wire.IDENTITY_LEN + 64, wire.BLOCK_SIZE, 61))  # ratchet message
        + [wire.BLOCK_SIZE - 1]
    )
    for i in positions:
        with pytest.raises(DecryptionError):
            accept_first_contact(entropy, store, flipped(block, i))
    assert store.to_bytes() == before
    assert accept_first_contact(entropy, store, block).fragment.data == b"hi"


def test_forged_sender_binding_signature_rejected() -> None:
    """Re-seal a first contact whose sealed identity has a broken binding signature (the seal
    key is known here because the test plays the sender): the responder refuses it."""
    entropy = SystemEntropy()
    alice = IdentityKeyPair.generate(entropy)
    _bob, store, xs, kems = bob_with_store(entropy)
    bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes(), xs[0], kems[0])
    keys = pqxdh.initiate(entropy, alice, bundle)
    prefix = keys.prefix.to_bytes()
    identity = bytearray(alice.public.to_bytes())
    identity[-1] ^= 1  # last byte of the binding signature
    filler = bytes(wire.FIRST_CONTACT_INNER_LEN - wire.IDENTITY_LEN)
    block = prefix + p.seal_once(keys.seal_key, bytes(identity) + filler, prefix)
    before = store.to_bytes()
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)
    assert store.to_bytes() == before


def test_bundle_bytes_are_all_covered_by_signatures() -> None:
    entropy = SystemEntropy()
    bob, store, xs, kems = bob_with_store(entropy)
    base = store.bundle_base().to_bytes()
    assert pqxdh.verify_bundle(base, xs[0], kems[0], bob.public)
    for i in range(len(base)):
        with pytest.raises((DecodeError, BundleError)):
            pqxdh.verify_bundle(flipped(base, i), xs[0], kems[0], bob.public)
    for i in range(len(kems[0])):
        with pytest.raises((DecodeError, BundleError)):
            pqxdh.verify_bundle(base, xs[0], flipped(kems[0], i), bob.public)


def test_bundle_of_someone_else_rejected() -> None:
    entropy = SystemEntropy()
    bob, _store, _, _ = bob_with_store(entropy)
    mallory = IdentityKeyPair.generate(entropy)
    mallory_store = PrekeyStore.create(entropy, mallory, NOW)
    with pytest.raises(BundleError):
        pqxdh.verify_bundle(mallory_store.bundle_base().to_bytes(), expected=bob.public)


@pytest.mark.parametrize("one_time", [True, False])
def test_first_contact_replay_rejected(one_time: bool) -> None:
    entropy, _, store, block = _first_contact(one_time)
    accept_first_contact(entropy, store, block)
    before = store.to_bytes()
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)
    assert store.to_bytes() == before
    # The replay cache (or the burnt one-time keys) survive a restart.
    restored = PrekeyStore.from_bytes(store.to_bytes())
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, restored, block)


def test_last_resort_replay_cache_lives_until_the_key_retires() -> None:
    entropy, _, store, block = _first_contact(one_time=False)
    lrk_id = store.current_last_resort().prekey_id
    accept_first_contact(entropy, store, block)
    assert len(store.replay_cache[lrk_id]) == 1
    assert store.rotate(entropy, NOW + ROTATION_PERIOD)  # replaced, still accepted for a while
    assert lrk_id in store.last_resort and store.replay_cache[lrk_id]
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)
    store.rotate(entropy, NOW + ROTATION_PERIOD + RETIREMENT_GRACE)
    assert lrk_id not in store.last_resort and lrk_id not in store.replay_cache
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)


def test_delayed_first_contact_opens_during_grace_only() -> None:
    entropy, _, store, block = _first_contact(one_time=False)
    store.rotate(entropy, NOW + ROTATION_PERIOD)
    grace_copy = PrekeyStore.from_bytes(store.to_bytes())
    assert accept_first_contact(entropy, grace_copy, block).fragment.data == b"hi"
    store.rotate(entropy, NOW + ROTATION_PERIOD + RETIREMENT_GRACE)
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)


def test_forward_secrecy() -> None:
    """A state captured later cannot open messages it already received."""
    pair = make_pair()
    old = [pair.a.encrypt(pair.entropy, f"m{i}".encode())[0] for i in range(3)]
    for block in old:
        pair.b.decrypt(pair.entropy, block)
    (reply,) = pair.b.encrypt(pair.entropy, b"reply")
    pair.a.decrypt(pair.entropy, reply)
    stolen = Session.from_bytes(pair.b.to_bytes())
    for block in old:
        with pytest.raises(DecryptionError):
            stolen.decrypt(pair.entropy, block)


def test_post_compromise_recovery() -> None:
    """A copied state keeps decrypting the current chain, and stops once both sides stepped."""
    pair = make_pair()
    (warmup,) = pair.b.encrypt(pair.entropy, b"warm-up")
    pair.a.decrypt(pair.entropy, warmup)
    stolen = Session.from_bytes(pair.b.to_bytes())  # attacker copies Bob's whole state
    (same_chain,) = pair.a.encrypt(pair.entropy, b"still readable")
    assert stolen.decrypt(pair.entropy, same_chain).data == b"still readable"
    pair.b.decrypt(pair.entropy, same_chain)
    # Bob steps (fresh DH and ML-KEM keys), then Alice steps in answer.
    (b_step,) = pair.b.encrypt(pair.entropy, b"bob steps")
    pair.a.decrypt(pair.entropy, b_step)
    (a_step,) = pair.a.encrypt(pair.entropy, b"healed")
    with pytest.raises(DecryptionError):
        stolen.decrypt(pair.entropy, a_step)
    assert pair.b.decrypt(pair.entropy, a_step).data == b"healed"


def test_kem_secret_enters_the_root_key() -> None:
    """The PQ step is real: with a correct DH but the wrong ML-KEM secret, Bob cannot open
    Alice's next chain. (Simulated by swapping Bob's ML-KEM decapsulation key.)"""
    pair = make_pair()
    (b_step,) = pair.b.encrypt(pair.entropy, b"bob steps")
    pair.a.decrypt(pair.entropy, b_step)
    (a_step,) = pair.a.encrypt(pair.entropy, b"needs the KEM secret")
    pair.b.ratchet.kem_self = pair.entropy.mlkem_private()  # wrong decapsulation key
    with pytest.raises(DecryptionError):
        pair.b.decrypt(pair.entropy, a_step)


def test_skipped_messages_and_bound() -> None:
    from aegisd.core.ratchet import MAX_SKIP

    pair = make_pair()
    blocks = [pair.a.encrypt(pair.entropy, f"{i}".encode())[0] for i in range(MAX_SKIP + 2)]
    before = pair.b.to_bytes()
    with pytest.raises(DecryptionError):
        pair.b.decrypt(pair.entropy, blocks[-1])  # would skip MAX_SKIP + 1 keys
    assert pair.b.to_bytes() == before
    assert pair.b.decrypt(pair.entropy, blocks[MAX_SKIP]).data == str(MAX_SKIP).encode()
    assert pair.b.decrypt(pair.entropy, blocks[0]).data == b"0"  # a skipped key
    with pytest.raises(DecryptionError):
        pair.b.decrypt(pair.entropy, blocks[0])  # used once only


def test_sizes_and_one_look() -> None:
    pair = make_pair()
    assert len(pair.first_block) == wire.BLOCK_SIZE
    blocks = pair.a.encrypt(pair.entropy, b"z" * (3 * wire.RATCHET_CAPACITY + 5))
    assert len(blocks) == 4
    assert {len(b) for b in blocks} == {wire.BLOCK_SIZE}
    assert {b[0] for b in [*blocks, pair.first_block]} == {wire.VERSION}


def test_all_zero_dh_rejected() -> None:
    entropy = SystemEntropy()
    with pytest.raises(DecryptionError):
        p.dh(entropy.x25519_private(), bytes(32))  # the neutral point: all-zero output
    _, _, store, block = _first_contact()
    zero_ephemeral = block[:1] + bytes(32) + block[33:]
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, zero_ephemeral)


def test_total_skipped_keys_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from aegisd.core import ratchet

    monkeypatch.setattr(ratchet, "MAX_SKIPPED_TOTAL", 10)
    pair = make_pair()
    blocks = [pair.a.encrypt(pair.entropy, f"{i}".encode())[0] for i in range(16)]
    pair.b.decrypt(pair.entropy, blocks[15])  # skips the 15 keys before it; the newest 10 stay
    assert sum(len(v) for v in pair.b.ratchet.skipped.values()) == 10
    with pytest.raises(DecryptionError):
        pair.b.decrypt(pair.entropy, blocks[1])  # evicted (oldest)
    assert pair.b.decrypt(pair.entropy, blocks[14]).data == b"14"


def test_store_without_a_current_key_rejected() -> None:
    _, _, store, _ = _first_contact()
    for k in store.signed.values():
        k.replaced = NOW
    with pytest.raises(DecodeError):
        PrekeyStore.from_bytes(store.to_bytes())


def test_skipped_keys_per_chain_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from aegisd.core import ratchet

    monkeypatch.setattr(ratchet, "MAX_SKIP", 5)
    pair = make_pair()
    blocks = [pair.a.encrypt(pair.entropy, f"{i}".encode())[0] for i in range(12)]
    pair.b.decrypt(pair.entropy, blocks[5])  # skips n=1..5 (5 keys)
    pair.b.decrypt(pair.entropy, blocks[10])  # skips 5 more: the chain keeps the newest 5
    (chain,) = pair.b.ratchet.skipped.values()
    assert len(chain) == 5
    with pytest.raises(DecryptionError):
        pair.b.decrypt(pair.entropy, blocks[0])
    assert pair.b.decrypt(pair.entropy, blocks[9]).data == b"9"


def test_first_contact_with_several_fragments_rejected() -> None:
    """The initiator always sends one fragment; a sealed block claiming more is refused."""
    entropy = SystemEntropy()
    alice = IdentityKeyPair.generate(entropy)
    _bob, store, xs, kems = bob_with_store(entropy)
    bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes(), xs[0], kems[0])
    keys = pqxdh.initiate(entropy, alice, bundle)
    from aegisd.core.ratchet import Ratchet

    ratchet = Ratchet.init_initiator(entropy, keys.sk, bundle.spk_pub)
    body = wire.Fragment(b"m" * 8, 0, 2, b"half").to_body(wire.FIRST_CONTACT_BODY_PT_LEN)
    message = ratchet.encrypt(entropy, body, keys.ad + b"\x01")
    prefix = keys.prefix.to_bytes()
    block = prefix + p.seal_once(keys.seal_key, alice.public.to_bytes() + message, prefix)
    with pytest.raises(DecryptionError):
        accept_first_contact(entropy, store, block)


def test_unusable_bundle_key_is_a_bundle_error() -> None:
    entropy = SystemEntropy()
    _bob, store, _, _ = bob_with_store(entropy)
    bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes())
    broken = pqxdh.VerifiedBundle(**{**bundle.__dict__, "spk_pub": bytes(32)})
    with pytest.raises(BundleError):
        initiate_session(entropy, IdentityKeyPair.generate(entropy), broken, b"x")
