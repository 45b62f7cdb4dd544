"""Sync between this profile's own devices (docs/devices.md §6).

- Sessions. For every other device of the newest own list, the device with the lower device ID
  opens a session: PQXDH to the other's bundle (its ``bundle_address``), so
  ``AD = Encode(IK) || Encode(IK)``, a first contact to its device mailbox whose payload is a
  device hello (0x41) bound to the session's ``EK_A.pub`` and naming a sync mailbox of ours
  for it. The other device (inbox.py: a first contact from our own identity) checks the hello
  against its own newest list, keeps the session as the sync session with that device and
  answers in it with a hello of its own (same ``EK_A.pub``) naming its sync mailbox.
- Payloads (core/sync.py, 0x44-0x46; and the own list, 0x40): taken only in a sync session
  whose device is in the newest own list held; a device dropped from the list has its
  session erased, and what it still deposits into our mailbox for it is refused, counted and
  changes nothing.
- What is synced: a text sent to a contact (a sent transcript), "read up to" a message of a
  conversation, and contacts (added, renamed, verified, blocked, removed: last writer wins by
  ``(changed_at_ms, device_id)``). Each leaves after a random delay (the receipt delay,
  privacy.receipt_delay_max) so that the relay does not see a sync deposit right after each
  deposit to a contact, but no earlier than a payload queued before it to the same device:
  each device gets this device's payloads in the order they were made (a text before its
  edit, §28.6). Message actions and the profile's settings (0x48, 0x49):
  own_sync_actions.py, own_sync_settings.py.

Sync mailboxes are rows of ``mailboxes`` with role 'contact' and no contact (from the pool
when there is one). Nothing here logs a device ID, a contact or a text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import pqxdh, sync_actions, wire
from aegisd.core import sync as sy
from aegisd.core.errors import BundleError, DecodeError, DecryptionError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity, keys_of
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.session import FirstContact, Session, initiate_session
from aegisd.core.sync_groups import MAX_GROUP_SYNC_FRAGMENTS
from aegisd.rpc import AppError
from aegisd.store import devices as store_devices
from aegisd.store import groups as group_store
from aegisd.store import own_sync as rows
from aegisd.store.cover import SLOT_WAIT
from aegisd.store.db import Contact

from . import device_answers
from .bundle_fetch import fetch_bundle
from .delivery import NEVER, Delivery
from .host import ServiceHost
from .mailbox import ContactState, address_to_bytes
from .mailboxes import Mailboxes
from .names import clean_name

SETTING_OWN_LIST = store_devices.SETTING_OWN_LIST
SETTING_SELF = store_devices.SETTING_SELF
SETTING_KEY = store_devices.SETTING_KEY
#: Seconds between the attempts to open a sync session with a device whose bundle is not at
#: the relay yet (a new device publishes it after its install).
OPEN_RETRIES = (1.0, 2.0, 5.0, 15.0, 60.0)
#: Seconds a session this device opened may stay unanswered before it is opened again (the
#: other device may have lost the first contact: held in memory only, or refused meanwhile);
#: doubled at each further reopen of the same device while the daemon runs, up to 2^6 times.
OPEN_TIMEOUT = 600
#: A sync payload spans at most this many blocks (the longest: a transcript of MAX_TEXT_BYTES).
MAX_SYNC_FRAGMENTS = -(-(wire.MAX_TEXT_BYTES + wire.IDENTITY_LEN + 42) // wire.RATCHET_CAPACITY)
REFUSED_REMOVED = "refused a sync payload from a removed device"


def _now() -> int:
    return int(time.time())


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def unique_name(self, wanted: str) -> str: ...
    async def accept_request(self, request_id: int, name: str | None) -> dict[str, Any]: ...
    async def remove_locked(self, c: Contact,
                            then: Callable[[], None] | None = None) -> None: ...


class Waker(Protocol):
    def wake(self) -> None: ...


class GroupSyncView(Protocol):
    def on_payload(self, content: bytes) -> None: ...


class MoreView(Protocol):
    """0x48 and 0x49's receivers (own_sync_actions.py, own_sync_settings.py)."""

    def on_payload(self, device_id: bytes, p: Any) -> None: ...


class ActionsView(MoreView, Protocol):
    def arrived(self, message_id: str) -> None: ...


class OwnSyncHost(ServiceHost, Protocol):
    prekeys: PrekeyStore | None

    @property
    def sync_groups(self) -> GroupSyncView: ...

    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def delivery(self) -> Delivery: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def disappearing(self) -> Waker: ...
    @property
    def sync_actions(self) -> ActionsView: ...
    @property
    def sync_settings(self) -> MoreView: ...
    def identity(self) -> IdentityKeyPair: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class OwnSync:
    def __init__(self, host: OwnSyncHost) -> None:
        self.m = host
        self._opening = False
        self._again = False
        #: First contacts from a device not in our list yet, but naming a newer list.
        self._held: dict[bytes, tuple[FirstContact, bytes]] = {}  # by device ID
        #: Reopens of an unanswered session per device (the next waits longer) and whether a
        #: timer for the next is set.
        self._reopens: dict[bytes, int] = {}
        self._timer = False
        #: Contacts (their keys) a synced change is being applied to: not sent back.
        self._applying: set[bytes] = set()
        #: Removed devices whose refusal was reported (devices.sync 'refused').
        self._refused: set[bytes] = set()
        #: Listeners (device_caps.py), all inside the caller's transaction: told of a session
        #: just answered (device ID; what they queue for that device is sealed first), given a
        #: listed device's 0x47, and the own list when it changed.
        self.answered_listeners: list[Callable[[bytes], None]] = []
        self.delete_keys_listeners: list[Callable[[bytes, sy.DeleteKeys], None]] = []
        self.list_listeners: list[Callable[[dv.DeviceList], None]] = []

    # --- this device and its list ----------------------------------------------------------

    def _own(self) -> tuple[dv.DeviceList, bytes, bytes] | None:
        """The own list held, this device's ID and device key; None before any link."""
        store = self.m.store
        own, me, key = (store.get_setting(n) for n in (SETTING_OWN_LIST, SETTING_SELF,
                                                        SETTING_KEY))  # fmt: skip
        if own is None or me is None or key is None:
            return None
        return dv.DeviceList.from_bytes(bytes.fromhex(str(own))), bytes.fromhex(str(me)), \
            bytes.fromhex(str(key))

    def own(self) -> tuple[dv.DeviceList, bytes, bytes] | None:
        return self._own()

    def is_own(self, sender: PublicIdentity) -> bool:
        return sender.encode() == self.m.identity().public.encode()

    def _refuse(self, device_id: bytes) -> None:
        """Each refusal is counted; the stored event goes once per device while the daemon
        runs (a removed device's every block would fill the event log)."""
        droplog.dropped(REFUSED_REMOVED)
        if device_id not in self._refused and len(self._refused) < dv.MAX_DEVICES * 4:
            self._refused.add(device_id)
            self.m.ctx.events.emit("devices.sync", {"device": device_id.hex(),
                                                    "state": "refused"})  # fmt: skip

    # --- opening -------------------------------------------------------------------------------

    def _to_open(self) -> list[dv.DeviceEntry]:
        """Listed devices with a higher ID than ours that we hold no live session with, or
        one that has not answered for a while (reopened: the first contact may be lost)."""
        store = self.m.ctx.store
        own = None if store is None else self._own()
        if store is None or own is None:
            return []
        listed, me, _ = own
        if me not in listed.ids():
            return []
        out = []
        for e in listed.devices:
            row = rows.get(store, e.device_id)
            if e.device_id > me and (row is None or row.removed
                                     or self._unanswered_for(row) >= self._timeout(row)):
                out.append(e)
        return out

    @staticmethod
    def _unanswered_for(row: rows.SyncRow) -> int:
        """Seconds since ``row``'s session was opened unanswered (-1: answered or removed)."""
        if row.removed or row.state is None or row.send_to is not None:
            return -1
        return _now() - row.updated_at

    def _timeout(self, row: rows.SyncRow) -> int:
        return OPEN_TIMEOUT << min(self._reopens.get(row.device_id, 0), 6)

    def _arm(self) -> None:
        """A timer for the next unanswered session's reopen (one at a time)."""
        store = self.m.ctx.store
        if store is None or self._timer:
            return
        waits = [self._timeout(r) - self._unanswered_for(r) for r in rows.rows(store)
                 if self._unanswered_for(r) >= 0]  # fmt: skip
        if waits:
            self._timer = True
            self.m.spawn(self._reopen_after(max(1, min(waits))))

    async def _reopen_after(self, seconds: int) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self._timer = False
        await self.ensure()

    async def ensure(self) -> None:
        """Open the sync sessions this device owes (it has the lower ID); a bundle not
        published yet is tried again after OPEN_RETRIES' waits, then at the next unlock."""
        if self._opening:
            self._again = True
            return
        self._opening = True
        try:
            for wait in (*OPEN_RETRIES, None):
                self._again = False
                failed = False
                for entry in self._to_open():
                    try:
                        await self._open(entry)
                    except (AppError, DecodeError, BundleError):
                        failed = True
                if (not failed and not self._again) or wait is None:
                    if failed:
                        droplog.dropped("could not open a sync session with an own device")
                    self._arm()
                    return
                await asyncio.sleep(0 if not failed else wait)
        finally:
            self._opening = False

    async def _open(self, entry: dv.DeviceEntry) -> None:
        identity = self.m.identity()
        if not self.m.mailboxes.peer_url_ok(entry.mailbox.relay_url):
            droplog.dropped("an own device's relay URL is refused")
            return
        base, x, m = await fetch_bundle(entry.mailbox.relay_url, entry.bundle_address,
                                        self.m.mailboxes.link, self.m.ctx.network())  # fmt: skip
        bundle = pqxdh.verify_bundle(base, x, m, expected=identity.public)
        async with self.m.lock:
            own = self._own()
            if own is None or entry not in self._to_open():
                return  # listed no more, or opened meanwhile
            listed, me, key = own
            mb_id, mb = await self.m.mailboxes.create("contact", public=False)

            def hello(ek: bytes) -> bytes:
                h = dv.DeviceHello.sign(key, identity.public, me, mb.address(), listed.version, ek)
                return dv.encode_device_payload(h)

            session, block = initiate_session(self.m.entropy, identity, bundle, hello)
            ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
            store = self.m.store
            old = rows.get(store, entry.device_id)
            if old is not None and self._unanswered_for(old) >= 0:
                self._reopens[entry.device_id] = self._reopens.get(entry.device_id, 0) + 1
            with store.transaction():
                # What waits for the session (sync_waiting) stays there until it is answered.
                self._retire_old(entry.device_id)
                rows.put(store, entry.device_id, session.to_bytes(), mb_id, None, ek, _now())
                store.enqueue_blocks(address_to_bytes(entry.mailbox), [block])
        self.m.delivery.wake()

    def _retire_old(self, device_id: bytes) -> None:
        """A newer session replaces an older one: the older one's mailbox is deleted at the
        relay (now or on a later connection: renewal.py drains the queue)."""
        old = rows.get(self.m.store, device_id)
        rows.drop_pending(self.m.store, device_id)  # sealed in the older session: useless now
        if old is None or old.mailbox_id is None:
            return
        row = self.m.store.get_mailbox(old.mailbox_id)
        if row is not None:
            store_devices.retire_mailbox(self.m.store, row.descriptor)
            self.m.store.delete_mailbox(row.id)

    async def on_first_contact(self, fc: FirstContact, block: bytes, *,
                               replay: bool = False) -> None:  # fmt: skip
        """A first contact from our own identity (inbox.py, under the lock): a device of ours
        opening its sync session with this one (``replay``: one held, seen again)."""
        assert self.m.prekeys is not None
        store, prekeys = self.m.store, self.m.prekeys
        own = self._own()
        try:
            hello = dv.decode_device_payload(fc.fragment.data)
        except DecodeError:
            hello = None
        entry, ek = None, b""
        if own is not None and isinstance(hello, dv.DeviceHello):
            ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
            # As dv.accept bounds a list: no version a removed device names pins a place here.
            newest_acceptable = (_now() + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND
            try:
                entry = hello.check(self.m.identity().public, own[0], ek)
            except dv.UnlistedDevice:
                if (not replay
                        and own[0].version < hello.list_version <= newest_acceptable
                        and (hello.device_id in self._held
                             or len(self._held) < dv.MAX_DEVICES)):  # fmt: skip
                    # A device that holds a newer list (a new one, whose link this device is
                    # just completing): held in memory until our list names it, one per device
                    # ID, once (still unlisted at the replay: dropped). Lost at a restart: the
                    # opener opens again after OPEN_TIMEOUT.
                    self._held[hello.device_id] = (fc, block)
                    with store.transaction():
                        store.put_identity(prekeys.to_bytes())
                    return
            except dv.ForgedDeviceProof:
                entry = None
        if (own is None or entry is None or not isinstance(hello, dv.DeviceHello)
                or entry.device_id == own[1]
                or not self.m.mailboxes.peer_url_ok(hello.reply.relay_url)):  # fmt: skip
            with store.transaction():
                store.put_identity(prekeys.to_bytes())  # the one-time keys stay burnt
            droplog.dropped("refused a sync session not proven by a listed own device")
            return
        listed, me, key = own
        mb_id, mb = await self.m.mailboxes.create("contact", public=False)
        answer = dv.DeviceHello.sign(key, self.m.identity().public, me, mb.address(),
                                     listed.version, ek)  # fmt: skip
        session = fc.session
        blocks = session.encrypt(self.m.entropy, dv.encode_device_payload(answer))
        with store.transaction():
            store.put_identity(prekeys.to_bytes())
            self._retire_old(entry.device_id)
            send_to = address_to_bytes(hello.reply)
            store.enqueue_blocks(send_to, blocks)
            for answered in self.answered_listeners:
                answered(entry.device_id)
            self._flush(session, entry.device_id, send_to)
            rows.put(store, entry.device_id, session.to_bytes(), mb_id, send_to, ek, _now())
            self.m.ctx.events.emit("devices.sync", {"device": entry.device_id.hex(),
                                                    "state": "open"})  # fmt: skip
        self.m.mailboxes.reload()
        self.m.delivery.wake()

    # --- receiving -------------------------------------------------------------------------

    def receive(self, mailbox_id: int, block: bytes) -> None:
        """A block in a sync mailbox of ours (inbox.py, under the lock)."""
        store = self.m.store
        row = rows.by_mailbox(store, mailbox_id)
        if row is None:
            droplog.dropped("dropped a block in a mailbox of no contact")
            return
        own = self._own()
        if row.removed or row.state is None or own is None or row.device_id not in own[0].ids():
            with store.transaction():
                if not row.removed:
                    rows.mark_removed(store, row.device_id, _now())
                self._refuse(row.device_id)
            return
        session = Session.from_bytes(row.state)
        try:
            fragment = session.decrypt(self.m.entropy, block)
        except DecryptionError:
            droplog.dropped("dropped a sync block that did not decrypt")
            return
        with store.transaction():
            rows.set_state(store, row.device_id, session.to_bytes(), _now())
            if fragment.count == 1:
                content: bytes | None = fragment.data
            elif fragment.count > max(MAX_SYNC_FRAGMENTS, MAX_GROUP_SYNC_FRAGMENTS):
                droplog.dropped("dropped a fragment of an oversized sync payload")
                return
            else:
                parts = rows.put_fragment(store, row.device_id, fragment.msg_id, fragment.index,
                                          fragment.count, fragment.data, _now())  # fmt: skip
                content = None if parts is None else b"".join(parts)
            if content is None:
                return
            try:
                self._on_content(row, own, content)
            except DecodeError:
                droplog.dropped("dropped a sync payload that did not parse")

    def _on_content(self, row: rows.SyncRow, own: tuple[dv.DeviceList, bytes, bytes],
                    content: bytes) -> None:  # fmt: skip
        store, identity = self.m.store, self.m.identity().public
        if wire.is_device_payload(content):
            payload = dv.decode_device_payload(content)
            if isinstance(payload, dv.DeviceHello):
                if row.send_to is not None or payload.device_id != row.device_id:
                    droplog.dropped("dropped a device hello out of place")
                    return
                try:
                    payload.check(identity, own[0], row.session_ek)
                except (dv.UnlistedDevice, dv.ForgedDeviceProof):
                    droplog.dropped("refused a sync session not proven by a listed own device")
                    return
                send_to = address_to_bytes(payload.reply)
                rows.set_send_to(store, row.device_id, send_to)
                self._reopens.pop(row.device_id, None)
                due = time.time_ns() // 1_000_000 + int(self.m.delivery.receipt_delay() * 1000)
                # Blocks sealed before the answer by an older daemon wait in the outbox.
                rows.release_pending(store, row.device_id, send_to, due)
                answered = rows.get(store, row.device_id)
                assert answered is not None and answered.state is not None
                session = Session.from_bytes(answered.state)
                for listener in self.answered_listeners:
                    listener(row.device_id)
                self._flush(session, row.device_id, send_to)
                rows.set_state(store, row.device_id, session.to_bytes(), _now())
                self.m.delivery.wake()
                self.m.ctx.events.emit("devices.sync", {"device": row.device_id.hex(),
                                                        "state": "open"})  # fmt: skip
            elif isinstance(payload, dv.DeviceList):
                self._own_list(payload, own[0])
            else:
                droplog.dropped("dropped a device payload out of place")
            return
        if wire.is_sync_group_payload(content):  # 0x4A: own_sync_groups.py
            self.m.sync_groups.on_payload(content)
            return
        if not wire.is_sync_payload(content):
            droplog.dropped("dropped a payload out of place in a sync session")
            return
        if content[1] in (wire.PAYLOAD_SYNC_ACTION, wire.PAYLOAD_SYNC_SETTINGS):  # 0x48, 0x49
            more = sync_actions.decode(content)
            to = self.m.sync_actions if content[1] == wire.PAYLOAD_SYNC_ACTION else \
                self.m.sync_settings
            to.on_payload(row.device_id, more)
            return
        payload2 = sy.decode_sync_payload(content)
        if isinstance(payload2, sy.DeleteKeys):
            for taken in self.delete_keys_listeners:
                taken(row.device_id, payload2)
            return
        try:
            c = self.m.contacts.with_identity(PublicIdentity.from_bytes(payload2.contact))
        except (DecodeError, BundleError):
            droplog.dropped("dropped a sync payload about an unknown contact")
            return
        if c is not None and group_store.is_group_contact(store, c.id):
            if isinstance(payload2, sy.ContactItem):
                # A group's member only here: not made a second contact with its identity.
                droplog.dropped("dropped a contact change about a group's member")
                return
            c = None  # a group's member only: not synced as a contact
        if isinstance(payload2, sy.ContactItem):
            if payload2.device_id != row.device_id:
                droplog.dropped("dropped a contact change not made by its sending device")
                return
            if payload2.changed_at_ms > (_now() + dv.MAX_LIST_SKEW) * 1000:
                droplog.dropped("dropped a contact change dated in the future")
                return
            self._contact(payload2, c)
            return
        if c is None:
            droplog.dropped("dropped a sync payload about an unknown contact")
            return
        if isinstance(payload2, sy.SentTranscript):
            mid = payload2.message_id.hex()
            if store.get_message(mid) is not None:
                return  # an echo or a duplicate
            store.add_message(c.id, "out", payload2.text, status="sent", message_id=mid,
                              sent_at=payload2.sent_at_ms)  # fmt: skip
            self.m.ctx.events.emit("message.transcript", {
                "message_id": mid, "contact": c.name, "text": payload2.text,
                "sent_at": payload2.sent_at_ms,
            })  # fmt: skip
            self.m.disappearing.wake()  # its deadline, if the conversation has a timer
            self.m.sync_actions.arrived(mid)  # its edit or deletion, if it came first
        else:
            mid = payload2.message_id.hex()
            target = store.get_message(mid)
            if target is None:
                # Not received here yet (the relay delivers each mailbox in its own order):
                # applied when it arrives (``received``).
                keys = keys_of(payload2.contact)
                assert keys is not None
                rows.keep_read(store, mid, keys, _now())
                return
            if target.contact_id != c.id or target.direction != "in":
                droplog.dropped("dropped a read mark for a message not held")
                return
            self._mark_read(c, target.seq, None)

    def _mark_read(self, c: Contact, seq: int, sent_at: int | None) -> None:
        """Received messages of ``c`` up to ``seq`` (and, for a mark that came before its
        message, sent no later than ``sent_at`` by the contact's clock) are read."""
        store = self.m.store
        marked = 0
        for m in store.unread(c.id):
            if m.seq > seq or (sent_at is not None and (m.sent_at or 0) > sent_at):
                continue
            if store.set_message_status(m.id, "read"):
                marked += 1
        if marked:
            self.m.ctx.events.emit("conversation.read", {"contact": c.name,
                                                         "marked": marked})  # fmt: skip
            self.m.disappearing.wake()  # read: their timers, if any, run from now

    def received(self, c: Contact, message_id: str) -> None:
        """A message from ``c`` was stored (inbox.py, inside the receive's transaction): a
        read mark that came before it over sync applies now."""
        store = self.m.store
        self.m.sync_actions.arrived(message_id)  # our reaction to it made on another device
        keys = rows.take_read(store, message_id)
        if keys is None or keys != keys_of(c.identity_key):
            return
        m = store.get_message(message_id)
        if m is not None:
            self._mark_read(c, m.seq, m.sent_at)

    def _contact(self, p: sy.ContactItem, c: Contact | None) -> None:
        """A contact as another device last changed it: taken if newer than what this device
        holds by ``(changed_at_ms, device_id)``, else ignored."""
        store = self.m.store
        keys = keys_of(p.contact)
        assert keys is not None  # the record parsed
        held = rows.contact_clock(store, keys)
        if held is not None and (p.changed_at_ms, p.device_id) <= held:
            return  # an older change, or this one again
        if p.removed and c is not None:
            # Recorded only in the transaction that removes it (_remove): a kill or an error
            # before leaves it unapplied and unrecorded, not recorded as applied.
            self.m.spawn(self._remove(p))
            return
        if c is None and not p.removed:
            request = next((r for r in store.list_requests() if keys_of(r.identity_key) == keys),
                           None)  # fmt: skip
            if request is not None:
                # The contact reached this device first (its request): it is the contact now,
                # the change recorded only once applied (_accept).
                self.m.spawn(self._accept(request.id, p))
                return
            rows.set_contact_clock(store, keys, p.changed_at_ms, p.device_id)
            name = self.m.contacts.unique_name(clean_name(p.name, "contact"))
            cid = store.add_contact(name, identity_key=p.contact,
                                    state=ContactState(None, False).to_bytes()).id  # fmt: skip
            store.update_contact(cid, verified=p.verified, blocked=p.blocked)
            self.m.ctx.events.emit("contact.added", {"contact": name, "established": False})
            return
        rows.set_contact_clock(store, keys, p.changed_at_ms, p.device_id)
        if c is None:  # removed, and not held: a request of it here goes (rejected there)
            for r in store.list_requests():
                if keys_of(r.identity_key) == keys:
                    store.delete_request(r.id)
                    device_answers.request_ended(store, r.id)
            return
        fields: dict[str, Any] = {"verified": p.verified, "blocked": p.blocked}
        wanted = clean_name(p.name, c.name)
        if wanted != c.name and store.contact_by_name(wanted) is None:
            fields["name"] = wanted
        store.update_contact(c.id, **fields)
        if p.blocked and not c.blocked:
            self.m.delivery.drop_outbox_of(store, {c.id})

    async def _remove(self, p: sy.ContactItem) -> None:
        """A synced removal, applied under the lock if it is still the newest change (a change
        taken meanwhile, a re-add say, wins) and recorded in the removal's transaction."""
        keys = keys_of(p.contact)
        assert keys is not None
        async with self.m.lock:
            store = self.m.store
            held = rows.contact_clock(store, keys)
            if held is not None and (p.changed_at_ms, p.device_id) <= held:
                return
            try:
                c = self.m.contacts.with_identity(PublicIdentity.from_bytes(p.contact))
            except (DecodeError, BundleError):
                return
            if c is None or group_store.is_group_contact(store, c.id):
                with store.transaction():
                    rows.set_contact_clock(store, keys, p.changed_at_ms, p.device_id)
                return
            self._applying.add(keys)
            try:
                await self.m.contacts.remove_locked(
                    c, then=lambda: rows.set_contact_clock(store, keys, p.changed_at_ms,
                                                           p.device_id))  # fmt: skip
            finally:
                self._applying.discard(keys)

    async def _accept(self, request_id: int, p: sy.ContactItem) -> None:
        """A synced change of a contact whose request this device holds: the request accepted
        under the change's name, then the change (its flags) applied and recorded if still the
        newest (a second change before this runs: its accept finds no request, and it is
        applied the same way)."""
        keys = keys_of(p.contact)
        assert keys is not None
        self._applying.add(keys)
        try:
            with contextlib.suppress(AppError):  # taken or removed meanwhile
                await self.m.contacts.accept_request(request_id, clean_name(p.name, "contact"))
        finally:
            self._applying.discard(keys)
        async with self.m.lock:
            try:
                c = self.m.contacts.with_identity(PublicIdentity.from_bytes(p.contact))
            except (DecodeError, BundleError):
                return
            if c is None:
                return  # rejected or removed meanwhile: the change stays unrecorded
            with self.m.store.transaction():
                self._contact(p, c)

    def take_own_list(self, incoming: dv.DeviceList) -> None:
        """An own list a contact sent (fanout.py: its answer to our request, §28.3; inside the
        receive's transaction), taken by the same rule as one from an own device."""
        own = self._own()
        if own is not None:
            self._own_list(incoming, own[0])

    def _own_list(self, incoming: dv.DeviceList, current: dv.DeviceList) -> None:
        if (incoming.version, incoming.digest()) == (current.version, current.digest()):
            return  # the list held: nothing to do
        try:
            new = dv.accept(self.m.identity().public, current, incoming, _now())
        except (dv.ForgedDeviceList, dv.FutureDeviceList, dv.StaleDeviceList):
            droplog.dropped("refused an own device list")
            return
        store = self.m.store
        # The alert of docs/devices.md §7: a list naming a device this one did not list is
        # either a link the user just made on another device or a holder of the identity key
        # (a removed device, say) adding itself; only the user can tell. Computed before
        # list_changed, which marks removed rows.
        gone = {r.device_id for r in rows.rows(store) if r.removed}
        added = sorted(new.ids() - current.ids())
        store.set_setting(SETTING_OWN_LIST, new.to_bytes().hex())
        self.list_changed(new, send=False)
        if added:
            self.m.ctx.events.emit("devices.added", {
                "devices": [d.hex() for d in added],
                "readded": [d.hex() for d in added if d in gone]})  # fmt: skip

    # --- sending ---------------------------------------------------------------------------

    def send_payload(self, data: bytes) -> None:
        """A sync payload to every other own device (device_caps.py, inside its transaction)."""
        self._send(data)

    def _send(self, data: bytes) -> None:
        """``data`` to every own device with a live sync session (inside the caller's
        transaction), each after its own random delay."""
        store = self.m.ctx.store
        own = None if store is None else self._own()
        if store is None or own is None:
            return
        listed, me = own[0].ids(), own[1]
        live = {r.device_id: r for r in rows.rows(store) if not r.removed and r.state is not None}
        for device_id in sorted(listed - {me}):
            row = live.get(device_id)
            if row is None or row.state is None or row.send_to is None:
                # No session yet (the link just completed), or not answered: kept (bounded)
                # until one opens and answers (_flush).
                rows.wait_for_session(store, device_id, data, _now())
                continue
            session = Session.from_bytes(row.state)
            self._seal(session, device_id, row.send_to, data)
            rows.set_state(store, device_id, session.to_bytes(), _now())
        self.m.delivery.wake()

    def _seal(self, session: Session, device_id: bytes, send_to: bytes | None,
              data: bytes) -> None:  # fmt: skip
        blocks = session.encrypt(self.m.entropy, data)
        if send_to is None:  # not answered yet: waits for the answer (_on_content)
            store = self.m.store
            store.enqueue_blocks(rows.pending_destination(device_id), blocks, not_before=NEVER)
            return
        due = time.time_ns() // 1_000_000 + int(self.m.delivery.receipt_delay() * 1000)
        # Each payload its own random delay, but none due before one queued earlier to this
        # device (as a contact's outbox: delivery.py): the device gets them in order, a
        # message before its edit (§28.6).
        due = max(due, self.m.store.last_not_before(None, send_to, SLOT_WAIT))
        self.m.store.enqueue_blocks(send_to, blocks, not_before=due)

    def _flush(self, session: Session, device_id: bytes, send_to: bytes | None) -> None:
        """A session with the device just opened: what waited for one goes in it (inside
        the caller's transaction, before the caller stores the session)."""
        for data in rows.take_waiting(self.m.store, device_id):
            self._seal(session, device_id, send_to, data)

    def send(self, data: bytes) -> None:
        """A sync payload to every own device (own_sync_actions.py, own_sync_settings.py,
        own_sync_groups.py)."""
        self._send(data)

    def self_id(self) -> bytes | None:
        """This device's ID; None before any link."""
        own = None if self.m.ctx.store is None else self._own()
        return None if own is None else own[1]

    def sent(self, c: Contact, message_id: bytes, sent_at_ms: int, text: str) -> None:
        """A text this device sent to ``c`` (messages.send, inside its transaction)."""
        if c.identity_key is None:
            return
        payload = sy.SentTranscript(c.identity_key, message_id, sent_at_ms, text)
        self._send(sy.encode_sync_payload(payload))

    def read(self, c: Contact, newest: str) -> None:
        """The user read ``c``'s conversation up to the received message ``newest``."""
        if c.identity_key is None:
            return
        self._send(sy.encode_sync_payload(sy.ReadUpTo(c.identity_key, bytes.fromhex(newest))))

    def contact_changed(self, c: Contact, *, removed: bool = False) -> None:
        """The user added, renamed, verified, blocked or removed ``c`` on this device (inside
        or outside a transaction, with no await in between): the other devices follow."""
        store = self.m.ctx.store
        if store is None or c.identity_key is None or group_store.is_group_contact(store, c.id):
            return
        self._changed(c.identity_key, c.name, c.verified, c.blocked, removed)

    def request_rejected(self, identity_key: bytes, name: str) -> None:
        """The user rejected a contact request from ``identity_key`` here (inside its
        transaction): sent as that identity removed, so a request of it held on another
        device goes too (the newest change wins, as for a contact)."""
        self._changed(identity_key, name, False, False, True)

    def _changed(
        self, identity_key: bytes, name: str, verified: bool, blocked: bool, removed: bool
    ) -> None:
        store = self.m.ctx.store
        own = None if store is None else self._own()
        if store is None or own is None:
            return
        keys = keys_of(identity_key)
        if keys is None or keys in self._applying:
            return
        now_ms = time.time_ns() // 1_000_000
        held = rows.contact_clock(store, keys)
        if held is not None and held[0] >= now_ms:
            now_ms = held[0] + 1  # a clock behind the last change still makes a newer one
        item = sy.ContactItem(identity_key, now_ms, own[1], name, verified, blocked, removed)
        with store.transaction():
            rows.set_contact_clock(store, keys, now_ms, own[1])
            self._send(sy.encode_sync_payload(item))

    def list_changed(self, new: dv.DeviceList, *, send: bool = True) -> None:
        """The own list held changed (inside the caller's transaction): sessions of devices no
        longer listed are erased, the list goes to the others (when this device holds it
        first hand), and sessions with newly listed devices are opened."""
        store = self.m.store
        for row in rows.rows(store):
            if row.device_id not in new.ids() and not row.removed:
                rows.mark_removed(store, row.device_id, _now())
        for listener in self.list_listeners:
            listener(new)
        if send:
            self._send(dv.encode_device_payload(new))
        self.m.spawn(self.ensure())
        if self._held:
            self.m.spawn(self._replay_held())

    async def _replay_held(self) -> None:
        async with self.m.lock:
            held, self._held = list(self._held.values()), {}
            for fc, block in held:
                try:
                    await self.on_first_contact(fc, block, replay=True)
                except AppError:  # no mailbox now: the opener opens again after OPEN_TIMEOUT
                    droplog.dropped("could not answer a held sync session")
