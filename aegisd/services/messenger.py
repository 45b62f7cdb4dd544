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
import functools
import logging
import random
import time
import unicodedata
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

import sqlcipher3

from aegisd import droplog
from aegisd.core import pqxdh, wire
from aegisd.core.errors import BundleError, DecodeError, DecryptionError
from aegisd.core.identity import (
    IdentityKeyPair,
    PublicIdentity,
    format_safety_number,
    keys_of,
    new_address,
    safety_number,
)
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session, accept_first_contact, initiate_session
from aegisd.netmode import Unreachable, own_extra
from aegisd.relayurl import (
    SETTING_INSECURE,
    SETTING_URL,
    RelayUrlError,
    check_peer_relay_url,
    check_relay_url,
    endpoint_key,
    same_relay,
)
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.store import Store, StoreError
from aegisd.store import cover as cover_slots
from aegisd.store.cover import SLOT_WAIT
from aegisd.store.db import Contact, MailboxRow, OutboxItem
from aegisd.transport.network import Network
from aegisd.transport.relaylink import (
    UNAVAILABLE,
    RelayLink,
    RelayRefused,
    RelayUnavailable,
    acknowledge,
    with_relay,
)
from relay.client import Message, RelayClient, RelayError
from relay.wire import (
    E_DENIED,
    E_FULL,
    E_LIMIT,
    E_QUEUE_FULL,
    E_RATE_LIMITED,
    ITEM_MLKEM,
    ITEM_X25519,
)

from .attachments import BLOB_AREA, Attachments
from .bundle_fetch import fetch_bundle
from .mailbox import (
    ContactState,
    OwnedMailbox,
    address_from_bytes,
    address_to_bytes,
    box_public,
    new_keys,
)
from .renewal import failure as renewal_failure

if TYPE_CHECKING:
    from aegisd.daemon import Daemon

log = logging.getLogger("aegisd.messenger")

#: Failures of the store that a later attempt may not meet (disk full, I/O): never a reason to
#: acknowledge a block.
TRANSIENT = (sqlcipher3.Error, StoreError, OSError)

SETTING_ADDRESS = "profile.address"
SETTING_NAME = "profile.display_name"
SETTING_READ_RECEIPTS = "privacy.read_receipts"
SETTING_RECEIPT_DELAY = "privacy.receipt_delay_max"
SETTING_SEND_JITTER = "privacy.send_jitter_max"  # seconds; 0 (the default): send at once

INVITE_TTL_DEFAULT = 7 * 24 * 3600
INVITE_TTL_MAX = 90 * 24 * 3600
ONE_TIME_LOW = 20  # replenish the relay's one-time prekeys below this many of a kind
ONE_TIME_BATCH = 50
RECEIPT_DELAY_MAX = 3.0  # seconds; receipts leave after a random delay in [0.5, max]
RETRY_MAX = 60.0
MAINTENANCE_INTERVAL = 3600.0
#: How often the relay's count of one-time prekeys is checked (BUNDLE_STATUS, an owner command
#: on the address mailbox): anyone with the address link can take them, at the relay's one-time
#: rate (about one a minute), without ever making a first contact. A random wait in this range
#: (seconds), drawn afresh each time: on no exact beat the relay could match to a profile. The
#: command goes on the connection that holds the address's subscription anyway (in isolated
#: mode too: RelayLink.owner_of), so it opens no connection of its own.
PREKEY_CHECK_MIN = 300.0
PREKEY_CHECK_MAX = 900.0
MAILBOX_ROTATION = 7 * 24 * 3600  # seconds a per-contact receiving mailbox is used
SETTING_ROTATION = "privacy.mailbox_rotation"
ROTATION_KEY = "rotation.contact."
DEFAULT_TTL = 14 * 24 * 3600  # the relay's default; its HELLO says the real one
PENDING_DESTINATION = b"pending"  # outbox blocks waiting for the contact's answer
NEVER = 2**62  # not_before of those blocks: readdressing makes them due
#: How long contacts.add waits for the first contact's deposit: a refusal (used, revoked or
#: expired invitation) is reported at once; past this, a later failure shows in contacts.list.
FIRST_CONTACT_WAIT = 15.0  # well inside the CLI's 60 s, after a bundle fetch through Tor
LINK_NO_LONGER_VALID = (
    "the invitation was already used, revoked or has expired (its relay no longer has its "
    "mailbox): ask for a new invitation"
)
# The largest payload (a text of MAX_TEXT_BYTES) spans this many blocks; a peer claiming more
# is refused, so that partial messages cannot pile up.
MAX_MESSAGE_FRAGMENTS = -(-(wire.MAX_TEXT_BYTES + 26) // wire.RATCHET_CAPACITY)
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
SETTING_ADDRESS_RENEWED = "address.renewed"  # {"at": ms}: until address.get / address.rotate
ADDRESS_RENEWED_TEXT = (
    "this profile was away from its relay longer than the relay keeps unused mailboxes: its "
    "contact address expired there and a new one was made (aegis address shows it; the old "
    "link and outstanding invitations no longer work). Contacts were given new mailboxes"
)
SETTING_MOVE = "relay.move"  # {"from": url, "at": ms}: contacts' mailboxes moving (relay.set)
#: A contact that has not confirmed its new mailbox this long after a relay move (the relay's
#: default message TTL: it was offline longer than its blocks could wait) is left behind:
#: its old mailbox is deleted anyway.
MOVE_BOUND_MS = 14 * 24 * 3600 * 1000
SETTING_EVENT_RETENTION = "events.retention_days"
EVENT_RETENTION_DAYS = 30

# Application error codes (docs/api.md, "Errors").
E_RELAY_UNAVAILABLE = 1010
E_RATE_LIMITED_APP = 1011
E_RELAY_FULL = 1014
E_NOT_FOUND = 1020
E_EXISTS = 1021
E_BAD_LINK = 1022
E_EXPIRED = 1023
E_NOT_READY = 1024
E_BLOCKED = 1025
E_TOO_LARGE = 1026
E_TOO_MANY_MAILBOXES = 1048
#: Mailboxes a profile may own (address, invitations, contacts, the cover pool): below the
#: relay's default 1000 subscriptions per connection (relay/config.py), so that the link's
#: one connection receives on every one of them. A contact's renewals stop well before
#: (renewal.OWN_MAILBOX_RESERVE_AT): the rest is the user's own.
MAX_OWN_MAILBOXES = 950
SETTING_MAX_MAILBOXES = "mailboxes.max"  # MAX_OWN_MAILBOXES, lowered by tests


def clean_name(name: str, fallback: str = "new contact") -> str:
    """A display name chosen by someone else, made safe to show: no control, format (bidi
    override) or other invisible characters, at most 64 characters."""
    kept = "".join(
        ch for ch in name if not unicodedata.category(ch).startswith(("C", "Z")) or ch == " "
    )
    kept = " ".join(kept.split())[:64]
    return kept or fallback


def url_ok(url: str, insecure_plaintext: bool) -> bool:
    """A relay URL that came from someone else passes the same policy as our own."""
    try:
        check_relay_url(url, insecure_plaintext=insecure_plaintext)
    except RelayUrlError:
        return False
    return True


def own_relay_ok(url: str, insecure_plaintext: bool, move: dict[str, Any] | None) -> bool:
    """`url_ok` for a relay of ours: also the old relay of a move under way (``relay.move``)
    that was set with --insecure-plaintext-relay, though the profile's flag is now the new
    relay's (connectivity.move_insecure)."""
    if url_ok(url, insecure_plaintext):
        return True
    return endpoint_key(url) in ((move or {}).get("insecure") or []) and url_ok(url, True)


def not_found(what: str) -> AppError:
    return AppError(E_NOT_FOUND, "not_found", f"no such {what}")


def relay_unavailable() -> AppError:
    return AppError(
        E_RELAY_UNAVAILABLE,
        "relay_unavailable",
        "the relay is not reachable right now; try again later (aegis status shows why)",
    )


RELAY_FULL_TEXT = (
    "the relay is full: it holds as many mailboxes or as much stored data as it allows; try "
    "again later, or move to another relay (aegis relay set URL)"
)
#: status.relay.refusing: why deposits are refused for now (they wait in the outbox).
REFUSING_FULL = "the relay is full: messages wait in the outbox until it has room again"
REFUSING_QUEUE = (
    "a contact's mailbox at the relay is full (they have been away long): messages to them wait "
    "in the outbox"
)


def relay_full() -> AppError:
    """The relay refused to store more (relay-protocol.md error 17, `full`): not a network
    problem, so not relay_unavailable."""
    return AppError(E_RELAY_FULL, "relay_full", RELAY_FULL_TEXT)


def _now() -> int:
    return int(time.time())


def _ms() -> int:
    return time.time_ns() // 1_000_000


class Messenger:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.entropy = SystemEntropy()
        self.lock = asyncio.Lock()
        self.prekeys: PrekeyStore | None = None
        self.link: RelayLink | None = None
        self._top_up_pending = False  # a prekey top-up is queued (first contacts coalesce)
        self.relay_reason: str | None = "no relay configured"
        # Deposits refused for want of room, by destination (a contact's mailbox, or
        # BLOB_AREA for an upload): status.relay.refusing. An entry goes once a deposit to
        # its destination goes through, or nothing waits for it any more; a full relay (every
        # destination) once any deposit goes through. Not "any deposit went through": cover
        # and other contacts' messages would make a full mailbox's warning flicker.
        self._refusals: dict[bytes, str] = {}
        self._outbox_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._owned: dict[bytes, tuple[MailboxRow, OwnedMailbox]] = {}
        # After a relay move: one link per other relay that still holds mailboxes of ours,
        # receiving on them until every contact has switched (or the bound passed).
        self._drains: dict[str, RelayLink] = {}
        # Mailboxes of ours the relay refused as gone since the link last went down
        # ("address", "contact", "deposit": the evidence _on_refused weighs), and what status
        # says when that is not enough to mark the profile superseded.
        self._denied: set[str] = set()
        self.relay_lost: str | None = None
        # SETTING_LAST_REACHED as it was before the current connection (how long we were
        # away), and the contacts given a new mailbox for an expired one on this connection.
        self._reached_before: int | None = None
        self._renewing: set[int] = set()
        self._moving = asyncio.Lock()  # one continue_move at a time
        self._acked_rotations: list[tuple[Contact, bytes]] = []
        # contacts.add waiting for its first contact's deposit: contact id -> outcome
        self._first_contact: dict[int, asyncio.Future[str]] = {}
        self.attachments = Attachments(self)
        from .renewal import Renewals  # session renewal after a backup import (§23)

        self.renewals = Renewals(self)
        from .cover import Cover  # cover traffic and the slots real blocks wait for (§24)

        self.cover = Cover(self, test_methods=getattr(daemon, "_test_methods", False))

    # --- life cycle -----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        store = self.daemon.store
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
        self._reload_owned()
        self._start_link()
        self._tasks = [
            asyncio.create_task(self._outbox_loop(), name="outbox"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._prekey_loop(), name="prekeys"),
        ]
        if not self.superseded():  # cover for contacts that moved on to a restored copy: no
            self.cover.start()
        await self.attachments.on_unlock()

    def network(self) -> Network:
        """How relays are reached now (services/connectivity.py)."""
        return self.daemon.connectivity.network()

    def _start_link(self) -> None:
        url = self.store.get_setting(SETTING_URL)
        if url:
            self.relay_reason = "connecting"
            self.link = RelayLink(
                url,
                handler=self._on_block,
                subscriptions=lambda: self._subscriptions(str(url)),
                on_state=self._on_relay_state,
                network=self.network(),
                on_refused=self._on_refused,
            )
            self.link.start()
        self._reconcile_drains()

    def _reconcile_drains(self) -> None:
        """A receiving link for each other relay that holds mailboxes of ours (a relay move
        under way); none once they are gone."""
        main = self.link.url if self.link is not None else None
        wanted: dict[str, str] = {}  # endpoint -> a URL of it (as a mailbox stores it)
        if self.daemon.store is not None:
            for _, mb in self._owned.values():
                key = endpoint_key(mb.relay_url)
                if not same_relay(mb.relay_url, main) and self._url_ok(mb.relay_url):
                    wanted.setdefault(key, mb.relay_url)
        for key in set(wanted) - set(self._drains):
            url = wanted[key]
            link = RelayLink(
                url,
                handler=self._on_block,
                subscriptions=functools.partial(self._subscriptions, url),
                on_state=lambda up, reason: None,  # status is about the profile's relay
                network=self.network(),
                on_refused=self._on_refused,
                name="old relay",  # its log lines are told apart from the profile's relay
            )
            self._drains[key] = link
            link.start()
        for key in set(self._drains) - set(wanted):
            self._spawn(self._drains.pop(key).stop())

    async def _stop_drains(self) -> None:
        drains, self._drains = list(self._drains.values()), {}
        for link in drains:
            await link.stop()

    async def restart_link(self) -> None:
        """After a change of the network settings: every connection is made anew."""
        if self.link is not None:
            await self.link.stop()
            self.link = None
        await self._stop_drains()
        self.daemon.relay_connected = False
        self._start_link()

    async def on_lock(self, store: Store) -> None:
        if self.daemon.relay_connected:
            store.set_setting(SETTING_LAST_REACHED, _ms())  # connected until now
        await self.cover.stop()
        await self.attachments.on_lock()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.link is not None:
            await self.link.stop()
            self.link = None
        await self._stop_drains()
        self.daemon.relay_connected = False
        async with self.lock:
            self.prekeys = None
            self._owned.clear()
            self._denied.clear()
            self.relay_lost = None

    def _reload_owned(self) -> None:
        self._owned = {}
        for row in [*self.store.list_mailboxes(), *cover_slots.pool_rows(self.store)]:
            mb = OwnedMailbox.from_bytes(row.descriptor)
            self._owned[mb.owner_id] = (row, mb)

    def _subscriptions(self, url: str) -> list[tuple[bytes, Any]]:
        """The mailboxes of ours at the relay at ``url``."""
        return [(mb.owner_id, mb.signing_key) for _, mb in self._owned.values()
                if same_relay(mb.relay_url, url)]  # fmt: skip

    def _on_relay_state(self, up: bool, reason: str | None) -> None:
        was = self.daemon.relay_connected
        first_failure = not up and self.relay_reason == "connecting"
        self.daemon.relay_connected = up
        self.relay_reason = reason
        if self.daemon.store is not None and (up or was):
            # Connected now, or until now: the relay saw our subscriptions (they count as use).
            now = _ms()
            self.daemon.store.set_setting(SETTING_LAST_REACHED, now)
            if not up:
                self._reached_before, self._renewing = now, set()
        if not up:
            self._denied.clear()  # the evidence of one connection (_on_refused)
        if (up != was or first_failure) and self.daemon.store is not None:
            self.daemon.events.emit("relay.up" if up else "relay.down", {"reason": reason})
        if up:
            if self.daemon.store is not None:
                self.daemon.store.retry_failed_now()  # they failed because of the outage
            self._outbox_wake.set()
            self._spawn(self._after_connect())

    @property
    def relay_refusing(self) -> str | None:
        """Why deposits are refused for now (status.relay.refusing), or None."""
        reasons = set(self._refusals.values())
        return REFUSING_FULL if REFUSING_FULL in reasons else next(iter(reasons), None)

    def refused_for_room(self, destination: bytes, full: bool) -> None:
        self._refusals[destination] = REFUSING_FULL if full else REFUSING_QUEUE

    def room_again(self, destination: bytes) -> None:
        """A deposit to ``destination`` went through: it has room, and the relay too."""
        self._refusals.pop(destination, None)
        for key in [k for k, why in self._refusals.items() if why == REFUSING_FULL]:
            del self._refusals[key]

    # --- a copy of the profile restored elsewhere ------------------------------------------

    def superseded(self) -> str | None:
        """Why this copy of the profile is out of use (restored on another device), or None."""
        store = self.daemon.store
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
        entry = self._owned.get(owner_id)
        if entry is None or code != E_DENIED or self.daemon.store is None:
            return False
        row = entry[0]
        if row.role == cover_slots.POOL_ROLE:
            # Made ahead and not yet anyone's: gone (expired unused at the relay, relay-protocol
            # md §4, or lost), it is simply replaced, at the pool's own random time.
            with self.store.transaction():
                cover_slots.pool_remove(self.store, row.id)
            self._reload_owned()
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
        ttl = self.link.mailbox_ttl if self.link is not None else None
        return _ms() - before >= (ttl or DEFAULT_MAILBOX_TTL) * 1000 // 2

    def _expired(self, row: MailboxRow, mb: OwnedMailbox) -> None:
        """A mailbox of ours expired at the relay while we were away (_on_refused): the
        address is made anew (with its invitations, which point at its bundle, gone: status
        and an event say the link changed); a contact is given a new mailbox through the
        ratchet (the ordinary rotation: its own mailbox is most likely still there)."""
        self._owned.pop(mb.owner_id, None)
        if row.role == "address":
            with self.store.transaction():
                for r in [row, *self.store.list_mailboxes("invitation")]:
                    self.store.delete_mailbox(r.id)
                    self._owned.pop(OwnedMailbox.from_bytes(r.descriptor).owner_id, None)
                self.store.set_setting(SETTING_ADDRESS_RENEWED, {"at": _ms()})
                self.daemon.events.emit("address.renewed", {"reason": ADDRESS_RENEWED_TEXT})
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
            await self.ensure_address()  # else the next connection makes it (_after_connect)

    async def _renew_contact_mailbox(self, contact_id: int) -> None:
        c = self.store.get_contact(contact_id) if self.daemon.store is not None else None
        if c is None:
            return
        try:
            await self.rotate_mailbox(c.name)
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            # Retried by the ordinary rotation on the next connection or hourly pass: a
            # mailbox that expired is older than the rotation period (_rotate_due_mailboxes).
            self._renewing.discard(contact_id)

    def address_renewed(self) -> str | None:
        """status.address_renewed: the address expired at the relay and was made anew, until
        the user asks for the new one (address.get, address.rotate)."""
        store = self.daemon.store
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
        found = self._address_mailbox() if self.daemon.store is not None else None
        if found is None or self.link is None or self.superseded():
            return
        _, mb = found
        try:
            async with self._client() as client:
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
                self.daemon.events.emit("message.status", {
                    "message_id": mid, "contact": contact.name if contact else None,
                    "status": "failed"})  # fmt: skip
            self.daemon.events.emit("profile.superseded", {"reason": SUPERSEDED_TEXT})
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
            await self.ensure_address()
            await self._replenish_prekeys(republish=True)
            await self._expire_invitations()
            await self._finish_acked_rotations()
            await self._rotate_due_mailboxes()
            await self.renewals.resume()
            await self.renewals.retire_due()
            await self.continue_move()
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            pass  # the next connection tries again

    # --- identity and the public address ---------------------------------------------------

    def identity(self) -> IdentityKeyPair:
        if self.prekeys is None:
            raise RuntimeError("store is locked")
        return self.prekeys.identity

    def _url_ok(self, url: str) -> bool:
        """The URL policy for a relay of ours: the profile's flag, or, for the old relay of a
        move under way that was set with --insecure-plaintext-relay, that relay's own flag (its
        old mailboxes are still drained and deleted: connectivity.move_insecure)."""
        return own_relay_ok(url, bool(self.store.get_setting(SETTING_INSECURE, False)),
                            self.store.get_setting(SETTING_MOVE))  # fmt: skip

    def _peer_url_ok(self, url: str) -> bool:
        """The stricter policy for a relay URL someone else chose (a contact's mailbox, a
        stranger's reply address, a file's relay): relayurl.check_peer_relay_url."""
        try:
            check_peer_relay_url(url, self._own_urls())
        except RelayUrlError:
            return False
        return True

    def _own_urls(self) -> list[str]:
        """The user's own relays: the relay, and the old one of a move under way (as
        Network.own_hosts: connectivity.network)."""
        url = self.store.get_setting(SETTING_URL)
        return [str(u) for u in (url, *own_extra(self.store)) if u]

    def _relay_url(self) -> str:
        url = self.store.get_setting(SETTING_URL)
        if not url:
            raise AppError(E_NOT_READY, "no_relay", "no relay configured: aegis relay set URL")
        return str(url)

    @contextlib.asynccontextmanager
    async def _client(self, about: bytes | None = None) -> AsyncIterator[RelayClient]:
        """A connection for owner commands (the link decides which: docs/protocol.md §20.7);
        ``about``: commands about that mailbox alone, which may go on its own subscription."""
        if self.link is None:
            self._relay_url()
            raise relay_unavailable()
        try:
            async with self.link.owner_of(about) as client:
                yield client
        except RelayUnavailable:
            raise relay_unavailable() from None

    async def _made_ahead(self, *, public: bool) -> OwnedMailbox | None:
        """A mailbox made at the relay BEFORE the caller takes the lock: its CREATE's proof of
        work takes seconds (2**22 hashes on a relay with default settings, docs/protocol.md
        §20.2), and messages.send and every receive wait for the lock. None when a private one
        can come from the pool (cover.py) instead."""
        if not public and cover_slots.pool_rows(self.store):
            return None
        return await self._new_mailbox(public=public)

    async def _create_mailbox(
        self, role: str, *, public: bool, contact_id: int | None = None,
        made: OwnedMailbox | None = None, **extra: Any,
    ) -> tuple[int, OwnedMailbox]:
        """Store a mailbox of ours (``made`` ahead by _made_ahead, taken from the pool, or
        made now); the caller holds the lock."""
        if self._stale(made):
            made = None
        if role == "contact" and not public:
            # Made ahead, at a random time, and already receiving loop cover (cover.py): the
            # relay does not see a mailbox born the moment a contact is.
            with self.store.transaction():
                descriptor = cover_slots.pool_take(self.store)
                if descriptor is not None:
                    row_id = self.store.add_mailbox(
                        role, descriptor, contact_id=contact_id, **extra
                    )
            if descriptor is not None:
                mb = OwnedMailbox.from_bytes(descriptor)
                row = self.store.get_mailbox(row_id)
                assert row is not None
                self._owned[mb.owner_id] = (row, mb)  # subscribed already, as a pool mailbox
                if made is not None:  # made ahead for nothing: it goes to the pool (not lost)
                    await self._to_pool(made)
                self.cover.changed()  # the pool wants a new one
                return row_id, mb
        mb = made if made is not None else await self._new_mailbox(public=public)
        row_id = self.store.add_mailbox(role, mb.to_bytes(), contact_id=contact_id, **extra)
        row = self.store.get_mailbox(row_id)
        assert row is not None
        self._owned[mb.owner_id] = (row, mb)
        await self._subscribe_new(mb)
        return row_id, mb

    async def _subscribe_new(self, mb: OwnedMailbox) -> None:
        """Subscribe a mailbox just made (the link subscribes all of them on every reconnect).
        A refusal is said, with the count: a mailbox not subscribed receives nothing."""
        if self.link is None:
            return
        try:
            await self.link.subscribe(mb.owner_id, mb.signing_key)
        except RelayError as exc:
            log.warning("the relay refused to subscribe a new mailbox (error %d; the profile "
                        "owns %d mailboxes)", exc.code, len(self._owned))  # fmt: skip
        except UNAVAILABLE:
            pass  # the next connection subscribes it

    async def add_pool_mailbox(self) -> None:
        """One more mailbox for the pool (cover.py calls this at random times, without the
        lock: the CREATE's proof is solved first, then the lock is taken to store it)."""
        mb = await self._new_mailbox(public=False)
        async with self.lock:
            await self._to_pool(mb)

    def _stale(self, mb: OwnedMailbox | None) -> bool:
        """A mailbox made ahead (its proof solved outside the lock) at a relay the profile has
        left meanwhile (relay.set): deleted there, not kept. Call with the lock held."""
        if mb is None or same_relay(mb.relay_url, self.store.get_setting(SETTING_URL)):
            return False
        self._spawn(self._delete_at_relay(mb))
        return True

    async def _to_pool(self, mb: OwnedMailbox) -> None:
        if self.daemon.store is None:
            return  # locked meanwhile: the relay expires it unused
        if self._stale(mb):
            return
        with self.store.transaction():
            cover_slots.pool_add(self.store, mb.to_bytes())
        self._reload_owned()
        if self.store.get_setting(SETTING_MOVE):
            self._spawn(self.continue_move())  # a relay move waits for pool mailboxes
        await self._subscribe_new(mb)

    async def _new_mailbox(self, *, public: bool) -> OwnedMailbox:
        """A mailbox made at the relay (with a send token unless public). Refused past the
        profile's mailbox limit (MAX_OWN_MAILBOXES); a relay limit that a connection of its
        own does not get round is reported as such (rate_limited), not as unreachable."""
        limit = int(self.store.get_setting(SETTING_MAX_MAILBOXES, MAX_OWN_MAILBOXES))
        if len(self._owned) >= limit:
            raise AppError(
                E_TOO_MANY_MAILBOXES, "too_many_mailboxes",
                f"this profile has {len(self._owned)} mailboxes, the most one relay connection "
                "receives on: revoke unused invitations or remove contacts",
            )  # fmt: skip
        sign_seed, box_secret = new_keys()
        token = b"" if public else self.entropy.random(32)

        async def make(client: RelayClient) -> OwnedMailbox:
            created = await client.create(
                OwnedMailbox(self._relay_url(), sign_seed, b"", b"", b"", b"", b"").signing_key,
                box_public(box_secret),
                public=public,
            )
            mb = OwnedMailbox(
                self._relay_url(),
                sign_seed,
                box_secret,
                created.owner_id,
                created.deposit_id,
                created.relay_box_pub,
                token,
            )
            if token:
                await client.token_add(mb.owner_id, mb.signing_key, token)
            return mb

        try:
            try:
                async with self._client() as client:
                    return await make(client)
            except RelayError as exc:
                if exc.code != E_LIMIT:
                    raise
            # The link's connection made as many mailboxes as the relay lets one connection
            # make (issue 15 item 12): a short-lived connection of its own makes this one.
            own, _ = await with_relay(self._relay_url(), None, self.network())
            try:
                return await make(own)
            finally:
                await own.close()
        except RelayError as exc:
            if exc.code == E_FULL:  # its mailbox table or storage is full: say so
                raise relay_full() from None
            if exc.code in (E_LIMIT, E_RATE_LIMITED):  # a limit a connection of its own hit too
                raise AppError(
                    E_RATE_LIMITED_APP, "rate_limited",
                    "the relay makes no more mailboxes for now (one of its limits): try again "
                    "later",
                ) from None  # fmt: skip
            raise relay_unavailable() from None
        except (*UNAVAILABLE, RelayUnavailable):
            raise relay_unavailable() from None

    async def _retire_mailbox(self, row_id: int) -> None:
        row = self.store.get_mailbox(row_id)
        if row is None:
            return
        mb = OwnedMailbox.from_bytes(row.descriptor)
        self.store.delete_mailbox(row_id)
        self._owned.pop(mb.owner_id, None)
        await self._delete_at_relay(mb)

    async def _delete_at_relay(self, mb: OwnedMailbox) -> None:
        """Delete at the mailbox's own relay (after a move, not this profile's); one that
        cannot be reached now is deleted on a later connection (renewal.py retire_due)."""
        try:
            await self.renewals._delete_old(mb)
        except AppError:
            if self.daemon.store is not None:
                self.store._q(
                    "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)",
                    (mb.to_bytes(),),
                )

    def _address_mailbox(self) -> tuple[MailboxRow, OwnedMailbox] | None:
        rows = self.store.list_mailboxes("address")
        if not rows:
            return None
        return rows[-1], OwnedMailbox.from_bytes(rows[-1].descriptor)

    async def ensure_address(self) -> tuple[MailboxRow, OwnedMailbox]:
        """The public (first-contact) mailbox, created with its bundle on first need."""
        async with self.lock:
            found = self._address_mailbox()
            if found is not None:
                return found
        made = await self._made_ahead(public=True)  # the proof: outside the lock
        async with self.lock:
            found = self._address_mailbox()
            if found is not None:  # another call made one meanwhile: this one is not needed
                if made is not None:
                    self._spawn(self._delete_at_relay(made))
                return found
            row_id, mb = await self._create_mailbox("address", public=True, made=made)
            await self._publish_bundle(mb, fresh=True)
            row = self.store.get_mailbox(row_id)
            assert row is not None
            return row, mb

    async def _publish_bundle(self, mb: OwnedMailbox, *, fresh: bool) -> None:
        assert self.prekeys is not None
        try:
            async with self._client() as client:
                await client.bundle_base(
                    mb.owner_id, mb.signing_key, self.prekeys.bundle_base().to_bytes()
                )
                if fresh:
                    await self._add_one_time(client, mb, ONE_TIME_BATCH)
        except (*UNAVAILABLE, RelayError):
            raise relay_unavailable() from None

    async def _add_one_time(self, client: RelayClient, mb: OwnedMailbox, count: int) -> None:
        assert self.prekeys is not None
        now = _now()
        xs, kems = self.prekeys.generate_one_time(self.entropy, count, now)
        # Bounded: a drainer makes the daemon publish new keys for ever (prune_one_time).
        self.prekeys.prune_one_time(now)
        self.store.put_identity(self.prekeys.to_bytes())  # before publishing: never lose one
        await client.bundle_add(
            mb.owner_id, mb.signing_key, ITEM_X25519, [x.to_bytes() for x in xs]
        )
        await client.bundle_add(
            mb.owner_id, mb.signing_key, ITEM_MLKEM, [k.to_bytes() for k in kems]
        )

    async def _replenish_prekeys(self, republish: bool = False) -> None:
        """Rotate due prekeys; republish the bundle base when it changed (and, with
        `republish`, always: an earlier publication may have been cut short); top up the
        one-time prekeys."""
        async with self.lock:
            found = self._address_mailbox()
            if found is None or self.prekeys is None:
                return
            _, mb = found
            async with self._client(mb.owner_id) as client:
                if self.prekeys.rotate(self.entropy, _now()) or republish:
                    self.store.put_identity(self.prekeys.to_bytes())
                    await client.bundle_base(
                        mb.owner_id, mb.signing_key, self.prekeys.bundle_base().to_bytes()
                    )
                xs, kems = await client.bundle_status(mb.owner_id, mb.signing_key)
                if min(xs, kems) < ONE_TIME_LOW:
                    await self._add_one_time(client, mb, ONE_TIME_BATCH)

    def _request_top_up(self) -> None:
        """After a first contact (it used one-time keys): top up the relay's soon, once for
        any number of first contacts arriving meanwhile."""
        if not self._top_up_pending:
            self._top_up_pending = True
            self._spawn(self._top_up())

    async def _top_up(self) -> None:
        self._top_up_pending = False
        with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            await self._replenish_prekeys()

    async def _prekey_loop(self) -> None:
        while True:
            await asyncio.sleep(random.SystemRandom().uniform(PREKEY_CHECK_MIN, PREKEY_CHECK_MAX))
            if not self.superseded():
                await self._top_up()

    def _link_for(
        self,
        kind: int,
        mb: OwnedMailbox,
        bundle_mb: OwnedMailbox,
        invitation_id: bytes,
        expires: int,
    ) -> str:
        return wire.ContactLink(
            kind=kind,
            identity=self.identity().public.record(),
            mailbox=mb.address(),
            bundle_address=bundle_mb.deposit_id,
            invitation_id=invitation_id,
            expires=expires,
        ).to_text()

    async def address_link(self, rotate: bool = False) -> dict[str, Any]:
        if rotate:
            old = self._address_mailbox()
            made = await self._made_ahead(public=True)  # the proof: outside the lock
            async with self.lock:
                _, mb = await self._create_mailbox("address", public=True, made=made)
                await self._publish_bundle(mb, fresh=True)
            if old is not None:
                await self._retire_mailbox(old[0].id)
                # Invitations point at the old address's bundle: they die with it.
                async with self.lock:
                    for r in self.store.list_mailboxes("invitation"):
                        await self._retire_mailbox(r.id)
            self.daemon.events.emit("address.rotated", {})
        _, mb = await self.ensure_address()
        self.store.set_setting(SETTING_ADDRESS_RENEWED, None)  # the user has the new link now
        return {"link": self._link_for(wire.LINK_ADDRESS, mb, mb, b"", 0)}

    async def create_invitation(self, expires_in: int) -> dict[str, Any]:
        if not 60 <= expires_in <= INVITE_TTL_MAX:
            raise InvalidParamsError(
                "expires_in", f"must be between 60 and {INVITE_TTL_MAX} seconds"
            )
        await self.ensure_address()  # its errors before the proof
        invitation_id = self.entropy.random(16)
        expires = _now() + expires_in
        made = await self._new_mailbox(public=False)  # the proof: outside the lock
        async with self.lock:
            _, mb = await self._create_mailbox(
                "invitation", public=False, invitation_id=invitation_id, expires_at=expires,
                made=made,
            )
        # The address now, not from before the proof: a relay.set meanwhile deleted that one.
        _, address = await self.ensure_address()
        link = self._link_for(wire.LINK_INVITATION, mb, address, invitation_id, expires)
        return {"invitation": invitation_id.hex(), "link": link, "expires_at": expires}

    def list_invitations(self) -> list[dict[str, Any]]:
        return [
            {"invitation": (r.invitation_id or b"").hex(), "expires_at": r.expires_at}
            for r in self.store.list_mailboxes("invitation")
        ]

    async def revoke_invitation(self, invitation: str) -> None:
        async with self.lock:  # not while a first contact for it is being handled
            for r in self.store.list_mailboxes("invitation"):
                if r.invitation_id is not None and r.invitation_id.hex() == invitation:
                    await self._retire_mailbox(r.id)
                    return
        raise not_found("invitation")

    async def _expire_invitations(self) -> None:
        async with self.lock:
            for r in self.store.list_mailboxes("invitation"):
                if r.expires_at is not None and r.expires_at < _now():
                    await self._retire_mailbox(r.id)

    # --- contacts ---------------------------------------------------------------------------

    def contact(self, name: str) -> Contact:
        c = self.store.contact_by_name(name)
        if c is None:
            raise not_found("contact")
        return c

    def _unique_name(self, wanted: str) -> str:
        base = wanted.strip()[:64] or "contact"
        name, n = base, 1
        while self.store.contact_by_name(name) is not None:
            n += 1
            name = f"{base} ({n})"
        return name

    def _contact_with_identity(self, identity: PublicIdentity) -> Contact | None:
        # By its keys, not the record's bytes: the same keys with another binding signature
        # are the same identity (and a blocked one stays blocked).
        key = identity.encode()
        return next(
            (c for c in self.store.list_contacts() if keys_of(c.identity_key) == key), None
        )

    def describe(self, c: Contact) -> dict[str, Any]:
        state = ContactState.from_bytes(c.state)
        return {
            "name": c.name,
            "verified": c.verified,
            "blocked": c.blocked,
            "established": state.established,
            "failed": state.failed or renewal_failure(self.store, c.id),
            "created_at": c.created_at,
        }

    def failed_contacts(self) -> list[str]:
        """Names of the contacts whose first contact was refused for good (status shows them)."""
        return [c.name for c in self.store.list_contacts()
                if ContactState.from_bytes(c.state).failed
                or renewal_failure(self.store, c.id)]  # fmt: skip

    def _settle_first_contact(self, contact_id: int | None, outcome: str) -> None:
        waiter = self._first_contact.get(contact_id) if contact_id is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def add_contact(self, name: str, link_text: str) -> dict[str, Any]:
        self.check_usable()
        try:
            link = wire.ContactLink.from_text(link_text)
            identity = PublicIdentity.from_record(link.identity)
        except (DecodeError, BundleError):
            raise AppError(E_BAD_LINK, "bad_link", "this is not a valid AegisLink link") from None
        if link.expires and link.expires < _now():
            raise AppError(E_EXPIRED, "expired", "this invitation has expired")
        try:
            check_peer_relay_url(link.mailbox.relay_url, self._own_urls())
        except RelayUrlError as exc:
            raise AppError(E_BAD_LINK, "bad_link", f"the link's relay URL is not allowed: {exc}"
                           ) from None
        try:  # e.g. a contact on an onion relay, and this profile connects directly
            self.network().check(link.mailbox.relay_url)
        except Unreachable as exc:
            raise AppError(E_BAD_LINK, "bad_link", f"this contact's relay: {exc}") from None
        if identity.same_keys(self.identity().public):
            raise AppError(E_BAD_LINK, "bad_link", "this link is your own")
        for stale in {c.id: c for c in (self._contact_with_identity(identity),
                                        self.store.contact_by_name(name)) if c}.values():
            if ContactState.from_bytes(stale.state).failed:
                await self.remove_contact(stale.name)  # a failed attempt is replaced by this one
        if self._contact_with_identity(identity) is not None:
            raise AppError(E_EXISTS, "exists", "this contact is already in your contacts")
        if self.store.contact_by_name(name) is not None:
            raise AppError(E_EXISTS, "exists", "a contact with this name already exists")
        # Errors say what happened: no such address, a limit (try later), or no relay.
        base, x, m = await fetch_bundle(
            link.mailbox.relay_url, link.bundle_address, self.link, self.network()
        )
        try:
            bundle = pqxdh.verify_bundle(base, x, m, expected=identity)
        except (DecodeError, BundleError):
            raise AppError(
                E_BAD_LINK, "bad_link", "the keys the relay served do not match the link"
            ) from None
        made = await self._made_ahead(public=False)  # the proof: outside the lock
        async with self.lock:
            mb_id, mb = await self._create_mailbox("contact", public=False, made=made)
            hello = wire.HelloPayload(
                reply_to=mb.address(),
                display_name=str(self.store.get_setting(SETTING_NAME, "")),
                invitation_id=link.invitation_id,
            )
            session, block = initiate_session(
                self.entropy, self.identity(), bundle, wire.encode_payload(hello)
            )
            with self.store.transaction():
                cid = self.store.add_contact(
                    name,
                    identity_key=identity.to_bytes(),
                    state=ContactState(link.mailbox, False).to_bytes(),
                ).id
                self.store.set_mailbox_contact(mb_id, cid)
                self.store.put_session(cid, session.to_bytes())
                self.store.enqueue_blocks(address_to_bytes(link.mailbox), [block], contact_id=cid)
                self.daemon.events.emit("contact.added", {"contact": name, "established": False})
            self._reload_owned()
            # Registered before any await: the outbox cannot settle it unseen.
            waiter = self._first_contact[cid] = asyncio.get_running_loop().create_future()
        self._outbox_wake.set()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(waiter), FIRST_CONTACT_WAIT)
        except TimeoutError:
            outcome = "pending"  # a slow relay: a later refusal shows in contacts.list
        finally:
            self._first_contact.pop(cid, None)
        if outcome == "refused":
            # Known at once: nothing is kept, the user can try again with a fresh link.
            await self.remove_contact(name)
            raise AppError(E_BAD_LINK, "bad_link", LINK_NO_LONGER_VALID, reason="link_used")
        c = self.store.get_contact(cid)
        if c is None:
            raise not_found("contact")  # removed meanwhile
        return {**self.describe(c), "first_contact": outcome}

    def list_requests(self) -> list[dict[str, Any]]:
        own = self.identity().public
        out = []
        for r in self.store.list_requests():
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
        async with self.lock:
            # Read and delete the request under the lock, before anything is encrypted: its
            # session must be used once only (two accepts would reuse its keys).
            row = self.store.get_request(request_id)
            if row is None:
                raise not_found("request")
            identity = PublicIdentity.from_bytes(row.identity_key)
            known = self._contact_with_identity(identity)
            if known is not None:
                raise AppError(E_EXISTS, "exists", "this identity is already a contact")
            mb_id, mb = await self._create_mailbox("contact", public=False)
            with self.store.transaction():
                if not self.store.delete_request(request_id):
                    raise not_found("request")
                contact = self._establish(
                    name or row.display_name,
                    identity,
                    Session.from_bytes(row.session),
                    address_from_bytes(row.reply_to),
                    mb_id,
                    mb,
                )
            self._reload_owned()
        self._outbox_wake.set()
        return self.describe(contact)

    def reject_request(self, request_id: int) -> None:
        if not self.store.delete_request(request_id):
            raise not_found("request")

    def _establish(
        self,
        name: str,
        identity: PublicIdentity,
        session: Session,
        reply_to: wire.MailboxAddress,
        mb_id: int,
        mb: OwnedMailbox,
    ) -> Contact:
        """Create the contact and answer with our mailbox (inside a transaction)."""
        name = self._unique_name(clean_name(name))
        cid = self.store.add_contact(
            name, identity_key=identity.to_bytes(), state=ContactState(reply_to, True).to_bytes()
        ).id
        self.store.set_mailbox_contact(mb_id, cid)
        hello = wire.HelloPayload(mb.address(), str(self.store.get_setting(SETTING_NAME, "")), b"")
        blocks = session.encrypt(self.entropy, wire.encode_payload(hello))
        self.store.put_session(cid, session.to_bytes())
        self.store.enqueue_blocks(address_to_bytes(reply_to), blocks, contact_id=cid)
        self.daemon.events.emit("contact.added", {"contact": name, "established": True})
        c = self.store.get_contact(cid)
        assert c is not None
        return c

    def safety(self, name: str) -> dict[str, Any]:
        c = self.contact(name)
        assert c.identity_key is not None
        number = safety_number(self.identity().public, PublicIdentity.from_bytes(c.identity_key))
        return {
            "contact": c.name,
            "safety_number": number,
            "formatted": format_safety_number(number),
        }

    async def block_contact(self, name: str, blocked: bool) -> Contact:
        """Block (or unblock) a contact. Blocking also stops what the contact set going: its
        incomplete messages are dropped and its files stop downloading (their relay was
        chosen by the contact: it must not see this daemon again)."""
        async with self.lock:
            c = self.contact(name)
            with self.store.transaction():
                self.store.update_contact(c.id, blocked=blocked)
                if blocked:
                    self.drop_partials(c.id)
                    self._drop_outbox_of(self.store, {c.id})
            if blocked:
                await self.attachments.stop_downloads(c.id, "the contact is blocked")
        return c

    async def remove_contact(self, name: str) -> None:
        async with self.lock:
            c = self.contact(name)
            rows = [r for r in self.store.list_mailboxes("contact") if r.contact_id == c.id]
            files = await self.attachments.stop_contact(c.id)
            with self.store.transaction():
                self.store.remove_contact(c.id)  # its mailbox rows go with it
                self.store.set_setting(f"{ROTATION_KEY}{c.id}", None)
                self.store.set_setting(f"renewal.answered.{c.id}", None)  # renewal.ANSWERED_KEY
            self.attachments.remove_files(files)  # their rows went with the contact
            for r in rows:
                mb = OwnedMailbox.from_bytes(r.descriptor)
                self._owned.pop(mb.owner_id, None)
                await self._delete_at_relay(mb)

    # --- sending ----------------------------------------------------------------------------

    def _enqueue(
        self,
        c: Contact,
        session: Session,
        payload: wire.Payload,
        *,
        message_id: str | None = None,
        delay: float = 0.0,
        slotted: bool = True,
    ) -> None:
        """Encrypt and queue. With cover on, a ``slotted`` block waits for its contact's next
        cover slot (services/cover.py) instead of leaving after ``delay``."""
        state = ContactState.from_bytes(c.state)
        if state.failed:
            raise AppError(E_NOT_READY, "not_ready", f"this contact failed: {state.failed}",
                           reason="contact_failed")  # fmt: skip
        if state.send_to is None:
            raise AppError(E_NOT_READY, "not_ready", "this contact cannot be reached yet")
        blocks = session.encrypt(self.entropy, wire.encode_payload(payload))
        self.store.put_session(c.id, session.to_bytes())
        if not state.established:
            # Until the contact answered, only the first contact may go to the link's mailbox;
            # later blocks wait, addressed to nobody, and are readdressed when the answer comes.
            not_before = NEVER
        elif slotted and self.cover.active():
            not_before = SLOT_WAIT
        else:
            not_before = _ms() + int(delay * 1000)
        self.store.enqueue_blocks(
            address_to_bytes(state.send_to) if state.established else PENDING_DESTINATION,
            blocks,
            message_id=message_id,
            contact_id=c.id,
            not_before=not_before,
        )

    def queue_receipt(self, c: Contact, session: Session, kind: int, ids: list[bytes]) -> None:
        """A delivery or read receipt: with cover on, it waits to ride the contact's next
        slot with the others (no block per message, no echo of the message's timing); with
        cover off, it leaves after the receipt delay."""
        if self.cover.active():
            cover_slots.add_receipts(self.store, c.id, kind, ids)
            return
        step = wire.MAX_RECEIPT_IDS
        for i in range(0, len(ids), step):
            self._enqueue(c, session, wire.ReceiptPayload(kind, tuple(ids[i : i + step])),
                          delay=self._receipt_delay())  # fmt: skip

    async def send_text(self, name: str, text: str) -> dict[str, Any]:
        if len(text.encode()) > wire.MAX_TEXT_BYTES:
            raise AppError(
                E_TOO_LARGE, "too_large", f"a message holds at most {wire.MAX_TEXT_BYTES} bytes"
            )
        self.check_usable()
        async with self.lock:
            c = self.contact(name)
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
                self._enqueue(c, session, payload, message_id=mid, delay=self._send_jitter())
        self._outbox_wake.set()
        return {"message_id": mid, "status": "queued"}

    def _send_jitter(self) -> float:
        """Optional random delay before a message leaves (privacy.send_jitter_max; 0: none)."""
        ceiling = float(self.store.get_setting(SETTING_SEND_JITTER, 0.0))
        return random.uniform(0.0, ceiling) if ceiling > 0 else 0.0

    def _receipt_delay(self) -> float:
        ceiling = float(self.store.get_setting(SETTING_RECEIPT_DELAY, RECEIPT_DELAY_MAX))
        return random.uniform(min(0.5, ceiling), ceiling)

    async def mark_read(self, name: str, message_ids: list[str] | None) -> dict[str, Any]:
        async with self.lock:
            c = self.contact(name)
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
                    self.queue_receipt(c, Session.from_bytes(blob), wire.RECEIPT_READ, ids)
        self._outbox_wake.set()
        return {"marked": len(incoming)}

    async def _outbox_loop(self) -> None:
        while True:
            # Cleared before the pass, so that a block enqueued during it wakes the next one.
            self._outbox_wake.clear()
            try:
                delay = await self._drain_outbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the loop alive; the next pass retries
                log.error("outbox pass failed: %s", type(exc).__name__)
                delay = 1.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), delay)

    async def _drain_outbox(self) -> float:
        """Deposit every due block; returns how long to sleep before the next pass.

        A destination's blocks leave in the order they were stored: after a block failed
        (and waits for its retry), later blocks to the same mailbox wait too. A block that is
        merely delayed on purpose (a receipt's random delay) holds nothing up. Destinations
        are served concurrently, so one slow relay does not hold up the others."""
        store = self.daemon.store
        if store is None:
            return 1.0
        if self.superseded():
            store._q("DELETE FROM outbox")  # nothing is deposited: the contacts moved on
            return 60.0
        blocked = {c.id for c in store.list_contacts() if c.blocked}
        if blocked:  # e.g. a receipt queued by a message that arrived as the block was made
            self._drop_outbox_of(store, blocked)
        now = _ms()
        queues: dict[bytes, list[OutboxItem]] = {}
        held: set[bytes] = set()
        soonest: int | None = None
        for item in store.pending_blocks(now=now + 3_600_000, limit=1000):
            if item.not_before > now:
                soonest = item.not_before if soonest is None else min(soonest, item.not_before)
                if item.attempts:
                    held.add(item.destination)
                continue
            if item.destination not in held and item.destination != PENDING_DESTINATION:
                queues.setdefault(item.destination, []).append(item)
        for key in [k for k in self._refusals if k != BLOB_AREA]:
            if not store._q("SELECT 1 FROM outbox WHERE destination = ? LIMIT 1",
                            (key,)).fetchone():  # fmt: skip
                del self._refusals[key]  # nothing waits for it any more (removed, dropped)
        results = await asyncio.gather(
            *(self._deposit_in_order(store, items) for items in queues.values())
        )
        for retry_at in results:
            if retry_at is not None:
                soonest = retry_at if soonest is None else min(soonest, retry_at)
        self._expire_undelivered(store)
        if store.pending_blocks(now=_ms(), limit=1) and not any(r is not None for r in results):
            return 0.0  # more were due than one pass takes
        if soonest is None:
            if store.sent_before(2**62, limit=1):  # awaiting receipts: check expiry in time
                return min(60.0, max(0.5, self._relay_ttl() / 10))
            return 60.0
        return max(0.05, min(60.0, (soonest - _ms()) / 1000))

    async def _deposit_in_order(self, store: Store, items: list[OutboxItem]) -> int | None:
        """Deposit one destination's due blocks in order; on a failure, schedule its retry and
        stop (returning when). None when all went (or were refused for good)."""
        dest = address_from_bytes(items[0].destination)
        client: RelayClient | None = None
        own = False
        try:
            for item in items:
                try:
                    if client is None:
                        client, own = await with_relay(dest.relay_url, self.link, self.network())
                    await client.deposit(dest.deposit_id, item.block, dest.send_token or None)
                except RelayError as exc:
                    if exc.code == E_DENIED:  # the mailbox is gone: retrying cannot help
                        self._deposit_refused(store, item.id, item.contact_id, item.message_id)
                        continue
                    wait = min(RETRY_MAX, 0.5 * 2 ** min(item.attempts, 8))
                    if exc.code == E_RATE_LIMITED:
                        wait = max(wait, 1.0)
                    if exc.code in (E_FULL, E_QUEUE_FULL):  # no room: tell the user (status)
                        self.refused_for_room(item.destination, exc.code == E_FULL)
                        wait = max(wait, 5.0)
                    self._settle_first_contact(item.contact_id, "pending")
                    return self._retry_later(store, item, wait)
                except RelayRefused:  # never dialled: every block to it goes the same way
                    self._deposit_forbidden(store, item)
                    continue
                except (RelayUnavailable, *UNAVAILABLE):
                    self._settle_first_contact(item.contact_id, "pending")
                    return self._retry_later(
                        store, item, min(RETRY_MAX, 0.5 * 2 ** min(item.attempts, 8))
                    )
                self._deposited(store, item)
                self.room_again(item.destination)
                self._settle_first_contact(item.contact_id, "sent")
            return None
        finally:
            if own and client is not None:
                await client.close()

    def _drop_outbox_of(self, store: Store, contact_ids: set[int]) -> None:
        """Drop what waits in the outbox for blocked contacts, and mark their messages failed.
        Dropped rather than held: a blocked contact's relay must not see this daemon again
        (docs/threat-model.md §4.4), and a held block would go out on an unblock long after
        it was written, to a mailbox that may be gone. Unblocking sends nothing old."""
        with store.transaction():
            rows = []
            for cid in contact_ids:
                rows += store._q(
                    "SELECT DISTINCT message_id, contact_id FROM outbox WHERE contact_id = ?"
                    " AND message_id IS NOT NULL", (cid,),
                ).fetchall()  # fmt: skip
                store._q("DELETE FROM outbox WHERE contact_id = ?", (cid,))
            for message_id, contact_id in rows:
                if store.get_message(message_id) is not None and store.set_message_status(
                    message_id, "failed"
                ):
                    contact = store.get_contact(contact_id)
                    self.daemon.events.emit("message.status", {
                        "message_id": message_id,
                        "contact": contact.name if contact else None,
                        "status": "failed",
                    })  # fmt: skip

    def _deposit_forbidden(self, store: Store, item: OutboxItem) -> None:
        """The destination's relay fails the policy for relays someone else chose (a URL
        stored before it existed): no connection, now or later; the block is dropped and its
        message marked failed."""
        log.warning("a block was dropped: its contact's relay URL is not allowed")
        with store.transaction():
            store.block_deposited(item.id)
            if (
                item.message_id is not None
                and store.get_message(item.message_id) is not None
                and store.set_message_status(item.message_id, "failed")
            ):
                contact = store.get_contact(item.contact_id) if item.contact_id else None
                self.daemon.events.emit("message.status", {
                    "message_id": item.message_id,
                    "contact": contact.name if contact else None,
                    "status": "failed",
                })  # fmt: skip

    @staticmethod
    def _retry_later(store: Store, item: OutboxItem, wait: float) -> int:
        retry_at = _ms() + int(wait * 1000)
        store.block_attempted(item.id, retry_at=retry_at)
        return retry_at

    def _deposited(self, store: Store, item: OutboxItem) -> None:
        with store.transaction():
            store.block_deposited(item.id)
            if (
                item.message_id is not None
                and store.get_message(item.message_id) is not None  # not deleted meanwhile
                and not store.outbox_holds_message(item.message_id)
                and store.set_message_status(item.message_id, "sent")
            ):
                contact = store.get_contact(item.contact_id) if item.contact_id else None
                self.daemon.events.emit(
                    "message.status",
                    {
                        "message_id": item.message_id,
                        "contact": contact.name if contact else None,
                        "status": "sent",
                    },
                )

    def _deposit_refused(
        self, store: Store, item_id: int, contact_id: int | None, message_id: str | None
    ) -> None:
        """The relay refused a deposit for good (no such mailbox, or the token is not valid
        there: the relay gives one answer for both)."""
        contact = store.get_contact(contact_id) if contact_id is not None else None
        with store.transaction():
            store.block_deposited(item_id)  # drop it
            if contact is not None and self.renewals.on_refused(contact):
                return  # a renewal after a backup import: the contact and history stay
            state = ContactState.from_bytes(contact.state) if contact is not None else None
            if contact is not None and state is not None and not state.established:
                # The first contact went to an invitation that is used, revoked or expired, or
                # to an address that was rotated: the contact can never answer. Its mailbox
                # goes (at the relay too); the contact stays, marked failed with the reason,
                # until the user removes it or adds it again with a fresh link.
                self._settle_first_contact(contact.id, "refused")
                row = store.mailbox_for_contact(contact.id)
                if row is not None:
                    store.delete_mailbox(row.id)
                    mb = OwnedMailbox.from_bytes(row.descriptor)
                    self._owned.pop(mb.owner_id, None)
                    self._spawn(self._delete_at_relay(mb))
                state.failed = LINK_NO_LONGER_VALID
                store.update_contact(contact.id, state=state.to_bytes())
                for m in store.history(contact.id, limit=10_000):
                    if m.direction == "out" and store.set_message_status(m.id, "failed"):
                        self.daemon.events.emit(
                            "message.status",
                            {"message_id": m.id, "contact": contact.name, "status": "failed"},
                        )
                store._q("DELETE FROM outbox WHERE contact_id = ?", (contact.id,))
                self.daemon.events.emit(
                    "contact.failed", {"contact": contact.name, "reason": LINK_NO_LONGER_VALID}
                )
                return
            if contact is not None:  # an established contact's mailbox is gone: were we
                self._spawn(self._probe_address())  # restored elsewhere? (_on_refused)
            if (
                message_id is not None
                and store.get_message(message_id) is not None
                and store.set_message_status(message_id, "failed")
            ):
                self.daemon.events.emit(
                    "message.status",
                    {
                        "message_id": message_id,
                        "contact": contact.name if contact else None,
                        "status": "failed",
                    },
                )

    def _relay_ttl(self) -> int:
        ttl = self.link.hello_ttl if self.link is not None else None
        return DEFAULT_TTL if ttl is None else ttl

    def _expire_undelivered(self, store: Store) -> None:
        """A message deposited longer ago than the relay keeps blocks, with no delivery receipt,
        expired at the relay undelivered. Slack covers the relay rounding expiries up (an hour
        by default) and receipt delays: ttl/10, at least 2 s, at most 3660 s."""
        ttl = self._relay_ttl()
        slack = min(3660, max(2, ttl // 10))
        for m in store.sent_before(_ms() - (ttl + slack) * 1000):
            if store.set_message_status(m.id, "expired"):
                contact = store.get_contact(m.contact_id)
                self.daemon.events.emit(
                    "message.status",
                    {
                        "message_id": m.id,
                        "contact": contact.name if contact else None,
                        "status": "expired",
                    },
                )

    def _prune_events(self) -> None:
        """Events older than `events.retention_days` (default 30) go: clients that reconnect
        later than that are told of the gap by events.subscribe and read messages.history."""
        days = float(self.store.get_setting(SETTING_EVENT_RETENTION, EVENT_RETENTION_DAYS))
        self.store.prune_events_before(_ms() - int(days * 86_400_000))

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.daemon.store is not None:
                self.store.delete_stale_fragments(_ms() - STALE_FRAGMENTS_MS)
                self._prune_events()
                if self.daemon.relay_connected:
                    self.store.set_setting(SETTING_LAST_REACHED, _ms())
            with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                await self._replenish_prekeys()
                await self._expire_invitations()
                await self._rotate_due_mailboxes()
                if not self.superseded():
                    await self.continue_move()  # contacts that answered since, the bound

    # --- per-contact mailbox rotation --------------------------------------------------------
    #
    # Every MAILBOX_ROTATION seconds a contact's receiving mailbox is replaced: a new mailbox is
    # created and announced inside the ratchet (MailboxPayload); the old one keeps working
    # until the contact acknowledges (MailboxAckPayload), then it is deleted at the relay.

    async def _rotate_due_mailboxes(self) -> None:
        period = int(self.store.get_setting(SETTING_ROTATION, MAILBOX_ROTATION))
        cutoff = _ms() - period * 1000
        for c in self.store.list_contacts():
            row = self.store.mailbox_for_contact(c.id)
            pending = self.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if (
                row is None
                or row.created_at >= cutoff
                or pending is not None
                or c.blocked
                or not ContactState.from_bytes(c.state).established
            ):
                continue
            try:
                await self.rotate_mailbox(c.name)
            except AppError:
                return  # the relay went away: the next pass tries again

    async def _finish_acked_rotations(self) -> None:
        """Rotations whose acknowledgement was stored but not yet acted on (a crash, a lock)."""
        for c in self.store.list_contacts():
            pending = self.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if pending is not None and pending.get("acked"):
                async with self.lock:
                    await self._finish_rotation(c, bytes.fromhex(pending["id"]))

    def _rotatable(self, name: str) -> tuple[Contact, bytes, MailboxRow]:
        c = self.contact(name)
        blob = self.store.get_session(c.id)
        old = self.store.mailbox_for_contact(c.id)
        if blob is None or old is None or not ContactState.from_bytes(c.state).established:
            raise AppError(E_NOT_READY, "not_ready", "this contact cannot be reached yet")
        return c, blob, old

    async def rotate_mailbox(self, name: str) -> dict[str, Any]:
        self._rotatable(name)  # its errors before any relay call
        made = await self._made_ahead(public=False)  # the proof: outside the lock
        async with self.lock:
            try:
                c, blob, old = self._rotatable(name)
            except AppError:
                if made is not None:
                    await self._to_pool(made)  # not lost: the next contact's mailbox
                raise
            pending = self.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if pending is not None:  # a rotation is under way: keep its old mailbox
                old = self.store.get_mailbox(int(pending["old"])) or old
            new_id, new = await self._create_mailbox(
                "contact", public=False, contact_id=c.id, made=made
            )
            rotation_id = self.entropy.random(wire.MESSAGE_ID_LEN)
            with self.store.transaction():
                self.store.set_setting(
                    f"{ROTATION_KEY}{c.id}", {"id": rotation_id.hex(), "old": old.id, "new": new_id}
                )
                self._enqueue(
                    c, Session.from_bytes(blob), wire.MailboxPayload(rotation_id, new.address())
                )
        self._outbox_wake.set()
        return {"contact": c.name, "rotating": True}

    async def _finish_rotation(self, c: Contact, rotation_id: bytes) -> None:
        pending = self.store.get_setting(f"{ROTATION_KEY}{c.id}")
        if pending is None or pending["id"] != rotation_id.hex():
            return
        # The retired mailbox and any mailbox older than the new one go.
        for row in self.store.list_mailboxes("contact"):
            if row.contact_id == c.id and row.id < int(pending["new"]):
                await self._retire_mailbox(row.id)
        self.store.set_setting(f"{ROTATION_KEY}{c.id}", None)
        self.daemon.events.emit("contact.mailbox_rotated", {"contact": c.name})
        self._move_progress()

    # --- moving to another relay (relay.set on a profile with contacts) ----------------------
    #
    # Each contact is sent a new mailbox at the new relay by the ordinary rotation (the
    # MailboxPayload carries the relay URL); the old mailbox keeps receiving (a drain link)
    # until the contact acknowledges, then it is deleted at the old relay. A contact that has
    # not acknowledged after MOVE_BOUND_MS is left behind.

    def move_status(self) -> dict[str, Any] | None:
        store = self.daemon.store
        move = store.get_setting(SETTING_MOVE) if store is not None else None
        if not move:
            return None
        url = str(store.get_setting(SETTING_URL)) if store is not None else ""
        left = sorted({c.name for row, mb in self._owned.values() if row.role == "contact"
                       and not same_relay(mb.relay_url, url) and row.contact_id is not None
                       and (c := self.store.get_contact(row.contact_id)) is not None})  # fmt: skip
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
        if self.daemon.store is None:
            return
        move = self.store.get_setting(SETTING_MOVE)
        if not move:
            return
        url = self._relay_url()
        overdue = _ms() - int(move["at"]) > MOVE_BOUND_MS
        for c in self.store.list_contacts():
            row = self.store.mailbox_for_contact(c.id)
            if row is None or same_relay(OwnedMailbox.from_bytes(row.descriptor).relay_url, url):
                continue  # its newest mailbox is here already (announced, or confirmed)
            if ContactState.from_bytes(c.state).established and not c.blocked:
                if self.cover.active() and not cover_slots.pool_rows(self.store):
                    break  # the next pool mailbox (made at a random time) moves the next one
                try:
                    await self.rotate_mailbox(c.name)
                except AppError as exc:
                    if exc.code in (E_RELAY_UNAVAILABLE, E_RELAY_FULL):
                        return  # the relay went away or is full: the next connection goes on
                    continue  # this contact cannot move now (not_ready: no session): the next
        if overdue:
            async with self.lock:
                for row in self.store.list_mailboxes("contact"):
                    if not same_relay(OwnedMailbox.from_bytes(row.descriptor).relay_url, url):
                        await self._retire_mailbox(row.id)
        self._move_progress()

    def _move_progress(self) -> None:
        """The move is over once no mailbox of ours is left at another relay."""
        if self.daemon.store is None:
            return
        move = self.store.get_setting(SETTING_MOVE)
        if move:
            url = self.store.get_setting(SETTING_URL)
            if all(same_relay(mb.relay_url, url) for _, mb in self._owned.values()):
                self.store.set_setting(SETTING_MOVE, None)
                log.info("relay move finished")
                self.daemon.events.emit("relay.moved", {"from": move["from"], "url": url})
        self._reconcile_drains()

    # --- receiving --------------------------------------------------------------------------

    async def _on_block(self, client: RelayClient, msg: Message) -> None:
        entry = self._owned.get(msg.owner_id)
        if entry is not None:
            row, mb = entry
            try:
                block = mb.open(msg.sealed)
            except Exception:  # not sealed by our relay for this mailbox: drop it
                droplog.dropped("dropped a delivery that did not open")
            else:
                async with self.lock:
                    try:
                        if row.role == cover_slots.POOL_ROLE or self.cover.is_loop(block):
                            pass  # our own loop cover (a pool mailbox, or gap filling)
                        elif row.role == "contact":
                            if row.contact_id is not None:
                                self._receive_from_contact(row.contact_id, block)
                                self._outbox_wake.set()  # receipts may be due
                                await self.renewals.after_receive()
                            while self._acked_rotations:  # relay calls: outside the commit
                                await self._finish_rotation(*self._acked_rotations.pop())
                        else:
                            await self._receive_first_contact(row, block)
                    except AppError:
                        # The relay went away mid-way: leave the block unacknowledged, so
                        # the relay delivers it again after the reconnect.
                        self._reload_prekeys()
                        self._acked_rotations.clear()
                        self.renewals.reset()
                        return
                    except TRANSIENT as exc:
                        # The store failed (disk full, I/O): the transaction rolled back. Do
                        # not acknowledge: drop the connection, and the relay delivers the
                        # block again after the reconnect.
                        self._reload_prekeys()
                        self._acked_rotations.clear()
                        self.renewals.reset()
                        raise RelayUnavailable() from exc
                    except Exception as exc:
                        # A bug or a block no retry can open: the transaction rolled back;
                        # acknowledge it, and log only the kind of failure.
                        droplog.dropped(f"dropped a block: {type(exc).__name__}")
                        self._reload_prekeys()
                        self._acked_rotations.clear()
                        self.renewals.reset()
        await acknowledge(client, msg.msg_id)  # withdrawn (END): not an error, §4.3

    def _reload_prekeys(self) -> None:
        state = self.store.get_identity()
        if state is not None:
            self.prekeys = PrekeyStore.from_bytes(state)

    async def _receive_first_contact(self, row: MailboxRow, block: bytes) -> None:
        assert self.prekeys is not None
        try:
            fc = accept_first_contact(self.entropy, self.prekeys, block)
            hello = wire.decode_payload(fc.fragment.data)
        except (DecryptionError, DecodeError):
            self._reload_prekeys()
            droplog.dropped("dropped a first-contact block that did not open")
            return
        self._request_top_up()  # it used one-time keys (kept burnt below, whatever follows)
        if not isinstance(hello, wire.HelloPayload) or not self._peer_url_ok(
            hello.reply_to.relay_url
        ):
            self._reload_prekeys()
            return
        known = self._contact_with_identity(fc.sender)
        if row.role == "invitation":
            valid = (
                row.invitation_id is not None
                and hello.invitation_id == row.invitation_id
                and (row.expires_at is None or row.expires_at >= _now())
                and (known is None or not known.blocked)
            )
            if not valid:
                self.store.put_identity(self.prekeys.to_bytes())  # one-time keys stay burnt
                return
            mb_id, mb = await self._create_mailbox("contact", public=False)
            with self.store.transaction():
                self.store.put_identity(self.prekeys.to_bytes())
                self.store.delete_mailbox(row.id)  # used: the invitation is void
                name = hello.display_name or "new contact"
                self._establish(name, fc.sender, fc.session, hello.reply_to, mb_id, mb)
            self._reload_owned()
            self._outbox_wake.set()
            with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                old = OwnedMailbox.from_bytes(row.descriptor)
                async with self._client() as client:
                    await client.delete(old.owner_id, old.signing_key)
            return
        with self.store.transaction():
            self.store.put_identity(self.prekeys.to_bytes())  # burnt one-time keys
            if known is not None and known.blocked:
                return
            pending = self.store.list_requests()
            keys = fc.sender.encode()  # the keys: a re-signed record is the same identity
            same = [r for r in pending if keys_of(r.identity_key) == keys]
            if same:
                # The same identity again (it retried, or floods): one request, holding the
                # newest session, the one its sender now waits on (issue 15 item 14).
                self.store.replace_request(
                    same[0].id, clean_name(hello.display_name), fc.session.to_bytes(),
                    address_to_bytes(hello.reply_to),
                )  # fmt: skip
                for extra in same[1:]:  # kept apart before requests were merged
                    self.store.delete_request(extra.id)
                droplog.dropped("merged a contact request into an earlier one of its identity")
                return
            limit = int(self.store.get_setting(SETTING_MAX_REQUESTS, MAX_PENDING_REQUESTS))
            if len(pending) >= limit:
                droplog.dropped("dropped a contact request (too many pending)")
                return
            request_id = self.store.add_request(
                fc.sender.to_bytes(),
                clean_name(hello.display_name),
                fc.session.to_bytes(),
                address_to_bytes(hello.reply_to),
            )
            self.daemon.events.emit(
                "contact.request",
                {
                    "request": request_id,
                    "name": clean_name(hello.display_name),
                    "known": known is not None,
                },
            )

    def _receive_from_contact(self, contact_id: int, block: bytes) -> None:
        c = self.store.get_contact(contact_id)
        blob = self.store.get_session(contact_id)
        if c is not None and blob is None:  # restored from a backup: a renewal's answer?
            self.renewals.receive_first_contact(c, block)
            return
        if c is None or blob is None:
            return
        session = Session.from_bytes(blob)
        try:
            fragment = session.decrypt(self.entropy, block)
        except DecryptionError:
            if self.renewals.on_undecryptable(c, block):
                return
            droplog.dropped("dropped a block that did not decrypt")
            return
        self.cover.heard(contact_id)  # online: cover to it goes on
        with self.store.transaction():
            self.store.put_session(contact_id, session.to_bytes())
            if c.blocked:
                # Nothing of a blocked contact is shown or kept (not even a partial message):
                # the ratchet step above is all that is stored.
                droplog.dropped("dropped a block of a blocked contact")
                return
            if fragment.count == 1:
                content: bytes | None = fragment.data
            elif fragment.count > MAX_MESSAGE_FRAGMENTS:
                droplog.dropped("dropped a fragment of an oversized message")
                return
            else:
                self._make_room_for_partial(contact_id, fragment.msg_id)
                parts = self.store.put_fragment(
                    contact_id, fragment.msg_id, fragment.index, fragment.count, fragment.data
                )
                content = None if parts is None else b"".join(parts)
            if content is None:
                return
            try:
                payload = wire.decode_payload(content)
            except DecodeError:
                droplog.dropped("dropped a payload that did not parse")
                return
            self._handle_payload(c, session, payload)

    def _make_room_for_partial(self, contact_id: int, msg_id: bytes) -> None:
        """Before a fragment of a message not yet kept starts one more partial message (inside
        the receive transaction): a contact's oldest partials make room for its newest
        (PARTIALS_PER_CONTACT); past the total for all contacts, the oldest partial of the
        contact holding the most goes, so whoever fills it loses, not everyone else."""
        own = self.store.partial_messages(contact_id)
        if any(m == msg_id for _, m in own):
            return
        for _, old in own[: max(0, len(own) - PARTIALS_PER_CONTACT + 1)]:
            self.store.delete_fragments(contact_id, old)
            droplog.dropped("dropped a partial message (over a contact's limit)")
        total = int(self.store.get_setting(SETTING_MAX_PARTIALS, PARTIALS_TOTAL))
        kept = self.store.partial_messages()  # oldest first
        while len(kept) >= max(1, total):
            held: dict[int, int] = {}
            for cid, _ in kept:
                held[cid] = held.get(cid, 0) + 1
            most = max(held.values())
            victim = next((cid, m) for cid, m in kept if held[cid] == most)  # its oldest
            self.store.delete_fragments(*victim)
            kept.remove(victim)
            droplog.dropped("dropped a partial message (over the total limit)")

    def drop_partials(self, contact_id: int) -> None:
        """A contact blocked: its incomplete messages go (they would never be shown)."""
        n = len(self.store.partial_messages(contact_id))
        self.store.delete_fragments(contact_id)
        for _ in range(n):
            droplog.dropped("dropped a partial message (contact blocked)")

    def _handle_payload(self, c: Contact, session: Session, payload: wire.Payload) -> None:
        if isinstance(payload, wire.CoverPayload):
            return  # cover: nothing to show, keep or answer (§24)
        if isinstance(payload, wire.TextPayload):
            mid = payload.message_id.hex()
            if self.store.get_message(mid) is not None:
                return  # a duplicate id: never show a message twice
            self.store.add_message(
                c.id, "in", payload.text, status="received", message_id=mid,
                sent_at=payload.sent_at_ms,
            )  # fmt: skip
            self.daemon.events.emit(
                "message.received",
                {"message_id": mid, "contact": c.name, "text": payload.text,
                 "sent_at": payload.sent_at_ms},
            )  # fmt: skip
            self.queue_receipt(c, session, wire.RECEIPT_DELIVERED, [payload.message_id])
        elif isinstance(payload, wire.ReceiptPayload):
            status = "delivered" if payload.kind == wire.RECEIPT_DELIVERED else "read"
            for raw in payload.message_ids:
                m = self.store.get_message(raw.hex())
                if m is None or m.contact_id != c.id or m.direction != "out":
                    continue
                if self.store.set_message_status(m.id, status):
                    self.daemon.events.emit(
                        "message.status", {"message_id": m.id, "contact": c.name, "status": status}
                    )
        elif isinstance(
            payload, (wire.HelloPayload, wire.MailboxPayload)
        ) and not self._peer_url_ok(
            payload.reply_to.relay_url
            if isinstance(payload, wire.HelloPayload)
            else payload.mailbox.relay_url
        ):
            droplog.dropped("dropped a mailbox address with a refused relay URL")
        elif isinstance(payload, wire.HelloPayload):
            state = ContactState.from_bytes(c.state)
            state.send_to, state.established = payload.reply_to, True
            self.store.update_contact(c.id, state=state.to_bytes())
            self.store.readdress_outbox(
                c.id, PENDING_DESTINATION, address_to_bytes(payload.reply_to),
                due=SLOT_WAIT if self.cover.active() else 0,
            )
            self.cover.changed()
            if not self.renewals.on_hello(c):
                self.daemon.events.emit("contact.established", {"contact": c.name})
        elif isinstance(payload, wire.MailboxPayload):
            state = ContactState.from_bytes(c.state)
            if state.send_to is not None:  # blocks still queued for the old mailbox follow
                self.store.readdress_outbox(
                    c.id, address_to_bytes(state.send_to), address_to_bytes(payload.mailbox)
                )
            state.send_to = payload.mailbox
            self.store.update_contact(c.id, state=state.to_bytes())
            # The acknowledgement goes to the new mailbox: the old one may be gone already (it
            # expired while the contact was away, _expired), and the new one is subscribed.
            c = self.store.get_contact(c.id) or c
            self._enqueue(
                c, session, wire.MailboxAckPayload(payload.rotation_id), delay=self._receipt_delay()
            )
        elif isinstance(payload, wire.AttachmentPayload):
            self.attachments.on_descriptor(c, session, payload)
        elif isinstance(payload, wire.MailboxAckPayload):
            pending = self.store.get_setting(f"{ROTATION_KEY}{c.id}")
            if pending is not None and pending["id"] == payload.rotation_id.hex():
                # Stored with the receive, acted on (relay calls) right after the commit.
                self.store.set_setting(f"{ROTATION_KEY}{c.id}", {**pending, "acked": True})
                self._acked_rotations.append((c, payload.rotation_id))
        elif isinstance(payload, (wire.CallPayload, wire.CallSealedPayload)):
            calls = getattr(self, "calls", None)  # aegisd/calls/service.py, set at start-up
            if calls is not None:
                calls.on_payload(c, payload)

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
                self._enqueue(c, Session.from_bytes(blob), payload, slotted=False)
        self._outbox_wake.set()
