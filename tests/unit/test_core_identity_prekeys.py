"""Identities, safety numbers, addresses, prekey generation, rotation and persistence."""

from __future__ import annotations

import pytest

from aegisd.core import pqxdh, wire
from aegisd.core.errors import BundleError, DecodeError
from aegisd.core.identity import (
    ADDRESS_LEN,
    IdentityKeyPair,
    PublicIdentity,
    format_safety_number,
    new_address,
    safety_number,
)
from aegisd.core.prekeys import RETIREMENT_GRACE, ROTATION_PERIOD, PrekeyStore
from aegisd.core.primitives import SystemEntropy
from tests.support.entropy import DeterministicEntropy
from tests.support.parties import NOW

E = SystemEntropy()


def test_identity_keys_are_independent_and_bound() -> None:
    ident = IdentityKeyPair.generate(DeterministicEntropy(b"seed"))
    pub = ident.public
    assert pub.ed_pub != pub.x_pub
    assert PublicIdentity.from_bytes(pub.to_bytes()) == pub
    other = IdentityKeyPair.generate(E).public
    # Pairing someone else's X25519 key with this Ed25519 key fails the binding signature.
    spliced = wire.IdentityRecord(pub.ed_pub, other.x_pub, pub.binding_sig)
    with pytest.raises(BundleError):
        PublicIdentity.from_record(spliced)
    assert "private" in repr(ident) and pub.ed_pub.hex() not in repr(ident)


def test_safety_number_symmetric_and_covers_all_four_keys() -> None:
    a, b = IdentityKeyPair.generate(E).public, IdentityKeyPair.generate(E).public
    number = safety_number(a, b)
    assert number == safety_number(b, a)
    assert len(number) == 60 and number.isdigit()
    c = IdentityKeyPair.generate(E).public
    variants = [
        PublicIdentity(c.ed_pub, a.x_pub, a.binding_sig),  # other Ed25519 key
        PublicIdentity(a.ed_pub, c.x_pub, a.binding_sig),  # other X25519 key
    ]
    for v in variants:
        assert safety_number(v, b) != number
        assert safety_number(a, PublicIdentity(v.ed_pub, v.x_pub, v.binding_sig)) != number
    formatted = format_safety_number(number)
    assert formatted.replace(" ", "").replace("\n", "") == number
    assert len(formatted.splitlines()) == 3
    with pytest.raises(DecodeError):
        format_safety_number("123")


def test_address_is_random_and_unrelated_to_keys() -> None:
    a1, a2 = new_address(E), new_address(E)
    assert len(a1) == ADDRESS_LEN and a1 != a2
    d = DeterministicEntropy(b"x")
    ident = IdentityKeyPair.generate(d)
    address = new_address(d)
    assert address not in ident.public.to_bytes()


def test_one_time_prekeys_are_signed_and_unique() -> None:
    ident = IdentityKeyPair.generate(E)
    store = PrekeyStore.create(E, ident, NOW)
    xs, kems = store.generate_one_time(E, 20)
    ids = {x.prekey_id for x in xs} | {k.prekey_id for k in kems}
    assert len(ids) == 40 and 0 not in ids
    base = store.bundle_base().to_bytes()
    for x, k in zip(xs, kems, strict=True):
        b = pqxdh.verify_bundle(base, x.to_bytes(), k.to_bytes(), ident.public)
        assert b.pqpk_one_time and b.opk_id == x.prekey_id and b.pqpk_id == k.prekey_id


def test_rotation_and_retirement() -> None:
    ident = IdentityKeyPair.generate(E)
    store = PrekeyStore.create(E, ident, NOW)
    spk, lrk = store.current_signed().prekey_id, store.current_last_resort().prekey_id
    assert not store.rotate(E, NOW + ROTATION_PERIOD - 1)
    assert store.rotate(E, NOW + ROTATION_PERIOD)
    assert store.current_signed().prekey_id != spk
    assert store.current_last_resort().prekey_id != lrk
    assert spk in store.signed and lrk in store.last_resort  # grace period
    store.rotate(E, NOW + ROTATION_PERIOD + RETIREMENT_GRACE)
    assert spk not in store.signed and lrk not in store.last_resort


def test_store_round_trip() -> None:
    ident = IdentityKeyPair.generate(E)
    store = PrekeyStore.create(E, ident, NOW)
    store.generate_one_time(E, 3)
    data = store.to_bytes()
    again = PrekeyStore.from_bytes(data)
    assert again.to_bytes() == data
    assert again.identity.public == ident.public
    assert ident.raw_private()[0].hex() not in repr(again)


def test_prekey_store_record_is_canonical() -> None:
    """docs/protocol.md §13.3: one replay-cache entry per last-resort key, in the order of the
    last-resort list; digests strictly ascending; no prekey ID twice. The parser refuses any
    other layout, so a stored store has exactly one encoding (and re-encodes to the same bytes)."""
    entropy = DeterministicEntropy(b"canonical store")
    store = PrekeyStore.create(entropy, IdentityKeyPair.generate(entropy), NOW)
    store.rotate(entropy, NOW + ROTATION_PERIOD)  # two last-resort keys
    store.generate_one_time(entropy, 2)
    lrk = list(store.last_resort)
    store.replay_cache[lrk[0]] = {b"\x02" * 32, b"\x01" * 32}
    good = store.to_bytes()
    assert PrekeyStore.from_bytes(good).to_bytes() == good
    rec = wire.PrekeyStoreRecord.from_bytes(good)
    assert list(rec.replay_cache) == lrk and rec.replay_cache[lrk[1]] == []

    def variant(**changes: object) -> bytes:
        fields = {**rec.__dict__, **changes}
        return wire.PrekeyStoreRecord(**fields).to_bytes()  # type: ignore[arg-type]

    digests = rec.replay_cache[lrk[0]]
    bad = {
        "an entry missing": {lrk[0]: digests},
        "entries out of order": {lrk[1]: [], lrk[0]: digests},
        "an entry for no key": {**rec.replay_cache, 7: []},
        "digests not ascending": {lrk[0]: digests[::-1], lrk[1]: []},
        "a digest twice": {lrk[0]: [digests[0], digests[0]], lrk[1]: []},
    }
    for why, cache in bad.items():
        with pytest.raises(DecodeError):
            wire.PrekeyStoreRecord.from_bytes(variant(replay_cache=cache))
            pytest.fail(why)
    # The same replay-cache entry written twice (the count says three entries).
    twice = variant(replay_cache={lrk[0]: digests, lrk[1]: []})
    count_at = twice.index((2).to_bytes(4, "big") + lrk[0].to_bytes(4, "big"))
    entry = lrk[1].to_bytes(4, "big") + bytes(4)
    dup = twice[:count_at] + (3).to_bytes(4, "big") + twice[count_at + 4 :] + entry
    with pytest.raises(DecodeError):
        wire.PrekeyStoreRecord.from_bytes(dup)
    # A prekey ID used twice, within a kind or across kinds.
    x = rec.one_time_x25519
    with pytest.raises(DecodeError):
        wire.PrekeyStoreRecord.from_bytes(variant(one_time_x25519=[x[0], x[0]]))
    with pytest.raises(DecodeError):
        wire.PrekeyStoreRecord.from_bytes(
            variant(one_time_x25519=[(rec.signed[0].prekey_id, x[0][1]), x[1]])
        )


def test_one_time_keys_kept_are_bounded_oldest_first_after_a_grace() -> None:
    """Issue 15 review, finding 3: anyone holding the address link makes the daemon publish
    (and keep) new one-time keys for ever. Past the newest `keep` of a kind, the oldest go, once
    older than `grace`; the order survives the store's record (the relay hands out oldest
    first, so the newest are the ones it may still hold)."""
    store = PrekeyStore.create(E, IdentityKeyPair.generate(E), NOW)
    batches = [store.generate_one_time(E, 10, NOW + i * 100) for i in range(5)]
    store = PrekeyStore.from_bytes(store.to_bytes())
    # All within the grace: nothing goes, however many.
    assert store.prune_one_time(NOW + 450, keep=20, grace=1000) == 0
    assert len(store.one_time_mlkem) == len(store.one_time_x25519) == 50
    # Past the grace for the first three batches: the oldest go, down to `keep` per kind.
    assert store.prune_one_time(NOW + 1250, keep=20, grace=1000) == 60
    newest = [k.prekey_id for k in batches[3][1] + batches[4][1]]
    assert list(store.one_time_mlkem) == newest
    assert list(store.one_time_x25519) == [x.prekey_id for x in batches[3][0] + batches[4][0]]
    # Within the grace, the bound waits: a first contact made with a key handed out less than
    # `grace` ago still finds it.
    store.generate_one_time(E, 10, NOW + 1260)
    assert store.prune_one_time(NOW + 1290, keep=20, grace=1000) == 0
    assert len(store.one_time_mlkem) == 30
