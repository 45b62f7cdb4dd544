"""Sessions with a contact's devices (docs/devices.md §5.2, §5.5), as this device opens
them: for every device of the contact's list it has no session with, its bundle fetched at its
``bundle_address`` and a first contact to its device mailbox (PQXDH), whose hello carries the
contact mailbox for the person (a device hello bound to the session's EK_A.pub when this
device has a list of its own); tried again after OPEN_RETRIES' waits, then at the next
unlock. A session never answered is opened anew after REOPEN_AFTER, at most REOPENS times per
device, the one it replaced kept (``superseded``) in case the device answers it after all. A
contact device moving its mailbox (``device_rotated``). The list sending and what comes in a
contact's sessions are fanout.py's (``Fanout`` extends ``DeviceSessions``).

Nothing here logs a list, a device ID or a contact.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import pqxdh, wire
from aegisd.core.errors import BundleError, DecodeError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.session import Session, initiate_session
from aegisd.rpc import AppError
from aegisd.store import contact_devices as cd
from aegisd.store.db import Contact
from aegisd.store.devices import SETTING_OWN_LIST

from . import device_answers
from .bundle_fetch import fetch_bundle
from .delivery import Delivery
from .host import ServiceHost
from .mailbox import OwnedMailbox, address_to_bytes
from .mailboxes import Mailboxes

log = logging.getLogger("aegisd.fanout")

#: How long a held session (fanout.py SETTING_HELD) and a superseded one are kept, seconds.
HELD_FOR = 14 * 24 * 3600
#: What a device hello sent in a session opened before the person had a list binds in place of
#: the session's EK_A.pub (docs/protocol.md §28.4).
LEGACY_EK = bytes(32)
SETTING_NAME = "profile.display_name"
#: The sessions this device opened with a contact's devices that are not answered yet:
#: {contact id: [device hex, ...]}. Only these meet the device-ID rule when that device's own
#: first contact comes (§5.2); a session it opened that was answered, or one it adopted, means
#: a new first contact from that device is a device that lost its state.
SETTING_OPENED = "devices.opened_unanswered"
#: Seconds between the attempts to open a session with a contact's device whose bundle is not
#: at the relay yet.
OPEN_RETRIES = (1.0, 2.0, 5.0, 15.0, 60.0)
#: A session this device opened with a contact's device that never answered (its first contact
#: lost on the way, or dropped by the other side) is opened anew once REOPEN_AFTER seconds
#: passed, while the daemon runs and at the next unlock, at most REOPENS times per device
#: (docs/devices.md §5.5): {contact id: {device hex: times opened anew}}.
REOPEN_AFTER = 600
REOPENS = 3
SETTING_REOPENED = "devices.reopened"
#: The unanswered sessions a reopening replaced, kept HELD_FOR seconds: the device may only have
#: been away, and answer the first one after all (it then stands again, and the one it replaced
#: is kept in its place: whichever the device answers last is the device's session):
#: {contact id: {device hex: [[session hex, kept since], ...]}}, at most REOPENS per device.
SETTING_SUPERSEDED = "devices.superseded"


def _now() -> int:
    return int(time.time())


class OwnListTaker(Protocol):
    def take_own_list(self, incoming: dv.DeviceList) -> None: ...


class FanoutHost(ServiceHost, Protocol):
    @property
    def own_sync(self) -> OwnListTaker: ...
    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def delivery(self) -> Delivery: ...
    def identity(self) -> IdentityKeyPair: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class DeviceSessions:
    """The sessions this device opens with a contact's devices (fanout.py ``Fanout`` is one)."""

    def __init__(self, host: FanoutHost) -> None:
        self.m = host
        self._opening: set[int] = set()  # contacts whose device sessions are being opened
        self._reopening: set[int] = set()  # contacts with a _reopen_later waiting: one each

    def _opened_unanswered(self, contact_id: int, device_id: bytes) -> bool:
        opened = self.m.store.get_setting(SETTING_OPENED) or {}
        return device_id.hex() in opened.get(str(contact_id), [])

    def _mark_opened(self, contact_id: int, device_id: bytes, unanswered: bool) -> None:
        """Record (or clear) that this device opened the session with the contact's
        ``device_id`` and it is not answered yet (inside the caller's transaction). Only IDs
        with a session are kept: bounded by the contacts' lists."""
        store = self.m.store
        opened = dict(store.get_setting(SETTING_OPENED) or {})
        have = {s.device_id.hex() for s in cd.device_sessions(store, contact_id)}
        ids = [d for d in opened.get(str(contact_id), []) if d in have and d != device_id.hex()]
        if unanswered:
            ids.append(device_id.hex())
        if ids:
            opened[str(contact_id)] = ids
        else:
            opened.pop(str(contact_id), None)
        store.set_setting(SETTING_OPENED, opened or None)

    def _own_list(self) -> dv.DeviceList | None:
        value = self.m.store.get_setting(SETTING_OWN_LIST)
        return None if value is None else dv.DeviceList.from_bytes(bytes.fromhex(str(value)))

    async def open_sessions(self, contact_id: int) -> None:
        """Open a session with every device of the contact's list this device has none with
        (§5.2): its bundle fetched at its bundle address, a first contact to its device
        mailbox. Waits for the hello that names the device of the contact's session row. A
        device whose bundle is not there yet (a list travels faster than its new device
        publishes) is tried again, after OPEN_RETRIES' waits, then at the next unlock."""
        if contact_id in self._opening:
            return
        self._opening.add(contact_id)
        try:
            for wait in (*OPEN_RETRIES, None):
                failed = False
                for entry in self._missing(contact_id):
                    try:
                        await self._open(contact_id, entry)
                    except (AppError, DecodeError, BundleError):
                        failed = True
                if not failed or wait is None:
                    if failed:
                        droplog.dropped("could not open a session with a contact's device")
                    if self._unanswered(contact_id) and contact_id not in self._reopening:
                        self._reopening.add(contact_id)
                        self.m.spawn(self._reopen_later(contact_id))
                    return
                await asyncio.sleep(wait)
        finally:
            self._opening.discard(contact_id)

    async def open_all(self) -> None:
        """At unlock: the sessions a stop or an absent bundle left unopened."""
        store = self.m.ctx.store
        if store is None:
            return
        for c in store.list_contacts():
            if self._missing(c.id):
                self.m.spawn(self.open_sessions(c.id))

    def _missing(self, contact_id: int) -> list[dv.DeviceEntry]:
        """The listed devices to open a session with: those with none, and those whose
        session never answered for REOPEN_AFTER (fewer than REOPENS times opened anew)."""
        store = self.m.ctx.store
        if store is None:
            return []
        held = cd.held_list(store, contact_id)
        if held is None or held.session_device is None:
            return []
        have = {s.device_id for s in cd.device_sessions(store, contact_id)}
        have -= self._unanswered(contact_id, _now() - REOPEN_AFTER)
        have.add(held.session_device)
        return [e for e in dv.DeviceList.from_bytes(held.data).devices if e.device_id not in have]

    def _unanswered(self, contact_id: int, before: int | None = None) -> set[bytes]:
        """The contact's devices whose session never answered (opened before ``before``)
        and may still be opened anew."""
        store = self.m.ctx.store
        if store is None:
            return set()
        counts = dict(store.get_setting(SETTING_REOPENED) or {}).get(str(contact_id), {})
        return {d for d, opened in cd.unanswered_sessions(store, contact_id).items()
                if (before is None or opened <= before)
                and int(counts.get(d.hex(), 0)) < REOPENS}  # fmt: skip

    def superseded(self, contact_id: int) -> list[tuple[bytes, bytes, bytes | None]]:
        """(device ID, session state, its EK_A.pub or None from before it was kept) of the
        sessions a reopening replaced, still kept."""
        store, now = self.m.store, _now()
        kept = dict(store.get_setting(SETTING_SUPERSEDED) or {}).get(str(contact_id), {})
        # Only of a device that still has a session: one a list dropped stays dropped.
        have = {s.device_id.hex() for s in cd.device_sessions(store, contact_id)}
        return [(bytes.fromhex(d), bytes.fromhex(str(i[0])),
                 bytes.fromhex(str(i[2])) if len(i) > 2 and i[2] else None)
                for d, items in kept.items() if d in have
                for i in items if int(i[1]) + HELD_FOR > now]  # fmt: skip

    def took_superseded(self, contact_id: int, device_id: bytes, used: bytes) -> None:
        """A superseded session of ``device_id`` is the device's again (inside the receive's
        transaction, which then stores that session as the device's): one proven in itself
        (device_answers.py) that decrypted a block, or one whose answer and proof just came in
        it. The session it replaces is kept among the superseded in its place. An unproven
        one never gets here (the inbox keeps it aside, update_superseded): a session a removed
        device was handed must not take over the listed device's proven one."""
        store = self.m.store
        current = next((s.state for s in cd.device_sessions(store, contact_id)
                        if s.device_id == device_id), None)  # fmt: skip
        current_ek = device_answers.session_ek(store, contact_id, device_id)
        everything = dict(store.get_setting(SETTING_SUPERSEDED) or {})
        mine = dict(everything.get(str(contact_id), {}))
        items = mine.get(device_id.hex(), [])
        used_ek = next((bytes.fromhex(str(i[2])) for i in items
                        if i[0] == used.hex() and len(i) > 2), None)  # fmt: skip
        mine[device_id.hex()] = [i for i in items if i[0] != used.hex()]
        everything[str(contact_id)] = mine
        store.set_setting(SETTING_SUPERSEDED, everything)
        if current is not None:
            self._keep_superseded(contact_id, device_id, current, current_ek)
        send_to = device_answers.swapped(store, contact_id, device_id, used_ek)
        cd.set_device_send_to(store, contact_id, device_id, send_to)
        if send_to is not None:
            self._mark_opened(contact_id, device_id, False)  # answered: no tie-break left
        self._prune_answers(contact_id)

    def update_superseded(
        self, contact_id: int, device_id: bytes, used: bytes, state: bytes
    ) -> None:
        """An unproven superseded session decrypted a block: its new state kept in its place,
        the device's session unchanged (inside the receive's transaction)."""
        store = self.m.store
        everything = dict(store.get_setting(SETTING_SUPERSEDED) or {})
        mine = dict(everything.get(str(contact_id), {}))
        mine[device_id.hex()] = [[state.hex(), *i[1:]] if i[0] == used.hex() else i
                                 for i in mine.get(device_id.hex(), [])]  # fmt: skip
        everything[str(contact_id)] = mine
        store.set_setting(SETTING_SUPERSEDED, everything)

    def _keep_superseded(
        self, contact_id: int, device_id: bytes, state: bytes, ek: bytes | None
    ) -> None:
        store, now = self.m.store, _now()
        everything = dict(store.get_setting(SETTING_SUPERSEDED) or {})
        mine = dict(everything.get(str(contact_id), {}))
        items = [i for i in mine.get(device_id.hex(), []) if int(i[1]) + HELD_FOR > now]
        items.append([state.hex(), now, "" if ek is None else ek.hex()])
        while len(items) > REOPENS:  # the oldest unproven goes first: never a proven one
            # for sessions nobody proved (reopenings pushed by a session a removed device
            # answered would otherwise evict the listed device's proven one)
            unproven = [i for i in items if not (len(i) > 2 and i[2] and device_answers.is_proven(
                store, contact_id, bytes.fromhex(str(i[2]))))]  # fmt: skip
            items.remove(unproven[0] if unproven else items[0])
        mine[device_id.hex()] = items
        everything[str(contact_id)] = mine
        store.set_setting(SETTING_SUPERSEDED, everything)

    def _drop_superseded(self, contact_id: int, device_id: bytes) -> None:
        """The device opened a new session that was taken: the ones we opened are dead."""
        store = self.m.store
        everything = dict(store.get_setting(SETTING_SUPERSEDED) or {})
        mine = dict(everything.get(str(contact_id), {}))
        if mine.pop(device_id.hex(), None) is not None:
            everything[str(contact_id)] = mine
            store.set_setting(SETTING_SUPERSEDED, everything)

    def _prune_answers(self, contact_id: int) -> None:
        """Answers and proofs of sessions no longer held go (device_answers.prune)."""
        kept = dict(self.m.store.get_setting(SETTING_SUPERSEDED) or {}).get(str(contact_id), {})
        device_answers.prune(self.m.store, contact_id,
                             [str(i[2]) for items in kept.values() for i in items
                              if len(i) > 2 and i[2]])  # fmt: skip

    async def _reopen_later(self, contact_id: int) -> None:
        """A session opened and not answered: looked at again once REOPEN_AFTER passed (a
        task that a lock cancels: the next unlock's open_all looks then)."""
        try:
            await asyncio.sleep(REOPEN_AFTER + random.SystemRandom().uniform(0, 60))
        finally:
            self._reopening.discard(contact_id)
        await self.open_sessions(contact_id)

    async def _open(self, contact_id: int, entry: dv.DeviceEntry) -> None:
        c = self.m.store.get_contact(contact_id)
        if c is None or c.identity_key is None or c.blocked:
            return
        identity = PublicIdentity.from_bytes(c.identity_key)
        if not self.m.mailboxes.peer_url_ok(entry.mailbox.relay_url):
            droplog.dropped("a contact device's relay URL is refused")
            return
        base, x, m = await fetch_bundle(entry.mailbox.relay_url, entry.bundle_address,
                                        self.m.mailboxes.link, self.m.ctx.network())  # fmt: skip
        bundle = pqxdh.verify_bundle(base, x, m, expected=identity)
        async with self.m.lock:
            if entry not in self._missing(contact_id):
                return  # listed no more, or opened meanwhile
            row = self.m.store.mailbox_for_contact(contact_id)
            if row is None:
                return
            reply = OwnedMailbox.from_bytes(row.descriptor).address()
            session, block = initiate_session(
                self.m.entropy, self.m.identity(), bundle, self._first_payload(reply)
            )
            with self.m.store.transaction():
                if entry.device_id in self._unanswered(contact_id):  # opened anew: counted
                    reopened = dict(self.m.store.get_setting(SETTING_REOPENED) or {})
                    counts = dict(reopened.get(str(contact_id), {}))
                    key = entry.device_id.hex()
                    counts[key] = int(counts.get(key, 0)) + 1
                    reopened[str(contact_id)] = counts
                    self.m.store.set_setting(SETTING_REOPENED, reopened)
                    old = next(s.state for s in cd.device_sessions(self.m.store, contact_id)
                               if s.device_id == entry.device_id)  # fmt: skip
                    old_ek = device_answers.session_ek(self.m.store, contact_id, entry.device_id)
                    self._keep_superseded(contact_id, entry.device_id, old, old_ek)
                cd.put_device_session(
                    self.m.store, contact_id, entry.device_id, session.to_bytes(), _now()
                )
                ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
                device_answers.opened(self.m.store, contact_id, entry.device_id, ek)
                self._prune_answers(contact_id)
                self._mark_opened(contact_id, entry.device_id, True)
                self.m.store.enqueue_blocks(
                    address_to_bytes(entry.mailbox), [block], contact_id=contact_id
                )
        self.m.delivery.wake()

    def _first_payload(self, reply: wire.MailboxAddress) -> bytes | Callable[[bytes], bytes]:
        """The first payload of a session this device opens with a contact's device: with a
        list of our own, a device hello bound to the session's EK_A.pub (§28.4), which the
        contact's device checks under our list; without one, a hello (0x03) carrying
        DEVICE_SESSION, so a group member's session is not taken for a contact request."""
        store, identity = self.m.store, self.m.identity()
        if device_answers.own_hello(store, identity, reply, LEGACY_EK) is None:
            name = str(store.get_setting(SETTING_NAME, ""))
            return wire.encode_payload(wire.HelloPayload(reply, name, wire.DEVICE_SESSION))

        def hello(ek: bytes) -> bytes:
            signed = device_answers.own_hello(store, identity, reply, ek)
            assert signed is not None
            return dv.encode_device_payload(signed)

        return hello

    def device_rotated(self, c: Contact, device_id: bytes, p: wire.MailboxPayload) -> None:
        """A contact device moved its mailbox for us (§20.6): its blocks go to the new one,
        and the acknowledgement goes in its session only (inside the receive's transaction)."""
        store = self.m.store
        ds = next((s for s in cd.device_sessions(store, c.id) if s.device_id == device_id), None)
        if ds is None:
            return
        new = address_to_bytes(p.mailbox)
        if ds.send_to is not None:
            store.readdress_outbox(c.id, ds.send_to, new)
        cd.set_device_send_to(store, c.id, device_id, new)
        session = Session.from_bytes(ds.state)
        ack = wire.encode_payload(wire.MailboxAckPayload(p.rotation_id))
        blocks = session.encrypt(self.m.entropy, ack)
        cd.put_device_session(store, c.id, device_id, session.to_bytes(), _now())
        delay_ms = int(self.m.delivery.receipt_delay() * 1000)
        store.enqueue_blocks(new, blocks, contact_id=c.id,
                             not_before=time.time_ns() // 1_000_000 + delay_ms)  # fmt: skip
        self.m.delivery.wake()
