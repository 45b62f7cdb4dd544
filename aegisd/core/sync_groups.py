"""Groups between one's own devices (docs/protocol.md §28.6, payload 0x4A): a pure format,
a strict parser raising only DecodeError / UnsupportedVersion.

A group is per identity (one member key for all of a person's devices), so what one device
makes, joins or changes, and what it sends in a group, the others learn only from it: the
members send their changes and messages to every device, but a device's own change or message
goes to the members and not to its other devices. Two items share the payload number:

- a group's state: the group's log as the device holds it (``GroupLogRecord``, as a link's
  profile carries it), which of the head's members are group-only contacts there, and the
  group's disappearing timer there (as a timer change, §25.11: the later one wins);
- a sent group text: the group, the message's ID, its time and text (a sent transcript);
- an ask for a group's state: the group's ID, from a device that got a member's change it
  cannot place (a group it does not hold yet, or a change whose parent it lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .errors import DecodeError, UnsupportedVersion
from .group import CONTEST_WINDOW, MAX_HELD
from .wire import (
    ED25519_LEN,
    GROUP_ID_LEN,
    MAX_GROUP_MEMBERS,
    MAX_TEXT_BYTES,
    MESSAGE_ID_LEN,
    PAYLOAD_SYNC_GROUP,
    GroupLogRecord,
    Reader,
    TimerPayload,
    Writer,
    timer_ok,
)

ITEM_STATE, ITEM_SENT, ITEM_ASK = 1, 2, 3
#: A group whose timer was never set (off, stamped 0).
NO_TIMER = TimerPayload(0, 0)
#: A log as a device holds it: its chain (the contest window) and the changes held back.
MAX_SYNC_LOG_CHANGES = CONTEST_WINDOW + MAX_HELD
#: The longest 0x4A: a base of MAX_GROUP_MEMBERS, MAX_SYNC_LOG_CHANGES changes of the longest
#: size and every member group-only comes to about 170 kB (tests/unit/test_core_sync_groups.py).
MAX_GROUP_SYNC_BYTES = 200_000
#: ...so it spans at most this many blocks.
MAX_GROUP_SYNC_FRAGMENTS = -(-MAX_GROUP_SYNC_BYTES // wire.RATCHET_CAPACITY)


@dataclass(frozen=True)
class GroupStateItem:
    """A group as the sending device holds it: ``hidden``, the Ed25519 keys (ascending) of the
    head's members that are group-only contacts there; ``log``, the log as it loads it;
    ``timer``, its disappearing timer there (changed_at_ms 0: never set)."""

    hidden: tuple[bytes, ...]
    log: GroupLogRecord
    timer: TimerPayload = NO_TIMER


@dataclass(frozen=True)
class GroupSentItem:
    """A text the sending device sent in a group: the others store it as sent by us, under
    the same message ID (an echo or a duplicate is ignored)."""

    group_id: bytes
    message_id: bytes
    sent_at_ms: int
    text: str


@dataclass(frozen=True)
class GroupAskItem:
    """The sending device asks for the group's state: the others that hold the group and are
    its members answer with a state item (rate-limited at both ends)."""

    group_id: bytes


GroupSyncItem = GroupStateItem | GroupSentItem | GroupAskItem


def encode(item: GroupSyncItem) -> bytes:
    w = Writer().u8(wire.VERSION).u8(PAYLOAD_SYNC_GROUP)
    if isinstance(item, GroupStateItem):
        if list(item.hidden) != sorted(set(item.hidden)) or len(item.hidden) > MAX_GROUP_MEMBERS:
            raise ValueError("hidden members: at most 256 keys, strictly ascending")
        if len(item.log.changes) > MAX_SYNC_LOG_CHANGES:
            raise ValueError("too many changes in a synced log")
        if not timer_ok(item.timer.seconds):
            raise ValueError("not a timer")
        w.u8(ITEM_STATE).u16(len(item.hidden))
        for key in item.hidden:
            w.fixed(key, ED25519_LEN)
        w.u64(item.timer.changed_at_ms).u32(item.timer.seconds)
        w.raw(item.log.to_bytes())
    elif isinstance(item, GroupAskItem):
        w.u8(ITEM_ASK).fixed(item.group_id, GROUP_ID_LEN)
    else:
        text = item.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError("text too long")
        w.u8(ITEM_SENT).fixed(item.group_id, GROUP_ID_LEN).fixed(item.message_id, MESSAGE_ID_LEN)
        w.u64(item.sent_at_ms).raw(text)
    out = w.bytes()
    if len(out) > MAX_GROUP_SYNC_BYTES:
        raise ValueError("group sync payload too long")
    return out


def decode(data: bytes) -> GroupSyncItem:
    if len(data) > MAX_GROUP_SYNC_BYTES:
        raise DecodeError("group sync payload too long")
    r = Reader(data)
    if r.u8() != wire.VERSION:
        raise UnsupportedVersion("unsupported payload version")
    if r.u8() != PAYLOAD_SYNC_GROUP:
        raise DecodeError("not a group sync payload")
    item = r.u8()
    if item == ITEM_STATE:
        n = r.u16()
        if n > MAX_GROUP_MEMBERS:
            raise DecodeError("too many hidden members")
        hidden = tuple(r.take(ED25519_LEN) for _ in range(n))
        if list(hidden) != sorted(set(hidden)):
            raise DecodeError("hidden members not strictly ascending")
        timer = TimerPayload(r.u64(), r.u32())
        if not timer_ok(timer.seconds):
            raise DecodeError("not a timer")
        log = GroupLogRecord.from_bytes(data[5 + n * ED25519_LEN + 12 :])
        if len(log.changes) > MAX_SYNC_LOG_CHANGES:
            raise DecodeError("too many changes in a synced log")
        return GroupStateItem(hidden, log, timer)
    if item == ITEM_SENT:
        group_id, mid, sent = r.take(GROUP_ID_LEN), r.take(MESSAGE_ID_LEN), r.u64()
        text = data[3 + GROUP_ID_LEN + MESSAGE_ID_LEN + 8 :]
        if len(text) > MAX_TEXT_BYTES:
            raise DecodeError("text too long")
        try:
            return GroupSentItem(group_id, mid, sent, text.decode("utf-8"))
        except UnicodeDecodeError:
            raise DecodeError("invalid UTF-8") from None
    if item == ITEM_ASK:
        group_id = r.take(GROUP_ID_LEN)
        if len(data) != 3 + GROUP_ID_LEN:
            raise DecodeError("trailing bytes after a group ask")
        return GroupAskItem(group_id)
    raise DecodeError("unknown group sync item")
