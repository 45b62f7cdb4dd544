"""The inbox: every block the relay delivers to a mailbox of ours, opened and acted on.

- ``on_block`` (the relay link's handler): open the relay's sealing, then, under the
  messenger's protocol lock, hand the block to the first-contact path (the address or an
  invitation mailbox: a PQXDH first message, a new contact or a contact request) or to the
  contact's ratchet session; our own loop cover is dropped unopened.
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
is kept. Of the other services this module imports only the mailboxes, the delivery layer
and rotation's constants (none imports it back): what it uses of the messenger is
``InboxHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import sqlcipher3

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError
from aegisd.core.identity import PublicIdentity, keys_of
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import Entropy
from aegisd.core.session import FirstContact, Session, accept_first_contact
from aegisd.rpc import AppError
from aegisd.store import Store, StoreError
from aegisd.store import contact_devices as cd
from aegisd.store import cover as cover_slots
from aegisd.store import groups as group_store
from aegisd.store.cover import SLOT_WAIT
from aegisd.store.db import Contact, MailboxRow
from aegisd.store.devices import SETTING_OWN_LIST  # a device that joined by a link holds one
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable, acknowledge
from relay.client import Message, RelayClient, RelayError

from .context import ServiceContext
from .delivery import PENDING_DESTINATION, Delivery, Recipient
from .groups_state import JOINING_KEY
from .mailbox import ContactState, OwnedMailbox, address_to_bytes
from .mailboxes import Mailboxes
from .names import clean_name
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
#: Contact requests through the address waiting for the user (issue 15 item 14): past this,
#: a request from a new identity is dropped (counted) until the user accepts or rejects some;
#: one identity holds one request whatever it sends. A setting may change it.
MAX_PENDING_REQUESTS = 50
SETTING_MAX_REQUESTS = "requests.max_pending"


def _now() -> int:
    return int(time.time())


class FanoutView(Protocol):
    def on_payload(
        self, c: Contact, session: Session, payload: dv.DevicePayload, device: bytes | None
    ) -> None: ...
    def device_answered(
        self, c: Contact, device_id: bytes, reply_to: wire.MailboxAddress
    ) -> None: ...
    def device_rotated(self, c: Contact, device_id: bytes, p: wire.MailboxPayload) -> None: ...
    def send_held(self, contact_id: int) -> None: ...
    def forget(self, contact_id: int) -> None: ...
    def device_first_contact(
        self, c: Contact, session: Session, hello: dv.DeviceHello, ek: bytes
    ) -> tuple[bool, bytes | None]: ...
    def superseded(self, contact_id: int) -> list[tuple[bytes, bytes]]: ...
    def took_superseded(self, contact_id: int, device_id: bytes, used: bytes) -> None: ...


class OwnSyncView(Protocol):
    def is_own(self, sender: PublicIdentity) -> bool: ...
    async def on_first_contact(self, fc: FirstContact, block: bytes) -> None: ...
    def receive(self, mailbox_id: int, block: bytes) -> None: ...
    def contact_changed(self, c: Contact, *, removed: bool = False) -> None: ...
    def received(self, c: Contact, message_id: str) -> None: ...


class CoverView(Protocol):
    def active(self) -> bool: ...
    def changed(self) -> None: ...
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


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def establish(
        self, name: str, identity: PublicIdentity, session: Session,
        reply_to: wire.MailboxAddress, mb_id: int, mb: OwnedMailbox, *, emit: bool = True,
    ) -> Contact: ...  # fmt: skip


class AddressView(Protocol):
    def request_top_up(self) -> None: ...


class CallsView(Protocol):
    """Call signaling's receiver (aegisd/calls/service.py CallService)."""

    def on_payload(
        self, c: Contact, payload: wire.CallPayload | wire.CallSealedPayload, device: bytes
    ) -> None: ...


class ActionsView(Protocol):
    """Replies, reactions, edits and deletions (actions.py, docs/protocol.md §26)."""

    def on_payload(self, c: Contact, session: Session, payload: wire.ActionPayload) -> None: ...
    def on_text(self, c: Contact, message_id: str) -> None: ...


class GroupsView(Protocol):
    """The groups service's receiver (groups.py): payloads 0x0C-0x11, receipts of group
    messages, first contacts through an introduction link."""

    def on_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None: ...
    def on_receipt(self, c: Contact, message_id: bytes, status: str) -> None: ...
    def introduction_sender_ok(
        self, invitation_id: bytes, sender: PublicIdentity
    ) -> bool | None: ...
    def introduced(self, invitation_id: bytes, contact_id: int) -> None: ...
    def member_session(self, contact_id: int) -> None: ...


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


class DisappearingView(Protocol):
    def on_payload(self, c: Contact, p: wire.TimerPayload) -> None: ...
    def apply_default(self, c: Contact, session: Session) -> None: ...


class InboxHost(Protocol):
    """What the inbox uses of the messenger."""

    prekeys: PrekeyStore | None
    calls: CallsView | None

    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    @property
    def entropy(self) -> Entropy: ...
    @property
    def delivery(self) -> Delivery: ...
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
    def mailboxes(self) -> Mailboxes: ...
    @property
    def address(self) -> AddressView: ...
    @property
    def contacts(self) -> ContactsView: ...
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

    def _reload_prekeys(self) -> None: ...


class Inbox:
    def __init__(self, host: InboxHost) -> None:
        self.m = host
        # Rotations whose acknowledgement this receive stored: acted on (relay calls) after
        # its commit, outside the transaction.
        self._acked_rotations: list[tuple[Contact, bytes]] = []

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
                            await self._receive_first_contact(row, block)
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

    async def _receive_first_contact(self, row: MailboxRow, block: bytes) -> None:
        assert self.m.prekeys is not None
        try:
            fc = accept_first_contact(self.m.entropy, self.m.prekeys, block)
            if self.m.own_sync.is_own(fc.sender):  # one of our own devices: a sync session
                self.m.address.request_top_up()
                await self.m.own_sync.on_first_contact(fc, block)
                return
            data = fc.fragment.data
            device_hello = dv.decode_device_payload(data) if wire.is_device_payload(data) else None
            hello = wire.decode_payload(data) if device_hello is None else None
        except (DecryptionError, DecodeError):
            self.m._reload_prekeys()
            droplog.dropped("dropped a first-contact block that did not open")
            return
        # It used one-time keys (kept burnt below, whatever follows): top the relay's up.
        self.m.address.request_top_up()
        if device_hello is not None:
            hello = await self._first_contact_of_device(row, block, fc, device_hello)
            if hello is None:
                return
        if not isinstance(hello, wire.HelloPayload) or not self.m.mailboxes.peer_url_ok(
            hello.reply_to.relay_url
        ):
            self.m._reload_prekeys()
            return
        known = self.m.contacts.with_identity(fc.sender)
        if row.role == "invitation":
            valid = (
                row.invitation_id is not None
                and hello.invitation_id == row.invitation_id
                and (row.expires_at is None or row.expires_at >= _now())
                and (known is None or not known.blocked)
            )
            # A link made for a group introduction takes the member it was made for only.
            intro = (
                self.m.groups.introduction_sender_ok(row.invitation_id, fc.sender)
                if valid and row.invitation_id is not None
                else None
            )
            valid = valid and intro is not False
            if not valid:
                self.m.store.put_identity(self.m.prekeys.to_bytes())  # one-time keys stay burnt
                return
            mb_id, mb = await self.m.mailboxes.create("contact", public=False)
            try:
                with self.m.store.transaction():
                    self.m.store.put_identity(self.m.prekeys.to_bytes())
                    self.m.store.delete_mailbox(row.id)  # used: the invitation is void
                    name = hello.display_name or "new contact"
                    made = self.m.contacts.establish(
                        name, fc.sender, fc.session, hello.reply_to, mb_id, mb
                    )
                    if intro and row.invitation_id is not None:
                        self.m.groups.introduced(row.invitation_id, made.id)
                    else:  # a contact of the user's: the default timer of new conversations
                        self.m.disappearing.apply_default(made, fc.session)
                        self.m.own_sync.contact_changed(made)  # on the other own devices too
            except BaseException:
                self._unused_mailbox(mb_id)
                raise
            self.m.mailboxes.reload()
            self.m.delivery.wake()
            with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                old = OwnedMailbox.from_bytes(row.descriptor)
                async with self.m.mailboxes.client() as client:
                    await client.delete(old.owner_id, old.signing_key)
            return
        if (
            known is not None
            and not known.blocked
            and self.m.store.get_setting(SETTING_OWN_LIST) is not None
            and self._device_session_of(known, hello)
        ):
            await self._device_session(known, fc.session, hello.reply_to, None)
            return
        if known is None and hello.invitation_id == wire.DEVICE_SESSION and self._held_member(
            fc.sender
        ):
            await self._member_session(fc.sender, fc.session, hello.reply_to)
            return
        with self.m.store.transaction():
            self.m.store.put_identity(self.m.prekeys.to_bytes())  # burnt one-time keys
            if known is not None and known.blocked:
                return
            pending = self.m.store.list_requests()
            keys = fc.sender.encode()  # the keys: a re-signed record is the same identity
            same = [r for r in pending if keys_of(r.identity_key) == keys]
            if same:
                # The same identity again (it retried, or floods): one request, holding the
                # newest session, the one its sender now waits on (issue 15 item 14).
                self.m.store.replace_request(
                    same[0].id, clean_name(hello.display_name), fc.session.to_bytes(),
                    address_to_bytes(hello.reply_to),
                )  # fmt: skip
                for extra in same[1:]:  # kept apart before requests were merged
                    self.m.store.delete_request(extra.id)
                droplog.dropped("merged a contact request into an earlier one of its identity")
                return
            limit = int(self.m.store.get_setting(SETTING_MAX_REQUESTS, MAX_PENDING_REQUESTS))
            if len(pending) >= limit:
                droplog.dropped("dropped a contact request (too many pending)")
                return
            request_id = self.m.store.add_request(
                fc.sender.to_bytes(),
                clean_name(hello.display_name),
                fc.session.to_bytes(),
                address_to_bytes(hello.reply_to),
            )
            self.m.ctx.events.emit(
                "contact.request",
                {
                    "request": request_id,
                    "name": clean_name(hello.display_name),
                    "known": known is not None,
                },
            )

    def _held_member(self, sender: PublicIdentity) -> bool:
        """Whether ``sender``, not us, is a member of a group this device is a member of by
        the group's proven head: not one we were removed from (the head no longer lists us)
        nor one whose join is under way (its member list is the inviter's word, unproven)."""
        assert self.m.prekeys is not None
        store = self.m.store
        me = self.m.prekeys.identity.public.ed_pub
        if store.get_setting(SETTING_OWN_LIST) is None or sender.ed_pub == me:
            return False
        return any(
            store.get_setting(f"{JOINING_KEY}{ref}") is None
            for ref in group_store.groups_with_both(store, me, sender.ed_pub)
        )

    async def _member_session(
        self, sender: PublicIdentity, session: Session, reply_to: wire.MailboxAddress
    ) -> None:
        """A member of a group this device holds, no contact of it, opened a device session
        with it (tagged so: a device hello, or a hello carrying DEVICE_SESSION) having learned
        the person's device list from another of its devices (the one that opened the
        member's introduction, docs/devices.md §5.5): a group contact, as the introduction
        would have made it here, without a request."""
        assert self.m.prekeys is not None
        mb_id, mb = await self.m.mailboxes.create("contact", public=False)
        with self.m.store.transaction():
            self.m.store.put_identity(self.m.prekeys.to_bytes())
            name = f"member {sender.ed_pub.hex()[:12]}"  # as an introduction names it
            made = self.m.contacts.establish(
                name, sender, session, reply_to, mb_id, mb, emit=False  # hidden: not announced
            )
            self.m.groups.member_session(made.id)
        self.m.mailboxes.reload()
        self.m.cover.changed()
        self.m.delivery.wake()

    def _device_session_of(self, c: Contact, hello: wire.HelloPayload) -> bool:
        """Whether a hello (0x03) first contact from contact ``c``, at this device holding a
        list, is its session rather than a request: a contact known without a session (its
        profile came by a link) or one whose introduction another device of ours opened.
        A group-only contact's must be tagged DEVICE_SESSION (its fanout's opening): an
        untagged one is its ``contacts.add``, a request, never swallowed as hidden."""
        fresh = (
            self.m.store.get_session(c.id) is None
            and self.m.store.mailbox_for_contact(c.id) is None  # not a restored contact
        )
        if not group_store.is_group_contact(self.m.store, c.id):
            return fresh
        tagged = hello.invitation_id == wire.DEVICE_SESSION
        return tagged and (fresh or self._introduced_elsewhere(c))

    def _introduced_elsewhere(self, c: Contact) -> bool:
        """A group member this device opened an introduction link to (a group-only contact
        not established): another device of ours opened it first, the member learned our
        list from that device and now opens a session with this one (docs/devices.md §5.5)."""
        return group_store.is_group_contact(self.m.store, c.id) and not ContactState.from_bytes(
            c.state
        ).established

    async def _first_contact_of_device(
        self, row: MailboxRow, block: bytes, fc: FirstContact, payload: dv.DevicePayload
    ) -> wire.HelloPayload | None:
        """A first contact whose first payload is a device hello (docs/protocol.md §28.4): a
        session with a device of a known contact, checked under that contact's list
        (fanout.py), never a contact request. From an identity that is no contact: a member
        of a group this device holds is its group contact (§25.7); anyone else (one added on
        another device of this person whose sync (own_sync.py, 0x46) has not arrived yet)
        makes the contact request a hello (0x03) without a name would make: returned for that
        path. The request keeps no device ID or proof: a synced 0x46 naming that identity
        accepts it (own_sync.py) on the word of our own device, not on a check under the
        contact's list."""
        assert self.m.prekeys is not None
        known = self.m.contacts.with_identity(fc.sender)
        if (
            isinstance(payload, dv.DeviceHello)
            and known is None
            and row.role == "address"
            and self.m.mailboxes.peer_url_ok(payload.reply.relay_url)
            and self._held_member(fc.sender)
        ):
            await self._member_session(fc.sender, fc.session, payload.reply)
            return None
        if isinstance(payload, dv.DeviceHello) and (known is None or (
            self.m.store.get_session(known.id) is None
            and self.m.store.mailbox_for_contact(known.id) is None
            and self.m.store.get_setting(SETTING_OWN_LIST) is None
        )):  # fmt: skip
            # No contact; or one without a session on a device that did not join by a link
            # (no list of its own): only a linked device takes a first session unasked, as on
            # the 0x03 path below. Either way what a nameless hello (0x03) would make.
            return wire.HelloPayload(payload.reply, "", b"")
        if (
            not isinstance(payload, dv.DeviceHello)
            or row.role != "address"
            or known is None
            or known.blocked
            or not self.m.mailboxes.peer_url_ok(payload.reply.relay_url)
        ):
            self.m.store.put_identity(self.m.prekeys.to_bytes())  # one-time keys stay burnt
            droplog.dropped("dropped a device hello out of place")
            return None
        if self._introduced_elsewhere(known):
            # its list follows in the session (device_answered checks the device then)
            await self._device_session(known, fc.session, payload.reply, None)
            return None
        ek = wire.FirstContactPrefix.from_block(block).ephemeral_pub
        with self.m.store.transaction():
            as_row, device_id = self.m.fanout.device_first_contact(known, fc.session, payload, ek)
            if not as_row:
                self.m.store.put_identity(self.m.prekeys.to_bytes())
        if as_row:
            # The burnt one-time keys are committed with the session row (_device_session): a
            # failure before it (the relay, a kill) leaves the block to open again.
            await self._device_session(known, fc.session, payload.reply, device_id)
        return None

    async def _device_session(
        self, c: Contact, session: Session, reply_to: wire.MailboxAddress,
        device_id: bytes | None,
    ) -> None:  # fmt: skip
        """A contact this linked device knows without a session (its profile came by a link,
        or its introduction went to another device of ours) opened one with it, having learned
        of it from the person's device list (docs/devices.md §5.2): the contact's session
        (with ``device_id``, when its hello proved it), answered with a mailbox of this
        device's own (the one its introduction made, if any)."""
        assert self.m.prekeys is not None
        row = self.m.store.mailbox_for_contact(c.id)
        if row is not None:
            mb_id, mb = row.id, OwnedMailbox.from_bytes(row.descriptor)
        else:
            mb_id, mb = await self.m.mailboxes.create("contact", public=False)
        try:
            with self.m.store.transaction():
                self.m.store.put_identity(self.m.prekeys.to_bytes())
                if row is not None:  # what waits for the introduction's dead session goes
                    self.m.delivery.drop_outbox_of(self.m.store, {c.id})
                self.m.store.set_mailbox_contact(mb_id, c.id)
                self.m.store.update_contact(c.id, state=ContactState(reply_to, True).to_bytes())
                own_name = str(self.m.store.get_setting("profile.display_name", ""))
                answer = wire.HelloPayload(mb.address(), own_name, b"")
                blocks = session.encrypt(self.m.entropy, wire.encode_payload(answer))
                self.m.store.put_session(c.id, session.to_bytes())
                if device_id is not None:
                    cd.set_session_device(self.m.store, c.id, device_id)
                self.m.store.enqueue_blocks(address_to_bytes(reply_to), blocks, contact_id=c.id)
                if not group_store.is_group_contact(self.m.store, c.id):  # hidden: not announced
                    self.m.ctx.events.emit("contact.established", {"contact": c.name})
        except BaseException:
            if row is None:  # a mailbox made for this session only
                self._unused_mailbox(mb_id)
            raise
        self.m.mailboxes.reload()
        self.m.cover.changed()
        self.m.delivery.wake()

    def _unused_mailbox(self, mb_id: int) -> None:
        """The transaction meant to give the mailbox ``create`` just took its contact did not
        commit: the mailbox is not left subscribed as a contact's without one."""
        with contextlib.suppress(Exception):  # the store failing: the row stays (harmless)
            self.m.mailboxes.unused(mb_id)

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
