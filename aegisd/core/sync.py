"""Sync payloads between one's own devices (docs/devices.md §6, docs/protocol.md §28.6): pure
formats, strict parsers raising only DecodeError / UnsupportedVersion.

They travel only in a sync session (a ratchet session between two devices of the same
identity, opened with a device hello); the ordinary and the device payload parsers refuse
them, so a contact's session never takes one. A conversation is named by its contact's
identity record (``PublicIdentity.to_bytes``, 128 bytes): every device of the person holds the
same contacts under the same identities, not under the same local names or row ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .errors import DecodeError, UnsupportedVersion
from .wire import (
    IDENTITY_LEN,
    MAX_TEXT_BYTES,
    MESSAGE_ID_LEN,
    PAYLOAD_SYNC_READ,
    PAYLOAD_SYNC_SENT,
    Reader,
    Writer,
)


@dataclass(frozen=True)
class SentTranscript:
    """A text this device sent to a contact (0x44): the other devices store it as sent by
    us, under the same message ID (an echo or a duplicate is ignored)."""

    contact: bytes  # the contact's identity record
    message_id: bytes
    sent_at_ms: int
    text: str


@dataclass(frozen=True)
class ReadUpTo:
    """The user read a conversation up to and including one received message (0x45)."""

    contact: bytes
    message_id: bytes


SyncPayload = SentTranscript | ReadUpTo


def encode_sync_payload(payload: SyncPayload) -> bytes:
    w = Writer().u8(wire.VERSION)
    if isinstance(payload, SentTranscript):
        text = payload.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError("text too long")
        w.u8(PAYLOAD_SYNC_SENT).fixed(payload.contact, IDENTITY_LEN)
        w.fixed(payload.message_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms).raw(text)
    else:
        w.u8(PAYLOAD_SYNC_READ).fixed(payload.contact, IDENTITY_LEN)
        w.fixed(payload.message_id, MESSAGE_ID_LEN)
    return w.bytes()


def decode_sync_payload(data: bytes) -> SyncPayload:
    r = Reader(data)
    if r.u8() != wire.VERSION:
        raise UnsupportedVersion("unsupported payload version")
    kind = r.u8()
    if kind == PAYLOAD_SYNC_SENT:
        contact, mid, sent = r.take(IDENTITY_LEN), r.take(MESSAGE_ID_LEN), r.u64()
        text = r.take(len(data) - 2 - IDENTITY_LEN - MESSAGE_ID_LEN - 8)
        if len(text) > MAX_TEXT_BYTES:
            raise DecodeError("text too long")
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("invalid UTF-8") from None
        return SentTranscript(contact, mid, sent, decoded)
    if kind == PAYLOAD_SYNC_READ:
        out = ReadUpTo(r.take(IDENTITY_LEN), r.take(MESSAGE_ID_LEN))
        r.done()
        return out
    raise DecodeError("not a sync payload")
