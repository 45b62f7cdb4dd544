"""Delete keys between one's own devices (docs/devices.md §6 "Delete keys", §7; payload 0x47,
docs/protocol.md §28.7).

- Sending: the delete capabilities of every mailbox this device owns (``mailboxes`` rows: the
  device mailbox, invitations, contacts', the sync mailboxes it made; the cover pool, whose
  mailboxes become contact mailboxes) go to each own device with a sync session: all of them
  once when a session is answered (``answered``, sealed in that session only), then what
  changed (made, rotated, renewed, deleted: ``check``) to every own device. The owner IDs sent
  are kept (table ``device_caps_sent``) so that a restart sends only what changed meanwhile.
  A change is noticed when the mailboxes are reloaded or one is made (``changed``, debounced),
  and at the latest after CHECK_EVERY seconds.
- Receiving (``taken``, from own_sync.py inside the receive's transaction, after the check that
  the sending device is listed): kept per device (table ``device_caps``, at most
  store.device_caps.HELD_PER_DEVICE), never an owner key. Refused: a URL that fails the
  peer-URL policy (but the profile's own relay), past MAX_RELAYS_PER_DEVICE relays other than
  the profile's, an owner ID of a mailbox of this device's or held for another device. Owner
  IDs removed are remembered (bounded), so an "added" arriving after its "removed" is not kept.
- A device leaving the own list, whoever removed it (``listed``, own_sync.py list_changed, and
  ``check`` for a list taken while this code did not run; ``retire_device`` for a removal made
  here): every capability held for it (link and sync) and the sync mailbox this device made
  for it (its owner key) go into the queue of mailboxes to delete (kept across restarts:
  renewal.py retire_due, at once when the removal is made here), then are forgotten. The
  remover may hold none of them; a DELETE for a mailbox gone already is answered `denied`,
  counted as deleted.

Nothing here logs a device ID, an owner ID or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from aegisd import droplog
from aegisd.aio import wait_event
from aegisd.core import devices as dv
from aegisd.core import sync as sy
from aegisd.relayurl import SETTING_URL, endpoint_key, same_relay
from aegisd.store import Store
from aegisd.store import cover as cover_slots
from aegisd.store import device_caps as held_caps
from aegisd.store import devices as store_devices
from aegisd.store import own_sync as sync_rows
from aegisd.store.devices import SETTING_DELETE_KEYS

from .context import ServiceContext
from .mailbox import DeleteCap, OwnedMailbox
from .mailboxes import Mailboxes
from .own_sync import OwnSync

#: Seconds between two looks at the mailboxes owned when nothing said they changed (some
#: paths drop one without a reload), and the wait that gathers a burst of changes into one.
CHECK_EVERY = 30.0
DEBOUNCE = 1.0
#: Relays other than the profile's that one device's delete keys may name: a removal dials
#: each, and the removed device must not choose many (docs/devices.md §7).
MAX_RELAYS_PER_DEVICE = 4

log = logging.getLogger("aegisd.device_caps")


def _now() -> int:
    return int(time.time())


class Retirer(Protocol):
    async def retire_due(self) -> None: ...


class DeviceCapsHost(Protocol):
    @property
    def ctx(self) -> ServiceContext: ...
    @property
    def store(self) -> Store: ...
    @property
    def lock(self) -> asyncio.Lock: ...
    @property
    def mailboxes(self) -> Mailboxes: ...
    @property
    def own_sync(self) -> OwnSync: ...
    @property
    def renewals(self) -> Retirer: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


#: The number of the last 0x47 this device sent (each payload takes the next: the receivers
#: order a mailbox's "added" and "removed" by it).
SETTING_SEQ = "devices.delete_keys_seq"
#: Owner IDs two own devices both claimed (hex, the newest MAX_CONTESTED): a listed device can
#: send another's owner ID with a seed of its own, first; neither keeps it, so that neither's
#: removal spends the other's mailbox on a false key (a `denied` counts as deleted).
SETTING_CONTESTED = "devices.delete_keys_contested"
MAX_CONTESTED = 1024


def _chunks(store: Store, added: list[sy.MailboxCap], removed: list[bytes]) -> list[bytes]:
    """The payloads (inside the caller's transaction: their numbers are taken)."""
    n = sy.MAX_CAPS_PER_PAYLOAD
    out = []
    seq = int(store.get_setting(SETTING_SEQ) or 0)
    for i in range(0, max(len(added), len(removed)), n):
        seq += 1
        payload = sy.DeleteKeys(tuple(added[i:i + n]), tuple(removed[i:i + n]), seq)
        out.append(sy.encode_sync_payload(payload))
    if out:
        store.set_setting(SETTING_SEQ, seq)
    return out


class DeviceCaps:
    def __init__(self, host: DeviceCapsHost) -> None:
        self.m = host
        self._wake = asyncio.Event()
        self._gone: set[bytes] = set()  # devices whose sync mailbox for us was found gone
        host.own_sync.answered_listeners.append(self.answered)
        host.own_sync.delete_keys_listeners.append(self.taken)
        host.own_sync.list_listeners.append(self.listed)
        host.mailboxes.change_listeners.append(self.changed)

    # --- sending ---------------------------------------------------------------------------

    def _current(self, store: Store) -> dict[bytes, sy.MailboxCap]:
        """This device's mailboxes with a delete key, by owner ID."""
        out = {}
        for row in [*store.list_mailboxes(), *cover_slots.pool_rows(store)]:
            mb = OwnedMailbox.from_bytes(row.descriptor)
            if mb.delete_seed and 0 < len(mb.relay_url.encode()) <= sy.MAX_CAP_URL_BYTES:
                out[mb.owner_id] = sy.MailboxCap(mb.relay_url, mb.owner_id, mb.delete_seed)
        return out

    def _others(self) -> frozenset[bytes] | None:
        """The other devices of the own list held; None before any link."""
        own = self.m.own_sync.own()
        return None if own is None else own[0].ids() - {own[1]}

    def check(self) -> int:
        """Send what changed in this device's mailboxes since the last check to every other
        own device (under the lock); queue the mailboxes of devices listed no more (a list
        taken while this code did not run). How many payloads were queued."""
        store = self.m.ctx.store
        own = None if store is None else self.m.own_sync.own()
        if store is not None and own is not None and self._unlisted(store, own[0]):
            with store.transaction():
                self.listed(own[0])
        others = None if own is None else own[0].ids() - {own[1]}
        if store is None or not others:
            return 0
        current, sent = self._current(store), held_caps.sent(store)
        added = [current[k] for k in sorted(current.keys() - sent)]
        removed = sorted(sent - current.keys())
        with store.transaction():
            payloads = _chunks(store, added, removed)
            for data in payloads:
                self.m.own_sync.send_payload(data)
            held_caps.set_sent(store, [c.owner_id for c in added], removed)
        return len(payloads)

    def answered(self, device_id: bytes) -> None:
        """A sync session with ``device_id`` was just answered (own_sync.py, inside its
        transaction, before what waits for the device is sealed): every capability goes to it."""
        store = self.m.store
        current = self._current(store)
        for data in _chunks(store, [current[k] for k in sorted(current)], []):
            sync_rows.wait_for_session(store, device_id, data, _now())
        self.changed()  # the others get what changed meanwhile

    def changed(self) -> None:
        """The mailboxes owned may have changed (mailboxes.py): a check soon."""
        self._wake.set()

    async def run(self) -> None:
        """The checks, while unlocked (messenger.py starts it at each unlock): one at once."""
        self._wake.set()
        while True:
            await wait_event(self._wake, CHECK_EVERY)
            await asyncio.sleep(DEBOUNCE)
            self._wake.clear()
            async with self.m.lock:
                try:
                    if self.m.ctx.store is not None:
                        self.check()
                except Exception as exc:  # the next check tries again; the loop must live on
                    log.warning("delete keys: a check failed (%s)", type(exc).__name__)

    # --- receiving -------------------------------------------------------------------------

    def taken(self, device_id: bytes, payload: sy.DeleteKeys) -> None:
        """A listed own device's 0x47 (own_sync.py, inside the receive's transaction)."""
        store = self.m.store
        own_url = str(store.get_setting(SETTING_URL) or "")
        # Owner IDs of this device's mailboxes: a removal of the sender must never delete
        # those. Held for another device (synced or given by the link): contested, dropped for
        # both and refused from anyone from then on (first come must not win).
        forbidden = set(self.m.mailboxes.owned)
        others: dict[bytes, bytes] = {o: d for d in held_caps.devices(store) if d != device_id
                                      for _, o, _ in held_caps.held(store, d)}  # fmt: skip
        for key, items in _link_caps(store).items():
            if key != device_id.hex():
                for item in items if isinstance(items, list) else []:
                    with contextlib.suppress(ValueError):
                        others.setdefault(DeleteCap.from_json(item).owner_id, b"")
        contested = [str(o) for o in store.get_setting(SETTING_CONTESTED) or []]
        relays = {endpoint_key(u) for u in held_caps.relays_held(store, device_id)
                  if not (own_url and same_relay(u, own_url))}  # fmt: skip
        caps, refused = [], 0
        for c in payload.added:
            if c.owner_id in others and c.owner_id.hex() not in contested:
                contested.append(c.owner_id.hex())
                if others[c.owner_id]:  # a synced one (a link's stays: the link proved it)
                    held_caps.forget(store, others[c.owner_id], c.owner_id)
            if c.owner_id in forbidden or c.owner_id.hex() in contested:
                refused += 1
                continue
            if not (own_url and same_relay(c.relay_url, own_url)):
                key = endpoint_key(c.relay_url)
                if not self.m.mailboxes.peer_url_ok(c.relay_url) or (
                        key not in relays and len(relays) >= MAX_RELAYS_PER_DEVICE):
                    refused += 1
                    continue
                relays.add(key)
            caps.append((c.relay_url, c.owner_id, c.delete_seed))
        store.set_setting(SETTING_CONTESTED, contested[-MAX_CONTESTED:] or None)
        if refused:
            droplog.dropped("refused delete keys an own device sent")
        held_caps.keep(store, device_id, caps, payload.seq, _now())
        held_caps.drop(store, device_id, list(payload.removed), payload.seq, _now())

    def count(self, device_id: bytes, from_link: list[Any] | None) -> int:
        """How many of ``device_id``'s mailboxes a removal here would delete with a delete key
        (devices.list): the link's capabilities (``from_link``, as stored) and the synced."""
        owners = {o for _, o, _ in held_caps.held(self.m.store, device_id)}
        for item in from_link or []:
            with contextlib.suppress(ValueError):
                owners.add(DeleteCap.from_json(item).owner_id)
        return len(owners)

    def sync_gone(self, store: Store, destination: bytes) -> None:
        """A sync deposit to ``destination`` was refused for good (delivery.py, inside its
        transaction): if it is an own device's sync mailbox for us, that device deleted it
        (it removed this device, or learnt that another did): event `devices.sync` `gone`,
        once per device while the daemon runs. Nothing else changes: the list says who is in."""
        for row in sync_rows.rows(store):
            if row.send_to == destination and row.device_id not in self._gone:
                self._gone.add(row.device_id)
                self.m.ctx.events.emit("devices.sync", {"device": row.device_id.hex(),
                                                        "state": "gone"})  # fmt: skip

    # --- a device leaving the list -------------------------------------------------------

    def _unlisted(self, store: Store, listed: dv.DeviceList) -> set[bytes]:
        """Devices not in ``listed`` that this device holds keys or a sync mailbox for."""
        ids = held_caps.devices(store) | {bytes.fromhex(k) for k in _link_caps(store)}
        ids |= {r.device_id for r in sync_rows.rows(store)
                if r.mailbox_id is not None and store.get_mailbox(r.mailbox_id) is not None}
        return ids - listed.ids()

    def listed(self, new: dv.DeviceList) -> None:
        """The own list changed (own_sync.py, inside the caller's transaction): what is held
        for the devices it dropped is queued for deletion (``retire_device``); deleted on a
        connection, the mailboxes owned reloaded after the commit."""
        store = self.m.store
        queued = [row for d in sorted(self._unlisted(store, new))
                  for row in self.retire_device(d)]  # fmt: skip
        if queued:
            self.m.spawn(self._after_retired())

    async def _after_retired(self) -> None:
        async with self.m.lock:
            if self.m.ctx.store is None:
                return
            self.m.mailboxes.reload()
        await self.m.renewals.retire_due()

    def retire_device(self, device_id: bytes) -> list[tuple[int, bytes]]:
        """``device_id`` leaves the list (inside the caller's transaction): the sync mailbox
        made here for it (the owner key), then its mailboxes whose delete keys this device
        holds (the link's and the synced) at the profile's relay, then at other relays, go
        into the queue of mailboxes to delete, and are forgotten. The queued rows (id,
        descriptor), in that order: a relay away must not hold up the rest. The caller
        reloads the mailboxes owned after the commit (the removal may still roll back)."""
        store = self.m.store
        link = _link_caps(store)
        caps = []
        for item in link.pop(device_id.hex(), []):
            with contextlib.suppress(ValueError):
                cap = DeleteCap.from_json(item)
                caps.append((cap.relay_url, cap.owner_id, cap.delete_seed))
        store.set_setting(SETTING_DELETE_KEYS, link or None)
        caps += held_caps.take(store, device_id)
        queued = []
        row = sync_rows.get(store, device_id)
        mailbox = None if row is None or row.mailbox_id is None else store.get_mailbox(
            row.mailbox_id)
        if mailbox is not None:
            # Ours: deleted with the owner key. What the removed device still deposits there
            # is refused by the relay, as into no mailbox. Queued first (retire_due goes in
            # the queue's order too).
            queued.append(store_devices.retire_mailbox(store, mailbox.descriptor))
            store.delete_mailbox(mailbox.id)
        return queued + queue_deletions(store, caps)


def _link_caps(store: Store) -> dict[str, list[Any]]:
    """The delete keys the link gave, by device ID (hex; devices.py)."""
    value = store.get_setting(SETTING_DELETE_KEYS)
    return dict(value) if isinstance(value, dict) else {}


Cap = tuple[str, bytes, bytes]  # relay URL, owner ID, delete seed


def queue_deletions(store: Store, caps: Iterable[Cap]) -> list[tuple[int, bytes]]:
    """Mailboxes of other devices to delete with their delete keys (relay URL, owner ID, seed),
    queued once each (inside the caller's transaction), those at the profile's relay first.
    The queued rows (id, descriptor)."""
    own = str(store.get_setting(SETTING_URL) or "")
    unique = {owner_id: (url, owner_id, seed) for url, owner_id, seed in caps}
    ordered = sorted(unique.values(), key=lambda c: (not (own and same_relay(c[0], own)),
                                                     endpoint_key(c[0]), c[1]))  # fmt: skip
    return [store_devices.retire_mailbox(store, DeleteCap(url, owner_id, seed)
                                         .as_mailbox().to_bytes())
            for url, owner_id, seed in ordered]  # fmt: skip
