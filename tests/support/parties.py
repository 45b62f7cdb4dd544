"""Two parties with an established session, for core tests."""

from __future__ import annotations

from dataclasses import dataclass

from aegisd.core import pqxdh
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import Entropy, SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session

NOW = 1_700_000_000


@dataclass
class Pair:
    entropy: Entropy
    alice: IdentityKeyPair
    bob: IdentityKeyPair
    store: PrekeyStore
    a: Session
    b: Session
    first_block: bytes


def bob_with_store(
    entropy: Entropy, one_time: int = 2
) -> tuple[IdentityKeyPair, PrekeyStore, list[bytes], list[bytes]]:
    bob = IdentityKeyPair.generate(entropy)
    store = PrekeyStore.create(entropy, bob, NOW)
    xs, kems = store.generate_one_time(entropy, one_time)
    return bob, store, [x.to_bytes() for x in xs], [k.to_bytes() for k in kems]


def make_pair(entropy: Entropy | None = None, one_time: bool = True) -> Pair:
    entropy = entropy or SystemEntropy()
    alice = IdentityKeyPair.generate(entropy)
    bob, store, xs, kems = bob_with_store(entropy)
    bundle = pqxdh.verify_bundle(
        store.bundle_base().to_bytes(),
        xs[0] if one_time else None,
        kems[0] if one_time else None,
        bob.public,
    )
    a, block = initiate_session(entropy, alice, bundle, b"hello")
    fc = accept_first_contact(entropy, store, block)
    return Pair(entropy, alice, bob, store, a, fc.session, block)
