"""The delivery layer: the one place that says "send this payload to these recipients".

Interface (everything that sends a ratchet payload goes through it: one-to-one texts,
receipts, mailbox announcements, files' descriptors, call signaling, session renewals, cover;
groups will pass N recipients, several devices per person later):

- ``enqueue(recipients, payload, *, message_id=None, delay=0.0, spread=0.0, slotted=True)``:
  inside the caller's store transaction, with the messenger's protocol lock held, encrypt
  ``payload`` once for each recipient's ratchet session (a long text spans several blocks: the
  session fragments it), store each advanced session and the exact ciphertext blocks in the
  durable outbox. They commit together, before the first deposit; a retry resends the stored bytes.
  ``message_id``: the message whose status follows the blocks (``sent`` once the outbox holds
  none of them: for N recipients, once every block went). With cover traffic on, a
  ``slotted`` block waits for its contact's next cover slot (services/cover.py) instead of
  leaving after ``delay`` seconds; without cover, each recipient's blocks leave after
  ``delay`` plus their own uniform random share of ``spread`` seconds (a group's fan-out, so
  that the relay does not see N deposits at one moment), kept as the outbox's not_before.
  A recipient whose first contact is unanswered gets its blocks addressed to nobody
  (PENDING_DESTINATION) until its answer readdresses them.
- ``queue_receipt(recipient, kind, ids)``: delivery or read receipts (batched with cover on).
- ``wake()``: something was queued (or became due): drain now.
- ``run()``: the drain loop (the messenger starts it at unlock and cancels it at lock).

Draining (unchanged from the single-class messenger): a destination's blocks leave in the
order they were stored (a failed block holds the later ones to the same mailbox back until
its retry; a block merely delayed on purpose holds nothing up); destinations are served
concurrently; retries back off exponentially; a mailbox the relay refuses for good drops the
block (and, for an unanswered first contact, fails the contact); a relay refusing for want of
room is reported in status (``relay_refusing``); a message without a receipt past the relay's
TTL is marked expired. ``contacts.add`` learns how its first contact's deposit went through
``first_contact_waiter``.

Batches (issue 16: storage and transport cost far more than the cryptography): a mailbox's
blocks with a send token are pipelined on the connection (``DEPOSIT_WINDOW`` before the first
answer; the relay stores them in the order it reads them), their answers handled in order one
by one as before; and the blocks the relay accepted are removed from the outbox together, one
transaction per pass (group commit), after their deposits: a crash in between resends them,
and the recipient's ratchet drops the copies.

This module imports no other service: what it needs from the messenger comes as the narrow
callbacks of ``DeliveryHooks``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.primitives import Entropy
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import contact_devices as cd
from aegisd.store import cover as cover_slots
from aegisd.store.cover import SLOT_WAIT
from aegisd.store.db import Contact, OutboxItem
from aegisd.transport.network import Network
from aegisd.transport.relaylink import (
    UNAVAILABLE,
    RelayLink,
    RelayRefused,
    RelayUnavailable,
    with_relay,
)
from relay.client import RelayClient, RelayError
from relay.wire import E_DENIED, E_FULL, E_QUEUE_FULL, E_RATE_LIMITED

from .context import EventSink
from .mailbox import ContactState, address_from_bytes, address_to_bytes

log = logging.getLogger("aegisd.messenger")
_RNG = random.SystemRandom()  # timing the relay sees: not Python's predictable generator

SETTING_RECEIPT_DELAY = "privacy.receipt_delay_max"
SETTING_SEND_JITTER = "privacy.send_jitter_max"  # seconds; 0 (the default): send at once
#: Seconds over which one group message's copies are spread, each member's independently;
#: cover off only (with cover on each copy already waits for its member's own slot).
SETTING_GROUP_SPREAD = "privacy.group_spread_max"
#: The default, 0: measured (bench/linkage.py --groups), a spread of seconds or minutes does not
#: hide a group from a relay that counts coincidences over a day; cover traffic does.
GROUP_SPREAD_MAX = 0.0
RECEIPT_DELAY_MAX = 3.0  # seconds; receipts leave after a random delay in [0.5, max]
RETRY_MAX = 60.0
#: Accepted blocks are forgotten together (group commit): at the end of a drain pass, or once
#: this many wait, or this many seconds after the first of them (a pass held up by a slow
#: destination).
FORGET_BATCH = 512
#: Deposits to one mailbox sent before the first answer (pipelining; the relay reads a
#: connection's requests in order and stops reading at its max_inflight, 64 by default).
DEPOSIT_WINDOW = 16
FORGET_DELAY = 0.5
DEFAULT_TTL = 14 * 24 * 3600  # the relay's default; its HELLO says the real one
PENDING_DESTINATION = b"pending"  # outbox blocks waiting for the contact's answer
NEVER = 2**62  # not_before of those blocks: readdressing makes them due
#: The key of an upload refused for want of room (attachments.BLOB_AREA): not a mailbox, so
#: its refusal is not forgotten when nothing waits in the outbox for it.
BLOB_AREA = b"blob area"
LINK_NO_LONGER_VALID = (
    "the invitation was already used, revoked or has expired (its relay no longer has its "
    "mailbox): ask for a new invitation"
)
#: status.relay.refusing: why deposits are refused for now (they wait in the outbox).
REFUSING_FULL = "the relay is full: messages wait in the outbox until it has room again"
REFUSING_QUEUE = (
    "a contact's mailbox at the relay is full (they have been away long): messages to them wait "
    "in the outbox"
)


@dataclass(frozen=True)
class Recipient:
    """One ratchet session to encrypt for: the contact row (its state says where its blocks
    go) and its session, which ``enqueue`` advances and stores."""

    contact: Contact
    session: Session


@dataclass(frozen=True)
class DeliveryHooks:
    """What the delivery layer needs from its owner (the messenger), nothing more."""

    store: Callable[[], Store | None]  # the open store, None while locked
    events: EventSink
    entropy: Entropy
    link: Callable[[], RelayLink | None]  # the profile's relay link, if any
    network: Callable[[], Network]
    superseded: Callable[[], str | None]  # this copy of the profile is out of use
    cover_active: Callable[[], bool]  # cover traffic on: slotted blocks wait for a slot
    #: A deposit to this contact was refused for good; True if a renewal accounts for it.
    renewal_refused: Callable[[Contact], bool]
    #: An unanswered first contact's mailbox is gone: forget the mailbox we made for it
    #: (inside the transaction; relay calls later).
    drop_contact_mailbox: Callable[[Store, int], None]
    #: An established contact's mailbox is gone: was this profile restored elsewhere?
    contact_mailbox_gone: Callable[[], None]
    #: A deposit for no contact (a sync payload to an own device) was refused for good: the
    #: destination's mailbox is gone (inside the transaction).
    uncontacted_gone: Callable[[Store, bytes], None] = lambda store, destination: None


def _ms() -> int:
    return time.time_ns() // 1_000_000


class Delivery:
    def __init__(self, hooks: DeliveryHooks) -> None:
        self.h = hooks
        self._wake = asyncio.Event()
        # Deposits refused for want of room, by destination (a contact's mailbox, or
        # BLOB_AREA for an upload): status.relay.refusing. An entry goes once a deposit to
        # its destination goes through, or nothing waits for it any more; a full relay (every
        # destination) once any deposit goes through. Not "any deposit went through": cover
        # and other contacts' messages would make a full mailbox's warning flicker.
        self._refusals: dict[bytes, str] = {}
        # contacts.add waiting for its first contact's deposit: contact id -> outcome
        self._first_contact: dict[int, asyncio.Future[str]] = {}
        # Blocks the relay accepted and the outbox still holds: forgotten together, in one
        # transaction (group commit): see _deposited.
        self._accepted: list[OutboxItem] = []
        self._forget_timer: asyncio.TimerHandle | None = None

    def _store(self) -> Store:
        store = self.h.store()
        if store is None:
            raise RuntimeError("store is locked")
        return store

    def wake(self) -> None:
        self._wake.set()

    # --- queueing ----------------------------------------------------------------------------

    def enqueue(
        self,
        recipients: Sequence[Recipient],
        payload: wire.Payload | dv.DevicePayload,
        *,
        message_id: str | None = None,
        delay: float = 0.0,
        spread: float = 0.0,
        slotted: bool = True,
        devices: bool = True,
    ) -> None:
        """Encrypt ``payload`` for each recipient and queue the blocks (module docstring).
        Call inside a store transaction: a recipient that cannot be reached raises not_ready
        and nothing of the call is kept. ``devices``: also once for each other device of the
        recipient that answered (docs/devices.md §5.3); False for a payload meant for the
        session given only (a device hello)."""
        store = self._store()
        ids = [r.contact.id for r in recipients]
        if len(set(ids)) != len(ids):
            # Two encryptions from one loaded copy of a session would reuse its message key.
            raise ValueError("a recipient is named twice")
        if isinstance(payload, (dv.DeviceList, dv.DeviceHello, dv.ListAck, dv.ListRequest)):
            encoded = dv.encode_device_payload(payload)
        else:
            encoded = wire.encode_payload(payload)
        # Every recipient is checked before any session advances.
        states = [ContactState.from_bytes(r.contact.state) for r in recipients]
        for state in states:
            if state.failed:
                raise AppError(E.NOT_READY, "not_ready", f"this contact failed: {state.failed}",
                               reason="contact_failed")  # fmt: skip
            if state.send_to is None:
                raise AppError(E.NOT_READY, "not_ready", "this contact cannot be reached yet")
        slot = slotted and self.h.cover_active()
        due = _ms() + int(delay * 1000)
        for r, state in zip(recipients, states, strict=True):
            assert state.send_to is not None
            blocks = r.session.encrypt(self.h.entropy, encoded)
            store.put_session(r.contact.id, r.session.to_bytes())
            if not state.established:
                # Until the contact answered, only the first contact may go to the link's
                # mailbox; later blocks wait, addressed to nobody, and are readdressed when
                # the answer comes.
                destination, not_before = PENDING_DESTINATION, NEVER
            else:
                destination = address_to_bytes(state.send_to)
                # Each copy's own draw: the fan-out's deposits are spread, not shifted together.
                own = int(_RNG.uniform(0.0, spread) * 1000) if spread > 0 else 0
                # A delayed block (send jitter, a receipt's delay) goes no earlier than a block
                # queued before it to this contact (jitter draws differ): the peer gets payloads
                # in order (a timer before its texts, §27.3). A block without delay is not held
                # behind a delayed receipt: it goes at once, as it always did.
                not_before = SLOT_WAIT if slot else due + own
                if not slot and delay > 0:
                    not_before = max(
                        not_before, store.last_not_before(r.contact.id, destination, SLOT_WAIT)
                    )
            store.enqueue_blocks(destination, blocks, message_id=message_id,
                                 contact_id=r.contact.id, not_before=not_before)  # fmt: skip
            if devices and state.established:
                self._to_devices(store, r.contact.id, encoded, message_id, slot, due, spread,
                                 delay)  # fmt: skip

    def _to_devices(self, store: Store, contact_id: int, encoded: bytes, message_id: str | None,
                    slot: bool, due: int, spread: float, delay: float) -> None:  # fmt: skip
        """The same payload once for each of the contact's other devices that answered, each
        in its own session, to its own mailbox, after its own share of ``spread``."""
        for ds in cd.device_sessions(store, contact_id):
            if ds.send_to is not None:  # else its answer has not come: it gets what follows it
                self._to_device(store, contact_id, ds, encoded, message_id, slot, due, spread,
                                delay)  # fmt: skip

    def _to_device(self, store: Store, contact_id: int, ds: cd.DeviceSession, encoded: bytes,
                   message_id: str | None, slot: bool, due: int, spread: float,
                   delay: float) -> None:  # fmt: skip
        """``encoded`` in the session with one device that answered, to its mailbox."""
        assert ds.send_to is not None
        session = Session.from_bytes(ds.state)
        blocks = session.encrypt(self.h.entropy, encoded)
        now = _ms() // 1000
        cd.put_device_session(store, contact_id, ds.device_id, session.to_bytes(), now)
        own = int(_RNG.uniform(0.0, spread) * 1000) if spread > 0 else 0
        not_before = SLOT_WAIT if slot else due + own
        if not slot and delay > 0:  # in order behind what was queued to it, as in enqueue
            not_before = max(not_before, store.last_not_before(contact_id, ds.send_to, SLOT_WAIT))
        store.enqueue_blocks(ds.send_to, blocks, message_id=message_id,
                             contact_id=contact_id, not_before=not_before)  # fmt: skip

    def answered_devices(self, contact_id: int) -> list[bytes]:
        """The IDs of the contact's other devices whose session answered (those ``enqueue``
        also encrypts for)."""
        return [ds.device_id for ds in cd.device_sessions(self._store(), contact_id)
                if ds.send_to is not None]  # fmt: skip

    def enqueue_device(self, contact_id: int, device_id: bytes, payload: wire.Payload) -> bool:
        """``payload`` in the session with one device of the contact only, to its mailbox, due
        now (call signaling tied to one device: docs/devices.md §9). Inside the caller's
        transaction. False if that device has no answered session (removed meanwhile)."""
        store = self._store()
        ds = next((s for s in cd.device_sessions(store, contact_id) if s.device_id == device_id),
                  None)  # fmt: skip
        if ds is None or ds.send_to is None:
            return False
        self._to_device(store, contact_id, ds, wire.encode_payload(payload), None, False, _ms(),
                        0.0, 0.0)  # fmt: skip
        return True

    def slot_destinations(self, contact: Contact) -> list[bytes]:
        """Where each slot of this contact deposits one block (docs/protocol.md §24): its
        mailbox, then the mailbox of each of its other devices that answered."""
        state = ContactState.from_bytes(contact.state)
        if state.send_to is None or not state.established or state.failed:
            return []
        out = [address_to_bytes(state.send_to)]
        for ds in cd.device_sessions(self._store(), contact.id):
            if ds.send_to is not None and ds.send_to not in out:
                out.append(ds.send_to)
        return out

    def enqueue_slot(self, contact: Contact, session: Session, payload: wire.Payload, *,
                     now_to: set[bytes], later_too: bool) -> None:  # fmt: skip
        """A slot's block (cover, or a receipt batch): encrypted for the contact's session
        and each of its devices' whose mailbox is in ``now_to`` (the destinations no real block
        took in this slot), due now; with ``later_too``, also for the others, waiting for their
        next slot behind what waits there. Inside the caller's transaction."""
        store = self._store()
        encoded = wire.encode_payload(payload)
        due = _ms()
        state = ContactState.from_bytes(contact.state)
        if state.send_to is None or not state.established or state.failed:
            return
        row = address_to_bytes(state.send_to)
        if row in now_to or later_too:
            blocks = session.encrypt(self.h.entropy, encoded)
            store.put_session(contact.id, session.to_bytes())
            store.enqueue_blocks(row, blocks, contact_id=contact.id,
                                 not_before=due if row in now_to else SLOT_WAIT)  # fmt: skip
        for ds in cd.device_sessions(store, contact.id):
            if ds.send_to is None or ds.send_to == row:
                continue
            if ds.send_to not in now_to and not later_too:
                continue
            dev = Session.from_bytes(ds.state)
            blocks = dev.encrypt(self.h.entropy, encoded)
            cd.put_device_session(store, contact.id, ds.device_id, dev.to_bytes(), due // 1000)
            store.enqueue_blocks(ds.send_to, blocks, contact_id=contact.id,
                                 not_before=due if ds.send_to in now_to else SLOT_WAIT)  # fmt: skip

    def queue_receipt(self, recipient: Recipient, kind: int, ids: list[bytes]) -> None:
        """A delivery or read receipt: with cover on, it waits to ride the contact's next
        slot with the others (no block per message, no echo of the message's timing); with
        cover off, it leaves after the receipt delay."""
        if self.h.cover_active():
            cover_slots.add_receipts(self._store(), recipient.contact.id, kind, ids)
            return
        step = wire.MAX_RECEIPT_IDS
        for i in range(0, len(ids), step):
            self.enqueue([recipient], wire.ReceiptPayload(kind, tuple(ids[i : i + step])),
                         delay=self.receipt_delay())  # fmt: skip

    def send_jitter(self) -> float:
        """Optional random delay before a message leaves (privacy.send_jitter_max; 0: none)."""
        ceiling = float(self._store().get_setting(SETTING_SEND_JITTER, 0.0))
        return random.uniform(0.0, ceiling) if ceiling > 0 else 0.0

    def group_spread(self) -> float:
        """The window over which a group message's copies leave (privacy.group_spread_max)."""
        return float(self._store().get_setting(SETTING_GROUP_SPREAD, GROUP_SPREAD_MAX))

    def receipt_delay(self) -> float:
        ceiling = float(self._store().get_setting(SETTING_RECEIPT_DELAY, RECEIPT_DELAY_MAX))
        return random.uniform(min(0.5, ceiling), ceiling)

    # --- first contacts ----------------------------------------------------------------------

    def first_contact_waiter(self, contact_id: int) -> asyncio.Future[str]:
        """How the first contact's deposit goes: "sent", "pending" (it waits for a retry) or
        "refused" (the invitation is no longer valid). Register before any await (the drain
        cannot settle it unseen); ``forget_first_contact`` after."""
        waiter = self._first_contact[contact_id] = asyncio.get_running_loop().create_future()
        return waiter

    def forget_first_contact(self, contact_id: int) -> None:
        self._first_contact.pop(contact_id, None)

    def _settle_first_contact(self, contact_id: int | None, outcome: str) -> None:
        waiter = self._first_contact.get(contact_id) if contact_id is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    # --- refusals for want of room -----------------------------------------------------------

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

    # --- draining ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            # Cleared before the pass, so that a block enqueued during it wakes the next one.
            self._wake.clear()
            try:
                delay = await self._drain_outbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the loop alive; the next pass retries
                log.error("outbox pass failed: %s", type(exc).__name__)
                delay = 1.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _drain_outbox(self) -> float:
        """Deposit every due block; returns how long to sleep before the next pass.

        A destination's blocks leave in the order they were stored: after a block failed
        (and waits for its retry), later blocks to the same mailbox wait too. A block that is
        merely delayed on purpose (a receipt's random delay) holds nothing up. Destinations
        are served concurrently, so one slow relay does not hold up the others."""
        store = self.h.store()
        if store is None:
            return 1.0
        if self.h.superseded():
            store._q("DELETE FROM outbox")  # nothing is deposited: the contacts moved on
            return 60.0
        blocked = {c.id for c in store.list_contacts() if c.blocked}
        if blocked:  # e.g. a receipt queued by a message that arrived as the block was made
            self.drop_outbox_of(store, blocked)
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
        try:
            results = await asyncio.gather(
                *(self._deposit_in_order(store, items) for items in queues.values())
            )
        finally:
            # Before anything reads the outbox again (the next pass must not resend them);
            # also when the pass is cancelled (lock), while the store is still open.
            self._forget_accepted()
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
        stop (returning when). None when all went (or were refused for good).

        Deposits with a send token are pipelined: up to ``DEPOSIT_WINDOW`` are sent on the
        connection before the first answer (the relay stores a connection's deposits in the
        order they arrive: relay/connection.py), and their answers are handled in order,
        each exactly as if it had been sent alone. A block refused for a passing reason (rate
        limit, no room, connection lost) stops the destination's queue as before; a later
        block already accepted meanwhile stays accepted (the recipient's ratchet takes blocks
        out of order), one refused too simply waits behind it, untried. Deposits paid with a
        proof of work (a mailbox without token) go one at a time."""
        dest = address_from_bytes(items[0].destination)
        token = dest.send_token or None
        window = DEPOSIT_WINDOW if token is not None else 1
        client: RelayClient | None = None
        own = False
        sent: collections.deque[tuple[OutboxItem, asyncio.Future[None]]] = collections.deque()
        retry_at: int | None = None
        try:
            queue = iter(items)
            while True:
                while retry_at is None and len(sent) < window:
                    item = next(queue, None)
                    if item is None:
                        break
                    if client is None:
                        try:
                            client, own = await with_relay(
                                dest.relay_url, self.h.link(), self.h.network()
                            )
                        except RelayRefused:  # never dialled: every block goes the same way
                            self._deposit_forbidden(store, item)
                            for rest in queue:
                                self._deposit_forbidden(store, rest)
                            return None
                        except (RelayUnavailable, *UNAVAILABLE):
                            self._settle_first_contact(item.contact_id, "pending")
                            return self._retry_later(
                                store, item, min(RETRY_MAX, 0.5 * 2 ** min(item.attempts, 8))
                            )
                    # A task starts at once and in order: with a token, the frame is on the
                    # wire before the task first waits.
                    sent.append((item, asyncio.ensure_future(
                        client.deposit(dest.deposit_id, item.block, token)
                    )))  # fmt: skip
                if not sent:
                    return retry_at
                item, answer = sent.popleft()
                try:
                    await answer
                except RelayError as exc:
                    if exc.code == E_DENIED:  # the mailbox is gone: retrying cannot help
                        self._deposit_refused(store, item.id, item.contact_id, item.message_id,
                                              item.destination)  # fmt: skip
                        continue
                    if retry_at is not None:
                        continue  # behind a block that waits for its retry: untried, as before
                    wait = min(RETRY_MAX, 0.5 * 2 ** min(item.attempts, 8))
                    if exc.code == E_RATE_LIMITED:
                        wait = max(wait, 1.0)
                    if exc.code in (E_FULL, E_QUEUE_FULL):  # no room: tell the user (status)
                        self.refused_for_room(item.destination, exc.code == E_FULL)
                        wait = max(wait, 5.0)
                    self._settle_first_contact(item.contact_id, "pending")
                    retry_at = self._retry_later(store, item, wait)
                    continue
                except (RelayUnavailable, *UNAVAILABLE):
                    if retry_at is None:
                        self._settle_first_contact(item.contact_id, "pending")
                        retry_at = self._retry_later(
                            store, item, min(RETRY_MAX, 0.5 * 2 ** min(item.attempts, 8))
                        )
                    continue
                self._deposited(item)
                self.room_again(item.destination)
                self._settle_first_contact(item.contact_id, "sent")
        finally:
            for _, answer in sent:  # cancelled: nothing is left running
                answer.cancel()
            if sent:
                await asyncio.gather(*(a for _, a in sent), return_exceptions=True)
            if own and client is not None:
                await client.close()

    def _status(self, store: Store, message_id: str, contact_id: int | None, status: str) -> None:
        contact = store.get_contact(contact_id) if contact_id else None
        self.h.events.emit("message.status", {
            "message_id": message_id,
            "contact": contact.name if contact else None,
            "status": status,
        })  # fmt: skip

    def drop_outbox_of(self, store: Store, contact_ids: set[int]) -> None:
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
                    self._status(store, message_id, contact_id, "failed")

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
                self._status(store, item.message_id, item.contact_id, "failed")

    @staticmethod
    def _retry_later(store: Store, item: OutboxItem, wait: float) -> int:
        retry_at = _ms() + int(wait * 1000)
        store.block_attempted(item.id, retry_at=retry_at)
        return retry_at

    def _deposited(self, item: OutboxItem) -> None:
        """The relay accepted ``item`` (its OK means stored). The outbox forgets it with the
        others accepted in the same pass, in one transaction (group commit): at the end of the
        pass, or sooner when many are waiting or a slow destination keeps the pass going (so
        their messages' "sent" does not wait for it). A crash before that resends it, and the
        recipient's ratchet drops the copy (a message number it has already used)."""
        self._accepted.append(item)
        if len(self._accepted) >= FORGET_BATCH:
            self._forget_accepted()
        elif self._forget_timer is None:
            self._forget_timer = asyncio.get_running_loop().call_later(
                FORGET_DELAY, self._forget_accepted
            )

    def _forget_accepted(self) -> None:
        if self._forget_timer is not None:
            self._forget_timer.cancel()
            self._forget_timer = None
        items, self._accepted = self._accepted, []
        store = self.h.store()
        if not items or store is None:  # locked meanwhile: resent after the unlock
            return
        with store.transaction():
            store.blocks_deposited([item.id for item in items])
            done: dict[str, int | None] = {}
            for item in items:
                if item.message_id is not None:
                    done.setdefault(item.message_id, item.contact_id)
            for message_id, contact_id in done.items():
                if (
                    store.get_message(message_id) is not None  # not deleted meanwhile
                    and not store.outbox_holds_message(message_id)
                    and store.set_message_status(message_id, "sent")
                ):
                    self._status(store, message_id, contact_id, "sent")

    def _deposit_refused(
        self,
        store: Store,
        item_id: int,
        contact_id: int | None,
        message_id: str | None,
        destination: bytes | None = None,
    ) -> None:
        """The relay refused a deposit for good (no such mailbox, or the token is not valid
        there: the relay gives one answer for both)."""
        contact = store.get_contact(contact_id) if contact_id is not None else None
        with store.transaction():
            store.block_deposited(item_id)  # drop it
            if contact_id is None and destination is not None:
                self.h.uncontacted_gone(store, destination)
            if contact is not None and self.h.renewal_refused(contact):
                return  # a renewal after a backup import: the contact and history stay
            state = ContactState.from_bytes(contact.state) if contact is not None else None
            if (
                contact is not None
                and state is not None
                and state.established
                and destination is not None
                and (state.send_to is None or destination != address_to_bytes(state.send_to))
            ):
                self._device_copy_refused(store, contact.id, message_id, destination)
                return
            if contact is not None and state is not None and not state.established:
                # The first contact went to an invitation that is used, revoked or expired, or
                # to an address that was rotated: the contact can never answer. Its mailbox
                # goes (at the relay too); the contact stays, marked failed with the reason,
                # until the user removes it or adds it again with a fresh link.
                self._settle_first_contact(contact.id, "refused")
                self.h.drop_contact_mailbox(store, contact.id)
                state.failed = LINK_NO_LONGER_VALID
                store.update_contact(contact.id, state=state.to_bytes())
                for m in store.history(contact.id, limit=10_000):
                    if m.direction == "out" and store.set_message_status(m.id, "failed"):
                        self.h.events.emit(
                            "message.status",
                            {"message_id": m.id, "contact": contact.name, "status": "failed"},
                        )
                store._q("DELETE FROM outbox WHERE contact_id = ?", (contact.id,))
                self.h.events.emit(
                    "contact.failed", {"contact": contact.name, "reason": LINK_NO_LONGER_VALID}
                )
                return
            if contact is not None:  # an established contact's mailbox is gone: were we
                self.h.contact_mailbox_gone()  # restored elsewhere? (messenger._on_refused)
            if (
                message_id is not None
                and store.get_message(message_id) is not None
                and store.set_message_status(message_id, "failed")
            ):
                self._status(store, message_id, contact_id if contact else None, "failed")

    def _device_copy_refused(
        self, store: Store, contact_id: int, message_id: str | None, destination: bytes
    ) -> None:
        """A copy for one of the contact's other devices was refused (its mailbox is gone: a
        device removed, a first contact to a mailbox that went): that device's failure only
        (docs/devices.md §5.4). Nothing more is deposited there; the message is sent if
        another copy went. No loss probe: our own mailboxes are not in question."""
        for ds in cd.device_sessions(store, contact_id):
            if ds.send_to == destination:
                cd.set_device_send_to(store, contact_id, ds.device_id, None)
        if (
            message_id is not None
            and store.get_message(message_id) is not None
            and not store.outbox_holds_message(message_id)
            and store.set_message_status(message_id, "sent")
        ):
            self._status(store, message_id, contact_id, "sent")

    def _relay_ttl(self) -> int:
        link = self.h.link()
        ttl = link.hello_ttl if link is not None else None
        return DEFAULT_TTL if ttl is None else ttl

    def _expire_undelivered(self, store: Store) -> None:
        """A message deposited longer ago than the relay keeps blocks, with no delivery receipt,
        expired at the relay undelivered. Slack covers the relay rounding expiries up (an hour
        by default) and receipt delays: ttl/10, at least 2 s, at most 3660 s."""
        ttl = self._relay_ttl()
        slack = min(3660, max(2, ttl // 10))
        for m in store.sent_before(_ms() - (ttl + slack) * 1000):
            if store.set_message_status(m.id, "expired"):
                self._status(store, m.id, m.contact_id, "expired")
