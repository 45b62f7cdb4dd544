"""Sync payloads 0x48 (a message action made on this device) and 0x49 (the profile's
settings), docs/protocol.md §28.6: pure formats, strict parsers raising only DecodeError /
UnsupportedVersion. Like 0x44-0x46 (core/sync.py) they travel only in a sync session.

0x48 wraps the ordinary payload the device sent to the contact, byte for byte, so that the
other devices apply the very thing the contact got (same message IDs, stamps, keys): only
the kinds in ACTION_KINDS are taken inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .devices import DEVICE_ID_LEN
from .errors import DecodeError, UnsupportedVersion
from .wire import IDENTITY_LEN, PAYLOAD_SYNC_ACTION, PAYLOAD_SYNC_SETTINGS, Reader, Writer

#: The ordinary payloads a 0x48 may carry: a file's descriptor (0x08, 0x17), a reply, a
#: reaction, an edit, a deletion for everyone (0x12-0x15) and a timer change (0x16).
ACTION_KINDS = frozenset({
    wire.PAYLOAD_ATTACHMENT, wire.PAYLOAD_ATTACHMENT_EXTRA, wire.PAYLOAD_REPLY,
    wire.PAYLOAD_REACTION, wire.PAYLOAD_EDIT, wire.PAYLOAD_DELETE, wire.PAYLOAD_TIMER,
})  # fmt: skip
#: The inner payload's longest: a reply of MAX_TEXT_BYTES (a descriptor is far shorter).
MAX_INNER = wire.MAX_TEXT_BYTES + 2 + 3 * wire.MESSAGE_ID_LEN
#: 0x49: a display name of at most this many bytes (names are at most 64), a privacy level
#: of at most this many ASCII letters ("" = not chosen: the relay's default applies).
MAX_NAME_BYTES = 256
MAX_LEVEL_BYTES = 16
_READ_RECEIPTS = 1

Inner = (wire.AttachmentPayload | wire.ReplyPayload | wire.ReactionPayload | wire.EditPayload
         | wire.DeletePayload | wire.TimerPayload)  # fmt: skip


@dataclass(frozen=True)
class ActionTranscript:
    """An action this device sent to a contact (0x48): the other devices apply it as made by
    us. ``payload`` is the ordinary payload as the contact got it."""

    contact: bytes  # the contact's identity record
    payload: Inner


@dataclass(frozen=True)
class SettingsItem:
    """The profile's settings as one device last changed them (0x49): the newest change by
    ``(changed_at_ms, device_id)`` wins on every device, the whole set at once."""

    changed_at_ms: int
    device_id: bytes
    display_name: str
    privacy_level: str  # "" when not chosen
    read_receipts: bool
    disappearing_default: int  # seconds, 0 = off

    def values(self) -> tuple[str, str, bool, int]:
        return (self.display_name, self.privacy_level, self.read_receipts,
                self.disappearing_default)  # fmt: skip


def encode(payload: ActionTranscript | SettingsItem) -> bytes:
    w = Writer().u8(wire.VERSION)
    if isinstance(payload, ActionTranscript):
        inner = wire.encode_payload(payload.payload)
        if inner[1] not in ACTION_KINDS or len(inner) > MAX_INNER:
            raise ValueError("not a transcribed action")
        return w.u8(PAYLOAD_SYNC_ACTION).fixed(payload.contact, IDENTITY_LEN).raw(inner).bytes()
    name, level = payload.display_name.encode(), payload.privacy_level.encode()
    if len(name) > MAX_NAME_BYTES or len(level) > MAX_LEVEL_BYTES or not level.isascii():
        raise ValueError("setting too long")
    if not wire.timer_ok(payload.disappearing_default) and payload.disappearing_default:
        raise ValueError("not a timer")
    w.u8(PAYLOAD_SYNC_SETTINGS).u64(payload.changed_at_ms).fixed(payload.device_id, DEVICE_ID_LEN)
    w.u8(_READ_RECEIPTS if payload.read_receipts else 0).u32(payload.disappearing_default)
    w.u16(len(name)).raw(name).u8(len(level)).raw(level)
    return w.bytes()


def decode(data: bytes) -> ActionTranscript | SettingsItem:
    r = Reader(data)
    if r.u8() != wire.VERSION:
        raise UnsupportedVersion("unsupported payload version")
    kind = r.u8()
    if kind == PAYLOAD_SYNC_ACTION:
        contact = r.take(IDENTITY_LEN)
        inner = data[2 + IDENTITY_LEN :]
        if len(inner) < 2 or inner[1] not in ACTION_KINDS or len(inner) > MAX_INNER:
            raise DecodeError("not a transcribed action")
        p = wire.decode_payload(inner)  # strict: the ordinary parser, to its end
        if not isinstance(p, (wire.AttachmentPayload, wire.ReplyPayload, wire.ReactionPayload,
                              wire.EditPayload, wire.DeletePayload, wire.TimerPayload)):
            raise DecodeError("not a transcribed action")
        return ActionTranscript(contact, p)
    if kind == PAYLOAD_SYNC_SETTINGS:
        at, device, flags, timer = r.u64(), r.take(DEVICE_ID_LEN), r.u8(), r.u32()
        if flags & ~_READ_RECEIPTS:
            raise DecodeError("unknown settings flags")
        if timer and not wire.timer_ok(timer):
            raise DecodeError("not a timer")
        n = r.u16()
        if n > MAX_NAME_BYTES:
            raise DecodeError("name too long")
        name = _utf8(r.take(n))
        m = r.u8()
        if m > MAX_LEVEL_BYTES:
            raise DecodeError("level too long")
        level = r.take(m)
        if not level.isascii():
            raise DecodeError("level not ASCII")
        r.done()
        return SettingsItem(at, device, name, level.decode(), bool(flags & _READ_RECEIPTS), timer)
    raise DecodeError("not a 0x48 or 0x49 sync payload")


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None
