"""Typing indicators (docs/protocol.md §22.6; what they show the relay: docs/threat-model.md
"Typing indicators").

Off by default (setting ``privacy.typing_indicators``). A side that has them off sends no
typing payload (one exception: when the user switches them off, the contacts told "on" get one
"off", so that they stop sending theirs) and drops every one it receives without an event
(keeping only the contact's choice). Switching on sends "on" to the contacts whose last word
was "on", so that a side switching on later is heard without having to type first.
Each side learns the other's choice inside the encryption, from the flags of payload 0x18:

- the first ``messages.typing(contact, true)`` after switching on sends "on, typing" (the
  contact has not heard our choice yet); a contact that has them on answers once with "on"
  (no typing), as a slotted block (with cover traffic on it takes a cover block's place);
- from then on, "typing" goes only to a contact whose last word was "on": at most one per
  INTERVAL per contact, and one "stopped" (``messages.typing(contact, false)``) after a
  "typing" that went.

These blocks are not slotted: a "typing" late by a cover interval (minutes) would be worthless,
so with cover traffic on each is one block more than the cover schedule, which is what the
threat model states. The receiver shows at most one ``contact.typing`` event per contact per
INTERVAL, and ends a shown "typing" itself after LAPSE seconds without a refresh. Those
events are live (``emit_live``): they reach the subscriptions open at that moment and are
never written to the store, which would otherwise keep when each contact typed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc import errors as E
from aegisd.store import groups as G
from aegisd.store import typing_state as ts
from aegisd.store.db import Contact

from .delivery import Recipient
from .host import ServiceHost

if TYPE_CHECKING:

    from .delivery import Delivery

SETTING_ENABLED = "privacy.typing_indicators"
#: At most one "typing" block per contact per this many seconds (the sender), and at most one
#: contact.typing event per contact per this many seconds (the receiver).
INTERVAL = 5.0
#: A shown "typing" ends (event with typing false, lapsed true) this long after the last one.
LAPSE = 8.0


class ContactsView(Protocol):
    def by_name(self, name: str) -> Contact: ...


class TypingHost(ServiceHost, Protocol):
    @property
    def delivery(self) -> Delivery: ...
    @property
    def contacts(self) -> ContactsView: ...

    def check_usable(self) -> None: ...


class Typing:
    def __init__(self, host: TypingHost) -> None:
        self.m = host
        self._sent: dict[int, float] = {}  # contact id: when its last "typing" went (monotonic)
        self._active: set[int] = set()  # a "typing" went, no "stopped" yet
        # The receiver. When a "typing" was last shown is kept apart from whether one shows
        # now: a "stopped" ends the showing, not the rate limit (a peer alternating 0x03 and
        # 0x01 gets one shown "typing" per INTERVAL, not one per block).
        self._shown_at: dict[int, float] = {}  # contact id: when a "typing" was last shown
        self._showing: set[int] = set()  # a shown "typing" not yet ended
        self._heard: dict[int, float] = {}  # contact id: the last TYPING received (the lapse)
        self._lapses: dict[int, asyncio.TimerHandle] = {}  # one lapse timer per contact
        #: What went and what came (the daemon's own counters: ``typing.config`` shows them).
        self.counts = {"sent": 0, "received": 0, "dropped": 0}

    def enabled(self) -> bool:
        return bool(self.m.store.get_setting(SETTING_ENABLED, False))

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled(), "interval": INTERVAL, "lapse": LAPSE,
                "counts": dict(self.counts)}  # fmt: skip

    async def configure(self, enabled: bool | None) -> dict[str, Any]:
        if enabled is not None and not isinstance(enabled, bool):
            raise InvalidParamsError("enabled", "must be true or false")
        if enabled is None or enabled == self.enabled():
            return self.describe()
        m = self.m
        async with m.lock:
            with m.store.transaction():
                m.store.set_setting(SETTING_ENABLED, enabled)
                # Off: those told "on" hear "off", unslotted (with cover on a slot can be
                # minutes away, and until it lands they keep sending theirs; its timing shows
                # only that a setting changed). On: those that said they are on hear "on",
                # slotted: no hurry. Either way each contact's copy leaves after its own
                # delay (receipt delay, then privacy.group_spread_max), as a group's fan-out.
                for cid in ts.told(m.store) if not enabled else ts.peers_on(m.store):
                    peer_on, _ = ts.get(m.store, cid)
                    c = m.store.get_contact(cid)
                    blob = m.store.get_session(cid)
                    if c is None or blob is None or c.blocked:
                        ts.put(m.store, cid, peer_on, False)
                        continue
                    try:
                        m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))],
                                           wire.TypingPayload(enabled, False),
                                           delay=m.delivery.receipt_delay(),
                                           spread=m.delivery.group_spread(),
                                           slotted=enabled)  # fmt: skip
                    except AppError:
                        ts.put(m.store, cid, peer_on, False)
                        continue  # cannot be reached now: told at its first "typing"
                    ts.put(m.store, cid, peer_on, enabled)
                    self.counts["sent"] += 1
            if not enabled:
                # _sent stays: switching off and on again does not restart the rate limit.
                self._active.clear()
                self._showing.clear()
                self._heard.clear()
                for timer in self._lapses.values():
                    timer.cancel()
                self._lapses.clear()
        m.delivery.wake()
        return self.describe()

    async def send(self, name: str, typing: bool) -> dict[str, Any]:
        """``messages.typing``: whether a block went, and if not, why."""
        if not isinstance(typing, bool):
            raise InvalidParamsError("typing", "must be true or false")
        m = self.m
        m.check_usable()
        c = m.contacts.by_name(name)
        if G.is_group_contact(m.store, c.id):
            raise AppError(E.NOT_FOUND, "not_found", "no such contact")
        if c.blocked:
            raise AppError(E.BLOCKED, "blocked", "this contact is blocked")
        if not self.enabled():
            return {"sent": False, "reason": "off"}
        async with m.lock:
            # Again under the lock: a typing.config(false) queued on it ahead of this call
            # has switched them off and told the contact so.
            if not self.enabled():
                return {"sent": False, "reason": "off"}
            blob = m.store.get_session(c.id)
            if blob is None:
                raise AppError(E.NOT_READY, "not_ready", "no session with this contact")
            peer_on, told_on = ts.get(m.store, c.id)
            now = time.monotonic()
            if typing:
                if told_on and not peer_on:
                    return {"sent": False, "reason": "contact_off"}
                last = self._sent.get(c.id)
                if last is not None and now - last < INTERVAL:
                    return {"sent": False, "reason": "rate_limited"}
            elif c.id not in self._active or not peer_on:
                return {"sent": False, "reason": "not_typing"}
            with m.store.transaction():
                m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))],
                                   wire.TypingPayload(True, typing), slotted=False)  # fmt: skip
                ts.put(m.store, c.id, peer_on, True)
            self.counts["sent"] += 1
            if typing:
                self._sent[c.id] = now
                self._active.add(c.id)
            else:
                # _sent stays: "typing" again within INTERVAL waits (at most two blocks per
                # INTERVAL, whatever a frontend calls)
                self._active.discard(c.id)
        m.delivery.wake()
        return {"sent": True, "reason": None}

    def on_payload(self, c: Contact, session: Session, p: wire.TypingPayload) -> None:
        """Inside the receive transaction (messenger lock held)."""
        m = self.m
        _, told_on = ts.get(m.store, c.id)
        if not self.enabled():
            # Ours are off: the contact's choice is kept (not shown), nothing answers.
            ts.put(m.store, c.id, p.enabled, told_on)
            self.counts["dropped"] += 1
            return
        self.counts["received"] += 1
        if p.enabled and not told_on:
            # The contact has them on and has not heard ours: one "on" back (slotted).
            m.delivery.enqueue([Recipient(c, session)], wire.TypingPayload(True, False),
                               delay=m.delivery.receipt_delay())  # fmt: skip
            self.counts["sent"] += 1
            told_on = True
        ts.put(m.store, c.id, p.enabled, told_on)
        now = time.monotonic()
        if p.enabled and p.typing:
            self._heard[c.id] = now
            if c.id in self._showing:
                return  # refreshed: its lapse counts from now
            last = self._shown_at.get(c.id)
            if last is not None and now - last < INTERVAL:
                return  # absorbed: at most one shown "typing" per INTERVAL
            self._shown_at[c.id] = now
            self._showing.add(c.id)
            m.ctx.events.emit_live("contact.typing", {"contact": c.name, "typing": True})
            if c.id not in self._lapses:
                self._lapses[c.id] = asyncio.get_running_loop().call_later(
                    LAPSE, self._lapse, c.id, c.name)  # fmt: skip
        elif c.id in self._showing:
            self._end(c.id)
            m.ctx.events.emit_live("contact.typing", {"contact": c.name, "typing": False})

    def _end(self, contact_id: int) -> None:
        self._showing.discard(contact_id)
        self._heard.pop(contact_id, None)
        timer = self._lapses.pop(contact_id, None)
        if timer is not None:
            timer.cancel()

    def _lapse(self, contact_id: int, name: str) -> None:
        self._lapses.pop(contact_id, None)
        if contact_id not in self._showing:
            return
        left = LAPSE - (time.monotonic() - self._heard.get(contact_id, 0.0))
        if left > 0.05:  # refreshed meanwhile: look again when that one lapses
            self._lapses[contact_id] = asyncio.get_running_loop().call_later(
                left, self._lapse, contact_id, name)  # fmt: skip
            return
        self._end(contact_id)
        if self.m.ctx.store is None:
            return  # locked meanwhile
        self.m.ctx.events.emit_live("contact.typing", {"contact": name, "typing": False,
                                                  "lapsed": True})  # fmt: skip
