"""Sync payloads between one's own devices (docs/devices.md §6, docs/protocol.md §28.6 and
§28.7, 0x44 to 0x47): pure formats, strict parsers raising only DecodeError / UnsupportedVersion.

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
    PAYLOAD_SYNC_DELETE_KEYS,
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


#: 0x47: at most this many capabilities added, and as many owner IDs removed, in one payload
#: (a full set goes in several: each is applied alone, in any order, so none replaces a set).
MAX_CAPS_PER_PAYLOAD = 64
#: A relay URL in 0x47: 1 to this many bytes of UTF-8 (services/mailbox.py MAX_CAP_URL).
MAX_CAP_URL_BYTES = 512
OWNER_ID_LEN = 16
DELETE_SEED_LEN = 32


@dataclass(frozen=True)
class MailboxCap:
    """One mailbox's delete capability in 0x47: its relay, its owner ID, its delete key's seed
    (a DELETE only, relay-protocol.md §4.1)."""

    relay_url: str
    owner_id: bytes
    delete_seed: bytes

    def __repr__(self) -> str:
        return "MailboxCap(<hidden>)"


@dataclass(frozen=True)
class DeleteKeys:
    """Delete capabilities of the sending device's mailboxes (0x47): ``added`` are kept (a
    capability held again is replaced), ``removed`` (owner IDs of mailboxes it no longer
    owns) dropped. ``seq`` grows with every 0x47 the device sends: per owner ID, the
    receiver applies only what is newer than what it applied, so payloads may arrive in any
    order (each after its own delay) and a removal is never undone by an older addition."""

    added: tuple[MailboxCap, ...]
    removed: tuple[bytes, ...]
    seq: int = 0


SyncPayload = SentTranscript | ReadUpTo | ContactItem | DeleteKeys


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
    elif isinstance(payload, DeleteKeys):
        if len(payload.added) > MAX_CAPS_PER_PAYLOAD or len(payload.removed) > MAX_CAPS_PER_PAYLOAD:
            raise ValueError("too many capabilities")
        w.u8(PAYLOAD_SYNC_DELETE_KEYS).u16(len(payload.added))
        for cap in payload.added:
            url = cap.relay_url.encode()
            if not 0 < len(url) <= MAX_CAP_URL_BYTES:
                raise ValueError("bad relay URL")
            w.u16(len(url)).raw(url).fixed(cap.owner_id, OWNER_ID_LEN)
            w.fixed(cap.delete_seed, DELETE_SEED_LEN)
        w.u16(len(payload.removed))
        for owner_id in payload.removed:
            w.fixed(owner_id, OWNER_ID_LEN)
        w.u64(payload.seq)
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
    if kind == PAYLOAD_SYNC_DELETE_KEYS:
        return _delete_keys(r)
    raise DecodeError("not a sync payload")


def _delete_keys(r: Reader) -> DeleteKeys:
    n = r.u16()
    if n > MAX_CAPS_PER_PAYLOAD:
        raise DecodeError("too many capabilities")
    added = []
    for _ in range(n):
        size = r.u16()
        if not 0 < size <= MAX_CAP_URL_BYTES:
            raise DecodeError("bad relay URL")
        url = _utf8(r.take(size))
        added.append(MailboxCap(url, r.take(OWNER_ID_LEN), r.take(DELETE_SEED_LEN)))
    m = r.u16()
    if m > MAX_CAPS_PER_PAYLOAD:
        raise DecodeError("too many capabilities")
    removed = tuple(r.take(OWNER_ID_LEN) for _ in range(m))
    seq = r.u64()
    r.done()
    return DeleteKeys(tuple(added), removed, seq)


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None
