"""Sync payloads between one's own devices (aegisd/core/sync.py, docs/protocol.md §28.6), and
a sync session's first contact: a device hello bound to the session's EK_A.pub, between two
holders of the same identity."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.core import devices as dv
from aegisd.core import pqxdh, wire
from aegisd.core import sync as sy
from aegisd.core.errors import DecodeError, UnsupportedVersion
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.session import accept_first_contact, initiate_session
from tests.support.entropy import DeterministicEntropy

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RNG = DeterministicEntropy(b"sync")
IDENTITY = IdentityKeyPair.generate(RNG)
CONTACT = IdentityKeyPair.generate(DeterministicEntropy(b"contact")).public.to_bytes()
SENT = sy.SentTranscript(CONTACT, bytes(range(16)), 1_700_000_000_000, "héllo")
READ = sy.ReadUpTo(CONTACT, bytes(16))
ITEM = sy.ContactItem(CONTACT, 1_700_000_000_123, bytes(range(16)), "Bob ☕", True, False, False)
CAP = sy.MailboxCap("ws://127.0.0.1:1/v1/ws", bytes(range(16)), bytes(range(32)))
KEYS = sy.DeleteKeys((CAP, sy.MailboxCap("wss://r.example/v1/ws", b"o" * 16, b"k" * 32)),
                     (b"r" * 16,), 2**64 - 1)  # fmt: skip


def test_sync_payloads_round_trip_with_their_numbers() -> None:
    gone = sy.ContactItem(CONTACT, 1, bytes(16), "", False, True, True)
    for payload, kind in ((SENT, 0x44), (READ, 0x45), (ITEM, 0x46), (gone, 0x46), (KEYS, 0x47),
                          (sy.DeleteKeys((), ()), 0x47)):  # fmt: skip
        data = sy.encode_sync_payload(payload)
        assert data[:2] == bytes([1, kind])
        assert wire.is_sync_payload(data) and not wire.is_device_payload(data)
        assert sy.decode_sync_payload(data) == payload
        with pytest.raises(DecodeError):  # no other parser takes them
            wire.decode_payload(data)
        with pytest.raises(DecodeError):
            dv.decode_device_payload(data)
    empty = sy.SentTranscript(CONTACT, bytes(16), 0, "")
    assert sy.decode_sync_payload(sy.encode_sync_payload(empty)) == empty


def test_sync_payloads_are_parsed_strictly() -> None:
    read = sy.encode_sync_payload(READ)
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(read + b"\x00")
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(read[:-1])
    with pytest.raises(UnsupportedVersion):
        sy.decode_sync_payload(b"\x02" + read[1:])
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(bytes([1, 0x48]) + read[2:])
    item = sy.encode_sync_payload(ITEM)
    flags_at = 2 + wire.IDENTITY_LEN + 8 + 16
    assert item[flags_at] == 1
    with pytest.raises(DecodeError):  # an unknown flag
        sy.decode_sync_payload(item[:flags_at] + b"\x08" + item[flags_at + 1 :])
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(item + b"\x00")
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(item[:-1])
    long_name = item[: flags_at + 1] + (sy.MAX_NAME_BYTES + 1).to_bytes(2, "big")
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(long_name + b"a" * (sy.MAX_NAME_BYTES + 1))
    sent = sy.encode_sync_payload(SENT)
    with pytest.raises(DecodeError):  # not UTF-8
        sy.decode_sync_payload(sent + b"\xff")
    with pytest.raises(DecodeError):  # shorter than its fixed fields
        sy.decode_sync_payload(sent[: 2 + wire.IDENTITY_LEN + 16 + 7])
    too_long = sy.encode_sync_payload(sy.SentTranscript(CONTACT, bytes(16), 0, "a")) + bytes(
        wire.MAX_TEXT_BYTES
    )
    with pytest.raises(DecodeError):
        sy.decode_sync_payload(too_long)
    with pytest.raises(ValueError):
        sy.encode_sync_payload(sy.SentTranscript(CONTACT, bytes(16), 0, "a" * 70_000))


def test_delete_keys_are_parsed_strictly() -> None:
    keys = sy.encode_sync_payload(KEYS)
    assert keys[2:4] == b"\x00\x02"
    for cut in (keys + b"\x00", keys[:-1]):
        with pytest.raises(DecodeError):
            sy.decode_sync_payload(cut)
    head = bytes([1, 0x47])
    over = sy.MAX_CAPS_PER_PAYLOAD + 1
    with pytest.raises(DecodeError):  # more capabilities than a payload may carry
        sy.decode_sync_payload(head + over.to_bytes(2, "big") + bytes(over * 60))
    with pytest.raises(DecodeError):  # more removed owner IDs than a payload may carry
        sy.decode_sync_payload(head + bytes(2) + over.to_bytes(2, "big") + bytes(over * 16))
    for size in (0, sy.MAX_CAP_URL_BYTES + 1):  # an empty or too long URL
        bad = head + b"\x00\x01" + size.to_bytes(2, "big") + b"a" * size + bytes(48 + 2)
        with pytest.raises(DecodeError):
            sy.decode_sync_payload(bad)
    with pytest.raises(DecodeError):  # not UTF-8
        sy.decode_sync_payload(head + b"\x00\x01\x00\x01\xff" + bytes(48 + 2))
    assert "0001" not in repr(CAP) and "hidden" in repr(CAP)
    with pytest.raises(ValueError):
        sy.encode_sync_payload(sy.DeleteKeys((CAP,) * over, ()))
    with pytest.raises(ValueError):
        sy.encode_sync_payload(sy.DeleteKeys((sy.MailboxCap("", bytes(16), bytes(32)),), ()))


@pytest.mark.parametrize("sample", [SENT, READ, ITEM, KEYS])
@FUZZ
@given(data=st.data())
def test_mutated_sync_payloads_raise_only_decode_error(
    sample: sy.SyncPayload, data: st.DataObject
) -> None:
    mutated = bytearray(sy.encode_sync_payload(sample))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with contextlib.suppress(DecodeError):
        sy.decode_sync_payload(bytes(mutated[:cut]) + data.draw(st.binary(max_size=32)))


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for prefix in (b"", bytes([1, 0x44]), bytes([1, 0x45]), bytes([1, 0x46]), bytes([1, 0x47]),
                   bytes([1, 0x47, 0, 1, 0, 5])):  # fmt: skip
        with contextlib.suppress(DecodeError):
            sy.decode_sync_payload(prefix + data)


def test_a_sync_session_hello_binds_the_sessions_ek() -> None:
    """Two devices of one identity: the opener's hello, made from EK_A.pub, checks at the
    other against their list; in another session's place it does not."""
    (key_a, pub_a), (_key_b, pub_b) = dv.new_device_key(RNG), dv.new_device_key(RNG)
    store = PrekeyStore.create(RNG, IDENTITY, 1_700_000_000)
    address = wire.MailboxAddress("ws://127.0.0.1:1/v1/ws", bytes(16), b"t" * 32)
    entries = [
        dv.DeviceEntry(bytes([i]) * 16, address, bytes(16), 0, pub)
        for i, pub in ((1, pub_a), (2, pub_b))
    ]
    listed = dv.DeviceList.sign(IDENTITY, 5, entries)
    bundle = pqxdh.verify_bundle(store.bundle_base().to_bytes(), None, None, IDENTITY.public)

    def hello(ek: bytes) -> bytes:
        h = dv.DeviceHello.sign(key_a, IDENTITY.public, entries[0].device_id, address, 5, ek)
        return dv.encode_device_payload(h)

    _session, block = initiate_session(RNG, IDENTITY, bundle, hello)
    fc = accept_first_contact(RNG, store, block)
    assert fc.sender.encode() == IDENTITY.public.encode()
    got = dv.decode_device_payload(fc.fragment.data)
    assert isinstance(got, dv.DeviceHello)
    ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
    assert got.check(IDENTITY.public, listed, ek) == entries[0]
    with pytest.raises(dv.ForgedDeviceProof):
        got.check(IDENTITY.public, listed, bytes(32))
