"""Contacts and contact requests.

- ``add``: from someone's address or invitation link: fetch and verify their prekey bundle
  (PQXDH), make our mailbox for their answer, and queue the first contact (a HelloPayload
  with our mailbox) through the delivery layer; wait briefly for its deposit, so that a used
  or revoked invitation is reported at once.
- A first contact through our address arrives as a request (the inbox makes it): the user
  accepts it (``accept_request``: the contact is made and answered, ``establish``) or
  rejects it.
- ``block`` drops what a blocked contact set going (partial messages, queued blocks, files);
  ``remove`` deletes the contact with its mailboxes (here and at the relay).

Of the other services this module imports the mailboxes, the delivery layer, the bundle
fetch and constants or helpers of the inbox, renewal and rotation (none imports it back):
what it uses of the messenger is ``ContactsHost``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from aegisd.core import pqxdh, wire
from aegisd.core.errors import BundleError, DecodeError
from aegisd.core.identity import (
    IdentityKeyPair,
    PublicIdentity,
    format_safety_number,
    keys_of,
    safety_number,
)
from aegisd.core.session import Session, initiate_session
from aegisd.netmode import Unreachable
from aegisd.relayurl import RelayUrlError, check_peer_relay_url
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store.attachments import AttachmentRow
from aegisd.store.db import Contact
from aegisd.store.groups import group_contact_ids, mark_group_contact

from .bundle_fetch import fetch_bundle
from .delivery import LINK_NO_LONGER_VALID, Delivery
from .host import ServiceHost
from .inbox import FanoutView
from .mailbox import ContactState, OwnedMailbox, address_from_bytes, address_to_bytes
from .mailboxes import Mailboxes
from .names import clean_name
from .renewal import failure as renewal_failure
from .rotation import ROTATION_KEY

SETTING_NAME = "profile.display_name"
#: How long contacts.add waits for the first contact's deposit: a refusal (used, revoked or
#: expired invitation) is reported at once; past this, a later failure shows in contacts.list.
FIRST_CONTACT_WAIT = 15.0  # well inside the CLI's 60 s, after a bundle fetch through Tor


class AttachmentsView(Protocol):
    async def stop_contact(self, contact_id: int) -> list[AttachmentRow]: ...
    async def stop_downloads(self, contact_id: int, reason: str) -> None: ...
    def forget_rows(self, rows: list[AttachmentRow]) -> None: ...
    def discard(self, aids: list[str]) -> None: ...


class InboxView(Protocol):
    def drop_partials(self, contact_id: int) -> None: ...


class DisappearingView(Protocol):
    def apply_default(self, c: Contact, session: Session) -> None: ...


class OwnSyncView(Protocol):
    def contact_changed(self, c: Contact, *, removed: bool = False) -> None: ...


class ContactsHost(ServiceHost, Protocol):
    """What the contacts use of the messenger."""

    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def delivery(self) -> Delivery: ...
    @property
    def attachments(self) -> AttachmentsView: ...
    @property
    def inbox(self) -> InboxView: ...
    @property
    def disappearing(self) -> DisappearingView: ...
    @property
    def fanout(self) -> FanoutView: ...
    @property
    def own_sync(self) -> OwnSyncView: ...

    def identity(self) -> IdentityKeyPair: ...
    def check_usable(self) -> None: ...


def _now() -> int:
    return int(time.time())


class Contacts:
    def __init__(self, host: ContactsHost) -> None:
        self.m = host

    def by_name(self, name: str) -> Contact:
        c = self.m.store.contact_by_name(name)
        if c is None:
            raise E.not_found("contact")
        return c

    def unique_name(self, wanted: str) -> str:
        base = wanted.strip()[:64] or "contact"
        name, n = base, 1
        while self.m.store.contact_by_name(name) is not None:
            n += 1
            name = f"{base} ({n})"
        return name

    def with_identity(self, identity: PublicIdentity) -> Contact | None:
        # By its keys, not the record's bytes: the same keys with another binding signature
        # are the same identity (and a blocked one stays blocked).
        key = identity.encode()
        return next(
            (c for c in self.m.store.list_contacts() if keys_of(c.identity_key) == key), None
        )

    def describe(self, c: Contact) -> dict[str, Any]:
        state = ContactState.from_bytes(c.state)
        return {
            "name": c.name,
            "verified": c.verified,
            "blocked": c.blocked,
            "established": state.established,
            "failed": state.failed or renewal_failure(self.m.store, c.id),
            "created_at": c.created_at,
            "timer": self.m.store.get_timer(c.id)[0],  # disappearing messages (§27), 0: off
        }

    def failed(self) -> list[str]:
        """Names of the contacts whose first contact was refused for good (status shows them;
        not group contacts, which contacts.list does not show either)."""
        hidden = group_contact_ids(self.m.store)
        return [c.name for c in self.m.store.list_contacts()
                if c.id not in hidden and (ContactState.from_bytes(c.state).failed
                                           or renewal_failure(self.m.store, c.id))]  # fmt: skip

    async def add(self, name: str, link_text: str, *, group_only: bool = False
                  ) -> dict[str, Any]:  # fmt: skip
        """``group_only``: a group contact made through an introduction (hidden from the
        contact list), marked so in the same transaction that makes it."""
        self.m.check_usable()
        try:
            link = wire.ContactLink.from_text(link_text)
            identity = PublicIdentity.from_record(link.identity)
        except (DecodeError, BundleError):
            raise AppError(E.BAD_LINK, "bad_link", "this is not a valid AegisLink link") from None
        if link.expires and link.expires < _now():
            raise AppError(E.EXPIRED, "expired", "this invitation has expired")
        try:
            check_peer_relay_url(link.mailbox.relay_url, self.m.mailboxes.own_urls())
        except RelayUrlError as exc:
            raise AppError(E.BAD_LINK, "bad_link", f"the link's relay URL is not allowed: {exc}"
                           ) from None
        try:  # e.g. a contact on an onion relay, and this profile connects directly
            self.m.ctx.network().check(link.mailbox.relay_url)
        except Unreachable as exc:
            raise AppError(E.BAD_LINK, "bad_link", f"this contact's relay: {exc}") from None
        if identity.same_keys(self.m.identity().public):
            raise AppError(E.BAD_LINK, "bad_link", "this link is your own")
        for stale in {c.id: c for c in (self.with_identity(identity),
                                        self.m.store.contact_by_name(name)) if c}.values():
            if ContactState.from_bytes(stale.state).failed:
                await self.remove(stale.name)  # a failed attempt is replaced by this one
        if self.with_identity(identity) is not None:
            raise AppError(E.EXISTS, "exists", "this contact is already in your contacts")
        if self.m.store.contact_by_name(name) is not None:
            raise AppError(E.EXISTS, "exists", "a contact with this name already exists")
        # Errors say what happened: no such address, a limit (try later), or no relay.
        base, x, m = await fetch_bundle(
            link.mailbox.relay_url, link.bundle_address, self.m.mailboxes.link, self.m.ctx.network()
        )
        try:
            bundle = pqxdh.verify_bundle(base, x, m, expected=identity)
        except (DecodeError, BundleError):
            raise AppError(
                E.BAD_LINK, "bad_link", "the keys the relay served do not match the link"
            ) from None
        made = await self.m.mailboxes.made_ahead(public=False)  # the proof: outside the lock
        async with self.m.lock:
            mb_id, mb = await self.m.mailboxes.create("contact", public=False, made=made)
            hello = wire.HelloPayload(
                reply_to=mb.address(),
                display_name=str(self.m.store.get_setting(SETTING_NAME, "")),
                invitation_id=link.invitation_id,
            )
            session, block = initiate_session(
                self.m.entropy, self.m.identity(), bundle, wire.encode_payload(hello)
            )
            with self.m.store.transaction():
                cid = self.m.store.add_contact(
                    name,
                    identity_key=identity.to_bytes(),
                    state=ContactState(link.mailbox, False).to_bytes(),
                ).id
                self.m.store.set_mailbox_contact(mb_id, cid)
                self.m.store.put_session(cid, session.to_bytes())
                self.m.store.enqueue_blocks(address_to_bytes(link.mailbox), [block], contact_id=cid)
                if group_only:
                    mark_group_contact(self.m.store, cid)
                else:
                    self.m.ctx.events.emit("contact.added", {"contact": name, "established": False})
                    made_c = self.m.store.get_contact(cid)
                    assert made_c is not None
                    self.m.disappearing.apply_default(made_c, session)
                    self.m.own_sync.contact_changed(made_c)  # on the other own devices too
            self.m.mailboxes.reload()
            # Registered before any await: the outbox cannot settle it unseen.
            waiter = self.m.delivery.first_contact_waiter(cid)
        self.m.delivery.wake()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(waiter), FIRST_CONTACT_WAIT)
        except TimeoutError:
            outcome = "pending"  # a slow relay: a later refusal shows in contacts.list
        finally:
            self.m.delivery.forget_first_contact(cid)
        if outcome == "refused":
            # Known at once: nothing is kept, the user can try again with a fresh link.
            await self.remove(name)
            raise AppError(E.BAD_LINK, "bad_link", LINK_NO_LONGER_VALID, reason="link_used")
        c = self.m.store.get_contact(cid)
        if c is None:
            raise E.not_found("contact")  # removed meanwhile
        return {**self.describe(c), "first_contact": outcome}

    def list_requests(self) -> list[dict[str, Any]]:
        own = self.m.identity().public
        out = []
        for r in self.m.store.list_requests():
            ident = PublicIdentity.from_bytes(r.identity_key)
            out.append(
                {
                    "request": r.id,
                    "name": r.display_name,
                    "safety_number": safety_number(own, ident),
                    "created_at": r.created_at,
                }
            )
        return out

    async def accept_request(self, request_id: int, name: str | None) -> dict[str, Any]:
        async with self.m.lock:
            # Read and delete the request under the lock, before anything is encrypted: its
            # session must be used once only (two accepts would reuse its keys).
            row = self.m.store.get_request(request_id)
            if row is None:
                raise E.not_found("request")
            identity = PublicIdentity.from_bytes(row.identity_key)
            known = self.with_identity(identity)
            if known is not None:
                raise AppError(E.EXISTS, "exists", "this identity is already a contact")
            mb_id, mb = await self.m.mailboxes.create("contact", public=False)
            with self.m.store.transaction():
                if not self.m.store.delete_request(request_id):
                    raise E.not_found("request")
                session = Session.from_bytes(row.session)
                contact = self.establish(
                    name or row.display_name,
                    identity,
                    session,
                    address_from_bytes(row.reply_to),
                    mb_id,
                    mb,
                )
                self.m.disappearing.apply_default(contact, session)
                self.m.own_sync.contact_changed(contact)  # on the other own devices too
            self.m.mailboxes.reload()
        self.m.delivery.wake()
        return self.describe(contact)

    def reject_request(self, request_id: int) -> None:
        if not self.m.store.delete_request(request_id):
            raise E.not_found("request")

    def establish(
        self,
        name: str,
        identity: PublicIdentity,
        session: Session,
        reply_to: wire.MailboxAddress,
        mb_id: int,
        mb: OwnedMailbox,
        *,
        emit: bool = True,
    ) -> Contact:
        """Create the contact and answer with our mailbox (inside a transaction); ``emit``
        False: a hidden group contact, not announced."""
        name = self.unique_name(clean_name(name))
        cid = self.m.store.add_contact(
            name, identity_key=identity.to_bytes(), state=ContactState(reply_to, True).to_bytes()
        ).id
        self.m.store.set_mailbox_contact(mb_id, cid)
        own_name = str(self.m.store.get_setting(SETTING_NAME, ""))
        hello = wire.HelloPayload(mb.address(), own_name, b"")
        blocks = session.encrypt(self.m.entropy, wire.encode_payload(hello))
        self.m.store.put_session(cid, session.to_bytes())
        self.m.store.enqueue_blocks(address_to_bytes(reply_to), blocks, contact_id=cid)
        # A contact added after this device's list went gets the list now (§5.3).
        self.m.fanout.send_held(cid)
        if emit:
            self.m.ctx.events.emit("contact.added", {"contact": name, "established": True})
        c = self.m.store.get_contact(cid)
        assert c is not None
        return c

    def safety(self, name: str) -> dict[str, Any]:
        c = self.by_name(name)
        assert c.identity_key is not None
        number = safety_number(self.m.identity().public, PublicIdentity.from_bytes(c.identity_key))
        return {
            "contact": c.name,
            "safety_number": number,
            "formatted": format_safety_number(number),
        }

    async def block(self, name: str, blocked: bool) -> Contact:
        """Block (or unblock) a contact. Blocking also stops what the contact set going: its
        incomplete messages are dropped and its files stop downloading (their relay was
        chosen by the contact: it must not see this daemon again)."""
        async with self.m.lock:
            c = self.by_name(name)
            with self.m.store.transaction():
                self.m.store.update_contact(c.id, blocked=blocked)
                if blocked:
                    self.m.inbox.drop_partials(c.id)
                    self.m.delivery.drop_outbox_of(self.m.store, {c.id})
                self.m.own_sync.contact_changed(self.m.store.get_contact(c.id) or c)
            if blocked:
                await self.m.attachments.stop_downloads(c.id, "the contact is blocked")
        return c

    async def remove(self, name: str) -> None:
        async with self.m.lock:
            await self.remove_locked(self.by_name(name))

    async def remove_locked(self, c: Contact, then: Callable[[], None] | None = None) -> None:
        """Remove ``c`` (the caller holds the messenger's lock and checked it still goes);
        ``then`` runs inside the removal's transaction."""
        rows = [r for r in self.m.store.list_mailboxes("contact") if r.contact_id == c.id]
        files = await self.m.attachments.stop_contact(c.id)
        with self.m.store.transaction():
            # Synced in the removal's transaction, before the row goes (a group's: not sent).
            self.m.own_sync.contact_changed(c, removed=True)
            if then is not None:
                then()
            self.m.attachments.forget_rows(files)  # a group copy's setting goes with it
            self.m.store.remove_contact(c.id)  # its mailbox rows go with it
            self.m.fanout.forget(c.id)  # its held device sessions (threat-model.md)
            self.m.store.set_setting(f"{ROTATION_KEY}{c.id}", None)
            self.m.store.set_setting(f"renewal.answered.{c.id}", None)  # renewal.ANSWERED_KEY
        self.m.attachments.discard([r.id for r in files])  # rows went with the contact
        for r in rows:
            mb = OwnedMailbox.from_bytes(r.descriptor)
            self.m.mailboxes.owned.pop(mb.owner_id, None)
            await self.m.mailboxes.delete_at_relay(mb)
