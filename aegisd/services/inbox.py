"""The inbox: every block the relay delivers to a mailbox of ours, opened and acted on.

- ``on_block`` (the relay link's handler): open the relay's sealing, then, under the
  messenger's protocol lock, hand the block to the first-contact path (the address or an
  invitation mailbox: a PQXDH first message, a new contact or a contact request; routed in
  first_contacts.py) or to the contact's ratchet session; our own loop cover is dropped
  unopened.
- Receiving commits the advanced ratchet state, the received message and its event in one
  transaction, and only then is the relay acknowledged. A crash before the commit makes the
  relay deliver the block again; a crash after it makes the redelivered block fail to decrypt
  (its key is spent) and it is dropped: nothing is lost, nothing is shown twice. A store
  failure leaves the block unacknowledged (the connection drops; the relay delivers again).
- Long messages arrive as several blocks: partial messages are kept per contact, bounded
  (PARTIALS_PER_CONTACT, PARTIALS_TOTAL) so that a contact cannot pile them up.
- Payloads: texts (and their delivery receipts), receipts, mailbox announcements and
  acknowledgements (rotation.py acts on them after the commit), files' descriptors
  (attachments.py), call signaling (calls/service.py), group payloads 0x0C-0x11 (groups.py,
  through ``GroupsView``), cover (dropped).

Everything a peer sends is hostile: bounded, strictly parsed, and nothing of a blocked contact
is kept. Of the other services this module imports only the first contacts, the delivery
layer, the mailbox format and rotation's constants (none imports it back): what it uses of
the messenger is ``InboxHost``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import sqlcipher3

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.store import StoreError
from aegisd.store import contact_devices as cd
from aegisd.store import cover as cover_slots
from aegisd.store import groups as group_store
from aegisd.store.cover import SLOT_WAIT
from aegisd.store.db import Contact
from aegisd.transport.relaylink import RelayUnavailable, acknowledge
from relay.client import Message, RelayClient

from . import first_contacts as fcs
from .delivery import PENDING_DESTINATION, Recipient
from .mailbox import ContactState, address_to_bytes
from .rotation import ROTATION_KEY, awaiting_devices

#: Failures of the store that a later attempt may not meet (disk full, I/O): never a reason to
#: acknowledge a block.
TRANSIENT = (sqlcipher3.Error, StoreError, OSError)

# The largest payload (a reply of MAX_TEXT_BYTES, 42 bytes of header) spans this many blocks;
# a peer claiming more is refused, so that partial messages cannot pile up.
MAX_MESSAGE_FRAGMENTS = -(-(wire.MAX_TEXT_BYTES + 42) // wire.RATCHET_CAPACITY)
#: Group invitations and answers span up to 11 blocks (docs/protocol.md §25.8): only they may
#: be longer than the longest text (checked once the message is whole), and a contact keeps at
#: most LONG_PARTIALS_PER_CONTACT such partial messages (its oldest goes), inside the caps below.
MAX_GROUP_FRAGMENTS = 11
LONG_PARTIALS_PER_CONTACT = 2
_LONG_PAYLOADS = (wire.GroupInvitePayload, wire.GroupAnswerPayload)
STALE_FRAGMENTS_MS = 24 * 3600 * 1000
#: Incomplete multi-block messages kept per contact, and in all (issue 15 item 13): a contact's
#: own software has at most a few in flight (its outbox sends a message's blocks in order), so
#: past this the contact's oldest partial goes; past the total, the oldest partial of whichever
#: contact holds the most goes (so that a few contacts filling it cannot keep everyone else's
#: multi-block messages out).
PARTIALS_PER_CONTACT = 8
PARTIALS_TOTAL = 256
SETTING_MAX_PARTIALS = "partials.max_total"  # PARTIALS_TOTAL, lowered by tests


def _now() -> int:
    return int(time.time())


class FanoutView(fcs.FanoutView, Protocol):
    def on_payload(
        self, c: Contact, session: Session, payload: dv.DevicePayload, device: bytes | None
    ) -> None: ...
    def device_answered(
        self, c: Contact, device_id: bytes, reply_to: wire.MailboxAddress
    ) -> None: ...
    def device_rotated(self, c: Contact, device_id: bytes, p: wire.MailboxPayload) -> None: ...
    def send_held(self, contact_id: int) -> None: ...
    def forget(self, contact_id: int) -> None: ...
    def superseded(self, contact_id: int) -> list[tuple[bytes, bytes]]: ...
    def took_superseded(self, contact_id: int, device_id: bytes, used: bytes) -> None: ...


class OwnSyncView(fcs.OwnSyncView, Protocol):
    def receive(self, mailbox_id: int, block: bytes) -> None: ...
    def received(self, c: Contact, message_id: str) -> None: ...


class CoverView(fcs.CoverView, Protocol):
    def active(self) -> bool: ...
    def heard(self, contact_id: int) -> None: ...
    def is_loop(self, block: bytes) -> bool: ...


class RenewalsView(Protocol):
    def receive_first_contact(self, c: Contact, block: bytes) -> None: ...
    def on_undecryptable(self, c: Contact, block: bytes) -> bool: ...
    def on_hello(self, c: Contact) -> bool: ...
    async def after_receive(self) -> None: ...
    def reset(self) -> None: ...


class AttachmentsView(Protocol):
    def on_descriptor(self, c: Contact, session: Session, p: wire.AttachmentPayload) -> None: ...


class TypingView(Protocol):
    def on_payload(self, c: Contact, session: Session, p: wire.TypingPayload) -> None: ...


class RotationView(Protocol):
    async def finish(self, c: Contact, rotation_id: bytes) -> None: ...


class CallsView(Protocol):
    """Call signaling's receiver (aegisd/calls/service.py CallService)."""

    def on_payload(
        self, c: Contact, payload: wire.CallPayload | wire.CallSealedPayload, device: bytes
    ) -> None: ...


class ActionsView(Protocol):
    """Replies, reactions, edits and deletions (actions.py, docs/protocol.md §26)."""

    def on_payload(self, c: Contact, session: Session, payload: wire.ActionPayload) -> None: ...
    def on_text(self, c: Contact, message_id: str) -> None: ...


class GroupsView(fcs.GroupsView, Protocol):
    """The groups service's receiver (groups.py): payloads 0x0C-0x11, receipts of group
    messages (first contacts through an introduction link: first_contacts.py)."""

    def on_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None: ...
    def on_receipt(self, c: Contact, message_id: bytes, status: str) -> None: ...


_GROUP_PAYLOADS = (
    wire.GroupInvitePayload, wire.GroupAnswerPayload, wire.GroupChangePayload,
    wire.GroupMessagePayload, wire.GroupIntroductionPayload, wire.GroupFilePayload,
    wire.GroupActionPayload,
)  # fmt: skip
def _group_change(content: bytes) -> wire.GroupChangePayload | None:
    try:
        payload = wire.decode_payload(content)
    except DecodeError:
        return None
    return payload if isinstance(payload, wire.GroupChangePayload) else None


#: What a group-only contact (made through an introduction, hidden) may send: the group's
#: payloads, receipts of group messages, and the session's housekeeping (its mailbox, moved
#: or renewed). Texts, files and calls from it are dropped: it is no contact of the user's.
_GROUP_CONTACT_PAYLOADS = (
    *_GROUP_PAYLOADS, wire.CoverPayload, wire.ReceiptPayload, wire.HelloPayload,
    wire.MailboxPayload, wire.MailboxAckPayload,
)  # fmt: skip


class DisappearingView(fcs.DisappearingView, Protocol):
    def on_payload(self, c: Contact, p: wire.TimerPayload) -> None: ...


class InboxHost(fcs.FirstContactsHost, Protocol):
    """What the inbox uses of the messenger: what the first contacts use, and more."""

    calls: CallsView | None

    @property
    def cover(self) -> CoverView: ...
    @property
    def renewals(self) -> RenewalsView: ...
    @property
    def attachments(self) -> AttachmentsView: ...
    @property
    def rotation(self) -> RotationView: ...
    @property
    def typing(self) -> TypingView: ...
    @property
    def groups(self) -> GroupsView: ...
    @property
    def actions(self) -> ActionsView: ...
    @property
    def disappearing(self) -> DisappearingView: ...
    @property
    def fanout(self) -> FanoutView: ...
    @property
    def own_sync(self) -> OwnSyncView: ...


class Inbox:
    def __init__(self, host: InboxHost) -> None:
        self.m = host
        # Rotations whose acknowledgement this receive stored: acted on (relay calls) after
        # its commit, outside the transaction.
        self._acked_rotations: list[tuple[Contact, bytes]] = []
        self.first_contacts = fcs.FirstContacts(host)  # the address's and invitations' blocks

    async def on_block(self, client: RelayClient, msg: Message) -> None:
        entry = self.m.mailboxes.owned.get(msg.owner_id)
        if entry is not None:
            row, mb = entry
            try:
                block = mb.open(msg.sealed)
            except Exception:  # not sealed by our relay for this mailbox: drop it
                droplog.dropped("dropped a delivery that did not open")
            else:
                async with self.m.lock:
                    try:
                        if row.role == cover_slots.POOL_ROLE or self.m.cover.is_loop(block):
                            pass  # our own loop cover (a pool mailbox, or gap filling)
                        elif row.role == "contact":
                            if row.contact_id is not None:
                                self._receive_from_contact(row.contact_id, block)
                                self.m.delivery.wake()  # receipts may be due
                                await self.m.renewals.after_receive()
                            else:  # a sync mailbox: one of our own devices (own_sync.py)
                                self.m.own_sync.receive(row.id, block)
                            while self._acked_rotations:  # relay calls: outside the commit
                                await self.m.rotation.finish(*self._acked_rotations.pop())
                        else:
                            await self.first_contacts.receive(row, block)
                    except AppError:
                        # The relay went away mid-way: leave the block unacknowledged, so
                        # the relay delivers it again after the reconnect.
                        self.m._reload_prekeys()
                        self._acked_rotations.clear()
                        self.m.renewals.reset()
                        return
                    except TRANSIENT as exc:
                        # The store failed (disk full, I/O): the transaction rolled back. Do
                        # not acknowledge: drop the connection, and the relay delivers the
                        # block again after the reconnect.
                        self.m._reload_prekeys()
                        self._acked_rotations.clear()
                        self.m.renewals.reset()
                        raise RelayUnavailable() from exc
                    except Exception as exc:
                        # A bug or a block no retry can open: the transaction rolled back;
                        # acknowledge it, and log only the kind of failure.
                        droplog.dropped(f"dropped a block: {type(exc).__name__}")
                        self.m._reload_prekeys()
                        self._acked_rotations.clear()
                        self.m.renewals.reset()
                    except BaseException:
                        # Cancelled mid-way (the link stopped: a lock, a reconnect). Before a
                        # first contact's commit: what it changed in memory goes (one-time
                        # keys burnt, the replay cache), or a later save of the prekeys would
                        # make the redelivered block look replayed and lose it for good. A
                        # contact's block is cancelled only after its commit (its awaits come
                        # after it): its rotations and renewals stay for the next receive.
                        with contextlib.suppress(Exception):  # locked meanwhile: no store
                            self.m._reload_prekeys()
                        raise
        await acknowledge(client, msg.msg_id)  # withdrawn (END): not an error, §4.3

    def _decrypt_device(
        self, contact_id: int, block: bytes
    ) -> tuple[bytes, Session, wire.Fragment, bytes | None] | None:
        """A block that the contact's own session did not open, tried in the sessions with
        the contact's other devices (at most MAX_DEVICES - 1), then in the unanswered ones a
        reopening replaced (fanout.py, at most REOPENS per device): which one opened it, and
        the superseded state it was, if one."""
        for ds in cd.device_sessions(self.m.store, contact_id):
            session = Session.from_bytes(ds.state)
            try:
                fragment = session.decrypt(self.m.entropy, block)
            except DecryptionError:
                continue
            return ds.device_id, session, fragment, None
        for device_id, state in self.m.fanout.superseded(contact_id):
            session = Session.from_bytes(state)
            try:
                fragment = session.decrypt(self.m.entropy, block)
            except DecryptionError:
                continue
            return device_id, session, fragment, state
        return None

    def _receive_from_contact(self, contact_id: int, block: bytes) -> None:
        c = self.m.store.get_contact(contact_id)
        blob = self.m.store.get_session(contact_id)
        if c is not None and blob is None:  # restored from a backup: a renewal's answer?
            self.m.renewals.receive_first_contact(c, block)
            return
        if c is None or blob is None:
            return
        session = Session.from_bytes(blob)
        device: bytes | None = None
        superseded: bytes | None = None
        try:
            fragment = session.decrypt(self.m.entropy, block)
        except DecryptionError:
            found = self._decrypt_device(contact_id, block)
            if found is None:
                if self.m.renewals.on_undecryptable(c, block):
                    return
                droplog.dropped("dropped a block that did not decrypt")
                return
            device, dsession, fragment, superseded = found
            # The contact's own session answers (receipts go to every device): unchanged.
            session = Session.from_bytes(blob)
        self.m.cover.heard(contact_id)  # online: cover to it goes on
        with self.m.store.transaction():
            if device is None:
                self.m.store.put_session(contact_id, session.to_bytes())
            else:
                if superseded is not None:  # the device answered the session opened first
                    self.m.fanout.took_superseded(contact_id, device, superseded)
                cd.put_device_session(self.m.store, contact_id, device, dsession.to_bytes(), _now())
            if c.blocked:
                # Nothing of a blocked contact is shown or kept (not even a partial message):
                # the ratchet step above is all that is stored. Save a group change (0x0E,
                # one block): a blocked admin's changes still make the group's state, or
                # blocking would fork it (docs/protocol.md §25.9).
                change = _group_change(fragment.data) if fragment.count == 1 else None
                if change is not None:
                    self.m.groups.on_payload(c, session, change)
                else:
                    droplog.dropped("dropped a block of a blocked contact")
                return
            if fragment.count == 1:
                content: bytes | None = fragment.data
            elif fragment.count > MAX_GROUP_FRAGMENTS:
                droplog.dropped("dropped a fragment of an oversized message")
                return
            else:
                if fragment.count > MAX_MESSAGE_FRAGMENTS:
                    self._make_room_for_long(contact_id, fragment.msg_id)
                self._make_room_for_partial(contact_id, fragment.msg_id)
                parts = self.m.store.put_fragment(
                    contact_id, fragment.msg_id, fragment.index, fragment.count, fragment.data
                )
                content = None if parts is None else b"".join(parts)
            if content is None:
                return
            try:
                if wire.is_device_payload(content):
                    # a group-only contact's too: a member fans out to a person's devices
                    self.m.fanout.on_payload(c, session, dv.decode_device_payload(content), device)
                    return
                payload = wire.decode_payload(content)
            except DecodeError:
                droplog.dropped("dropped a payload that did not parse")
                return
            if device is not None and isinstance(
                payload, (wire.HelloPayload, wire.MailboxPayload, wire.MailboxAckPayload)
            ):
                # A contact device's own routing: its answer and its rotations name its
                # mailbox; its acknowledgement of our rotation counts for that device (the
                # old mailbox goes once the row and every device it went to acknowledged).
                url = (payload.reply_to.relay_url if isinstance(payload, wire.HelloPayload)
                       else payload.mailbox.relay_url if isinstance(payload, wire.MailboxPayload)
                       else None)  # fmt: skip
                if url is not None and not self.m.mailboxes.peer_url_ok(url):
                    droplog.dropped("dropped a mailbox address with a refused relay URL")
                elif isinstance(payload, wire.HelloPayload):
                    self.m.fanout.device_answered(c, device, payload.reply_to)
                elif isinstance(payload, wire.MailboxPayload):
                    self.m.fanout.device_rotated(c, device, payload)
                else:
                    self._rotation_acked(c, device, payload.rotation_id)
                return
            if fragment.count > MAX_MESSAGE_FRAGMENTS and not isinstance(payload, _LONG_PAYLOADS):
                droplog.dropped("dropped a fragment of an oversized message")
                return
            self._handle_payload(c, session, payload, device)

    def _rotation_acked(self, c: Contact, device: bytes | None, rotation_id: bytes) -> None:
        """An acknowledgement of our rotation of the mailbox for ``c``, in its session row
        (``device`` None) or in the session with one of its other devices: the old mailbox
        goes once the row and every device the rotation went to acknowledged it, so that no
        device of the contact deposits into a deleted mailbox. Stored with the receive, acted
        on (relay calls) right after the commit."""
        key = f"{ROTATION_KEY}{c.id}"
        pending = self.m.store.get_setting(key)
        if pending is None or pending["id"] != rotation_id.hex():
            return
        if device is None:
            pending = {**pending, "acked": True}
        else:
            pending = {**pending, "devices": [d for d in pending.get("devices", [])
                                              if d != device.hex()]}  # fmt: skip
        self.m.store.set_setting(key, pending)
        if pending.get("acked") and not awaiting_devices(self.m.store, c.id, pending):
            self._acked_rotations.append((c, rotation_id))

    def _make_room_for_long(self, contact_id: int, msg_id: bytes) -> None:
        """Before a fragment of a long message (over MAX_MESSAGE_FRAGMENTS) not yet kept: the
        contact's oldest long partials go past LONG_PARTIALS_PER_CONTACT."""
        longs = group_store.long_partials(self.m.store, contact_id, MAX_MESSAGE_FRAGMENTS)
        if msg_id in longs:
            return
        for old in longs[: max(0, len(longs) - LONG_PARTIALS_PER_CONTACT + 1)]:
            self.m.store.delete_fragments(contact_id, old)
            droplog.dropped("dropped a partial message (over a contact's long-message limit)")

    def _make_room_for_partial(self, contact_id: int, msg_id: bytes) -> None:
        """Before a fragment of a message not yet kept starts one more partial message (inside
        the receive transaction): a contact's oldest partials make room for its newest
        (PARTIALS_PER_CONTACT); past the total for all contacts, the oldest partial of the
        contact holding the most goes, so whoever fills it loses, not everyone else."""
        own = self.m.store.partial_messages(contact_id)
        if any(m == msg_id for _, m in own):
            return
        for _, old in own[: max(0, len(own) - PARTIALS_PER_CONTACT + 1)]:
            self.m.store.delete_fragments(contact_id, old)
            droplog.dropped("dropped a partial message (over a contact's limit)")
        total = int(self.m.store.get_setting(SETTING_MAX_PARTIALS, PARTIALS_TOTAL))
        kept = self.m.store.partial_messages()  # oldest first
        while len(kept) >= max(1, total):
            held: dict[int, int] = {}
            for cid, _ in kept:
                held[cid] = held.get(cid, 0) + 1
            most = max(held.values())
            victim = next((cid, m) for cid, m in kept if held[cid] == most)  # its oldest
            self.m.store.delete_fragments(*victim)
            kept.remove(victim)
            droplog.dropped("dropped a partial message (over the total limit)")

    def drop_partials(self, contact_id: int) -> None:
        """A contact blocked: its incomplete messages go (they would never be shown)."""
        n = len(self.m.store.partial_messages(contact_id))
        self.m.store.delete_fragments(contact_id)
        for _ in range(n):
            droplog.dropped("dropped a partial message (contact blocked)")

    def _handle_payload(
        self, c: Contact, session: Session, payload: wire.Payload, device: bytes | None = None
    ) -> None:
        """``device``: the contact's device whose session it came in, None for the row (only
        call signaling looks at it: docs/devices.md §9)."""
        if isinstance(payload, wire.CoverPayload):
            return  # cover: nothing to show, keep or answer (§24)
        if not isinstance(payload, _GROUP_CONTACT_PAYLOADS) and group_store.is_group_contact(
            self.m.store, c.id
        ):
            droplog.dropped("dropped a one-to-one payload from a group-only contact")
            return
        if isinstance(payload, _GROUP_PAYLOADS):
            self.m.groups.on_payload(c, session, payload)
            return
        if isinstance(payload, wire.TextPayload):
            mid = payload.message_id.hex()
            if self.m.store.get_message(mid) is not None:
                return  # a duplicate id: never show a message twice
            msg = self.m.store.add_message(
                c.id, "in", payload.text, status="received", message_id=mid,
                sent_at=payload.sent_at_ms,
            )  # fmt: skip
            self.m.ctx.events.emit(
                "message.received",
                {"message_id": mid, "contact": c.name, "text": payload.text,
                 "sent_at": payload.sent_at_ms, "timer": msg.timer_s},
            )  # fmt: skip
            self.m.delivery.queue_receipt(
                Recipient(c, session), wire.RECEIPT_DELIVERED, [payload.message_id]
            )
            self.m.actions.on_text(c, mid)  # actions that came before it (§26.5)
            self.m.own_sync.received(c, mid)  # read on another device before it came here
        elif isinstance(payload, wire.ActionPayload):
            self.m.actions.on_payload(c, session, payload)
        elif isinstance(payload, wire.ReceiptPayload):
            status = "delivered" if payload.kind == wire.RECEIPT_DELIVERED else "read"
            for raw in payload.message_ids:
                m = self.m.store.get_message(raw.hex())
                if m is None or m.contact_id != c.id or m.direction != "out":
                    # a group message's, maybe (a text of another's with this id, which a
                    # member can copy from a group message of ours, must not hide it)
                    self.m.groups.on_receipt(c, raw, status)
                    continue
                if self.m.store.set_message_status(m.id, status):
                    self.m.ctx.events.emit(
                        "message.status", {"message_id": m.id, "contact": c.name, "status": status}
                    )
        elif isinstance(
            payload, (wire.HelloPayload, wire.MailboxPayload)
        ) and not self.m.mailboxes.peer_url_ok(
            payload.reply_to.relay_url
            if isinstance(payload, wire.HelloPayload)
            else payload.mailbox.relay_url
        ):
            droplog.dropped("dropped a mailbox address with a refused relay URL")
        elif isinstance(payload, wire.HelloPayload):
            state = ContactState.from_bytes(c.state)
            state.send_to, state.established = payload.reply_to, True
            self.m.store.update_contact(c.id, state=state.to_bytes())
            self.m.store.readdress_outbox(
                c.id,
                PENDING_DESTINATION,
                address_to_bytes(payload.reply_to),
                due=SLOT_WAIT if self.m.cover.active() else 0,
            )
            self.m.cover.changed()
            if not self.m.renewals.on_hello(c) and not group_store.is_group_contact(
                self.m.store, c.id
            ):  # a group contact is hidden: not announced
                self.m.ctx.events.emit("contact.established", {"contact": c.name})
            # Established after this device's list went: it gets the list now (§5.3).
            self.m.fanout.send_held(c.id)
        elif isinstance(payload, wire.MailboxPayload):
            state = ContactState.from_bytes(c.state)
            if state.send_to is not None:  # blocks still queued for the old mailbox follow
                self.m.store.readdress_outbox(
                    c.id, address_to_bytes(state.send_to), address_to_bytes(payload.mailbox)
                )
            state.send_to = payload.mailbox
            self.m.store.update_contact(c.id, state=state.to_bytes())
            # The acknowledgement goes to the new mailbox: the old one may be gone already (it
            # expired while the contact was away, _expired), and the new one is subscribed.
            c = self.m.store.get_contact(c.id) or c
            self.m.delivery.enqueue([Recipient(c, session)],
                                  wire.MailboxAckPayload(payload.rotation_id),
                                  delay=self.m.delivery.receipt_delay())  # fmt: skip
        elif isinstance(payload, wire.AttachmentPayload):
            self.m.attachments.on_descriptor(c, session, payload)
            # A reaction to the file may have come first (§26.5).
            self.m.actions.on_text(c, payload.message_id.hex())
        elif isinstance(payload, wire.TypingPayload):
            self.m.typing.on_payload(c, session, payload)
        elif isinstance(payload, wire.TimerPayload):
            self.m.disappearing.on_payload(c, payload)
        elif isinstance(payload, wire.MailboxAckPayload):
            self._rotation_acked(c, None, payload.rotation_id)
        elif (
            isinstance(payload, (wire.CallPayload, wire.CallSealedPayload))
            and self.m.calls is not None  # aegisd/calls/service.py, set at start-up
        ):
            # The calls service names the row's session as a device too (cd.ROW_DEVICE).
            self.m.calls.on_payload(c, payload, cd.ROW_DEVICE if device is None else device)
