"""Call signaling: the 0x06/0x07 payloads and the per-call sealed channel (docs/protocol.md §21).
Strict parsers (fuzzed like test_core_parsers_fuzz.py), one error for every failure to open,
replays refused, state unchanged by bad input, keys gone after erase."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegisd.calls import signaling
from aegisd.calls.signaling import CallChannel, ReplayError, new_call_key
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError, StateError, UnsupportedVersion
from aegisd.core.primitives import SystemEntropy

E = SystemEntropy()
CID = bytes(range(16))


def pair() -> tuple[CallChannel, CallChannel]:
    a_sk, a_pk = new_call_key(E)
    b_sk, b_pk = new_call_key(E)
    return CallChannel(CID, a_sk, b_pk, caller=True), CallChannel(CID, b_sk, a_pk, caller=False)


SAMPLES = {
    "invite": wire.CallPayload(CID, wire.CALL_INVITE, key=bytes(32), video=True, sent_at_ms=7),
    "accept": wire.CallPayload(CID, wire.CALL_ACCEPT, key=b"k" * 32),
    "reject": wire.CallPayload(CID, wire.CALL_REJECT, reason=wire.CALL_REASON_BUSY),
    "cancel": wire.CallPayload(CID, wire.CALL_CANCEL),
    "ringing": wire.CallPayload(CID, wire.CALL_RINGING),
    "sealed": pair()[0].seal(E, signaling.SIG_OFFER, b"v=0\r\n"),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_payloads_round_trip_exactly(name: str) -> None:
    encoded = wire.encode_payload(SAMPLES[name])
    assert wire.decode_payload(encoded) == SAMPLES[name]
    assert encoded[1] == (wire.PAYLOAD_CALL_SEALED if name == "sealed" else wire.PAYLOAD_CALL)
    with pytest.raises(DecodeError):
        wire.decode_payload(encoded + b"\0")
    with pytest.raises(DecodeError):
        wire.decode_payload(encoded[:-1])
    with pytest.raises(UnsupportedVersion):
        wire.decode_payload(b"\x02" + encoded[1:])


def test_exact_bytes_of_an_invite() -> None:
    p = wire.CallPayload(CID, wire.CALL_INVITE, key=b"\x11" * 32, video=True, sent_at_ms=258)
    assert wire.encode_payload(p) == (
        b"\x01\x06" + CID + b"\x01" + b"\x11" * 32 + b"\x01" + (258).to_bytes(8, "big")
    )


def test_unknown_kinds_and_reasons_rejected() -> None:
    for bad in (b"\x01\x06" + CID + b"\x09", b"\x01\x06" + CID + b"\x03\x07"):
        with pytest.raises(DecodeError):
            wire.decode_payload(bad)
    with pytest.raises(DecodeError):  # empty box
        wire.decode_payload(b"\x01\x07" + CID + bytes(24) + b"\x00\x00")
    with pytest.raises(ValueError):
        wire.encode_payload(wire.CallPayload(CID, 9))


def test_sealed_round_trip_and_replay_refused() -> None:
    a, b = pair()
    first = a.seal(E, signaling.SIG_OFFER, b"offer")
    second = a.seal(E, signaling.SIG_HANGUP, b"")
    assert b.unseal(first) == signaling.Signal(1, signaling.SIG_OFFER, b"offer")
    with pytest.raises(ReplayError):
        b.unseal(first)
    assert b.unseal(second).kind == signaling.SIG_HANGUP
    with pytest.raises(ReplayError):  # an older one after a newer one
        b.unseal(first)
    assert b"offer" not in wire.encode_payload(first)


def test_tampered_or_misaddressed_signaling_gives_one_error_and_changes_nothing() -> None:
    a, b = pair()
    good = a.seal(E, signaling.SIG_ANSWER, b"answer")
    tampered = []
    for i in range(0, len(good.box), 7):
        box = bytearray(good.box)
        box[i] ^= 0x80
        tampered.append(wire.CallSealedPayload(CID, good.nonce, bytes(box)))
    nonce = bytearray(good.nonce)
    nonce[0] ^= 1
    tampered.append(wire.CallSealedPayload(CID, bytes(nonce), good.box))
    tampered.append(wire.CallSealedPayload(bytes(16), good.nonce, good.box))  # other call id
    tampered.append(wire.CallSealedPayload(CID, good.nonce, good.box[:-1]))
    _, stranger_pk = new_call_key(E)
    c_sk, _ = new_call_key(E)
    stranger = CallChannel(CID, c_sk, stranger_pk, caller=True)
    tampered.append(stranger.seal(E, signaling.SIG_HANGUP, b""))
    for p in tampered:
        with pytest.raises(DecryptionError) as info:
            b.unseal(p)
        assert str(info.value) == "block could not be decrypted"
    assert b.unseal(good).data == b"answer"  # the bad ones did not move the sequence


def test_call_id_is_bound_inside_the_box() -> None:
    a_sk, a_pk = new_call_key(E)
    b_sk, b_pk = new_call_key(E)
    other = bytes(16)
    sealed = CallChannel(other, a_sk, b_pk, caller=True).seal(E, signaling.SIG_HANGUP, b"")
    receiver = CallChannel(CID, b_sk, a_pk, caller=False)  # same keys, another call id outside
    with pytest.raises((DecryptionError, DecodeError)):
        receiver.unseal(wire.CallSealedPayload(CID, sealed.nonce, sealed.box))


def test_own_message_reflected_back_is_refused() -> None:
    """Both boxes share one key: without the sealed sender byte, the callee's own HANGUP sent
    back to it (its seq above the caller's) would open as the caller's."""
    a, b = pair()
    assert b.unseal(a.seal(E, signaling.SIG_OFFER, b"offer")).seq == 1
    b.seal(E, signaling.SIG_ANSWER, b"answer")
    own_hangup = b.seal(E, signaling.SIG_HANGUP, b"")  # b's seq 2, above the 1 it accepted
    with pytest.raises(DecodeError):
        b.unseal(own_hangup)
    mine = a.seal(E, signaling.SIG_HANGUP, b"")
    with pytest.raises(DecodeError):
        a.unseal(mine)
    assert b.unseal(mine).kind == signaling.SIG_HANGUP  # the reflected one moved nothing


def test_signal_bytes_carry_the_sender() -> None:
    encoded = signaling.encode_signal(CID, signaling.SIG_FROM_CALLEE, 3, signaling.SIG_HANGUP, b"")
    assert encoded == b"\x01" + CID + b"\x02" + (3).to_bytes(4, "big") + b"\x04"


def test_erase_forgets_the_keys() -> None:
    a, b = pair()
    p = a.seal(E, signaling.SIG_OFFER, b"x")
    b.erase()
    assert not b.open
    with pytest.raises(DecryptionError):
        b.unseal(p)
    a.erase()
    with pytest.raises(StateError):
        a.seal(E, signaling.SIG_HANGUP, b"")


def test_low_order_peer_key_refused() -> None:
    sk, _ = new_call_key(E)
    with pytest.raises(DecryptionError):
        CallChannel(CID, sk, bytes(32), caller=True)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_payload_parser(data: bytes) -> None:
    for prefix in (b"\x01\x06", b"\x01\x07", b""):
        with contextlib.suppress(DecodeError):
            wire.decode_payload(prefix + data)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_samples(data: st.DataObject) -> None:
    sample = bytearray(wire.encode_payload(data.draw(st.sampled_from(list(SAMPLES.values())))))
    i = data.draw(st.integers(0, len(sample) - 1))
    if data.draw(st.booleans()):
        sample[i] ^= data.draw(st.integers(1, 255))
    else:
        del sample[i:]
    with contextlib.suppress(DecodeError):
        wire.decode_payload(bytes(sample))


@FUZZ
@given(data=st.binary(max_size=256))
def test_fuzz_signal_decoder(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        signaling.decode_signal(CID, signaling.SIG_FROM_CALLER, data)


def test_cancel_answered_elsewhere_round_trips_and_other_reasons_refused() -> None:
    """CANCEL carries no byte (the caller gave up) or reason 3 (another device of the callee
    answered: docs/protocol.md §21.1); any other reason byte is refused."""
    p = wire.CallPayload(CID, wire.CALL_CANCEL, reason=wire.CALL_REASON_ANSWERED_ELSEWHERE)
    encoded = wire.encode_payload(p)
    assert encoded == b"\x01\x06" + CID + b"\x04\x03"
    assert wire.decode_payload(encoded) == p
    assert wire.decode_payload(encoded[:-1]) == wire.CallPayload(CID, wire.CALL_CANCEL)
    for bad in (b"\x00", b"\x01", b"\x02", b"\x04"):
        with pytest.raises(DecodeError):
            wire.decode_payload(encoded[:-1] + bad)
    with pytest.raises(DecodeError):
        wire.decode_payload(encoded + b"\x00")
    with pytest.raises(ValueError):
        wire.encode_payload(wire.CallPayload(CID, wire.CALL_CANCEL, reason=wire.CALL_REASON_BUSY))
