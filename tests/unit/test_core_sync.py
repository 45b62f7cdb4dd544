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
from aegisd.core import sync_actions as sa
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


# --- 0x48 (a message action's transcript) and 0x49 (the profile's settings) ----------------

MID = bytes(range(16, 32))
ACTIONS = [
    sa.ActionTranscript(CONTACT, wire.ReplyPayload(MID, 1_700_000_000_000, bytes(16), "ré")),
    sa.ActionTranscript(CONTACT, wire.ReactionPayload(MID, "👍")),
    sa.ActionTranscript(CONTACT, wire.ReactionPayload(MID, "")),
    sa.ActionTranscript(CONTACT, wire.EditPayload(MID, 1_700_000_000_001, "fixed")),
    sa.ActionTranscript(CONTACT, wire.DeletePayload(MID)),
    sa.ActionTranscript(CONTACT, wire.TimerPayload(1_700_000_000_002, 3600)),
    sa.ActionTranscript(CONTACT, wire.AttachmentPayload(
        MID, 1_700_000_000_003, bytes(32), 5, 1, bytes(32), "ws://127.0.0.1:1/v1/ws", "a.txt")),
    sa.ActionTranscript(CONTACT, wire.AttachmentPayload(
        MID, 1_700_000_000_003, bytes(32), 5, 1, bytes(32), "ws://127.0.0.1:1/v1/ws", "a.txt",
        "a caption")),
]  # fmt: skip
D1, D2 = bytes(range(16)), bytes(range(1, 17))
SETTINGS = sa.SettingsItem(((1_700_000_000_004, D1), "Alice ☕"),
                           ((1_700_000_000_005, D2), "strong"),
                           ((1_700_000_000_006, D1), True),
                           ((1_700_000_000_007, D2), 86400))  # fmt: skip


def test_action_transcripts_and_settings_round_trip_with_their_numbers() -> None:
    some = sa.SettingsItem(privacy_level=((0, bytes(16)), ""), read_receipts=((1, D2), False))
    for payload in (*ACTIONS, SETTINGS, some, sa.SettingsItem()):
        data = sa.encode(payload)
        kind = 0x48 if isinstance(payload, sa.ActionTranscript) else 0x49
        assert data[:2] == bytes([1, kind])
        assert wire.is_sync_payload(data) and not wire.is_device_payload(data)
        got = sa.decode(data)
        assert sa.encode(got) == data and type(got) is type(payload)
        if not isinstance(payload, sa.ActionTranscript) or not isinstance(
            payload.payload, wire.AttachmentPayload
        ):  # (a descriptor's parse fills fields 0x08 does not carry)
            assert got == payload
        with pytest.raises(DecodeError):  # no other parser takes them
            wire.decode_payload(data)
        with pytest.raises(DecodeError):
            sy.decode_sync_payload(data)
    # Only the settings present go: a field bit each, then its clock and value.
    assert sa.encode(some) == bytes([1, 0x49, 0b0110]) + bytes(24) + b"\x00" + \
        (1).to_bytes(8, "big") + D2 + b"\x00"
    # A transcript carries the ordinary payload byte for byte.
    inner = wire.encode_payload(ACTIONS[0].payload)
    assert sa.encode(ACTIONS[0]) == bytes([1, 0x48]) + CONTACT + inner


def test_action_transcripts_and_settings_are_parsed_strictly() -> None:
    text = wire.encode_payload(wire.TextPayload(MID, 0, "a text goes in 0x44, not 0x48"))
    for data in (
        bytes([1, 0x48]) + CONTACT + text,  # a kind not transcribed in 0x48
        bytes([1, 0x48]) + CONTACT,  # nothing inside
        bytes([1, 0x48]) + CONTACT[:-1],
        sa.encode(ACTIONS[1]) + b"\x00",  # the inner payload is parsed to its end
        sa.encode(ACTIONS[4])[:-1],
        bytes([1, 0x48]) + CONTACT + b"\x01\x12" + bytes(wire.MAX_TEXT_BYTES + 60),  # too long
    ):
        with pytest.raises(DecodeError):
            sa.decode(data)
    with pytest.raises(UnsupportedVersion):
        sa.decode(b"\x02" + sa.encode(ACTIONS[1])[1:])
    with pytest.raises(UnsupportedVersion):  # the inner payload's version too
        sa.decode(bytes([1, 0x48]) + CONTACT + b"\x02" + wire.encode_payload(
            ACTIONS[1].payload)[1:])  # fmt: skip
    with pytest.raises(ValueError):
        sa.encode(sa.ActionTranscript(CONTACT, wire.TextPayload(MID, 0, "x")))  # type: ignore[arg-type]
    data = sa.encode(SETTINGS)
    assert data[2] == 0b1111
    name_at = 3 + 8 + 16  # the name's length, after its clock
    level_at = name_at + 2 + len("Alice ☕".encode()) + 24  # the level's length
    receipts_at = level_at + 1 + len("strong") + 24
    timer_at = receipts_at + 1 + 24
    bad = [
        data + b"\x00", data[:-1],
        data[:2] + b"\x1f" + data[3:],  # an unknown setting
        data[:2] + b"\x07" + data[3:],  # the timer not announced: bytes left over
        data[:receipts_at] + b"\x02" + data[receipts_at + 1 :],  # not a boolean
        # only 0 and 1..TIMER_MAX_S are timers
        data[:timer_at] + (wire.TIMER_MAX_S + 1).to_bytes(4, "big"),
    ]
    one = bytes([1, 0x49, 0b0001]) + bytes(24)
    bad.append(one + (sa.MAX_NAME_BYTES + 1).to_bytes(2, "big") + b"a" * (sa.MAX_NAME_BYTES + 1))
    bad.append(one + b"\x00\x01\xff")  # a name not UTF-8
    two = bytes([1, 0x49, 0b0010]) + bytes(24)
    bad.append(two + bytes([sa.MAX_LEVEL_BYTES + 1]) + b"a" * 17)
    bad.append(two + b"\x01\xff")  # a level not ASCII
    assert sa.decode(one + b"\x00\x01a") == sa.SettingsItem(display_name=((0, bytes(16)), "a"))
    for b in bad:
        with pytest.raises(DecodeError):
            sa.decode(b)
    with pytest.raises(ValueError):
        sa.encode(sa.SettingsItem(display_name=((0, bytes(16)), "a" * 300)))
    with pytest.raises(ValueError):
        sa.encode(sa.SettingsItem(read_receipts=((0, bytes(15)), True)))


@pytest.mark.parametrize("sample", [*ACTIONS, SETTINGS])
@FUZZ
@given(data=st.data())
def test_mutated_action_transcripts_and_settings_raise_only_decode_error(
    sample: sa.ActionTranscript | sa.SettingsItem, data: st.DataObject
) -> None:
    mutated = bytearray(sa.encode(sample))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with contextlib.suppress(DecodeError):
        sa.decode(bytes(mutated[:cut]) + data.draw(st.binary(max_size=32)))


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_after_0x48_or_0x49_raise_only_decode_error(data: bytes) -> None:
    for prefix in (b"", bytes([1, 0x48]), bytes([1, 0x48]) + CONTACT + b"\x01",
                   bytes([1, 0x49])):  # fmt: skip
        with contextlib.suppress(DecodeError):
            sa.decode(prefix + data)
