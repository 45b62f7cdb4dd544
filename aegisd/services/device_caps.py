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
  store.device_caps.HELD_PER_DEVICE), never an owner key.
- A removal (``on_removed``, devices.py inside the removal's transaction): every capability held
  for the removed device and the sync mailbox this device made for it go into the queue of
  mailboxes to delete (kept across restarts; devices.py deletes them at once).

Nothing here logs a device ID, an owner ID or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aegisd.core import sync as sy
from aegisd.relayurl import SETTING_URL, same_relay
from aegisd.store import Store
from aegisd.store import cover as cover_slots
from aegisd.store import device_caps as held_caps
from aegisd.store import devices as store_devices
from aegisd.store import own_sync as sync_rows

from .context import ServiceContext
from .mailbox import DeleteCap, OwnedMailbox
from .mailboxes import Mailboxes
from .own_sync import OwnSync

#: Seconds between two looks at the mailboxes owned when nothing said they changed (some
#: paths drop one without a reload), and the wait that gathers a burst of changes into one.
CHECK_EVERY = 30.0
DEBOUNCE = 1.0


def _now() -> int:
    return int(time.time())


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
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def _chunks(added: list[sy.MailboxCap], removed: list[bytes]) -> list[bytes]:
    n = sy.MAX_CAPS_PER_PAYLOAD
    out = []
    for i in range(0, max(len(added), len(removed)), n):
        payload = sy.DeleteKeys(tuple(added[i:i + n]), tuple(removed[i:i + n]))
        out.append(sy.encode_sync_payload(payload))
    return out


class DeviceCaps:
    def __init__(self, host: DeviceCapsHost) -> None:
        self.m = host
        self._wake = asyncio.Event()
        host.own_sync.on_answered = self.answered
        host.own_sync.on_delete_keys = self.taken
        host.mailboxes.on_change = self.changed

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
        own device (under the lock); forget capabilities held for devices listed no more. How
        many payloads were queued."""
        store = self.m.ctx.store
        others = None if store is None else self._others()
        if store is None or not others:
            return 0
        current, sent = self._current(store), held_caps.sent(store)
        added = [current[k] for k in sorted(current.keys() - sent)]
        removed = sorted(sent - current.keys())
        payloads = _chunks(added, removed)
        with store.transaction():
            held_caps.forget_others(store, others)
            for data in payloads:
                self.m.own_sync.send_payload(data)
            held_caps.set_sent(store, [c.owner_id for c in added], removed)
        return len(payloads)

    def answered(self, device_id: bytes) -> None:
        """A sync session with ``device_id`` was just answered (own_sync.py, inside its
        transaction, before what waits for the device is sealed): every capability goes to it."""
        store = self.m.store
        current = self._current(store)
        for data in _chunks([current[k] for k in sorted(current)], []):
            sync_rows.wait_for_session(store, device_id, data, _now())
        self.changed()  # the others get what changed meanwhile

    def changed(self) -> None:
        """The mailboxes owned may have changed (mailboxes.py): a check soon."""
        self._wake.set()

    async def run(self) -> None:
        """The checks, while unlocked (messenger.py starts it at each unlock): one at once."""
        self._wake.set()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_EVERY)
            await asyncio.sleep(DEBOUNCE)
            self._wake.clear()
            async with self.m.lock:
                if self.m.ctx.store is not None:
                    self.check()

    # --- receiving -------------------------------------------------------------------------

    def taken(self, device_id: bytes, payload: sy.DeleteKeys) -> None:
        """A listed own device's 0x47 (own_sync.py, inside the receive's transaction)."""
        store = self.m.store
        caps = [(c.relay_url, c.owner_id, c.delete_seed) for c in payload.added]
        held_caps.keep(store, device_id, caps, _now())
        held_caps.drop(store, device_id, list(payload.removed))

    def count(self, device_id: bytes, from_link: list[Any] | None) -> int:
        """How many of ``device_id``'s mailboxes a removal here would delete with a delete key
        (devices.list): the link's capabilities (``from_link``, as stored) and the synced."""
        owners = {o for _, o, _ in held_caps.held(self.m.store, device_id)}
        for item in from_link or []:
            with contextlib.suppress(ValueError):
                owners.add(DeleteCap.from_json(item).owner_id)
        return len(owners)

    # --- removal ---------------------------------------------------------------------------

    def on_removed(self, device_id: bytes,
                   queued_already: list[DeleteCap]) -> list[tuple[int, bytes]]:  # fmt: skip
        """``device_id`` was removed here (inside the removal's transaction): its mailboxes
        whose capabilities this device holds (but those the link gave, ``queued_already``)
        and the sync mailbox made here for it go into the queue of mailboxes to delete. The
        queued rows (id, descriptor)."""
        store = self.m.store
        skip = {c.owner_id for c in queued_already}
        own = str(store.get_setting(SETTING_URL) or "")
        # The profile's relay first: the deletions stop at the first relay away, and a URL
        # the removed device chose must not hold up the others.
        caps = sorted((c for c in held_caps.take(store, device_id) if c[1] not in skip),
                      key=lambda c: not (own and same_relay(c[0], own)))  # fmt: skip
        queued = [store_devices.retire_mailbox(store, DeleteCap(url, owner_id, seed)
                                               .as_mailbox().to_bytes())
                  for url, owner_id, seed in caps]  # fmt: skip
        row = sync_rows.get(store, device_id)
        mailbox = None if row is None or row.mailbox_id is None else store.get_mailbox(
            row.mailbox_id)
        if mailbox is not None:
            # Ours: deleted with the owner key. What the removed device still deposits there
            # is refused by the relay, as into no mailbox.
            queued.insert(0, store_devices.retire_mailbox(store, mailbox.descriptor))
            store.delete_mailbox(mailbox.id)
            self.m.mailboxes.owned.pop(OwnedMailbox.from_bytes(mailbox.descriptor).owner_id,
                                       None)  # fmt: skip
        return queued
