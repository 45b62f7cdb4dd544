"""Disappearing messages (docs/protocol.md §27): a timer per one-to-one conversation, set by
either side (payload 0x16), and the erasure of messages whose timer ran out.

A message takes the conversation's timer as it is when the message is stored (store/db.py
``add_message``); its deadline runs from when it is queued (one's own) or marked read
(incoming). ``run`` erases what is due: the message row, its events, and a file's attachment
row and encrypted copy, under secure_delete. It runs from unlock, so deadlines that passed
while the daemon was stopped or locked are met at the next unlock. Group messages take their
group's timer (group_actions.py, §25.11) and are erased here alike: the row, its events, its
quotes and its file's attachment rows and copies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from aegisd import droplog
from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.store import Contact, Store
from aegisd.store import actions as actions_db
from aegisd.store import attachments as att_db
from aegisd.store import group_actions as group_db

from .delivery import Delivery, Recipient
from .host import ServiceHost
from .mailbox import ContactState
from .own_sync_actions import TranscriptsView

if TYPE_CHECKING:
    pass

SETTING_DEFAULT = "messages.disappearing_default"
#: The longest sleep between looks at the next deadline (a deadline set by a path that does
#: not wake the loop is met at most this late).
MAX_WAIT_S = 60.0
E_NOT_READY = 1024
CHECKPOINT_TRIES = 5
#: How far ahead of our clock a contact's changed_at may be (§27.2): later ones are dropped,
#: so a contact cannot stamp a change no later change of ours could beat.
MAX_SKEW_MS = 86_400_000
#: The largest changed_at stored or sent (a u64 on the wire, a signed 64-bit integer in SQLite).
STAMP_MAX = 2**63 - 1
#: Visible changes (a history line's new value, an event) per contact per hour; beyond, a
#: received change is still applied and its line rewritten, but no event is emitted (§27.2).
VISIBLE_PER_HOUR = 10

#: Our group file whose copies are still uploading at its deadline is kept (looked at again
#: every UPLOAD_RECHECK_MS) until they are up, at most UPLOAD_GRACE_MS past the deadline.
UPLOAD_GRACE_MS = 3_600_000
UPLOAD_RECHECK_MS = 2_000

#: Erased ids kept per contact: an action (edit, reaction, deletion) arriving for one later is
#: dropped, not held for its message (a held edit keeps its new text for a day, §26.5).
ERASED_KEPT = 256
_erased: weakref.WeakKeyDictionary[Store, dict[int, collections.OrderedDict[str, None]]] = (
    weakref.WeakKeyDictionary()
)


def erased(store: Store, contact_id: int, message_id: str) -> bool:
    """Whether ``message_id`` of this contact was erased at its deadline since the store was
    opened (the last ERASED_KEPT of the contact's)."""
    return message_id in _erased.get(store, {}).get(contact_id, {})


def _note_erased(store: Store, contact_id: int, message_id: str) -> None:
    ids = _erased.setdefault(store, {}).setdefault(contact_id, collections.OrderedDict())
    ids[message_id] = None
    while len(ids) > ERASED_KEPT:
        ids.popitem(last=False)


_UNITS = ((7 * 86_400, "week"), (86_400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def label(seconds: int) -> str:
    """'off', '1 hour', '2 days', '90 seconds': what a history line and the CLI show."""
    if seconds == 0:
        return "off"
    for size, unit in _UNITS:
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"  # unreachable: every value is a whole number of seconds


def check_seconds(field: str, seconds: Any) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not wire.timer_ok(seconds):
        raise InvalidParamsError(
            field, f"must be 0 (off) or {wire.TIMER_MIN_S} to {wire.TIMER_MAX_S} seconds"
        )
    return seconds


def wins(new: tuple[int, int], current: tuple[int, int]) -> bool:
    """Whether a change (changed_at ms, seconds) replaces the one in force: the later change
    wins; at equal times the larger value (either side orders the pair alike, so both end
    with the same timer); an equal pair changes nothing (§27)."""
    return new > current


def _ms() -> int:
    return time.time_ns() // 1_000_000


class ContactsView(Protocol):
    def by_name(self, name: str) -> Contact: ...


class AttachmentsView(Protocol):
    async def delete(self, aid: str) -> None: ...


class GroupActionsView(Protocol):
    def note_erased(self, ref: int, api_id: str) -> None: ...


class GroupsView(Protocol):
    @property
    def actions(self) -> GroupActionsView: ...


class DisappearingHost(ServiceHost, Protocol):
    @property
    def delivery(self) -> Delivery: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def attachments(self) -> AttachmentsView: ...
    @property
    def groups(self) -> GroupsView: ...
    @property
    def sync_actions(self) -> TranscriptsView: ...


class Disappearing:
    def __init__(self, host: DisappearingHost) -> None:
        self.m = host
        self._wake = asyncio.Event()
        self._checkpoint_due = True
        # contact id -> times (ms) of its recent visible changes, for VISIBLE_PER_HOUR.
        self._recent: dict[int, collections.deque[int]] = {}

    def wake(self) -> None:
        """A new deadline may be sooner than the one the loop sleeps towards."""
        self._wake.set()

    def describe(self, c: Contact) -> dict[str, Any]:
        seconds, changed_at = self.m.store.get_timer(c.id)
        return {"contact": c.name, "seconds": seconds, "label": label(seconds),
                "changed_at": changed_at or None}  # fmt: skip

    # --- setting the timer ----------------------------------------------------------------

    async def set(self, name: str, seconds: int) -> dict[str, Any]:
        seconds = check_seconds("seconds", seconds)
        async with self.m.lock:
            c = self.m.contacts.by_name(name)
            blob = self.m.store.get_session(c.id)
            if blob is None or ContactState.from_bytes(c.state).failed:
                raise AppError(E_NOT_READY, "not_ready", "no session with this contact")
            with self.m.store.transaction():
                self._announce(c, Session.from_bytes(blob), seconds)
        self.m.delivery.wake()
        return self.describe(c)

    def apply_default(self, c: Contact, session: Session) -> None:
        """A contact just added or accepted (inside its transaction): the default timer of
        new conversations, announced to the peer, if it is not off."""
        seconds = int(self.m.store.get_setting(SETTING_DEFAULT, 0) or 0)
        if seconds and wire.timer_ok(seconds):
            self._announce(c, session, seconds)

    def _announce(self, c: Contact, session: Session, seconds: int) -> None:
        # Our change must win at the peer as it wins here: later than the change in force,
        # even if the peer's clock (which stamped that one) runs ahead of ours.
        # A stamp in force beyond MAX_SKEW_MS (stored before that bound) is not followed:
        # own stamps stay near our clock, far below STAMP_MAX.
        now = _ms()
        in_force = min(self.m.store.get_timer(c.id)[1], now + MAX_SKEW_MS)
        changed_at = min(max(now, in_force + 1), STAMP_MAX)
        payload = wire.TimerPayload(changed_at, seconds)
        self.m.delivery.enqueue([Recipient(c, session)], payload,
                                delay=self.m.delivery.send_jitter())  # fmt: skip
        self.m.sync_actions.made(c, payload)  # on our other devices too
        self._record(c, seconds, changed_at, by_peer=False)

    def synced(self, c: Contact, p: wire.TimerPayload) -> None:
        """Our change made on another device of ours (0x48, inside the receive's transaction):
        ordered as the contact's are (§27), shown as ours; sent to no one."""
        if p.changed_at_ms > _ms() + MAX_SKEW_MS:
            droplog.dropped("dropped a timer change stamped more than a day ahead")
            return
        seconds, changed_at = self.m.store.get_timer(c.id)
        if not wins((p.changed_at_ms, p.seconds), (changed_at, seconds)):
            return  # an echo, or overtaken by a newer change
        if p.seconds == seconds:
            self.m.store.set_timer(c.id, seconds, p.changed_at_ms)
            return
        self._record(c, p.seconds, p.changed_at_ms, by_peer=False)
        self.wake()

    def on_payload(self, c: Contact, p: wire.TimerPayload) -> None:
        """The peer's change (inside the receive's transaction). The later change wins; at
        equal times the larger value; an equal pair changes nothing (§27)."""
        now = _ms()
        if p.changed_at_ms > now + MAX_SKEW_MS:
            droplog.dropped("dropped a timer change stamped more than a day ahead")
            return
        seconds, changed_at = self.m.store.get_timer(c.id)
        if not wins((p.changed_at_ms, p.seconds), (changed_at, seconds)):
            return
        if p.seconds == seconds:  # only the stamp moves: nothing to show
            self.m.store.set_timer(c.id, seconds, p.changed_at_ms)
            return
        recent = self._recent.setdefault(c.id, collections.deque())
        while recent and recent[0] <= now - 3_600_000:
            recent.popleft()
        visible = len(recent) < VISIBLE_PER_HOUR
        if visible:
            recent.append(now)
        else:
            droplog.dropped("a contact's timer changes past the hourly limit: no event")
        self._record(c, p.seconds, p.changed_at_ms, by_peer=True, emit=visible)

    def _record(
        self, c: Contact, seconds: int, changed_at: int, *, by_peer: bool, emit: bool = True
    ) -> None:
        store = self.m.store
        store.set_timer(c.id, seconds, changed_at)
        direction, body = ("in" if by_peer else "out"), f"[timer] {label(seconds)}"
        status = "read" if by_peer else "delivered"
        msg = store.merge_timer_line(c.id, direction, body, status, seconds)
        if msg is None:
            msg = store.add_message(c.id, direction, body, status=status, timer_change=seconds)
        if emit:
            self.m.ctx.events.emit("conversation.timer", {
                "contact": c.name, "seconds": seconds, "by": "contact" if by_peer else "self",
                "message_id": msg.id,
            })  # fmt: skip

    # --- erasure --------------------------------------------------------------------------

    async def run(self) -> None:
        """Erase what is due, then sleep until the next deadline (or a wake, or MAX_WAIT_S)."""
        # The first pass checkpoints whatever it erases: an erasure committed before a crash
        # (kill -9 before its checkpoint) left the erased page's old copy in the file.
        self._checkpoint_due = True
        while True:
            nxt = None
            self._wake.clear()  # before looking: a wake from now on is not lost
            try:
                if self.m.ctx.store is not None:
                    await self.expire_due()
                    if self._checkpoint_due:
                        self._checkpoint_due = not await self._checkpoint()
                    nxt = min((t for t in (self.m.store.next_expiry(),
                                           group_db.next_expiry(self.m.store)) if t is not None),
                              default=None)  # fmt: skip
            except Exception as exc:  # a bug: report it, try again later, never stop erasing
                droplog.dropped(f"disappearing messages: erasure failed: {type(exc).__name__}")
            wait = MAX_WAIT_S if nxt is None else min(MAX_WAIT_S, max(0.0, (nxt - _ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _checkpoint(self) -> bool:
        """The WAL checkpoint after erasures, tried a few times if busy (a reader); if it still
        cannot finish, the loop's next pass tries again."""
        for attempt in range(CHECKPOINT_TRIES):
            if attempt:
                await asyncio.sleep(0.2)
            async with self.m.lock:
                if self.m.store.checkpoint():
                    return True
        droplog.dropped("disappearing messages: the WAL checkpoint stayed busy")
        return False

    async def expire_due(self) -> int:
        """Erase every message whose deadline passed; returns how many went."""
        done = await self._expire_group_messages()
        while True:
            due = self.m.store.expired_messages(_ms(), limit=100)
            if not due:
                if done:
                    self._checkpoint_due = True  # run() checkpoints after this pass
                return done
            for msg in due:
                if att_db.get(self.m.store, msg.id) is not None:
                    # The file's row and its encrypted copy (a spool, or the received blocks).
                    with contextlib.suppress(AppError):
                        await self.m.attachments.delete(msg.id)
                async with self.m.lock:
                    c = self.m.store.get_contact(msg.contact_id)
                    with self.m.store.transaction():
                        # Replies keep a copy of the text they quote (actions.py): a
                        # quote must not outlive the message it quotes past its deadline.
                        actions_db.forget_quotes(self.m.store, msg.id, msg.contact_id)
                        # Actions held for it (an edit's text too) and any arriving later.
                        self.m.store._q(
                            "DELETE FROM pending_actions WHERE contact_id = ? AND target = ?",
                            (msg.contact_id, msg.id),
                        )
                        _note_erased(self.m.store, msg.contact_id, msg.id)
                        if self.m.store.delete_message(msg.id):
                            self.m.ctx.events.emit("message.expired", {
                                "message_id": msg.id, "contact": c.name if c else None,
                            })  # fmt: skip
                done += 1

    async def _expire_group_messages(self) -> int:
        """Group messages past their deadline (§25.11): a file's attachment rows and copies
        first (their link to the message goes with its row), then the row, its events, its
        quotes and the actions held for it."""
        done = 0
        while True:
            due = group_db.expired(self.m.store, _ms(), limit=100)
            if not due:
                if done:
                    self._checkpoint_due = True
                return done
            for ref, seq, api_id in due:
                async with self.m.lock:
                    with self.m.store.transaction():
                        waits = group_db.wait_for_uploads(
                            self.m.store, seq, _ms(), grace_ms=UPLOAD_GRACE_MS,
                            recheck_ms=UPLOAD_RECHECK_MS)  # fmt: skip
                if waits:  # its copies still going up to the members (§25.11)
                    continue
                aids = att_db.of_group_seq(self.m.store, seq)
                for aid in aids:
                    with contextlib.suppress(AppError):
                        await self.m.attachments.delete(aid)
                async with self.m.lock:
                    with self.m.store.transaction():
                        self.m.groups.actions.note_erased(ref, api_id)
                        if group_db.erase(self.m.store, ref, seq, api_id, aids):
                            self.m.ctx.events.emit("message.expired", {
                                "message_id": api_id, "contact": None, "group": ref,
                            })  # fmt: skip
                done += 1
