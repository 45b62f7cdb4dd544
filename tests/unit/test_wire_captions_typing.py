"""Payloads 0x17 (a file's descriptor with a caption and its place in a batch) and 0x18
(typing indicators): round trips, bounds, invalid UTF-8 and malformed fields refused
(docs/protocol.md §22.3, §22.6)."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from aegisd.core import wire
from aegisd.core.errors import DecodeError


def descriptor(**extra: object) -> wire.AttachmentPayload:
    p = wire.AttachmentPayload(
        message_id=bytes(range(16)), sent_at_ms=1_700_000_000_000, seed=bytes(32), size=5000,
        blocks=wire.attachment_blocks(5000), digest=bytes(range(32)),
        relay_url="wss://relay.example/v1/ws", name="photo.jpg",
    )  # fmt: skip
    return dataclasses.replace(p, **extra)  # type: ignore[arg-type]


def test_plain_descriptor_stays_0x08() -> None:
    data = wire.encode_payload(descriptor())
    assert data[1] == wire.PAYLOAD_ATTACHMENT


def test_caption_round_trip_and_lone_file_batch() -> None:
    p = descriptor(caption="our holiday 🏖\nday two")
    data = wire.encode_payload(p)
    assert data[1] == wire.PAYLOAD_ATTACHMENT_EXTRA == 0x17
    out = wire.decode_payload(data)
    assert isinstance(out, wire.AttachmentPayload)
    # A lone captioned file is a batch of one named by its own message id.
    assert out == dataclasses.replace(p, batch_id=p.message_id)
    assert wire.encode_payload(out) == data
    # Every truncation and any trailing byte is refused.
    for cut in range(2, len(data)):
        with pytest.raises(DecodeError):
            wire.decode_payload(data[:cut])
    with pytest.raises(DecodeError):
        wire.decode_payload(data + b"\x00")


def test_batch_round_trip() -> None:
    batch = bytes([7] * 16)
    for i in range(3):
        p = descriptor(caption="three" if i == 0 else "", batch_id=batch, batch_index=i,
                       batch_count=3)  # fmt: skip
        out = wire.decode_payload(wire.encode_payload(p))
        assert out == p


def test_caption_bounds() -> None:
    at_limit = descriptor(caption="é" * (wire.MAX_CAPTION_BYTES // 2))
    assert wire.decode_payload(wire.encode_payload(at_limit)) == dataclasses.replace(
        at_limit, batch_id=at_limit.message_id
    )
    with pytest.raises(ValueError):
        wire.encode_payload(descriptor(caption="x" * (wire.MAX_CAPTION_BYTES + 1)))
    # Forged on the wire: a length past the bound is refused before it is read.
    data = bytearray(wire.encode_payload(descriptor(caption="x")))
    at = len(data) - 1 - 16 - 2 - 2  # the caption's u16 length
    data[at : at + 2] = struct.pack(">H", wire.MAX_CAPTION_BYTES + 1)
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes(data) + b"x" * wire.MAX_CAPTION_BYTES)
    # The length alone refuses it (nothing of the caption need follow): not a truncation.
    data[at : at + 2] = struct.pack(">H", 0xFFFF)
    with pytest.raises(DecodeError, match="malformed attachment caption"):
        wire.decode_payload(bytes(data[: at + 2]))


def test_caption_invalid_utf8_refused() -> None:
    data = bytearray(wire.encode_payload(descriptor(caption="ab")))
    at = len(data) - 18 - 2  # the caption's two bytes
    data[at : at + 2] = b"\xc3\x28"
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes(data))


@pytest.mark.parametrize(("index", "count"), [(0, 0), (3, 3), (0, wire.MAX_BATCH_FILES + 1)])
def test_bad_batch_refused(index: int, count: int) -> None:
    good = wire.encode_payload(descriptor(caption="c", batch_id=bytes(16), batch_index=0,
                                          batch_count=1))  # fmt: skip
    forged = good[:-2] + bytes([index, count])
    with pytest.raises(DecodeError):
        wire.decode_payload(forged)
    with pytest.raises(ValueError):
        wire.encode_payload(descriptor(batch_id=bytes(16), batch_index=index, batch_count=count))


def test_group_descriptor_with_extras_is_a_0x1a() -> None:
    """A group's 0x11 has no caption field: a caption goes as 0x1A (docs/protocol.md §25.8),
    never silently dropped."""
    p = wire.GroupFilePayload(bytes(32), 1, descriptor(caption="x"))
    data = wire.encode_payload(p)
    back = wire.decode_payload(data)
    assert data[1] == wire.PAYLOAD_GROUP_FILE_EXTRA and isinstance(back, wire.GroupFilePayload)
    assert back.file.caption == "x" and back.file.batch_count == 1  # a lone file: its own batch


def test_typing_round_trip_and_flags() -> None:
    for enabled, typing in ((True, True), (True, False), (False, False)):
        p = wire.TypingPayload(enabled, typing)
        data = wire.encode_payload(p)
        assert data[1] == wire.PAYLOAD_TYPING == 0x18 and len(data) == 3
        assert wire.decode_payload(data) == p
    with pytest.raises(ValueError):
        wire.encode_payload(wire.TypingPayload(False, True))
    for flags in (wire.TYPING_NOW, 0x04, 0x80, 0xFF):
        with pytest.raises(DecodeError):
            wire.decode_payload(bytes((wire.VERSION, wire.PAYLOAD_TYPING, flags)))
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes((wire.VERSION, wire.PAYLOAD_TYPING)))
    with pytest.raises(DecodeError):
        wire.decode_payload(bytes((wire.VERSION, wire.PAYLOAD_TYPING, 1, 0)))
