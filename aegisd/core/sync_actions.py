"""Sync payloads 0x48 (a message action made on this device) and 0x49 (the profile's
settings), docs/protocol.md §28.6: pure formats, strict parsers raising only DecodeError /
UnsupportedVersion. Like 0x44-0x46 (core/sync.py) they travel only in a sync session.

0x48 wraps the ordinary payload the device sent to the contact, byte for byte, so that the
other devices apply the very thing the contact got (same message IDs, stamps, keys): only
the kinds in ACTION_KINDS are taken inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
#: 0x49's fields, in the order of their bits in its first byte (bit 0 first).
FIELDS = ("display_name", "privacy_level", "read_receipts", "disappearing_default")

Inner = (wire.AttachmentPayload | wire.ReplyPayload | wire.ReactionPayload | wire.EditPayload
         | wire.DeletePayload | wire.TimerPayload)  # fmt: skip


@dataclass(frozen=True)
class ActionTranscript:
    """An action this device sent to a contact (0x48): the other devices apply it as made by
    us. ``payload`` is the ordinary payload as the contact got it."""

    contact: bytes  # the contact's identity record
    payload: Inner


#: When a setting was last changed and on which device: ``(changed_at_ms, device_id)``.
Clock = tuple[int, bytes]


@dataclass(frozen=True)
class SettingsItem:
    """The profile's settings this device holds a change of (0x49), each with the clock of
    its newest change: on every device each setting takes the value of its newest clock. A
    setting no device of the profile changed since the link is absent (None): it never
    overwrites one chosen elsewhere."""

    display_name: tuple[Clock, str] | None = None
    privacy_level: tuple[Clock, str] | None = None  # "" when not chosen
    read_receipts: tuple[Clock, bool] | None = None
    disappearing_default: tuple[Clock, int] | None = None  # seconds, 0 = off

    def fields(self) -> dict[str, tuple[Clock, str | bool | int]]:
        """The settings present, by name (FIELDS)."""
        return {f: v for f in FIELDS if (v := getattr(self, f)) is not None}


def encode(payload: ActionTranscript | SettingsItem) -> bytes:
    w = Writer().u8(wire.VERSION)
    if isinstance(payload, ActionTranscript):
        inner = wire.encode_payload(payload.payload)
        if inner[1] not in ACTION_KINDS or len(inner) > MAX_INNER:
            raise ValueError("not a transcribed action")
        return w.u8(PAYLOAD_SYNC_ACTION).fixed(payload.contact, IDENTITY_LEN).raw(inner).bytes()
    present = payload.fields()
    w.u8(PAYLOAD_SYNC_SETTINGS).u8(sum(1 << i for i, f in enumerate(FIELDS) if f in present))
    for f in FIELDS:
        if f not in present:
            continue
        (at, device), value = present[f]
        if len(device) != DEVICE_ID_LEN:
            raise ValueError("not a device ID")
        w.u64(at).fixed(device, DEVICE_ID_LEN)
        if f == "display_name":
            name = str(value).encode()
            if len(name) > MAX_NAME_BYTES:
                raise ValueError("setting too long")
            w.u16(len(name)).raw(name)
        elif f == "privacy_level":
            level = str(value).encode()
            if len(level) > MAX_LEVEL_BYTES or not level.isascii():
                raise ValueError("setting too long")
            w.u8(len(level)).raw(level)
        elif f == "read_receipts":
            w.u8(1 if value else 0)
        else:
            if not isinstance(value, int) or (value and not wire.timer_ok(value)):
                raise ValueError("not a timer")
            w.u32(value)
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
        present = r.u8()
        if present >> len(FIELDS):
            raise DecodeError("unknown settings")
        got: dict[str, Any] = {}
        for i, f in enumerate(FIELDS):
            if not present & (1 << i):
                continue
            clock = (r.u64(), r.take(DEVICE_ID_LEN))
            if f == "display_name":
                n = r.u16()
                if n > MAX_NAME_BYTES:
                    raise DecodeError("name too long")
                got[f] = (clock, _utf8(r.take(n)))
            elif f == "privacy_level":
                m = r.u8()
                if m > MAX_LEVEL_BYTES:
                    raise DecodeError("level too long")
                level = r.take(m)
                if not level.isascii():
                    raise DecodeError("level not ASCII")
                got[f] = (clock, level.decode())
            elif f == "read_receipts":
                flag = r.u8()
                if flag > 1:
                    raise DecodeError("not a boolean")
                got[f] = (clock, bool(flag))
            else:
                timer = r.u32()
                if timer and not wire.timer_ok(timer):
                    raise DecodeError("not a timer")
                got[f] = (clock, timer)
        r.done()
        return SettingsItem(**got)
    raise DecodeError("not a 0x48 or 0x49 sync payload")


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8") from None
