"""Application payloads and contact links: exact round trips, strict parsing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegisd.core import wire
from aegisd.core.errors import DecodeError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.primitives import SystemEntropy

IDENT = IdentityKeyPair.generate(SystemEntropy()).public

ids = st.binary(min_size=16, max_size=16)
mailboxes = st.builds(
    wire.MailboxAddress,
    relay_url=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
    deposit_id=st.binary(min_size=16, max_size=16),
    send_token=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
)
payloads = st.one_of(
    st.builds(
        wire.TextPayload,
        message_id=ids,
        sent_at_ms=st.integers(0, 2**64 - 1),
        text=st.text(max_size=300),
    ),
    st.builds(
        wire.ReceiptPayload,
        kind=st.sampled_from([wire.RECEIPT_DELIVERED, wire.RECEIPT_READ]),
        message_ids=st.lists(ids, min_size=1, max_size=20).map(tuple),
    ),
    st.builds(
        wire.HelloPayload,
        reply_to=mailboxes,
        display_name=st.text(max_size=20).filter(lambda s: len(s.encode()) <= 64),
        invitation_id=st.binary(max_size=64),
    ),
    st.builds(wire.MailboxPayload, rotation_id=ids, mailbox=mailboxes),
    st.builds(wire.MailboxAckPayload, rotation_id=ids),
)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_payload_round_trip(payload: wire.Payload) -> None:
    data = wire.encode_payload(payload)
    assert wire.decode_payload(data) == payload
    with pytest.raises(DecodeError):
        wire.decode_payload(data[:2])  # truncated
    if not isinstance(payload, wire.TextPayload):  # a text's tail is its text
        with pytest.raises(DecodeError):
            wire.decode_payload(data + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_payload_parser_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        wire.decode_payload(data)


def make_link(kind: int = wire.LINK_INVITATION) -> wire.ContactLink:
    return wire.ContactLink(
        kind=kind,
        identity=IDENT.record(),
        mailbox=wire.MailboxAddress("ws://127.0.0.1:8765", b"d" * 16, b"t" * 32),
        bundle_address=b"b" * 16,
        invitation_id=b"i" * 16 if kind == wire.LINK_INVITATION else b"",
        expires=1_700_086_400,
    )


def test_link_round_trip_and_identity_check() -> None:
    for kind in (wire.LINK_INVITATION, wire.LINK_ADDRESS):
        link = make_link(kind)
        text = link.to_text()
        assert text.startswith("aegis:") and "=" not in text
        parsed = wire.ContactLink.from_text(text)
        assert parsed == link
        assert PublicIdentity.from_record(parsed.identity) == IDENT


@pytest.mark.parametrize(
    "text",
    ["", "aegis:", "https://example.org", "aegis:!!!!", "aegis:AAAA", "aegis:" + "A" * 3000],
)
def test_bad_links_rejected(text: str) -> None:
    with pytest.raises(DecodeError):
        wire.ContactLink.from_text(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_link_raises_only_decode_error(data: st.DataObject) -> None:
    raw = bytearray(make_link().to_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(DecodeError):
        wire.ContactLink.from_bytes(bytes(raw[:cut]))


def test_invitation_id_presence_matches_kind() -> None:
    bad = wire.ContactLink(**{**make_link().__dict__, "invitation_id": b""})
    with pytest.raises(DecodeError):
        wire.ContactLink.from_bytes(bad.to_bytes())


def test_reassembler_bounds_and_duplicates() -> None:
    from aegisd.core.session import Reassembler

    r = Reassembler(max_pending=2, max_bytes=10)
    assert r.add(wire.Fragment(b"a" * 8, 0, 2, b"12345")) is None
    assert r.add(wire.Fragment(b"a" * 8, 0, 2, b"12345")) is None  # duplicate ignored
    assert r.add(wire.Fragment(b"b" * 8, 0, 2, b"123456")) is None  # 11 bytes: "a" dropped
    assert r.add(wire.Fragment(b"a" * 8, 1, 2, b"x")) is None  # "a" starts over
    assert r.add(wire.Fragment(b"b" * 8, 1, 2, b"7")) == b"1234567"
    with pytest.raises(DecodeError):
        r.add(wire.Fragment(b"a" * 8, 0, 3, b"y"))  # disagrees with the known count
