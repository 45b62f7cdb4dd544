"""First contacts: a PQXDH first message to the address or an invitation mailbox, opened
and routed (services/inbox.py hands them here, under the messenger's protocol lock). One of
our own devices goes to the sync sessions (own_sync.py); a known contact's other device to
its device sessions (fanout.py, checked under the contact's list); a hello to an invitation
mailbox makes the contact (or the group member its introduction was made for); a member of
a group this device holds opens its group contact; anyone else makes a contact request,
bounded (MAX_PENDING_REQUESTS) and one per identity.

Everything a peer sends is hostile: a block that does not open, or a hello out of place, is
dropped (counted, never logged with its content), its burnt one-time keys kept burnt.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError
from aegisd.core.identity import PublicIdentity, keys_of
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.session import FirstContact, Session, accept_first_contact
from aegisd.rpc import AppError
from aegisd.store import contact_devices as cd
from aegisd.store import groups as group_store
from aegisd.store.db import Contact, MailboxRow
from aegisd.store.devices import SETTING_OWN_LIST  # a device that joined by a link holds one
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayError

from .delivery import Delivery
from .groups_state import JOINING_KEY
from .host import ServiceHost
from .mailbox import ContactState, OwnedMailbox, address_to_bytes
from .mailboxes import Mailboxes
from .names import clean_name

#: Contact requests through the address waiting for the user (issue 15 item 14): past this,
#: a request from a new identity is dropped (counted) until the user accepts or rejects some;
#: one identity holds one request whatever it sends. A setting may change it.
MAX_PENDING_REQUESTS = 50
SETTING_MAX_REQUESTS = "requests.max_pending"


def _now() -> int:
    return int(time.time())


class OwnSyncView(Protocol):
    def is_own(self, sender: PublicIdentity) -> bool: ...
    async def on_first_contact(self, fc: FirstContact, block: bytes) -> None: ...
    def contact_changed(self, c: Contact, *, removed: bool = False) -> None: ...


class FanoutView(Protocol):
    def device_first_contact(
        self, c: Contact, session: Session, hello: dv.DeviceHello, ek: bytes
    ) -> tuple[bool, bytes | None]: ...


class CoverView(Protocol):
    def changed(self) -> None: ...


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...
    def establish(
        self, name: str, identity: PublicIdentity, session: Session,
        reply_to: wire.MailboxAddress, mb_id: int, mb: OwnedMailbox, *, emit: bool = True,
    ) -> Contact: ...  # fmt: skip


class AddressView(Protocol):
    def request_top_up(self) -> None: ...


class GroupsView(Protocol):
    """First contacts through an introduction link (groups.py)."""

    def introduction_sender_ok(
        self, invitation_id: bytes, sender: PublicIdentity
    ) -> bool | None: ...
    def introduced(self, invitation_id: bytes, contact_id: int) -> None: ...
    def member_session(self, contact_id: int) -> None: ...


class DisappearingView(Protocol):
    def apply_default(self, c: Contact, session: Session) -> None: ...


class FirstContactsHost(ServiceHost, Protocol):
    """What the first contacts use of the messenger."""

    prekeys: PrekeyStore | None

    @property
    def delivery(self) -> Delivery: ...
    @property
    def cover(self) -> CoverView: ...
    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def address(self) -> AddressView: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def groups(self) -> GroupsView: ...
    @property
    def disappearing(self) -> DisappearingView: ...
    @property
    def fanout(self) -> FanoutView: ...
    @property
    def own_sync(self) -> OwnSyncView: ...
    def _reload_prekeys(self) -> None: ...


class FirstContacts:
    def __init__(self, host: FirstContactsHost) -> None:
        self.m = host

    async def receive(self, row: MailboxRow, block: bytes) -> None:
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
