"""Messaging: the protocol core, the store and the relay link put together.

Invariants (docs/protocol.md, "Mailboxes and the daemon"):
- Receiving: the advanced ratchet state, the received message and its event commit in one
  transaction, and only then is the relay acknowledged. A crash before the commit makes the
  relay deliver the block again; a crash after it makes the redelivered block fail to decrypt
  (its key is spent) and it is dropped: nothing is lost, nothing is shown twice.
- Sending: the advanced sending chain and the exact ciphertext blocks commit together before the
  first deposit; a retry resends those stored bytes.
- One protocol lock serialises everything that reads or writes sessions and prekeys.
- Nothing here logs an address, an ID, a key or message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aegisd.core import wire
from aegisd.core.identity import (
    IdentityKeyPair,
    new_address,
)
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.store import Store
from aegisd.store import cover as cover_slots
from aegisd.store.db import MailboxRow
from aegisd.transport.network import Network
from aegisd.transport.relaylink import (
    UNAVAILABLE,
    RelayUnavailable,
)
from relay.client import RelayError
from relay.wire import (
    E_DENIED,
)

from .address import SETTING_ADDRESS_RENEWED, Address
from .attachments import Attachments
from .contacts import Contacts
from .delivery import Delivery, DeliveryHooks, Recipient
from .inbox import STALE_FRAGMENTS_MS, Inbox
from .mailbox import (
    ContactState,
    OwnedMailbox,
)
from .mailboxes import SETTING_MOVE, Mailboxes
from .rotation import Rotation

if TYPE_CHECKING:
    from .context import ServiceContext

log = logging.getLogger("aegisd.messenger")

SETTING_ADDRESS = "profile.address"
SETTING_READ_RECEIPTS = "privacy.read_receipts"

MAINTENANCE_INTERVAL = 3600.0
SETTING_SUPERSEDED = "profile.superseded"  # {"at": ms}: restored on another device
SUPERSEDED_TEXT = (
    "this profile was restored from a backup on another device, which now has its contacts "
    "(the relay no longer has this copy's mailboxes): use that device; this copy can no "
    "longer send or receive, and its history stays readable here (if it was not restored "
    "elsewhere, the relay lost its mailboxes: aegis relay set URL makes new ones)"
)
#: status.relay_lost: the relay refused this profile's address mailbox as gone, without the
#: evidence of a restored copy (_on_refused): a relay that lost its data, most likely.
RELAY_LOST_TEXT = (
    "the relay no longer has this profile's address mailbox (it may have lost its data): "
    "aegis relay set URL (the same URL) makes new mailboxes there; contacts that cannot "
    "reach you need a new invitation"
)
#: When the profile's relay last held our subscriptions (ms; written on connect, hourly while
#: connected, when the connection ends and at lock): how long this copy was away. The relay
#: deletes a mailbox nobody used for its mailbox_ttl (HELLO_OK, relay-protocol.md §4), so a
#: mailbox refused after an absence that long expired: _on_refused then makes new ones instead
#: of taking the refusal for a copy restored elsewhere.
SETTING_LAST_REACHED = "relay.last_reached"
#: The relay's mailbox_ttl when its HELLO_OK does not say (its default: 90 days).
DEFAULT_MAILBOX_TTL = 90 * 24 * 3600
ADDRESS_RENEWED_TEXT = (
    "this profile was away from its relay longer than the relay keeps unused mailboxes: its "
    "contact address expired there and a new one was made (aegis address shows it; the old "
    "link and outstanding invitations no longer work). Contacts were given new mailboxes"
)
SETTING_EVENT_RETENTION = "events.retention_days"
EVENT_RETENTION_DAYS = 30

# Application error codes (docs/api.md, "Errors"); the same as aegisd/rpc/errors.py's.
E_NOT_FOUND = 1020
E_NOT_READY = 1024
E_BLOCKED = 1025
E_TOO_LARGE = 1026


def _now() -> int:
    return int(time.time())


def _ms() -> int:
    return time.time_ns() // 1_000_000


class Messenger:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.entropy = SystemEntropy()
        self.lock = asyncio.Lock()
        self.prekeys: PrekeyStore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.mailboxes = Mailboxes(self)  # the mailboxes we own and the relay link
        self.address = Address(self)  # the public address, its prekeys, the invitations
        self.contacts = Contacts(self)  # contacts and contact requests
        # Mailboxes of ours the relay refused as gone since the link last went down
        # ("address", "contact", "deposit": the evidence _on_refused weighs), and what status
        # says when that is not enough to mark the profile superseded.
        self._denied: set[str] = set()
        self.relay_lost: str | None = None
        # SETTING_LAST_REACHED as it was before the current connection (how long we were
        # away), and the contacts given a new mailbox for an expired one on this connection.
        self._reached_before: int | None = None
        self._renewing: set[int] = set()
        self.rotation = Rotation(self)  # mailbox rotation and relay moves (rotation.py)
        self.inbox = Inbox(self)  # every block delivered to a mailbox of ours (inbox.py)
        self.attachments = Attachments(self)
        from .renewal import Renewals  # session renewal after a backup import (§23)

        self.renewals = Renewals(self)
        from .cover import Cover  # cover traffic and the slots real blocks wait for (§24)

        self.cover = Cover(self, test_methods=ctx.test_methods)
        # The one place that sends payloads (delivery.py): encrypt, queue, drain.
        self.delivery = Delivery(DeliveryHooks(
            store=lambda: ctx.store,
            events=ctx.events,
            entropy=self.entropy,
            link=lambda: self.mailboxes.link,
            network=self.network,
            superseded=self.superseded,
            cover_active=lambda: self.cover.active(),
            renewal_refused=lambda c: self.renewals.on_refused(c),
            drop_contact_mailbox=self.mailboxes.drop_contact_mailbox,
            contact_mailbox_gone=lambda: self._spawn(self._probe_address()),
        ))  # fmt: skip

    # --- life cycle -----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        store = self.ctx.store
        if store is None:
            raise RuntimeError("store is locked")
        return store

    async def on_unlock(self, store: Store) -> None:
        state = store.get_identity()
        if state is None:
            identity = IdentityKeyPair.generate(self.entropy)
            self.prekeys = PrekeyStore.create(self.entropy, identity, _now())
            with store.transaction():
                store.put_identity(self.prekeys.to_bytes())
                store.set_setting(SETTING_ADDRESS, new_address(self.entropy).hex())
            log.info("new identity created")
        else:
            self.prekeys = PrekeyStore.from_bytes(state)
        reached = store.get_setting(SETTING_LAST_REACHED)
        self._reached_before = int(reached) if reached is not None else None
        self.mailboxes.reload()
        self.mailboxes.start_link()
        self._tasks = [
            asyncio.create_task(self.delivery.run(), name="outbox"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self.address.prekey_loop(), name="prekeys"),
        ]
        if not self.superseded():  # cover for contacts that moved on to a restored copy: no
            self.cover.start()
        await self.attachments.on_unlock()

    def network(self) -> Network:
        """How relays are reached now (services/connectivity.py)."""
        return self.ctx.network()

    async def on_lock(self, store: Store) -> None:
        if self.ctx.relay_connected:
            store.set_setting(SETTING_LAST_REACHED, _ms())  # connected until now
        await self.cover.stop()
        await self.attachments.on_lock()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.mailboxes.link is not None:
            await self.mailboxes.link.stop()
            self.mailboxes.link = None
        await self.mailboxes.stop_drains()
        self.ctx.relay_connected = False
        async with self.lock:
            self.prekeys = None
            self.mailboxes.owned.clear()
            self._denied.clear()
            self.relay_lost = None

    def _on_relay_state(self, up: bool, reason: str | None) -> None:
        was = self.ctx.relay_connected
        first_failure = not up and self.mailboxes.relay_reason == "connecting"
        self.ctx.relay_connected = up
        self.mailboxes.relay_reason = reason
        if self.ctx.store is not None and (up or was):
            # Connected now, or until now: the relay saw our subscriptions (they count as use).
            now = _ms()
            self.ctx.store.set_setting(SETTING_LAST_REACHED, now)
            if not up:
                self._reached_before, self._renewing = now, set()
        if not up:
            self._denied.clear()  # the evidence of one connection (_on_refused)
        if (up != was or first_failure) and self.ctx.store is not None:
            self.ctx.events.emit("relay.up" if up else "relay.down", {"reason": reason})
        if up:
            if self.ctx.store is not None:
                self.ctx.store.retry_failed_now()  # they failed because of the outage
            self.delivery.wake()
            self._spawn(self._after_connect())

    # --- a copy of the profile restored elsewhere ------------------------------------------

    def superseded(self) -> str | None:
        """Why this copy of the profile is out of use (restored on another device), or None."""
        store = self.ctx.store
        if store is not None and store.get_setting(SETTING_SUPERSEDED):
            return SUPERSEDED_TEXT
        return None

    def check_usable(self) -> None:
        if self.superseded():
            raise AppError(E_NOT_READY, "not_ready", SUPERSEDED_TEXT, reason="restored_elsewhere")

    def _on_refused(self, owner_id: bytes, code: int) -> bool:
        """The relay refused to subscribe one of our mailboxes. E_DENIED: it no longer exists.
        Only a holder of its key can have deleted it (this profile's: a copy restored from a
        backup deletes the old mailboxes once its contacts renewed, docs/protocol.md §23), or
        the relay lost it (its database, or a hostile relay). One refusal is not enough to
        stop this copy for good (_verdict): the address mailbox AND an established contact's
        (its own mailbox, or the contact's, a deposit refused) must both be gone, with no relay
        move or renewal under way. Returns whether the refusal is accounted for (no warning)."""
        entry = self.mailboxes.owned.get(owner_id)
        if entry is None or code != E_DENIED or self.ctx.store is None:
            return False
        row = entry[0]
        if row.role == cover_slots.POOL_ROLE:
            # Made ahead and not yet anyone's: gone (expired unused at the relay, relay-protocol
            # md §4, or lost), it is simply replaced, at the pool's own random time.
            with self.store.transaction():
                cover_slots.pool_remove(self.store, row.id)
            self.mailboxes.reload()
            self.cover.changed()
            return True
        if row.role in ("address", "contact", "invitation") and self._away_past_mailbox_ttl():
            self._expired(row, entry[1])
            return True
        if row.role == "address":
            self._denied.add("address")
        elif row.role == "contact" and row.contact_id is not None:
            c = self.store.get_contact(row.contact_id)
            if c is None or c.blocked or not ContactState.from_bytes(c.state).established:
                return False
            self._denied.add("contact")
        else:
            return False
        self._verdict()
        return True

    def _away_past_mailbox_ttl(self) -> bool:
        """Whether this copy was away from its relay long enough for its mailboxes to expire
        there. The relay stores a mailbox's last use rounded down to its granularity (a month
        of the 90 days by default), which HELLO_OK does not carry: half the TTL covers any
        granularity up to half of it. A copy restored elsewhere while this one was away that
        long is taken for expiry too: then this copy makes new mailboxes its contacts ignore."""
        before = self._reached_before
        if before is None:
            return False  # never reached (or a profile from before this setting): no evidence
        ttl = self.mailboxes.link.mailbox_ttl if self.mailboxes.link is not None else None
        return _ms() - before >= (ttl or DEFAULT_MAILBOX_TTL) * 1000 // 2

    def _expired(self, row: MailboxRow, mb: OwnedMailbox) -> None:
        """A mailbox of ours expired at the relay while we were away (_on_refused): the
        address is made anew (with its invitations, which point at its bundle, gone: status
        and an event say the link changed); a contact is given a new mailbox through the
        ratchet (the ordinary rotation: its own mailbox is most likely still there)."""
        self.mailboxes.owned.pop(mb.owner_id, None)
        if row.role == "address":
            with self.store.transaction():
                for r in [row, *self.store.list_mailboxes("invitation")]:
                    self.store.delete_mailbox(r.id)
                    self.mailboxes.owned.pop(OwnedMailbox.from_bytes(r.descriptor).owner_id, None)
                self.store.set_setting(SETTING_ADDRESS_RENEWED, {"at": _ms()})
                self.ctx.events.emit("address.renewed", {"reason": ADDRESS_RENEWED_TEXT})
            log.warning("the relay expired this profile's address while it was away: a new "
                        "address is made (aegis address)")  # fmt: skip
            self._spawn(self._renew_address())
        elif row.role == "invitation":
            self.store.delete_mailbox(row.id)
        elif row.contact_id is not None and row.contact_id not in self._renewing:
            c = self.store.get_contact(row.contact_id)
            if c is not None and not c.blocked and ContactState.from_bytes(c.state).established:
                self._renewing.add(c.id)
                self._spawn(self._renew_contact_mailbox(c.id))

    async def _renew_address(self) -> None:
        with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            await self.address.ensure()  # else the next connection makes it (_after_connect)

    async def _renew_contact_mailbox(self, contact_id: int) -> None:
        c = self.store.get_contact(contact_id) if self.ctx.store is not None else None
        if c is None:
            return
        try:
            await self.rotation.rotate(c.name)
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            # Retried by the ordinary rotation on the next connection or hourly pass: a
            # mailbox that expired is older than the rotation period (rotation.py rotate_due).
            self._renewing.discard(contact_id)

    def address_renewed(self) -> str | None:
        """status.address_renewed: the address expired at the relay and was made anew, until
        the user asks for the new one (address.get, address.rotate)."""
        store = self.ctx.store
        if store is not None and store.get_setting(SETTING_ADDRESS_RENEWED):
            return ADDRESS_RENEWED_TEXT
        return None

    def _verdict(self) -> None:
        """Mark the profile superseded on strong evidence (above); on the address alone, say in
        status that the relay lost it (RELAY_LOST_TEXT)."""
        if "address" not in self._denied or self.store.get_setting(SETTING_SUPERSEDED):
            return
        busy = self.store.get_setting(SETTING_MOVE) or self.store._q(
            "SELECT 1 FROM renewals WHERE done = 0"
        ).fetchone()
        if busy or not self._denied & {"contact", "deposit"}:
            if self.relay_lost is None:
                log.warning("the relay no longer has this profile's address mailbox")
            self.relay_lost = RELAY_LOST_TEXT
            return
        self.relay_lost = None
        self._mark_superseded()

    async def _probe_address(self) -> None:
        """A deposit to an established contact was refused (its mailbox is gone): ask the relay
        about the address mailbox (an owner command without side effects); it refuses if a
        restored copy of this profile deleted it (then _on_refused marks this copy)."""
        self._denied.add("deposit")
        found = self.address.mailbox() if self.ctx.store is not None else None
        if found is None or self.mailboxes.link is None or self.superseded():
            return
        _, mb = found
        try:
            async with self.mailboxes.client() as client:
                await client.bundle_status(mb.owner_id, mb.signing_key)
        except RelayError as exc:
            self._on_refused(mb.owner_id, exc.code)
        except (*UNAVAILABLE, RelayUnavailable, AppError):
            pass  # the next connection subscribes it anyway

    def _mark_superseded(self) -> None:
        """Once: stop sending (every queued block would be refused), fail what waited, say so
        in one log line, an event, status and every send."""
        store = self.store
        with store.transaction():
            store.set_setting(SETTING_SUPERSEDED, {"at": _ms()})
            rows = store._q("SELECT DISTINCT message_id FROM outbox WHERE message_id IS NOT NULL")
            ids = [r[0] for r in rows.fetchall()]
            store._q("DELETE FROM outbox")
            for mid in ids:
                m = store.get_message(mid)
                if m is None or m.direction != "out" or not store.set_message_status(mid, "failed"):
                    continue
                contact = store.get_contact(m.contact_id)
                self.ctx.events.emit("message.status", {
                    "message_id": mid, "contact": contact.name if contact else None,
                    "status": "failed"})  # fmt: skip
            self.ctx.events.emit("profile.superseded", {"reason": SUPERSEDED_TEXT})
        self._spawn(self.cover.stop())
        log.warning("the relay no longer has this profile's mailboxes: it was restored on "
                    "another device; sending stopped (aegis status)")  # fmt: skip

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that on_lock cancels; finished ones are forgotten."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(coro))

    async def _after_connect(self) -> None:
        if self.superseded():
            return  # every relay call would be refused: the mailboxes are gone
        try:
            await self.address.ensure()
            await self.address.replenish_prekeys(republish=True)
            await self.address.expire_invitations()
            await self.rotation.finish_acked()
            await self.rotation.rotate_due()
            await self.renewals.resume()
            await self.renewals.retire_due()
            await self.rotation.continue_move()
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            pass  # the next connection tries again

    # --- identity and the public address ---------------------------------------------------

    def identity(self) -> IdentityKeyPair:
        if self.prekeys is None:
            raise RuntimeError("store is locked")
        return self.prekeys.identity

    # --- contacts ---------------------------------------------------------------------------

    # --- sending ----------------------------------------------------------------------------

    async def send_text(self, name: str, text: str) -> dict[str, Any]:
        if len(text.encode()) > wire.MAX_TEXT_BYTES:
            raise AppError(
                E_TOO_LARGE, "too_large", f"a message holds at most {wire.MAX_TEXT_BYTES} bytes"
            )
        self.check_usable()
        async with self.lock:
            c = self.contacts.by_name(name)
            if c.blocked:
                raise AppError(E_BLOCKED, "blocked", "this contact is blocked")
            blob = self.store.get_session(c.id)
            if blob is None:
                raise AppError(E_NOT_READY, "not_ready", "no session with this contact")
            session = Session.from_bytes(blob)
            wire_id = self.entropy.random(wire.MESSAGE_ID_LEN)
            payload = wire.TextPayload(wire_id, _ms(), text)
            with self.store.transaction():
                mid = self.store.add_message(
                    c.id, "out", text, status="queued", message_id=wire_id.hex()
                ).id
                self.delivery.enqueue([Recipient(c, session)], payload, message_id=mid,
                                      delay=self.delivery.send_jitter())
        self.delivery.wake()
        return {"message_id": mid, "status": "queued"}

    async def mark_read(self, name: str, message_ids: list[str] | None) -> dict[str, Any]:
        async with self.lock:
            c = self.contacts.by_name(name)
            wanted = set(message_ids) if message_ids is not None else None
            incoming = [m for m in self.store.unread(c.id) if wanted is None or m.id in wanted]
            if not incoming:
                return {"marked": 0}
            with self.store.transaction():
                for m in incoming:
                    self.store.set_message_status(m.id, "read")
                blob = self.store.get_session(c.id)
                if self.store.get_setting(SETTING_READ_RECEIPTS, True) and blob and not c.blocked:
                    ids = [bytes.fromhex(m.id) for m in incoming]
                    recipient = Recipient(c, Session.from_bytes(blob))
                    self.delivery.queue_receipt(recipient, wire.RECEIPT_READ, ids)
        self.delivery.wake()
        return {"marked": len(incoming)}

    def _prune_events(self) -> None:
        """Events older than `events.retention_days` (default 30) go: clients that reconnect
        later than that are told of the gap by events.subscribe and read messages.history."""
        days = float(self.store.get_setting(SETTING_EVENT_RETENTION, EVENT_RETENTION_DAYS))
        self.store.prune_events_before(_ms() - int(days * 86_400_000))

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.ctx.store is not None:
                self.store.delete_stale_fragments(_ms() - STALE_FRAGMENTS_MS)
                self._prune_events()
                if self.ctx.relay_connected:
                    self.store.set_setting(SETTING_LAST_REACHED, _ms())
            with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                await self.address.replenish_prekeys()
                await self.address.expire_invitations()
                await self.rotation.rotate_due()
                if not self.superseded():
                    await self.rotation.continue_move()  # contacts that answered since, the bound

    def _reload_prekeys(self) -> None:
        state = self.store.get_identity()
        if state is not None:
            self.prekeys = PrekeyStore.from_bytes(state)

    async def send_call_payload(self, contact_id: int, payload: wire.Payload) -> None:
        """Call signaling leaves at once: no send jitter and no receipt delay (a call cannot
        wait), in ordinary blocks through the ordinary outbox (docs/threat-model.md: what the
        timing of a call reveals)."""
        self.check_usable()
        async with self.lock:
            c = self.store.get_contact(contact_id)
            blob = self.store.get_session(contact_id) if c is not None else None
            if c is None or blob is None or not ContactState.from_bytes(c.state).established:
                raise AppError(E_NOT_READY, "not_ready", "this contact cannot be reached yet")
            with self.store.transaction():
                self.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload,
                                      slotted=False)
        self.delivery.wake()
