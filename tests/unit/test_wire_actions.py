"""Payloads 0x12-0x15 (docs/protocol.md §26): round trips, and the decoder's refusals of what a
hostile contact could send (overlong or invisible reactions, invalid UTF-8, bad lengths)."""

from __future__ import annotations

import struct

import pytest

from aegisd.core import wire
from aegisd.core.errors import DecodeError

MID = bytes(range(16))
OTHER = bytes(range(16, 32))


@pytest.mark.parametrize(
    "payload",
    [
        wire.ReplyPayload(MID, 1_700_000_000_000, OTHER, "yes, that one"),
        wire.ReplyPayload(MID, 0, OTHER, ""),
        wire.ReplyPayload(MID, 1, OTHER, "é" * (wire.MAX_TEXT_BYTES // 2)),
        wire.ReactionPayload(MID, "👍"),
        wire.ReactionPayload(MID, "👍🏽"),
        wire.ReactionPayload(MID, "👩\u200d👩\u200d👧\u200d👦"),  # a ZWJ family: 25 bytes
        wire.ReactionPayload(MID, "❤\ufe0f"),
        wire.ReactionPayload(MID, ""),  # removal
        wire.EditPayload(MID, 2**64 - 1, "fixed the typo"),
        wire.EditPayload(MID, 5, "x" * wire.MAX_TEXT_BYTES),
        wire.DeletePayload(MID),
    ],
)
def test_round_trip(payload: wire.Payload) -> None:
    raw = wire.encode_payload(payload)
    assert wire.decode_payload(raw) == payload


def test_layouts_are_the_documented_ones() -> None:
    reply = wire.encode_payload(wire.ReplyPayload(MID, 7, OTHER, "hi"))
    assert reply == b"\x01\x12" + MID + struct.pack(">Q", 7) + OTHER + b"hi"
    reaction = wire.encode_payload(wire.ReactionPayload(MID, "👍"))
    assert reaction == b"\x01\x13" + MID + b"\x04" + "👍".encode()
    edit = wire.encode_payload(wire.EditPayload(MID, 9, "new"))
    assert edit == b"\x01\x14" + MID + struct.pack(">Q", 9) + b"new"
    assert wire.encode_payload(wire.DeletePayload(MID)) == b"\x01\x15" + MID


def _reaction(raw_emoji: bytes) -> bytes:
    return b"\x01\x13" + MID + bytes([len(raw_emoji)]) + raw_emoji


@pytest.mark.parametrize(
    "raw_emoji",
    [
        "👍".encode() * 17,  # 17 code points, 68 bytes
        "😀".encode() * 16 + b"!",  # 17 code points
        b"a" * 11,  # letters
        b"\xff\xfe",  # invalid UTF-8
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\x1b[2J",  # an escape sequence
        "\u202eevil".encode(),  # a bidi override
        "\u200b".encode(),  # an invisible character
        b" ",  # a separator
        "\u0301".encode(),  # a lone combining mark
        "\u200d👍".encode(),  # starts with the joiner
        "\ue000".encode(),  # private use
        b"ok\n",
    ],
)
def test_hostile_reactions_are_refused(raw_emoji: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_payload(_reaction(raw_emoji))


def test_a_reaction_length_byte_over_the_bound_is_refused() -> None:
    # 65 bytes announced and present: refused by the length check before any decoding.
    with pytest.raises(DecodeError):
        wire.decode_payload(b"\x01\x13" + MID + bytes([65]) + "😀".encode() * 16 + b"!")


# The rule of §26.2 uses no Unicode database: these pass whatever the interpreter's version
# (Python 3.11's tables, Unicode 14, call the first two unassigned).
ACCEPTED = [
    "\U0001fa77",  # 🩷 pink heart, Unicode 15
    "\U0001fae8",  # 🫨 shaking face, Unicode 15
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # Scotland
    "🧑🏻\u200d❤\ufe0f\u200d💋\u200d🧑🏼",  # a kiss with two skin tones: 35 bytes
    "👨🏻\u200d👩🏻\u200d👧🏻\u200d👦🏻",  # a family with skin tones: 41 bytes, 11 code points
    "1\ufe0f\u20e3", "#\ufe0f\u20e3",  # keycaps
    "🏳\ufe0f\u200d🌈", "🇫🇷", "©\ufe0f", "™", "⭐", "↩\ufe0f", "♥\ufe0f", "☺",
    "\U0001faff",  # unassigned today, in an emoji block: maybe a later emoji
    "👍🏽", "🆓", "🅰\ufe0f", "🆚", "🏴", "🇺🇸",
    "\U0001f3f4\U000e0075\U000e0073\U000e0063\U000e0061\U000e007f",  # California: usca
    "👍\u200d" * 7 + "👍",  # one (joined) sequence of 15 code points
]  # fmt: skip
REFUSED = [
    "bit.ly/x1y", "FREEMONEY!", "שלום", "привет", "你好", "ok", "1", "#", "1\u20e3",
    "I really like this message, thanks",  # a sentence
    "😀" * 17, "\ufe0f", "👍\u200d", "👍\u200d\u200d👍", "\u20e3", "👍\ufe0f\ufe0f",
    "\U000e0067\U000e007f",  # tags not after the black flag
    "\U0001f3f4\U000e0067",  # an unterminated tag sequence
    "👍\U000e0067\U000e007f",  # tags after another emoji
    "\u2060", "\u00a0", "\u2028", "\U000f0000", "\U0001fb00", "👍 👍", "\u00a8",
    # The reviewer's four: enclosed letters, regional indicators spelling a word, tags
    # carrying a link, a run of emoji not joined (a count that reads as a message).
    "".join(chr(0x1F130 + ord(c) - 65) for c in "FREEMONEY"),
    "".join(chr(0x1F1E6 + ord(c) - 65) for c in "FREE"),
    "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "bit.ly/x1y") + "\U000e007f",
    "👍" * 16, "😀😀", "🇫🇷🇩🇪", "🇫", "👍🇫🇷", "🏻", "🏻👍", "\U0001f150", "\U0001f110",
    "\U0001f3f4\U000e0067\U000e007f",  # one tag: too short
    "\U0001f3f4\U000e0047\U000e0042\U000e007f",  # uppercase tags
    "\U0001f3f4" + "\U000e0061" * 7 + "\U000e007f",  # seven tags
    "1\ufe0f\u20e3\u200d👍", "👍\u200d", "👍🏽🏽", "👍\ufe0f🏽",
]  # fmt: skip


@pytest.mark.parametrize("emoji", ACCEPTED)
def test_emoji_of_any_unicode_version_are_accepted(emoji: str) -> None:
    raw = wire.encode_payload(wire.ReactionPayload(MID, emoji))
    assert wire.decode_payload(raw) == wire.ReactionPayload(MID, emoji)


@pytest.mark.parametrize("emoji", REFUSED)
def test_text_and_stray_marks_are_refused(emoji: str) -> None:
    with pytest.raises(ValueError):
        wire.check_reaction(emoji)
    raw = emoji.encode()
    if len(raw) <= 255:
        with pytest.raises(DecodeError):
            wire.decode_payload(b"\x01\x13" + MID + bytes([len(raw)]) + raw)


@pytest.mark.parametrize("emoji", ["a" * 11, "👍" * 17, "\x07", "\u202e"])
def test_the_encoder_refuses_what_the_decoder_would(emoji: str) -> None:
    with pytest.raises(ValueError):
        wire.encode_payload(wire.ReactionPayload(MID, emoji))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01\x12" + MID + struct.pack(">Q", 1) + OTHER + b"\xc3",  # truncated UTF-8
        b"\x01\x12" + MID + struct.pack(">Q", 1) + OTHER[:8],  # no room for the quoted id
        b"\x01\x12" + MID + struct.pack(">Q", 1) + OTHER + b"x" * (wire.MAX_TEXT_BYTES + 1),
        b"\x01\x14" + MID + struct.pack(">Q", 1) + b"\xff",
        b"\x01\x14" + MID + struct.pack(">Q", 1) + b"x" * (wire.MAX_TEXT_BYTES + 1),
        b"\x01\x14" + MID[:10],
        b"\x01\x15" + MID + b"\x00",  # trailing byte
        b"\x01\x15" + MID[:15],
        b"\x01\x13" + MID,  # no length byte
        b"\x01\x13" + MID + b"\x04" + "👍".encode() + b"\x00",  # trailing byte
    ],
)
def test_malformed_action_payloads_are_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_payload(raw)


def test_the_longest_reply_fits_the_inbox_fragment_bound() -> None:
    from aegisd.services.inbox import MAX_MESSAGE_FRAGMENTS

    raw = wire.encode_payload(wire.ReplyPayload(MID, 1, OTHER, "x" * wire.MAX_TEXT_BYTES))
    assert -(-len(raw) // wire.RATCHET_CAPACITY) <= MAX_MESSAGE_FRAGMENTS
