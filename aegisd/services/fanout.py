"""Contacts with several devices (docs/devices.md §5): the device lists, and a session with each
of a contact's devices.

- The person's side. The device that signed a list (a link that completed on it, a
  ``devices.remove``) sends it (``0x40``) to every contact it has a session with, followed by
  a device hello (``0x41`` bound to ``LEGACY_EK``, docs/protocol.md §28.4), in every session
  it has with that contact (the row and each device's): it tells each device of the contact
  which of our devices its session with us is with.
- The contact's side. A list received in a contact's session is checked under the contact's
  identity (``devices.accept``: forged, from the future or stale is refused, counted, nothing
  changed; the list held, again, is acknowledged again in its session: our acknowledgement
  was lost), stored, acknowledged (``0x42``, to every device it has a session with), and the
  sessions of devices no longer listed are dropped. For every listed device it has no session
  with, it fetches the device's bundle at its ``bundle_address`` and opens one (PQXDH, a
  first contact to the device mailbox, whose hello carries its mailbox for the person: the same
  contact mailbox every device of the person deposits to; a device hello bound to the
  session's EK_A.pub when this device has a list of its own; device_sessions.py, which
  ``Fanout`` extends). Every device holding the list
  does so, not only the one whose row got it. The device answers in the session, with its own
  mailbox: from then on the delivery layer encrypts everything for that contact once per
  device (services/delivery.py); a device with a list then sends its list and a hello there.
- Sessions a contact's device opens with this one (``device_first_contact``): its device
  hello checked under the contact's list; proven, that device's session (never a request);
  unlisted, held (``SETTING_HELD``) until a list names it; forged, dropped. Two sessions for
  one pair opened at once: the one the lower device ID opened stands, on both sides.
- Requests (``0x43``) and their answers go in the one session they answer, at most one per
  list named (settings kept in the store): a hostile contact's acknowledgements cannot make
  this device send more blocks than it sent. A contact established after the list went gets
  it then (``send_held``).
- A device that joined by a link (its contacts came without sessions) takes such a first
  contact from a contact it knows as that contact's session (inbox.py), answering with a
  mailbox of its own.

Nothing here logs a list, a device ID or a contact.
"""

from __future__ import annotations

import logging
import time

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.identity import PublicIdentity
from aegisd.core.session import Session
from aegisd.store import contact_devices as cd
from aegisd.store.db import Contact
from aegisd.store.devices import (
    SETTING_ANSWERED,
    SETTING_AWAITING,
    SETTING_KEY,
    SETTING_OWN_LIST,
    SETTING_REQUESTED,
    SETTING_SELF,
)

from . import device_answers
from .delivery import Recipient
from .device_sessions import (
    HELD_FOR,
    LEGACY_EK,
    SETTING_NAME,
    SETTING_OPENED,
    SETTING_REOPENED,
    DeviceSessions,
)
from .mailbox import ContactState, OwnedMailbox, address_from_bytes, address_to_bytes
from .rotation import ROTATION_KEY

log = logging.getLogger("aegisd.fanout")

#: Sessions a contact's device opened whose hello names a device the list held does not (yet):
#: {contact id: [[device hex, hello hex, EK_A.pub hex, session hex, held since], ...]}, at most
#: MAX_HELD per contact for HELD_FOR seconds, checked again when a list comes (§5.2).
SETTING_HELD = "devices.held_sessions"
MAX_HELD = 4
#: A device hello (bound to LEGACY_EK) that came in a contact's session row before the list
#: naming its device: {contact id: hello hex}, the newest one per contact, checked again when
#: a list comes (§5.5). The signer sends it once; dropping it would leave the row's device
#: unknown, and no session opened with the contact's other devices.
SETTING_EARLY_HELLO = "devices.early_hello"
_REFUSED = {
    dv.ForgedDeviceList: "refused a device list not signed by the contact",
    dv.FutureDeviceList: "refused a device list from the future",
    dv.StaleDeviceList: "refused a stale device list",
}


def _now() -> int:
    return int(time.time())


class Fanout(DeviceSessions):
    # --- the person's side ---------------------------------------------------------------

    def send_list(self, device_list: dv.DeviceList, self_id: bytes, device_priv: bytes) -> int:
        """Queue the list this device signed to every established contact, with the hello
        that names this device as the one of the session (inside the caller's lock); how many
        contacts. A contact that cannot be reached now is skipped."""
        return self._queue(device_list, self_id, device_priv, None)

    def send_held(self, contact_id: int) -> None:
        """A contact established after this device's list went (or added later): the list
        held, with the hello, goes to it now (inside the caller's transaction)."""
        store = self.m.store
        own, me, key = (store.get_setting(n) for n in (SETTING_OWN_LIST, SETTING_SELF,
                                                        SETTING_KEY))  # fmt: skip
        if own is None or me is None or key is None:
            return
        device_list = dv.DeviceList.from_bytes(bytes.fromhex(str(own)))
        self._queue(device_list, bytes.fromhex(str(me)), bytes.fromhex(str(key)), {contact_id})

    async def resend(self) -> None:
        """At unlock: the list held goes again to the contacts that have not acknowledged the
        one this device sent (§5.3: the signer re-sends until acknowledged)."""
        async with self.m.lock:
            store = self.m.ctx.store
            if store is None:
                return
            self.purge_held()
            awaiting = store.get_setting(SETTING_AWAITING)
            own, me, key = (store.get_setting(n) for n in (SETTING_OWN_LIST, SETTING_SELF,
                                                            SETTING_KEY))  # fmt: skip
            if not awaiting or own is None or me is None or key is None:
                return
            device_list = dv.DeviceList.from_bytes(bytes.fromhex(str(own)))
            self._queue(device_list, bytes.fromhex(str(me)), bytes.fromhex(str(key)),
                        {int(cid) for cid in awaiting})  # fmt: skip

    def _queue(self, device_list: dv.DeviceList, self_id: bytes, device_priv: bytes,
               only: set[int] | None) -> int:  # fmt: skip
        store, identity = self.m.store, self.m.identity()
        # A new list replaces who awaits it; a resend (or one contact) adds to those awaiting.
        held = store.get_setting(SETTING_AWAITING) if only is not None else None
        awaiting: dict[str, int] = dict(held) if held else {}
        told = 0
        with store.transaction():
            for c in store.list_contacts():
                if only is not None and c.id not in only:
                    continue  # a group-only contact is told too: it sends to every device
                blob = store.get_session(c.id)
                state = ContactState.from_bytes(c.state)
                row = store.mailbox_for_contact(c.id)
                if blob is None or not state.established or state.failed or row is None:
                    continue
                session = Session.from_bytes(blob)
                reply = OwnedMailbox.from_bytes(row.descriptor).address()
                hello = dv.DeviceHello.sign(device_priv, identity.public, self_id, reply,
                                            device_list.version, LEGACY_EK)  # fmt: skip
                self.m.delivery.enqueue([Recipient(c, session)], device_list)
                # In every session with the contact (its row and each of its devices'): a
                # device of the contact whose own row is with us learns from it which of our
                # devices that row is with, and only then opens sessions with our others.
                self.m.delivery.enqueue([Recipient(c, session)], hello)
                awaiting[str(c.id)] = device_list.version
                told += 1
            store.set_setting(SETTING_AWAITING, awaiting)
        self.m.delivery.wake()
        return told

    # --- payloads from a contact ---------------------------------------------------------

    def on_payload(
        self, c: Contact, session: Session, payload: dv.DevicePayload, device: bytes | None
    ) -> None:
        """A device payload from contact ``c`` (inside the receive's transaction); ``device``:
        the device whose session it came in, None for the contact's own session row."""
        if c.identity_key is None:
            return
        identity = PublicIdentity.from_bytes(c.identity_key)
        store = self.m.store
        held = cd.held_list(store, c.id)
        current = None if held is None else dv.DeviceList.from_bytes(held.data)
        if isinstance(payload, dv.DeviceList) and self._signed_by_us(payload):
            # Our own list, which the contact holds (it answers our request, §28.3): a device
            # whose sync session with the signer is down learns of a link or a removal so.
            self.m.own_sync.take_own_list(payload)
            return
        if isinstance(payload, dv.DeviceList):
            if current is not None and (payload.version, payload.digest()) == (
                current.version, current.digest()
            ):  # fmt: skip
                # The list held, again: our acknowledgement was lost (the signer re-sends
                # until acknowledged). Acknowledged again; not a refusal, nothing changed.
                try:
                    payload.verify(identity)
                except dv.ForgedDeviceList:
                    droplog.dropped(_REFUSED[dv.ForgedDeviceList])
                    return
                self._send_in(c, session, device, dv.ListAck.of(current))
                return
            try:
                new = dv.accept(identity, current, payload, _now())
            except (dv.ForgedDeviceList, dv.FutureDeviceList, dv.StaleDeviceList) as exc:
                droplog.dropped(_REFUSED[type(exc)])
                return
            cd.put_list(store, c.id, new.to_bytes(), new.version, _now())
            legacy = None if held is None else held.session_device
            if legacy is None:
                legacy = self._recheck_early_hello(c.id, identity, new)
            changed = False
            if legacy is not None and legacy not in new.ids():
                session, legacy = self._replace_row_session(c, session, device, legacy)
                changed = True
            keep = new.ids() - ({legacy} if legacy is not None else set())
            device_answers.forget(store, c.id, keep)
            self._prune_answers(c.id)
            if cd.drop_device_sessions(store, c.id, keep) or changed:
                self.m.ctx.events.emit("contact.devices", {"contact": c.name,
                                                           "devices": len(new.devices)})
            c = store.get_contact(c.id) or c
            self.m.delivery.enqueue([Recipient(c, session)], dv.ListAck.of(new),
                                    delay=self.m.delivery.receipt_delay())  # fmt: skip
            self._recheck_held(c, new)  # before opening: a held device's session is adopted
            self.m.spawn(self.open_sessions(c.id))
        elif isinstance(payload, dv.DeviceHello):
            if device is not None and payload.device_id == device:
                return  # a list's signer names itself in every session: this one is known
            if device is not None:
                droplog.dropped("dropped a device hello out of place")
                return
            if current is None:
                self._hold_early_hello(c.id, payload)  # its list follows (or was lost)
                return
            try:
                entry = payload.check(identity, current, LEGACY_EK)
            except dv.UnlistedDevice:
                if payload.list_version > current.version:
                    self._hold_early_hello(c.id, payload)  # a newer list may name it
                else:
                    droplog.dropped("dropped a device hello that does not prove a listed device")
                return
            except dv.ForgedDeviceProof:
                droplog.dropped("dropped a device hello that does not prove a listed device")
                return
            if held is not None and held.session_device is None:
                cd.set_session_device(store, c.id, entry.device_id)
                # A session opened with that device meanwhile is the same device's twice.
                cd.drop_device_sessions(store, c.id, current.ids() - {entry.device_id})
                self._recheck_held(c, current)
                self.m.spawn(self.open_sessions(c.id))
        elif isinstance(payload, dv.ListAck):
            own = self._own_list()
            awaiting = store.get_setting(SETTING_AWAITING)
            if payload.names(own) and awaiting and str(c.id) in awaiting:
                store.set_setting(SETTING_AWAITING,
                                  {k: v for k, v in awaiting.items() if k != str(c.id)})
            named = (payload.version, payload.digest)
            newer = own is None or named > (own.version, own.digest())
            if newer and payload.version <= (_now() + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND:
                # The contact holds a list this device has not seen: ask for it (§28.3), once
                # per list named and only for one above the highest asked of this contact
                # (kept in the store), in the session the acknowledgement came in only.
                requested = dict(store.get_setting(SETTING_REQUESTED) or {})
                last = requested.get(str(c.id))
                if last is None or named > (int(last[0]), bytes.fromhex(str(last[1]))):
                    requested[str(c.id)] = [payload.version, payload.digest.hex()]
                    store.set_setting(SETTING_REQUESTED, requested)
                    self._send_in(c, session, device,
                                  dv.ListRequest(payload.version, payload.digest))  # fmt: skip
        elif isinstance(payload, dv.ListRequest):
            answered = dict(store.get_setting(SETTING_ANSWERED) or {})
            if current is None or answered.get(str(c.id)) == current.version:
                return  # once per (contact, version), across restarts
            answered[str(c.id)] = current.version
            store.set_setting(SETTING_ANSWERED, answered)
            self._send_in(c, session, device, current)

    def _send_in(
        self, c: Contact, session: Session, device: bytes | None, payload: dv.DevicePayload,
        delay: float | None = None,
    ) -> None:  # fmt: skip
        """``payload`` in the one session a payload came in: the contact's row (``device``
        None) or the session with that device, to its mailbox (inside the caller's
        transaction), after ``delay`` (a receipt's, by default). A device that has not
        answered yet gets nothing."""
        if delay is None:
            delay = self.m.delivery.receipt_delay()
        if device is None:
            self.m.delivery.enqueue([Recipient(c, session)], payload, delay=delay, devices=False)
            return
        store = self.m.store
        ds = next((s for s in cd.device_sessions(store, c.id) if s.device_id == device), None)
        if ds is None or ds.send_to is None:
            return
        dsession = Session.from_bytes(ds.state)
        blocks = dsession.encrypt(self.m.entropy, dv.encode_device_payload(payload))
        cd.put_device_session(store, c.id, device, dsession.to_bytes(), _now())
        due = time.time_ns() // 1_000_000 + int(delay * 1000)
        store.enqueue_blocks(ds.send_to, blocks, contact_id=c.id, not_before=due)
        self.m.delivery.wake()

    def _replace_row_session(
        self, c: Contact, session: Session, device: bytes | None, legacy: bytes
    ) -> tuple[Session, bytes]:
        """The device of the contact's session row (``legacy``) left its list: the session
        of a listed device that answered (the one this list came in, if it did) takes the
        row's place, with its mailbox, so that nothing more goes to the removed device. None
        answered yet: the row stays as it is until one does (``device_answered``). Only a
        device of the list held now: a contact whose sessions with unlisted devices survived
        a reset (docs/devices.md §10) must not give the row back to one of them."""
        store = self.m.store
        held = cd.held_list(store, c.id)
        listed = set() if held is None else dv.DeviceList.from_bytes(held.data).ids()
        others = [s for s in cd.device_sessions(store, c.id)
                  if s.send_to is not None and s.device_id in listed]  # fmt: skip
        others.sort(key=lambda s: s.device_id != device)
        if not others:
            return session, legacy
        chosen = others[0]
        store.put_session(c.id, chosen.state)
        state = ContactState.from_bytes(c.state)
        assert chosen.send_to is not None
        state.send_to = address_from_bytes(chosen.send_to)
        store.update_contact(c.id, state=state.to_bytes())
        cd.set_session_device(store, c.id, chosen.device_id)
        self._carry_rotation(c.id, chosen.device_id)
        cd.drop_device_sessions(store, c.id, frozenset(
            s.device_id for s in cd.device_sessions(store, c.id) if s.device_id != chosen.device_id
        ))  # fmt: skip
        return Session.from_bytes(chosen.state), chosen.device_id

    def _carry_rotation(self, contact_id: int, device_id: bytes) -> None:
        """A rotation under way when the session with ``device_id`` takes the row's place:
        the row's acknowledgement is now that device's (given if it acknowledged in its own
        session, else awaited: rotation.py bounds the wait)."""
        store, key = self.m.store, f"{ROTATION_KEY}{contact_id}"
        pending = store.get_setting(key)
        if pending is None:
            return
        d = device_id.hex()
        devices = list(pending.get("devices", []))
        acked = d in pending.get("went", []) and d not in devices
        store.set_setting(key, {**pending, "acked": acked,
                                "devices": [x for x in devices if x != d]})  # fmt: skip

    # --- sessions a contact's device opens with this device ----------------------------------

    def device_first_contact(
        self, c: Contact, session: Session, hello: dv.DeviceHello, ek: bytes
    ) -> tuple[bool, bytes | None]:
        """A first contact from known contact ``c`` whose first payload is a device hello bound
        to ``ek`` (the session's EK_A.pub), inside the caller's transaction (§5.2, §28.4).
        (True, its device ID or None when unchecked): the caller makes it the contact's session
        row (there is none: a device that joined by a link); (False, None): adopted as the
        session with that device, held until a list names it, or dropped, here. Never a
        contact request: the identity is a contact's."""
        store = self.m.store
        assert c.identity_key is not None
        identity = PublicIdentity.from_bytes(c.identity_key)
        held = cd.held_list(store, c.id)
        current = None if held is None else dv.DeviceList.from_bytes(held.data)
        no_row = store.get_session(c.id) is None
        if no_row and store.mailbox_for_contact(c.id) is not None:
            droplog.dropped("dropped a device session of a contact restored from a backup")
            return False, None
        if current is None:
            if no_row:
                # Checked when the opener's list follows in it (device_answered): a contact
                # known only by a link, whose list this device has never held.
                return True, None
            self._hold(c.id, session, hello, ek)
            return False, None
        try:
            entry = hello.check(identity, current, ek)
        except dv.UnlistedDevice:
            self._hold(c.id, session, hello, ek)
            return False, None
        except dv.ForgedDeviceProof:
            droplog.dropped("dropped a device session whose hello does not prove a listed device")
            return False, None
        if no_row:
            return True, entry.device_id
        self._adopt(c, session, entry.device_id, hello.reply, ek)
        return False, None

    def _adopt(
        self, c: Contact, session: Session, device_id: bytes, reply: wire.MailboxAddress,
        ek: bytes,
    ) -> None:  # fmt: skip
        """A proven session with the contact's device ``device_id``: kept as that device's,
        answered (0x03) with our mailbox for the contact, followed by the proof of our device
        bound to the session's EK_A.pub ``ek`` (device_answers.py), deposited to from now on."""
        store = self.m.store
        held = cd.held_list(store, c.id)
        if held is not None and held.session_device == device_id:
            droplog.dropped("dropped a second session with the device of a contact's row")
            return
        existing = next((s for s in cd.device_sessions(store, c.id) if s.device_id == device_id),
                        None)  # fmt: skip
        me = store.get_setting(SETTING_SELF)
        if (
            existing is not None
            and self._opened_unanswered(c.id, device_id)
            and me is not None
            and bytes.fromhex(str(me)) < device_id
        ):
            # Both devices opened a session with each other at once: the one the lower device
            # ID opened stands, on both sides (the other side adopts ours, §5.2). Any other
            # session held (adopted, or answered) is one that device lost: its new proven
            # first contact replaces it (a replayed one does not open: the prekeys are burnt).
            return
        ours = store.mailbox_for_contact(c.id)
        if ours is None or not self.m.mailboxes.peer_url_ok(reply.relay_url):
            droplog.dropped("dropped a device session that cannot be answered")
            return
        mine = OwnedMailbox.from_bytes(ours.descriptor).address()
        answer = wire.HelloPayload(mine, str(store.get_setting(SETTING_NAME, "")), b"")
        blocks = session.encrypt(self.m.entropy, wire.encode_payload(answer))
        proof = device_answers.proof(store, self.m.identity(), ek, mine)
        if proof is not None:
            blocks += session.encrypt(self.m.entropy, proof)
        to = address_to_bytes(reply)
        cd.put_device_session(store, c.id, device_id, session.to_bytes(), _now())
        cd.set_device_send_to(store, c.id, device_id, to)
        self._mark_opened(c.id, device_id, False)  # ours, if any, is replaced
        self._drop_superseded(c.id, device_id)  # and those a reopening of ours replaced
        device_answers.adopted(store, c.id, device_id, ek, reply)
        self._prune_answers(c.id)
        store.enqueue_blocks(to, blocks, contact_id=c.id)
        listed = None if held is None else dv.DeviceList.from_bytes(held.data)
        count = 1 if listed is None else len(listed.devices)
        self.m.ctx.events.emit("contact.devices", {"contact": c.name, "devices": count})
        self.m.delivery.wake()

    def _hold(self, contact_id: int, session: Session, hello: dv.DeviceHello, ek: bytes) -> None:
        store, now = self.m.store, _now()
        if hello.list_version > (now + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND:
            # No list can name it within HELD_FOR (lists from the future are refused, §5.1):
            # a made-up ID with a huge version must not sit here waiting for one.
            droplog.dropped("dropped a device session naming a list from the future")
            return
        held = dict(store.get_setting(SETTING_HELD) or {})
        kept = [h for h in held.get(str(contact_id), [])
                if int(h[4]) + HELD_FOR > now and h[0] != hello.device_id.hex()]  # fmt: skip
        kept.append([hello.device_id.hex(), dv.encode_device_payload(hello).hex(), ek.hex(),
                     session.to_bytes().hex(), now])  # fmt: skip
        held[str(contact_id)] = kept[-MAX_HELD:]
        store.set_setting(SETTING_HELD, held)

    def _recheck_held(self, c: Contact, current: dv.DeviceList) -> None:
        """The sessions held for ``c`` checked under the list it now holds: adopted when
        proven, kept while the hello names a newer list than this one, else dropped."""
        store = self.m.store
        held = dict(store.get_setting(SETTING_HELD) or {})
        items = held.pop(str(c.id), [])
        if not items or c.identity_key is None:
            return
        identity, now, kept = PublicIdentity.from_bytes(c.identity_key), _now(), []
        for item in items:
            hello = dv.decode_device_payload(bytes.fromhex(str(item[1])))
            if int(item[4]) + HELD_FOR <= now or not isinstance(hello, dv.DeviceHello):
                continue
            try:
                entry = hello.check(identity, current, bytes.fromhex(str(item[2])))
            except dv.UnlistedDevice:
                if current.version < hello.list_version <= (
                    (now + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND
                ):
                    kept.append(item)  # a newer list than this one may name it
                else:
                    droplog.dropped("dropped a held session of a device its contact did not list")
                continue
            except dv.ForgedDeviceProof:
                droplog.dropped("dropped a device session whose hello does not prove a listed "
                                "device")  # fmt: skip
                continue
            self._adopt(c, Session.from_bytes(bytes.fromhex(str(item[3]))), entry.device_id,
                        hello.reply, bytes.fromhex(str(item[2])))  # fmt: skip
        if kept:
            held[str(c.id)] = kept
        store.set_setting(SETTING_HELD, held or None)

    def _hold_early_hello(self, contact_id: int, hello: dv.DeviceHello) -> None:
        """Keep the newest hello per contact whose list version is not from the future."""
        store = self.m.store
        if hello.list_version > (_now() + dv.MAX_LIST_SKEW) * dv.VERSIONS_PER_SECOND:
            droplog.dropped("dropped a device hello naming a list from the future")
            return
        early = dict(store.get_setting(SETTING_EARLY_HELLO) or {})
        prior = early.get(str(contact_id))
        if prior is not None:
            old = dv.decode_device_payload(bytes.fromhex(str(prior)))
            if isinstance(old, dv.DeviceHello) and old.list_version > hello.list_version:
                return
        early[str(contact_id)] = dv.encode_device_payload(hello).hex()
        store.set_setting(SETTING_EARLY_HELLO, early)

    def _recheck_early_hello(
        self, contact_id: int, identity: PublicIdentity, listed: dv.DeviceList
    ) -> bytes | None:
        """The hello held for the contact's row, checked under the list just stored: proven,
        its device is the row's (returned; a session opened with that device meanwhile is the
        same device's twice, dropped); kept while it names a newer list; else dropped."""
        store = self.m.store
        early = dict(store.get_setting(SETTING_EARLY_HELLO) or {})
        item = early.pop(str(contact_id), None)
        if item is None:
            return None
        hello = dv.decode_device_payload(bytes.fromhex(str(item)))
        device_id = None
        if isinstance(hello, dv.DeviceHello):
            try:
                device_id = hello.check(identity, listed, LEGACY_EK).device_id
            except dv.UnlistedDevice:
                if hello.list_version > listed.version:
                    early[str(contact_id)] = item
            except dv.ForgedDeviceProof:
                droplog.dropped("dropped a device hello that does not prove a listed device")
        store.set_setting(SETTING_EARLY_HELLO, early or None)
        if device_id is not None:
            cd.set_session_device(store, contact_id, device_id)
            cd.drop_device_sessions(store, contact_id, listed.ids() - {device_id})
        return device_id

    def forget(self, contact_id: int) -> None:
        """A contact removed: what is kept for it in settings goes with it (inside the
        caller's transaction): held sessions, an early hello, the sessions opened."""
        store = self.m.store
        for name in (SETTING_HELD, SETTING_EARLY_HELLO, SETTING_OPENED):
            value = dict(store.get_setting(name) or {})
            if value.pop(str(contact_id), None) is not None:
                store.set_setting(name, value or None)
        device_answers.forget(store, contact_id)

    def purge_held(self) -> None:
        """At unlock: held sessions past HELD_FOR go (else they would wait for a list)."""
        store = self.m.store
        held = dict(store.get_setting(SETTING_HELD) or {})
        now = _now()
        kept = {cid: live for cid, items in held.items()
                if (live := [h for h in items if int(h[4]) + HELD_FOR > now])}  # fmt: skip
        if kept != held:
            store.set_setting(SETTING_HELD, kept or None)

    def device_answered(
        self, c: Contact, device_id: bytes, reply_to: wire.MailboxAddress, ek: bytes | None,
        superseded: bytes | None = None,
    ) -> None:  # fmt: skip
        """A contact device answered in its session whose EK_A.pub is ``ek`` (``superseded``:
        the state of the superseded session it came in, kept aside until proven): deposited
        to once that session is proven too (device_answers.py), at once if it is (a repeated
        answer moves the deposits). ``ek`` None: a session from before the rule that was
        answered (the inbox takes no other without an EK_A.pub), a repeated answer."""
        if ek is None:
            self._take_answer(c, device_id, reply_to)
            return
        proven = device_answers.answer_came(self.m.store, c.id, ek, reply_to)
        if proven is not None:
            self._promote(c.id, device_id, superseded)
            self._take_answer(c, device_id, proven)

    def device_proof(
        self, c: Contact, device_id: bytes, hello: dv.DeviceHello, ek: bytes | None,
        superseded: bytes | None = None,
    ) -> None:  # fmt: skip
        """A device hello in a session with ``device_id`` not proven yet (EK_A.pub ``ek``):
        its proof, checked under the list held (nothing that session said can change it)."""
        held = cd.held_list(self.m.store, c.id)
        if ek is None or held is None or c.identity_key is None:
            return
        identity = PublicIdentity.from_bytes(c.identity_key)
        listed = dv.DeviceList.from_bytes(held.data)
        got = device_answers.proof_came(self.m.store, c.id, identity, listed, device_id,
                                        hello, ek)  # fmt: skip
        if got is not None:
            self._promote(c.id, device_id, superseded)
            self._take_answer(c, device_id, got)

    def _promote(self, contact_id: int, device_id: bytes, superseded: bytes | None) -> None:
        """A superseded session just proven in itself: the device's session from now on (its
        answer taken by the caller: _answered's bookkeeping runs as for a first answer)."""
        if superseded is None:
            return
        self.took_superseded(contact_id, device_id, superseded)
        cd.put_device_session(self.m.store, contact_id, device_id, superseded, _now())
        cd.set_device_send_to(self.m.store, contact_id, device_id, None)

    def _signed_by_us(self, listed: dv.DeviceList) -> bool:
        try:
            listed.verify(self.m.identity().public)
        except dv.ForgedDeviceList:
            return False
        return True

    def _take_answer(self, c: Contact, device_id: bytes, reply_to: wire.MailboxAddress) -> None:
        before = next((s for s in cd.device_sessions(self.m.store, c.id)
                       if s.device_id == device_id), None)  # fmt: skip
        if before is not None and before.send_to is not None:
            cd.set_device_send_to(self.m.store, c.id, device_id, address_to_bytes(reply_to))
        else:
            self._answered(c, device_id, reply_to)

    def _answered(self, c: Contact, device_id: bytes, reply_to: wire.MailboxAddress) -> None:
        """A contact device answered our first contact and proved itself: deposit to it."""
        store = self.m.store
        cd.set_device_send_to(store, c.id, device_id, address_to_bytes(reply_to))
        reopened = dict(store.get_setting(SETTING_REOPENED) or {})
        counts = dict(reopened.get(str(c.id), {}))
        if counts.pop(device_id.hex(), None) is not None:  # answered: its count starts over
            reopened[str(c.id)] = counts
            store.set_setting(SETTING_REOPENED, {k: v for k, v in reopened.items() if v} or None)
        self._mark_opened(c.id, device_id, False)
        held = cd.held_list(store, c.id)
        listed = None if held is None else dv.DeviceList.from_bytes(held.data)
        if held is not None and listed is not None and held.session_device not in listed.ids():
            blob = store.get_session(c.id)
            if blob is not None and held.session_device is not None:
                self._replace_row_session(c, Session.from_bytes(blob), device_id,
                                          held.session_device)  # fmt: skip
        count = 1 if listed is None else len(listed.devices)
        self.m.ctx.events.emit("contact.devices", {"contact": c.name, "devices": count})
        # Our list, and the hello naming this device bound to no session, in the session just
        # answered: a device of the contact that held no list of ours when our first contact
        # came took it unchecked (or holds it) until it has the list (§5.5). Once per answer
        # that gave the session its mailbox: a contact repeating its answer gets nothing more
        # (device_answered).
        own = self._own_list()
        blob, ours = store.get_session(c.id), store.mailbox_for_contact(c.id)
        if own is not None and blob is not None and ours is not None:
            reply = OwnedMailbox.from_bytes(ours.descriptor).address()
            hello = device_answers.own_hello(store, self.m.identity(), reply, LEGACY_EK)
            if hello is not None:
                row = Session.from_bytes(blob)
                self._send_in(c, row, device_id, own, delay=0.0)
                self._send_in(c, row, device_id, hello, delay=0.0)
