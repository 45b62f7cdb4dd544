"""Sync payloads between one's own devices (docs/devices.md §6, docs/protocol.md §28.6, 0x44 to
0x46): pure formats, strict parsers raising only DecodeError / UnsupportedVersion.

They travel only in a sync session (a ratchet session between two devices of the same
identity, opened with a device hello); the ordinary and the device payload parsers refuse
them, so a contact's session never takes one. A conversation is named by its contact's
identity record (``PublicIdentity.to_bytes``, 128 bytes): every device of the person holds the
same contacts under the same identities, not under the same local names or row ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .devices import DEVICE_ID_LEN
from .errors import DecodeError, UnsupportedVersion
from .wire import (
    IDENTITY_LEN,
    MAX_TEXT_BYTES,
    MESSAGE_ID_LEN,
    PAYLOAD_SYNC_CONTACT,
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


#: A contact's name in 0x46: at most this many bytes of UTF-8 (names are at most 64 characters).
MAX_NAME_BYTES = 256
_VERIFIED, _BLOCKED, _REMOVED = 1, 2, 4


@dataclass(frozen=True)
class ContactItem:
    """A contact as one device last changed it (0x46): added, renamed, verified, blocked or
    removed. The newest change by ``(changed_at_ms, device_id)`` wins on every device."""

    contact: bytes
    changed_at_ms: int
    device_id: bytes  # the device that made the change
    name: str
    verified: bool
    blocked: bool
    removed: bool


SyncPayload = SentTranscript | ReadUpTo | ContactItem


def encode_sync_payload(payload: SyncPayload) -> bytes:
    w = Writer().u8(wire.VERSION)
    if isinstance(payload, SentTranscript):
        text = payload.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError("text too long")
        w.u8(PAYLOAD_SYNC_SENT).fixed(payload.contact, IDENTITY_LEN)
        w.fixed(payload.message_id, MESSAGE_ID_LEN).u64(payload.sent_at_ms).raw(text)
    elif isinstance(payload, ReadUpTo):
        w.u8(PAYLOAD_SYNC_READ).fixed(payload.contact, IDENTITY_LEN)
        w.fixed(payload.message_id, MESSAGE_ID_LEN)
    else:
        name = payload.name.encode()
        if len(name) > MAX_NAME_BYTES:
            raise ValueError("name too long")
        flags = ((_VERIFIED if payload.verified else 0) | (_BLOCKED if payload.blocked else 0)
                 | (_REMOVED if payload.removed else 0))  # fmt: skip
        w.u8(PAYLOAD_SYNC_CONTACT).fixed(payload.contact, IDENTITY_LEN).u64(payload.changed_at_ms)
        w.fixed(payload.device_id, DEVICE_ID_LEN).u8(flags).u16(len(name)).raw(name)
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
        return SentTranscript(contact, mid, sent, _utf8(text))
    if kind == PAYLOAD_SYNC_READ:
        out = ReadUpTo(r.take(IDENTITY_LEN), r.take(MESSAGE_ID_LEN))
        r.done()
        return out
    if kind == PAYLOAD_SYNC_CONTACT:
        contact, at, device, flags = r.take(IDENTITY_LEN), r.u64(), r.take(DEVICE_ID_LEN), r.u8()
        if flags & ~(_VERIFIED | _BLOCKED | _REMOVED):
            raise DecodeError("unknown contact flags")
        n = r.u16()
        if n > MAX_NAME_BYTES:
            raise DecodeError("name too long")
        name = _utf8(r.take(n))
        r.done()
        return ContactItem(contact, at, device, name, bool(flags & _VERIFIED),
                           bool(flags & _BLOCKED), bool(flags & _REMOVED))  # fmt: skip
    raise DecodeError("not a sync payload")


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None
