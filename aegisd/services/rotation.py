"""Mailbox rotation and relay moves: a contact's receiving mailbox replaced through the ratchet.

Rotation: every ``privacy.mailbox_rotation`` seconds (MAILBOX_ROTATION by default) a contact's
receiving mailbox is replaced: a new mailbox is made and announced inside the ratchet
(MailboxPayload); the old one keeps working until the contact acknowledges
(MailboxAckPayload, stored by the inbox with the receive), then it is deleted at the relay.

A relay move (relay.set on a profile with contacts, SETTING_MOVE) is the same rotation: each
contact is sent a new mailbox at the new relay (the MailboxPayload carries the relay URL); the
old mailbox keeps receiving (a drain link of the relay link's owner) until the contact
acknowledges, then it is deleted at the old relay. A contact that has not acknowledged after
MOVE_BOUND_MS is left behind.

Of the other services this module imports only the mailboxes and the delivery layer (neither
imports it back; host.py is types only): what it uses of the messenger is ``RotationHost``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from aegisd.core import wire
from aegisd.core.session import Session
from aegisd.relayurl import SETTING_URL, same_relay
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import contact_devices as cd
from aegisd.store import cover as cover_slots
from aegisd.store.db import Contact, MailboxRow

from .delivery import Delivery, Recipient
from .host import ServiceHost
from .mailbox import ContactState, OwnedMailbox
from .mailboxes import SETTING_MOVE, Mailboxes

log = logging.getLogger("aegisd.messenger")

MAILBOX_ROTATION = 7 * 24 * 3600  # seconds a per-contact receiving mailbox is used
SETTING_ROTATION = "privacy.mailbox_rotation"
#: + contact id: {"id", "old", "new", "devices", "went", "at"[, "acked"]}; "devices": the
#: contact's other devices (hex IDs) the rotation went to that have not acknowledged it yet;
#: "went": all those it went to; "at": when it started (ms; added at the next check to one
#: stored before it was kept).
ROTATION_KEY = "rotation.contact."
#: A contact that has not confirmed its new mailbox this long after a relay move (the relay's
#: default message TTL: it was offline longer than its blocks could wait) is left behind:
#: its old mailbox is deleted anyway. A rotation waits no longer for a device of the contact
#: either (one that never comes back, without being removed, must not stall it for ever).
MOVE_BOUND_MS = 14 * 24 * 3600 * 1000


def awaiting_devices(store: Store, contact_id: int, pending: dict[str, Any]) -> list[str]:
    """The devices of a rotation's contact that have not acknowledged it, among those it still
    deposits to (a device removed or refused meanwhile waits no more), and none past
    MOVE_BOUND_MS: the old mailbox is retired only once the session row and each of them
    acknowledged (docs/devices.md §5.5)."""
    if _ms() - int(pending.get("at", _ms())) > MOVE_BOUND_MS:
        return []
    answered = {s.device_id.hex() for s in cd.device_sessions(store, contact_id)
                if s.send_to is not None}  # fmt: skip
    return [d for d in pending.get("devices", []) if d in answered]


class CoverView(Protocol):
    def active(self) -> bool: ...


class ContactsView(Protocol):
    def by_name(self, name: str) -> Contact: ...


class RotationHost(ServiceHost, Protocol):
    """What rotation and moves use of the messenger (the owned mailboxes, the lock)."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def cover(self) -> CoverView: ...
    @property
    def mailboxes(self) -> Mailboxes: ...

    @property
    def contacts(self) -> ContactsView: ...


def _ms() -> int:
    return time.time_ns() // 1_000_000


class Rotation:
    def __init__(self, host: RotationHost) -> None:
        self.m = host
        self._moving = asyncio.Lock()  # one continue_move at a time

    async def rotate_due(self) -> None:
        period = int(self.m.store.get_setting(SETTING_ROTATION, MAILBOX_ROTATION))
        cutoff = _ms() - period * 1000
        for c in self.m.store.list_contacts():
            row = self.m.store.mailbox_for_contact(c.id)
            pending = self.m.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if (
                row is None
                or row.created_at >= cutoff
                or pending is not None
                or c.blocked
                or not ContactState.from_bytes(c.state).established
            ):
                continue
            try:
                await self.rotate(c.name)
            except AppError:
                return  # the relay went away: the next pass tries again

    async def finish_acked(self) -> None:
        """Rotations whose acknowledgement was stored but not yet acted on (a crash, a lock)."""
        for c in self.m.store.list_contacts():
            pending = self.m.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if pending is not None and "at" not in pending:  # stored before "at" was kept
                pending = {**pending, "at": _ms()}
                self.m.store.set_setting(f"{ROTATION_KEY}{c.id}", pending)
            if (pending is not None and pending.get("acked")
                    and not awaiting_devices(self.m.store, c.id, pending)):  # fmt: skip
                async with self.m.lock:
                    await self.finish(c, bytes.fromhex(pending["id"]))

    def _rotatable(self, name: str) -> tuple[Contact, bytes, MailboxRow]:
        c = self.m.contacts.by_name(name)
        blob = self.m.store.get_session(c.id)
        old = self.m.store.mailbox_for_contact(c.id)
        if blob is None or old is None or not ContactState.from_bytes(c.state).established:
            raise AppError(E.NOT_READY, "not_ready", "this contact cannot be reached yet")
        return c, blob, old

    async def rotate(self, name: str) -> dict[str, Any]:
        self._rotatable(name)  # its errors before any relay call
        made = await self.m.mailboxes.made_ahead(public=False)  # the proof: outside the lock
        async with self.m.lock:
            try:
                c, blob, old = self._rotatable(name)
            except AppError:
                if made is not None:
                    await self.m.mailboxes.to_pool(made)  # not lost: the next contact's mailbox
                raise
            pending = self.m.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if pending is not None:  # a rotation is under way: keep its old mailbox
                old = self.m.store.get_mailbox(int(pending["old"])) or old
            new_id, new = await self.m.mailboxes.create(
                "contact", public=False, contact_id=c.id, made=made
            )
            rotation_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
            with self.m.store.transaction():
                # The same devices the delivery layer encrypts it for: those that answered.
                devices = [s.device_id.hex() for s in cd.device_sessions(self.m.store, c.id)
                           if s.send_to is not None]  # fmt: skip
                pending = {"id": rotation_id.hex(), "old": old.id, "new": new_id,
                           "devices": devices, "went": devices, "at": _ms()}  # fmt: skip
                self.m.store.set_setting(f"{ROTATION_KEY}{c.id}", pending)
                self.m.delivery.enqueue(
                    [Recipient(c, Session.from_bytes(blob))],
                    wire.MailboxPayload(rotation_id, new.address()),
                )
        self.m.delivery.wake()
        return {"contact": c.name, "rotating": True}

    async def finish(self, c: Contact, rotation_id: bytes) -> None:
        pending = self.m.store.get_setting(f"{ROTATION_KEY}{c.id}")
        if pending is None or pending["id"] != rotation_id.hex():
            return
        # The retired mailbox and any mailbox older than the new one go.
        for row in self.m.store.list_mailboxes("contact"):
            if row.contact_id == c.id and row.id < int(pending["new"]):
                await self.m.mailboxes.retire(row.id)
        self.m.store.set_setting(f"{ROTATION_KEY}{c.id}", None)
        self.m.ctx.events.emit("contact.mailbox_rotated", {"contact": c.name})
        self.move_progress()

    # --- moving to another relay -------------------------------------------------------------

    def move_status(self) -> dict[str, Any] | None:
        store = self.m.ctx.store
        move = store.get_setting(SETTING_MOVE) if store is not None else None
        if not move:
            return None
        url = str(store.get_setting(SETTING_URL)) if store is not None else ""
        owned, contact = self.m.mailboxes.owned.values(), self.m.store.get_contact
        left = sorted({c.name for row, mb in owned if row.role == "contact"
                       and not same_relay(mb.relay_url, url) and row.contact_id is not None
                       and (c := contact(row.contact_id)) is not None})  # fmt: skip
        return {"from": move["from"], "started_at": move["at"], "contacts_left": left}

    async def continue_move(self) -> None:
        """Announce a mailbox at the current relay to every contact still received at another
        one; past the bound, delete the old mailboxes of those that never confirmed. With cover
        on, one contact per pool mailbox: the pool is refilled at random times (cover.py), so
        the new relay does not see a burst of creations, and each announcement rides its
        contact's next slot (§24)."""
        async with self._moving:
            await self._continue_move()

    async def _continue_move(self) -> None:
        if self.m.ctx.store is None:
            return
        move = self.m.store.get_setting(SETTING_MOVE)
        if not move:
            return
        url = self.m.mailboxes.relay_url()
        overdue = _ms() - int(move["at"]) > MOVE_BOUND_MS
        for c in self.m.store.list_contacts():
            row = self.m.store.mailbox_for_contact(c.id)
            if row is None or same_relay(OwnedMailbox.from_bytes(row.descriptor).relay_url, url):
                continue  # its newest mailbox is here already (announced, or confirmed)
            if ContactState.from_bytes(c.state).established and not c.blocked:
                if self.m.cover.active() and not cover_slots.pool_rows(self.m.store):
                    break  # the next pool mailbox (made at a random time) moves the next one
                try:
                    await self.rotate(c.name)
                except AppError as exc:
                    if exc.code in (E.RELAY_UNAVAILABLE, E.RELAY_FULL):
                        return  # the relay went away or is full: the next connection goes on
                    continue  # this contact cannot move now (not_ready: no session): the next
        if overdue:
            async with self.m.lock:
                for row in self.m.store.list_mailboxes("contact"):
                    if not same_relay(OwnedMailbox.from_bytes(row.descriptor).relay_url, url):
                        await self.m.mailboxes.retire(row.id)
        self.move_progress()

    def move_progress(self) -> None:
        """The move is over once no mailbox of ours is left at another relay."""
        if self.m.ctx.store is None:
            return
        move = self.m.store.get_setting(SETTING_MOVE)
        if move:
            url = self.m.store.get_setting(SETTING_URL)
            if all(same_relay(mb.relay_url, url) for _, mb in self.m.mailboxes.owned.values()):
                self.m.store.set_setting(SETTING_MOVE, None)
                log.info("relay move finished")
                self.m.ctx.events.emit("relay.moved", {"from": move["from"], "url": url})
        self.m.mailboxes.reconcile_drains()
