"""Messaging: the protocol core, the store and the relay link put together.

``Messenger`` is the facade the API, calls, backups and tests hold: it owns the protocol
lock, the identity and its prekeys, the life cycle (unlock, lock, the maintenance loop) and
the one-to-one sends (texts, read marks, call signaling), and it holds the parts that do the
rest (the module map is in aegisd/services/__init__.py): ``mailboxes``, ``address``,
``contacts``, ``delivery``, ``inbox``, ``rotation``, ``loss``, ``groups``, ``actions``, and the
``attachments``, ``renewals`` and ``cover`` services. Each part takes the messenger through a
small Protocol of its own module (no part imports this module).

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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import sqlcipher3

from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair, new_address
from aegisd.core.prekeys import PrekeyStore
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.store import Store, StoreError
from aegisd.store.contact_devices import ROW_DEVICE
from aegisd.transport.network import Network
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayError

from .actions import Actions
from .address import Address
from .attachments import Attachments
from .contacts import Contacts
from .delivery import Delivery, DeliveryHooks, Recipient
from .device_caps import DeviceCaps
from .disappearing import Disappearing
from .fanout import Fanout
from .first_contacts import FirstContacts
from .group_logs import GroupLogs
from .groups import Groups
from .groups_state import SETTING_READ_RECEIPTS
from .inbox import STALE_FRAGMENTS_MS, CallsView, Inbox
from .mailbox import ContactState
from .mailbox_loss import SETTING_LAST_REACHED, MailboxLoss
from .mailboxes import Mailboxes
from .own_sync import OwnSync
from .own_sync_actions import OwnSyncActions
from .own_sync_groups import OwnSyncGroups
from .own_sync_settings import OwnSyncSettings
from .rotation import Rotation
from .typing_indicators import Typing

if TYPE_CHECKING:
    from .context import ServiceContext

log = logging.getLogger("aegisd.messenger")

SETTING_ADDRESS = "profile.address"

MAINTENANCE_INTERVAL = 3600.0
#: How often a search index a deletion or an edit touched is rebuilt, the bound on how long
#: a deleted word can stay in FTS5's ``%_idx`` (docs/threat-model.md §4.8). A rebuild and
#: its checkpoint took 0.12 s for 20,000 messages and 1.2 s for 200,000 (bench/search_index.py,
#: figures in the threat model); lock and stop rebuild first in any case (Store.close).
SEARCH_REBUILD_INTERVAL = 30.0
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
        #: Call signaling's receiver: the calls service sets itself here (calls/api.py).
        self.calls: CallsView | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.mailboxes = Mailboxes(self)  # the mailboxes we own and the relay link
        self.address = Address(self)  # the public address, its prekeys, the invitations
        self.contacts = Contacts(self)  # contacts and contact requests
        # Mailboxes the relay no longer has: restored elsewhere, lost, expired while away.
        self.loss = MailboxLoss(self)
        self.rotation = Rotation(self)  # mailbox rotation and relay moves (rotation.py)
        self.inbox = Inbox(self)  # every block delivered to a mailbox of ours (inbox.py)
        self.attachments = Attachments(self)
        self.typing = Typing(self)  # typing indicators (typing_indicators.py, §22.6)
        self.group_logs = GroupLogs()  # parsed once per change: conversations.list, search
        self.disappearing = Disappearing(self)  # conversation timers, erasure (§27)
        self.groups = Groups(self)  # groups over pairwise sessions (groups.py, §25)
        self.actions = Actions(self)  # replies, reactions, edits, deletions (actions.py, §26)
        self.fanout = Fanout(self)  # contacts' device lists and device sessions (fanout.py)
        self.own_sync = OwnSync(self)  # sync with this profile's other devices (own_sync.py)
        self.sync_groups = OwnSyncGroups(self)  # groups over that sync (own_sync_groups.py)
        # What else goes to them: actions and files (0x48), the profile's settings (0x49).
        self.sync_actions = OwnSyncActions(self, self.own_sync.send)
        self.sync_settings = OwnSyncSettings(self, self.own_sync.send, self.own_sync.self_id)
        self.device_caps = DeviceCaps(self)  # delete keys to and from them (device_caps.py)
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
            superseded=self.loss.superseded,
            cover_active=lambda: self.cover.active(),
            renewal_refused=lambda c: self.renewals.on_refused(c),
            drop_contact_mailbox=self.mailboxes.drop_contact_mailbox,
            contact_mailbox_gone=lambda: self._spawn(self.loss.probe_address()),
            uncontacted_gone=lambda store, dest: self.device_caps.sync_gone(store, dest),
        ))  # fmt: skip

    # --- life cycle -----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        store = self.ctx.store
        if store is None:
            raise RuntimeError("store is locked")
        return store

    @property
    def first_contacts(self) -> FirstContacts:
        """The address's first contacts (inbox.py's): own_sync_groups.py's adoptions."""
        return self.inbox.first_contacts

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
        self.loss.reached_before = int(reached) if reached is not None else None
        self.mailboxes.reload()
        self.mailboxes.start_link()
        self._tasks = [
            asyncio.create_task(self.delivery.run(), name="outbox"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._search_rebuild_loop(), name="search-rebuild"),
            asyncio.create_task(self.address.prekey_loop(), name="prekeys"),
            # First of all it erases what expired while the daemon was stopped or locked.
            asyncio.create_task(self.disappearing.run(), name="disappearing"),
            asyncio.create_task(self.device_caps.run(), name="device-caps"),
        ]
        if not self.loss.superseded():  # cover for contacts that moved on to a restored copy: no
            self.cover.start()
        await self.attachments.on_unlock()
        self.spawn(self.fanout.resend())  # a device list the contacts have not acknowledged
        self.spawn(self.fanout.open_all())  # sessions with contacts' devices not opened yet
        self.spawn(self.own_sync.ensure())  # sync sessions with own devices not opened yet
        self.spawn(self.sync_groups.adopt_pending())  # member sessions a group's state named

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
        self.groups.pruner.on_lock()  # its tasks were cancelled above
        await self.mailboxes.stop_link()
        await self.mailboxes.stop_drains()
        async with self.lock:
            self.prekeys = None
            self.group_logs.clear()
            self.mailboxes.owned.clear()
            self.loss.denied.clear()
            self.loss.relay_lost = None

    def _link_ended(self) -> None:
        """The relay link was stopped (it reports no down then): not connected any more."""
        self.ctx.relay_connected = False
        self.groups.pruner.link_ended()

    def _on_relay_state(self, up: bool, reason: str | None) -> None:
        was = self.ctx.relay_connected
        first_failure = not up and self.mailboxes.relay_reason == "connecting"
        self.ctx.relay_connected = up
        self.groups.pruner.relay_state(up)
        self.mailboxes.relay_reason = reason
        if self.ctx.store is not None and (up or was):
            # Connected now, or until now: the relay saw our subscriptions (they count as use).
            now = _ms()
            self.ctx.store.set_setting(SETTING_LAST_REACHED, now)
            if not up:
                self.loss.reached_before, self.loss.renewing = now, set()
        if not up:
            self.loss.denied.clear()  # the evidence of one connection (mailbox_loss.py)
        if (up != was or first_failure) and self.ctx.store is not None:
            self.ctx.events.emit("relay.up" if up else "relay.down", {"reason": reason})
        if up:
            if self.ctx.store is not None:
                self.ctx.store.retry_failed_now()  # they failed because of the outage
            self.delivery.wake()
            self._spawn(self._after_connect())

    # --- a copy of the profile restored elsewhere (mailbox_loss.py) -------------------------

    def superseded(self) -> str | None:
        """Why this copy of the profile is out of use (restored on another device), or None."""
        return self.loss.superseded()

    def check_usable(self) -> None:
        self.loss.check_usable()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that on_lock cancels; finished ones are forgotten. Public: the
        groups service starts its tasks through it (GroupsHost)."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(coro))

    _spawn = spawn  # the older services' hosts still name it so

    async def _after_connect(self) -> None:
        connection = self.groups.pruner.connection()  # the one these steps run on
        if self.loss.superseded():
            return  # every relay call would be refused: the mailboxes are gone
        try:
            await self.address.ensure()
            await self.address.replenish_prekeys(republish=True)
            await self.address.expire_invitations()
            await self.rotation.finish_acked()
            await self.rotation.rotate_due()
            await self.renewals.resume()
            # A deletion that fails never holds up the move (a relay away is skipped in it).
            with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                await self.renewals.retire_due()
            await self.rotation.continue_move()
        except (*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            pass  # the next connection tries again
        if self.ctx.store is not None:
            self.groups.pruner.connected(connection)  # departed group contacts: it read them

    # --- the identity and its prekeys (published by address.py) ---------------------------

    def identity(self) -> IdentityKeyPair:
        if self.prekeys is None:
            raise RuntimeError("store is locked")
        return self.prekeys.identity

    def _reload_prekeys(self) -> None:
        """After a receive that did not commit: the prekeys as stored (what it changed in
        memory, one-time keys it used, is undone)."""
        state = self.store.get_identity()
        if state is not None:
            self.prekeys = PrekeyStore.from_bytes(state)

    # --- sending ----------------------------------------------------------------------------

    async def send_text(self, name: str, text: str) -> dict[str, Any]:
        if len(text.encode()) > wire.MAX_TEXT_BYTES:
            raise AppError(
                E_TOO_LARGE, "too_large", f"a message holds at most {wire.MAX_TEXT_BYTES} bytes"
            )
        self.loss.check_usable()
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
                self.own_sync.sent(c, wire_id, payload.sent_at_ms, text)  # a sent transcript
        self.delivery.wake()
        self.disappearing.wake()  # its deadline, if the conversation has a timer
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
                self.own_sync.read(c, incoming[-1].id)  # read on one device: on all (§6)
                blob = self.store.get_session(c.id)
                if self.store.get_setting(SETTING_READ_RECEIPTS, True) and blob and not c.blocked:
                    ids = [bytes.fromhex(m.id) for m in incoming]
                    recipient = Recipient(c, Session.from_bytes(blob))
                    self.delivery.queue_receipt(recipient, wire.RECEIPT_READ, ids)
        self.delivery.wake()
        self.disappearing.wake()  # read: their timers, if any, run from now
        return {"marked": len(incoming)}

    def _prune_events(self) -> None:
        """Events older than `events.retention_days` (default 30) go: clients that reconnect
        later than that are told of the gap by events.subscribe and read messages.history."""
        days = float(self.store.get_setting(SETTING_EVENT_RETENTION, EVENT_RETENTION_DAYS))
        self.store.prune_events_before(_ms() - int(days * 86_400_000))

    async def _search_rebuild_loop(self) -> None:
        while True:
            await asyncio.sleep(SEARCH_REBUILD_INTERVAL)
            store = self.ctx.store
            # An error (a full disk, a damaged index) must not end the loop: logged without
            # any text, tried again at the next round.
            try:
                if store is not None and store.search_dirty():
                    store.rebuild_dirty_search()
            except (sqlcipher3.Error, StoreError) as exc:
                log.warning("rebuilding the search index failed (%s); trying again later",
                            type(exc).__name__)  # fmt: skip

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.ctx.store is not None:
                self.store.delete_stale_fragments(_ms() - STALE_FRAGMENTS_MS)
                self._prune_events()
                self.actions.prune_held()
                self.groups.actions.prune_held()
                if self.ctx.relay_connected:
                    self.store.set_setting(SETTING_LAST_REACHED, _ms())
            # Each step on its own: one that raises (the relay down) does not skip the others.
            steps: list[Callable[[], Awaitable[None]]] = [
                self.address.replenish_prekeys, self.address.expire_invitations,
                self.rotation.rotate_due,
                self._continue_move,  # contacts that answered since, the bound
                self.groups.inbound.retry_intros,  # introductions that failed (bounded)
                self.sync_groups.adopt_pending,  # adoptions the relay failed (own_sync_groups)
                self._sweep_departed,  # departed group contacts past their deadline
            ]  # fmt: skip
            for step in steps:
                with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
                    await step()

    async def _continue_move(self) -> None:
        if not self.loss.superseded():
            await self.rotation.continue_move()

    async def _sweep_departed(self) -> None:
        if self.ctx.store is not None:
            self.groups.pruner.sweep()

    async def send_call_payload(
        self, contact_id: int, payload: wire.Payload, to: Sequence[bytes] | None = None
    ) -> list[bytes]:
        """Call signaling leaves at once: no send jitter and no receipt delay (a call cannot
        wait), in ordinary blocks through the ordinary outbox (docs/threat-model.md: what the
        timing of a call reveals). ``to``: the sessions to send in, each ``ROW_DEVICE`` (the
        contact's session row) or the ID of one of its other devices, each once (a repeat is
        dropped); None: the row and every device that answered (an INVITE). Returns those it
        went in (docs/devices.md §9)."""
        self.loss.check_usable()
        async with self.lock:
            c = self.store.get_contact(contact_id)
            blob = self.store.get_session(contact_id) if c is not None else None
            if c is None or blob is None or not ContactState.from_bytes(c.state).established:
                raise AppError(E_NOT_READY, "not_ready", "this contact cannot be reached yet")
            with self.store.transaction():
                # Each session once: two encryptions from one loaded copy would reuse its key.
                targets = list(dict.fromkeys(
                    [ROW_DEVICE, *self.delivery.answered_devices(c.id)] if to is None else to
                ))  # fmt: skip
                went: list[bytes] = []
                for device in targets:
                    if device == ROW_DEVICE:
                        self.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload,
                                              slotted=False, devices=False)  # fmt: skip
                        went.append(device)
                    elif self.delivery.enqueue_device(c.id, device, payload):
                        went.append(device)
        self.delivery.wake()
        return went
