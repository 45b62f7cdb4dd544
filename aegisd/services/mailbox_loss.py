"""Mailboxes the relay no longer has: a copy of the profile restored elsewhere, a relay that
lost its data, or mailboxes that expired while this copy was away.

The relay refuses to subscribe a mailbox that no longer exists (E_DENIED). Only a holder of
its key can have deleted it (this profile's: a copy restored from a backup deletes the old
mailboxes once its contacts renewed, docs/protocol.md §23), or the relay lost it, or it
expired unused. ``on_refused`` weighs the evidence of one connection: away longer than the
relay keeps unused mailboxes, the mailboxes are made anew (``expired``); the address AND an
established contact's mailbox gone mark this copy superseded (``mark_superseded``: sending
stops, status and every send say why); the address alone is reported as ``relay_lost``.

This module imports no other service but the mailboxes and the address: what it uses of the
messenger is ``LossHost``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import cover as cover_slots
from aegisd.store.db import MailboxRow
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayError
from relay.wire import E_DENIED

from .address import SETTING_ADDRESS_RENEWED, Address
from .context import ServiceContext
from .mailbox import ContactState, OwnedMailbox
from .mailboxes import SETTING_MOVE, Mailboxes

log = logging.getLogger("aegisd.messenger")

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


class CoverView(Protocol):
    def changed(self) -> None: ...
    async def stop(self) -> None: ...


class RotationView(Protocol):
    async def rotate(self, name: str) -> dict[str, Any]: ...


class LossHost(Protocol):
    """What the mailbox-loss logic uses of the messenger."""

    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def address(self) -> Address: ...
    @property
    def cover(self) -> CoverView: ...
    @property
    def rotation(self) -> RotationView: ...

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def _ms() -> int:
    return time.time_ns() // 1_000_000


class MailboxLoss:
    def __init__(self, host: LossHost) -> None:
        self.m = host
        # Mailboxes of ours the relay refused as gone since the link last went down
        # ("address", "contact", "deposit": the evidence on_refused weighs), and what status
        # says when that is not enough to mark the profile superseded.
        self.denied: set[str] = set()
        self.relay_lost: str | None = None
        # SETTING_LAST_REACHED as it was before the current connection (how long we were
        # away), and the contacts given a new mailbox for an expired one on this connection.
        self.reached_before: int | None = None
        self.renewing: set[int] = set()

    def superseded(self) -> str | None:
        """Why this copy of the profile is out of use (restored on another device), or None."""
        store = self.m.ctx.store
        if store is not None and store.get_setting(SETTING_SUPERSEDED):
            return SUPERSEDED_TEXT
        return None

    def check_usable(self) -> None:
        if self.superseded():
            raise AppError(E.NOT_READY, "not_ready", SUPERSEDED_TEXT, reason="restored_elsewhere")

    def on_refused(self, owner_id: bytes, code: int) -> bool:
        """The relay refused to subscribe one of our mailboxes. E_DENIED: it no longer exists.
        Only a holder of its key can have deleted it (this profile's: a copy restored from a
        backup deletes the old mailboxes once its contacts renewed, docs/protocol.md §23), or
        the relay lost it (its database, or a hostile relay). One refusal is not enough to
        stop this copy for good (_verdict): the address mailbox AND an established contact's
        (its own mailbox, or the contact's, a deposit refused) must both be gone, with no relay
        move or renewal under way. Returns whether the refusal is accounted for (no warning)."""
        entry = self.m.mailboxes.owned.get(owner_id)
        if entry is None or code != E_DENIED or self.m.ctx.store is None:
            return False
        row = entry[0]
        if row.role == cover_slots.POOL_ROLE:
            # Made ahead and not yet anyone's: gone (expired unused at the relay, relay-protocol
            # md §4, or lost), it is simply replaced, at the pool's own random time.
            with self.m.store.transaction():
                cover_slots.pool_remove(self.m.store, row.id)
            self.m.mailboxes.reload()
            self.m.cover.changed()
            return True
        if row.role in ("address", "contact", "invitation") and self.away_past_mailbox_ttl():
            self.expired(row, entry[1])
            return True
        if row.role == "address":
            self.denied.add("address")
        elif row.role == "contact" and row.contact_id is not None:
            c = self.m.store.get_contact(row.contact_id)
            if c is None or c.blocked or not ContactState.from_bytes(c.state).established:
                return False
            self.denied.add("contact")
        else:
            return False
        self.verdict()
        return True

    def away_past_mailbox_ttl(self) -> bool:
        """Whether this copy was away from its relay long enough for its mailboxes to expire
        there. The relay stores a mailbox's last use rounded down to its granularity (a month
        of the 90 days by default), which HELLO_OK does not carry: half the TTL covers any
        granularity up to half of it. A copy restored elsewhere while this one was away that
        long is taken for expiry too: then this copy makes new mailboxes its contacts ignore."""
        before = self.reached_before
        if before is None:
            return False  # never reached (or a profile from before this setting): no evidence
        ttl = self.m.mailboxes.link.mailbox_ttl if self.m.mailboxes.link is not None else None
        return _ms() - before >= (ttl or DEFAULT_MAILBOX_TTL) * 1000 // 2

    def expired(self, row: MailboxRow, mb: OwnedMailbox) -> None:
        """A mailbox of ours expired at the relay while we were away (_on_refused): the
        address is made anew (with its invitations, which point at its bundle, gone: status
        and an event say the link changed); a contact is given a new mailbox through the
        ratchet (the ordinary rotation: its own mailbox is most likely still there)."""
        self.m.mailboxes.owned.pop(mb.owner_id, None)
        if row.role == "address":
            with self.m.store.transaction():
                for r in [row, *self.m.store.list_mailboxes("invitation")]:
                    self.m.store.delete_mailbox(r.id)
                    self.m.mailboxes.owned.pop(OwnedMailbox.from_bytes(r.descriptor).owner_id, None)
                self.m.store.set_setting(SETTING_ADDRESS_RENEWED, {"at": _ms()})
                self.m.ctx.events.emit("address.renewed", {"reason": ADDRESS_RENEWED_TEXT})
            log.warning("the relay expired this profile's address while it was away: a new "
                        "address is made (aegis address)")  # fmt: skip
            self.m._spawn(self.renew_address())
        elif row.role == "invitation":
            self.m.store.delete_mailbox(row.id)
        elif row.contact_id is not None and row.contact_id not in self.renewing:
            c = self.m.store.get_contact(row.contact_id)
            if c is not None and not c.blocked and ContactState.from_bytes(c.state).established:
                self.renewing.add(c.id)
                self.m._spawn(self.renew_contact_mailbox(c.id))

    async def renew_address(self) -> None:
        with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            await self.m.address.ensure()  # else the next connection makes it (_after_connect)

    async def renew_contact_mailbox(self, contact_id: int) -> None:
        c = self.m.store.get_contact(contact_id) if self.m.ctx.store is not None else None
        if c is None:
            return
        try:
            await self.m.rotation.rotate(c.name)
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            # Retried by the ordinary rotation on the next connection or hourly pass: a
            # mailbox that expired is older than the rotation period (rotation.py rotate_due).
            self.renewing.discard(contact_id)

    def address_renewed(self) -> str | None:
        """status.address_renewed: the address expired at the relay and was made anew, until
        the user asks for the new one (address.get, address.rotate)."""
        store = self.m.ctx.store
        if store is not None and store.get_setting(SETTING_ADDRESS_RENEWED):
            return ADDRESS_RENEWED_TEXT
        return None

    def verdict(self) -> None:
        """Mark the profile superseded on strong evidence (above); on the address alone, say in
        status that the relay lost it (RELAY_LOST_TEXT)."""
        if "address" not in self.denied or self.m.store.get_setting(SETTING_SUPERSEDED):
            return
        busy = self.m.store.get_setting(SETTING_MOVE) or self.m.store._q(
            "SELECT 1 FROM renewals WHERE done = 0"
        ).fetchone()
        if busy or not self.denied & {"contact", "deposit"}:
            if self.relay_lost is None:
                log.warning("the relay no longer has this profile's address mailbox")
            self.relay_lost = RELAY_LOST_TEXT
            return
        self.relay_lost = None
        self.mark_superseded()

    async def probe_address(self) -> None:
        """A deposit to an established contact was refused (its mailbox is gone): ask the relay
        about the address mailbox (an owner command without side effects); it refuses if a
        restored copy of this profile deleted it (then _on_refused marks this copy)."""
        self.denied.add("deposit")
        found = self.m.address.mailbox() if self.m.ctx.store is not None else None
        if found is None or self.m.mailboxes.link is None or self.superseded():
            return
        _, mb = found
        try:
            async with self.m.mailboxes.client() as client:
                await client.bundle_status(mb.owner_id, mb.signing_key)
        except RelayError as exc:
            self.on_refused(mb.owner_id, exc.code)
        except (*UNAVAILABLE, RelayUnavailable, AppError):
            pass  # the next connection subscribes it anyway

    def mark_superseded(self) -> None:
        """Once: stop sending (every queued block would be refused), fail what waited, say so
        in one log line, an event, status and every send."""
        store = self.m.store
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
                self.m.ctx.events.emit("message.status", {
                    "message_id": mid, "contact": contact.name if contact else None,
                    "status": "failed"})  # fmt: skip
            self.m.ctx.events.emit("profile.superseded", {"reason": SUPERSEDED_TEXT})
        self.m._spawn(self.m.cover.stop())
        log.warning("the relay no longer has this profile's mailboxes: it was restored on "
                    "another device; sending stopped (aegis status)")  # fmt: skip
