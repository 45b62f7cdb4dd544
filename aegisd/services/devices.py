"""Several devices per person, as far as the daemon goes today (docs/devices.md §4, §7):
linking a new device to this profile (`devices.link`, the existing device E) or this fresh
profile to an existing one (`devices.join`, the new device N), the confirmation code both
screens show (`devices.confirm` on each), the signed device list (`devices.list`) and
`devices.remove`.

The link's messages run over mailboxes of their own on the link's relay, on a connection of
their own (not the profile's receiving link): the link mailbox (E's, made with a send token and
never stored: a restart voids the link, as the core's LinkOffer is in memory only) and N's
reply mailbox. Both are polled with FETCH and deleted at the relay when the link ends.

What the new device receives (`P.profile`, docs/devices.md §4.2): the backup format's contents
(docs/backup.md §2) with the display name, the settings that are the profile's, and every
established contact (name, identity, verified, blocked) with no messages, no mailboxes and no
`send_to`: the sessions and mailboxes are per device, and the fan-out that would open them is
not built yet, so the new device knows its contacts but cannot write to them yet.

Nothing here logs a link, a code, a key or a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core import primitives as p
from aegisd.core import wire
from aegisd.core.errors import DecodeError, DecryptionError, ProtocolError, StateError
from aegisd.core.identity import PublicIdentity
from aegisd.core.prekeys import PrekeyStore
from aegisd.relayurl import SETTING_URL, same_relay
from aegisd.rpc import AppError, CallContext, InvalidParamsError, Registry
from aegisd.rpc import errors as E
from aegisd.store import devices as store_devices
from aegisd.store import groups as G
from aegisd.store.devices import (
    SETTING_DELETE_KEYS,
    SETTING_KEY,
    SETTING_LINK_MB,
    SETTING_MAX_LINKED,
    SETTING_SELF,
    SETTING_UNCONFIRMED,
)
from aegisd.store.devices import SETTING_OWN_LIST as SETTING_LIST
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable, with_relay
from relay.client import RelayClient, RelayError

from . import linked_groups
from .backup import RESTORABLE, SETTING_TIMERS
from .contacts import SETTING_NAME
from .mailbox import (
    ContactState,
    DeleteCap,
    OwnedMailbox,
    box_public,
    caps_from_bytes,
    caps_to_bytes,
    delete_public,
    new_delete_seed,
    new_keys,
)
from .messenger import Messenger
from .names import clean_name

log = logging.getLogger("aegisd.devices")

# Application error codes 1090-1099 (docs/api.md, "Errors").
E_DEVICE_LINK = 1090
E_LINK_EXPIRED = 1091
E_LINK_STATE = 1092
E_TOO_MANY_DEVICES = 1093
E_JOIN_NOT_FRESH = 1094
E_NO_SUCH_DEVICE = 1095

# The device settings' names: aegisd/store/devices.py owns them. A link's profile carries
# SETTING_DELETE_KEYS always (`{}` when E has none): the marker that E reads N's "installed".
MAX_LINK_MAILBOXES = 16  # a bound on the link mailboxes: one link at a time makes at most 3
MAX_CAPS_PER_DEVICE = 16  # capabilities taken from one device (hostile input: bounded)
POLL = 0.25  # seconds between two FETCHes of a link's mailbox
TTL_MIN = 10
#: Settings the new device does not take: the network is the machine's own choice.
NOT_CARRIED = ("network.proxy", "network.isolation", SETTING_TIMERS)
NOT_INSTALLED = "the new device did not say it installed the profile: it is not listed"
UNCONFIRMED = ("the device in use did not confirm that it lists this device: see aegis device "
               "list there (if this device is missing, remove this profile and link again)")
INSTALLED_WAIT = 15  # seconds N's "installed" deposit may take, past every cancel
LOCK_SLACK = 5  # seconds a lock also gives the install (local: one transaction) before that
RELAY_SLOW = "the relay did not answer in time"


def _joined_caps(offer: dv.LinkOffer) -> tuple[bytes, list[DeleteCap]]:
    """The device N's "installed" just listed, and the delete capabilities it carried (none
    if malformed: N is listed all the same, only its mailboxes cannot be deleted from here)."""
    entry = offer.joined
    assert entry is not None  # receive_installed succeeded
    try:
        return entry.device_id, caps_from_bytes(offer.installed_extra, MAX_CAPS_PER_DEVICE)
    except ValueError:
        return entry.device_id, []


def _profile_caps(
    contents: fmt.BackupContents, listed: dv.DeviceList, me: bytes
) -> list[tuple[bytes, list[DeleteCap]]]:
    """E's delete capabilities from the profile: only for devices of the list, never this
    one; a malformed value is ignored (the link goes on: they only serve a later removal)."""
    out = []
    for name, value in contents.settings:
        if name != SETTING_DELETE_KEYS:
            continue
        try:
            doc = json.loads(value)
            if not isinstance(doc, dict):
                continue
            for key, items in list(doc.items())[:dv.MAX_DEVICES]:
                device_id = bytes.fromhex(key)
                if device_id == me or listed.entry(device_id) is None:
                    continue
                out.append((device_id, caps_from_bytes(json.dumps(items).encode(),
                                                       MAX_CAPS_PER_DEVICE)))  # fmt: skip
        except (ValueError, TypeError):
            continue
    return out


def _now() -> int:
    return int(time.time())


def _ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Link:
    """One link under way, on either side."""

    role: str  # "offer" (E) or "join" (N)
    expires: int
    # waiting, code, confirmed, installing (N), listing (N), done, declined, expired, failed
    state: str = "waiting"
    code: str | None = None  # on E never shown: its user types the code N shows
    reason: str | None = None
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # Seconds past `expires` the run still waits: N for E's final (then its "listed"), E for
    # N's "installed" once the final left (docs/devices.md §4.3).
    grace: int = 0
    installed: asyncio.Event = field(default_factory=asyncio.Event)  # N: "installed" was tried

    def view(self) -> dict[str, Any]:
        code = self.code if self.role == "join" else None
        return {"role": self.role, "state": self.state, "code": code,
                "expires": self.expires, "reason": self.reason}  # fmt: skip


class Devices:
    def __init__(self, messenger: Messenger) -> None:
        self.m = messenger
        self.link: _Link | None = None

    # --- the device list ------------------------------------------------------------------

    def self_id(self) -> bytes:
        value = self.m.store.get_setting(SETTING_SELF)
        if value is None:
            device_id = dv.new_device_id(self.m.entropy)
            self.m.store.set_setting(SETTING_SELF, device_id.hex())
            return device_id
        return bytes.fromhex(str(value))

    def device_key(self) -> bytes:
        """This device's public device key (docs/devices.md: its hellos and bundle prove it);
        drawn on first need, kept in the store, never in a link's profile or a backup."""
        value = self.m.store.get_setting(SETTING_KEY)
        if value is None:
            priv, pub = dv.new_device_key(self.m.entropy)
            self.m.store.set_setting(SETTING_KEY, priv.hex())
            return pub
        return _ed_public(bytes.fromhex(str(value)))

    def device_private(self) -> bytes:
        """This device's device key, raw private: what signs its hellos (never sent)."""
        self.device_key()
        return bytes.fromhex(str(self.m.store.get_setting(SETTING_KEY)))

    def held(self) -> dv.DeviceList | None:
        value = self.m.store.get_setting(SETTING_LIST)
        return None if value is None else dv.DeviceList.from_bytes(bytes.fromhex(str(value)))

    def _store_list(self, device_list: dv.DeviceList) -> None:
        self.m.store.set_setting(SETTING_LIST, device_list.to_bytes().hex())
        self.m.own_sync.list_changed(device_list)  # sync sessions follow the list (own_sync.py)

    async def _entry(self) -> dv.DeviceEntry:
        """This device in a list: its address mailbox is its device mailbox (§3.1)."""
        _, mb = await self.m.address.ensure()
        return self._entry_for(mb)

    def _entry_for(self, mb: OwnedMailbox) -> dv.DeviceEntry:
        return dv.DeviceEntry(
            self.self_id(), mb.address(), mb.deposit_id, _now(), self.device_key()
        )

    async def own_list(self) -> dv.DeviceList:
        """The list held; a profile that never linked signs version 1 with itself."""
        current = self.held()
        if current is not None:
            return current
        entry = await self._entry()
        async with self.m.lock:
            current = self.held()
            if current is None:
                version = dv.next_version(None, _now())
                current = dv.DeviceList.sign(self.m.identity(), version, [entry])
                self._store_list(current)
            return current

    def list_view(self) -> dict[str, Any]:
        current = self.held()
        me = self.m.store.get_setting(SETTING_SELF)
        if current is None:  # one device, that never linked: itself
            return {
                "version": 0,
                "unconfirmed": False,
                "devices": [{"id": me or "", "this_device": True, "added_at": None, "relay": None,
                             "delete_keys": 0}],
            }
        unconfirmed = bool(self.m.store.get_setting(SETTING_UNCONFIRMED))
        caps = self._caps()
        return {"version": current.version, "unconfirmed": unconfirmed, "devices": [
            {"id": d.device_id.hex(), "this_device": d.device_id.hex() == me,
             "added_at": d.added_at, "relay": d.mailbox.relay_url,
             "delete_keys": self.m.device_caps.count(d.device_id, caps.get(d.device_id.hex()))}
            for d in current.devices]}  # fmt: skip

    def confirm_listed(self) -> dict[str, Any]:
        """The user saw this device in the list of the device in use (`aegis device list`
        there): `unconfirmed` is a false alarm, dismissed. Nothing is sent or checked: only
        the user can see the other device's list today (docs/devices.md §4.3)."""
        if self.held() is None:
            raise AppError(E_NO_SUCH_DEVICE, "not_found", "this device never joined by a link")
        self.m.store.set_setting(SETTING_UNCONFIRMED, None)
        return self.list_view()

    async def remove(self, device_id: str) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(device_id)
        except ValueError:
            raise InvalidParamsError("id", "must be a device ID (32 hex digits)") from None
        async with self.m.lock:
            current = self.held()
            if current is None or current.entry(raw) is None:
                raise AppError(E_NO_SUCH_DEVICE, "not_found", "no such device in the list")
            if raw == self.self_id():
                raise AppError(
                    E_NO_SUCH_DEVICE,
                    "this_device",
                    "this device cannot remove itself: remove it from another one",
                )
            kept = [d for d in current.devices if d.device_id != raw]
            new = dv.DeviceList.sign(self.m.identity(), dv.next_version(current, _now()), kept)
            # Its mailboxes this device holds delete keys for go into the queue of mailboxes
            # to delete (kept across restarts) in the list's own transaction; deleted at once
            # below, or on the next connection if the relay is away (docs/devices.md §7).
            with self.m.store.transaction():
                self._store_list(new)
                caps = self._take_caps(raw)
                queued = [store_devices.retire_mailbox(self.m.store, c.as_mailbox().to_bytes())
                          for c in caps]  # fmt: skip
                queued += self.m.device_caps.on_removed(raw, caps)  # synced ones, its sync box
                # The contacts learn of it and drop their sessions with it (docs/devices.md §5.3).
                told = self.m.fanout.send_list(new, self.self_id(), self.device_private())
        deleted, refused = await self._delete_now(queued)
        return {"version": new.version, "devices": len(new.devices),
                "mailboxes_deleted": deleted, "mailboxes_refused": refused,
                "mailboxes_queued": len(queued) - deleted - refused,
                "contacts_told": told}  # fmt: skip

    async def _delete_now(self, queued: list[tuple[int, bytes]]) -> tuple[int, int]:
        """Delete queued mailboxes at their relay now, in order: how many are gone and how
        many are on a relay the URL policy refuses. A row (with its delete key) leaves the
        queue only once its mailbox is gone; the first relay away or saying "not now" leaves
        the rest queued (renewal.py retire_due takes them on the next connection), a refused
        URL stays queued (for when the policy allows it) and the next is tried."""
        done = refused = 0
        for row_id, descriptor in queued:
            result = await self.m.renewals.relay_delete(OwnedMailbox.from_bytes(descriptor))
            if result == "away":
                break
            if result == "refused":
                refused += 1
                continue
            with contextlib.suppress(Exception):  # locked meanwhile: retire_due deletes again
                store_devices.unretire_mailbox(self.m.store, row_id)
            done += 1
        return done, refused

    # --- delete keys (docs/devices.md §6) -------------------------------------------------

    def _caps(self) -> dict[str, list[Any]]:
        value = self.m.store.get_setting(SETTING_DELETE_KEYS)
        return dict(value) if isinstance(value, dict) else {}

    def _take_caps(self, device_id: bytes) -> list[DeleteCap]:
        """The delete capabilities held for a device, dropped from the store (in the caller's
        transaction)."""
        held = self._caps()
        mine = held.pop(device_id.hex(), [])
        self.m.store.set_setting(SETTING_DELETE_KEYS, held or None)
        out = []
        for item in mine:
            with contextlib.suppress(ValueError):
                out.append(DeleteCap.from_json(item))
        return out

    def _keep_caps(self, device_id: bytes, caps: list[DeleteCap]) -> None:
        """Store the delete capabilities a device gave for its mailboxes (replacing the ones
        it gave before)."""
        if not caps:
            return
        held = self._caps()
        held[device_id.hex()] = [c.to_json() for c in caps[:MAX_CAPS_PER_DEVICE]]
        self.m.store.set_setting(SETTING_DELETE_KEYS, held)

    def _own_caps(self, current: dv.DeviceList) -> list[DeleteCap]:
        """This device's delete capability for its device mailbox (the one the list names),
        if that mailbox has a delete key (one made before delete keys has none)."""
        entry = current.entry(self.self_id())
        if entry is None:
            return []
        for _, mb in self.m.mailboxes.owned.values():
            if mb.deposit_id == entry.mailbox.deposit_id:
                cap = mb.delete_cap()
                return [] if cap is None else [cap]
        return []

    # --- common ---------------------------------------------------------------------------

    def _pending(self) -> _Link | None:
        link = self.link
        if link is not None and link.state in ("installing", "listing"):
            return link  # installed or installing: its own task ends it done
        if link is not None and link.state in ("waiting", "code", "confirmed"):
            if _now() >= link.expires + link.grace:
                link.state = "expired"
                link.reason = _expired_reason(link)
                return None
            return link
        return None

    def _emit(self, link: _Link) -> None:
        # Live: a link's state and code never reach the disk (docs/api.md, "Live events").
        # While locked there is nobody to tell (on_lock ends the link first).
        with contextlib.suppress(RuntimeError):
            self.m.ctx.events.emit_live("devices.link", link.view())

    def _set(self, link: _Link, state: str, reason: str | None = None) -> None:
        link.state, link.reason = state, reason
        self._emit(link)

    async def _client(self, url: str) -> RelayClient:
        try:
            client, _ = await with_relay(url, None, self.m.ctx.network())
        except (*UNAVAILABLE, RelayUnavailable):
            raise E.relay_unavailable() from None
        return client

    async def _make_mailbox(self, client: RelayClient, url: str) -> OwnedMailbox:
        """A private mailbox of the link's own (with its proof of work), never stored."""
        sign_seed, box_secret = new_keys()
        # A delete key nobody is given: so the relay cannot tell a link's mailboxes from the
        # profile's other mailboxes by its absence.
        delete_seed = new_delete_seed()
        token = self.m.entropy.random(32)
        key = OwnedMailbox(url, sign_seed, b"", b"", b"", b"", b"").signing_key
        try:
            made = await client.create(key, box_public(box_secret),
                                       delete_pub=delete_public(delete_seed))  # fmt: skip
            mb = OwnedMailbox(url, sign_seed, box_secret, made.owner_id, made.deposit_id,
                              made.relay_box_pub, token, delete_seed)  # fmt: skip
            self._remember_link_mailbox(mb.to_bytes())
            await client.token_add(mb.owner_id, mb.signing_key, token)
        except RelayError:
            raise E.relay_unavailable() from None
        except UNAVAILABLE:
            raise E.relay_unavailable() from None
        return mb

    async def _blocks(self, client: RelayClient, mb: OwnedMailbox) -> list[bytes]:
        msgs = await client.fetch(mb.owner_id, mb.signing_key)
        if msgs:
            await client.ack([x.msg_id for x in msgs])
        out = []
        for x in msgs:
            with contextlib.suppress(Exception):  # not sealed to this mailbox: not ours
                out.append(mb.open(x.sealed))
        return out

    async def _end(self, client: RelayClient, mb: OwnedMailbox | None) -> None:
        if mb is not None:
            gone = False
            with contextlib.suppress(RelayError, *UNAVAILABLE):
                await client.delete(mb.owner_id, mb.signing_key)
                gone = True
            with contextlib.suppress(Exception):  # locked meanwhile: on_unlock retires it
                self._retire_link_mailbox(mb.to_bytes(), gone)
        with contextlib.suppress(Exception):
            await client.close()

    def _link_mailboxes(self) -> list[str]:
        value = self.m.store.get_setting(SETTING_LINK_MB)
        if value is None:
            return []
        if isinstance(value, str):  # written before it was a list: one descriptor
            return [value]
        return [str(x) for x in value]

    def _remember_link_mailbox(self, descriptor: bytes) -> None:
        with self.m.store.transaction():
            held = self._link_mailboxes()
            if descriptor.hex() not in held:
                held = [*held, descriptor.hex()][-MAX_LINK_MAILBOXES:]
                self.m.store.set_setting(SETTING_LINK_MB, held)

    def _forget_link_mailbox(self, descriptor: bytes) -> None:
        """Drop one descriptor from the list (inside the caller's transaction, if any)."""
        held = self._link_mailboxes()
        if descriptor.hex() in held:
            rest = [x for x in held if x != descriptor.hex()]
            self.m.store.set_setting(SETTING_LINK_MB, rest or None)

    def _retire_link_mailbox(self, descriptor: bytes, gone: bool) -> None:
        """Forget a link's mailbox; one not deleted yet is deleted on a later connection.
        Only this one leaves the list (another link's stays)."""
        with self.m.store.transaction():
            if not gone:
                store_devices.retire_mailbox(self.m.store, descriptor)
            self._forget_link_mailbox(descriptor)

    async def _drop_made(self, made: OwnedMailbox) -> None:
        """N's device mailbox, not installed: deleted at its relay (or queued), then forgot."""
        await self.m.mailboxes.delete_at_relay(made)
        with contextlib.suppress(Exception):  # locked meanwhile: on_unlock retires it
            self._forget_link_mailbox(made.to_bytes())

    async def on_unlock(self, store: object) -> None:
        """Every link mailbox a restart (or a lock) left behind: to delete at its relay."""
        for left in self._link_mailboxes():
            self._retire_link_mailbox(bytes.fromhex(left), False)

    async def cancel(self) -> dict[str, Any]:
        link = self._pending()
        if link is None:
            raise AppError(E_LINK_STATE, "no_link", "no device link is under way")
        if link.state in ("installing", "listing"):
            raise AppError(E_LINK_STATE, "installing", "the profile is being installed: the "
                           "link can no longer be cancelled")  # fmt: skip
        self._decline(link, "cancelled")
        return link.view()

    def _decline(self, link: _Link, reason: str) -> None:
        if link.task is not None:
            link.task.cancel()
        self._set(link, "declined", reason)

    async def confirm(self, accept: bool | None, code: str | None) -> dict[str, Any]:
        link = self._pending()
        if link is None or link.state != "code":
            raise AppError(E_LINK_STATE, "no_code", "no confirmation code is shown now")
        if accept is False:
            self._decline(link, "the codes differ")
            return link.view()
        if code is None and link.role == "offer":
            # E's confirmation alone sends the identity key: its user types the code N shows,
            # which a holder of the link playing N cannot make E show (docs/devices.md §4.5).
            raise InvalidParamsError("code", "on the device in use, type the code the new "
                                     "device shows")  # fmt: skip
        if code is not None:
            assert link.code is not None
            typed = "".join(ch for ch in code if ch.isdigit())[: 2 * dv.CODE_DIGITS]
            wanted = link.code.replace(" ", "")
            if not hmac.compare_digest(typed.encode(), wanted.encode()):
                self._decline(link, "the code typed differs: the link was ended")
                return link.view()
        elif accept is not True:
            raise InvalidParamsError("accept", "must be true or false (or give code)")
        self._set(link, "confirmed")
        link.confirmed.set()
        return link.view()

    async def _await_user(
        self,
        link: _Link,
        client: RelayClient,
        mb: OwnedMailbox,
        offer: dv.LinkOffer | None = None,
    ) -> None:
        """Wait for this side's user, FETCHing the link's mailbox as every other step does: a
        relay closes a connection with no subscription after its idle timeout without a frame
        (pings do not count), and the pattern stays the one of the whole link. Nothing is due
        meanwhile; on N what comes is left queued (not acknowledged) for the next step; on E
        (`offer`) a second device's request is answered "used" at once and the rest dropped
        (N sends nothing more before E's profile)."""
        while not link.confirmed.is_set():
            if offer is not None:
                await self._offer_blocks(client, mb, offer)
            else:
                await client.fetch(mb.owner_id, mb.signing_key)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.confirmed.wait(), POLL)

    async def on_lock(self, store: object) -> None:
        """A lock ends a link under way (its state is in memory; the store closes); an install
        under way finishes first (it holds the messenger's lock the lock waits for anyway)."""
        link = self.link
        if link is not None and link.task is None and link.state == "waiting":
            self._set(link, "failed", "the profile was locked")  # being set up: it stops there
            return
        if link is None or link.task is None or link.task.done():
            return
        if link.state == "installing":  # its install and "installed" run to their end first
            # Bounded: the install is local (one transaction), "installed" one deposit of at
            # most INSTALLED_WAIT; the address's relay work comes after (docs/devices.md §4.3).
            waiter = asyncio.ensure_future(link.installed.wait())
            await asyncio.wait({link.task, waiter}, timeout=INSTALLED_WAIT + LOCK_SLACK,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            waiter.cancel()
        if not link.task.done():
            if link.state in ("installing", "listing"):  # installed: E may not list it, said
                self._set(link, "done", UNCONFIRMED)
            else:
                self._set(link, "failed", "the profile was locked")
            link.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await link.task

    def status(self) -> dict[str, Any]:
        self._pending()  # marks an expired one
        return {"link": None if self.link is None else self.link.view()}

    # --- E: the device in use -------------------------------------------------------------

    def _limit(self) -> int:
        linked = self.m.store.get_setting(SETTING_MAX_LINKED)
        return dv.MAX_DEVICES if linked is None else min(dv.MAX_DEVICES, 1 + int(linked))

    def _check_room(self, current: dv.DeviceList) -> None:
        limit = self._limit()
        if len(current.devices) >= limit:
            raise AppError(E_TOO_MANY_DEVICES, "too_many_devices", f"this profile has {limit} "
                           "devices already (settings max_linked_devices)")  # fmt: skip

    def _reserve(self, role: str, expires: int) -> _Link:
        """The one link slot, taken before the first await (two calls at once: one is busy)."""
        if self._pending() is not None:
            raise AppError(E_LINK_STATE, "busy", "a device link is under way: cancel it first")
        # N takes E's final block for FINAL_GRACE more (docs/devices.md §4.3).
        link = _Link(role, expires, grace=dv.FINAL_GRACE if role == "join" else 0)
        self.link = link
        return link

    def _release(self, link: _Link) -> None:
        """A link that failed before it started: the slot is free again, no state is kept
        (one cancelled or locked meanwhile keeps its state, for devices.status to say)."""
        if self.link is link and link.state == "waiting":
            self.link = None

    def _still_set_up(self, link: _Link) -> None:
        """After the awaits that set a link up: a cancel or a lock meanwhile (there was no task
        to cancel yet) ends it here, before its task starts or its text is given out."""
        if self.link is not link or link.state != "waiting":
            raise AppError(E_LINK_STATE, "ended", "the device link was "
                           f"{link.state if link.state != 'waiting' else 'replaced'} while it "
                           "was being set up")  # fmt: skip

    async def offer(self, expires_in: int) -> dict[str, Any]:
        link = self._reserve("offer", _now() + expires_in)
        try:
            current = await self.own_list()
            self._check_room(current)
            url = self.m.mailboxes.relay_url()
            client = await self._client(url)
            mb = None
            try:
                mb = await self._make_mailbox(client, url)
                self._still_set_up(link)
            except BaseException:
                await self._end(client, mb)
                raise
        except BaseException:
            self._release(link)
            raise
        offer = dv.LinkOffer.create(self.m.entropy, mb.address(), _now(), expires_in)
        link.expires = offer.link.expires
        link.task = asyncio.create_task(self._run_offer(link, offer, client, mb))
        return {"link": offer.link.to_text(), "expires": offer.link.expires}

    async def _run_offer(
        self, link: _Link, offer: dv.LinkOffer, client: RelayClient, mb: OwnedMailbox
    ) -> None:
        limit: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(max(0, link.expires - _now())) as limit:
                await self._offer_steps(link, offer, client, mb)
            # The final left: N is listed only once it says it installed the profile.
            link.grace = dv.FINAL_GRACE
            async with asyncio.timeout(max(0, link.expires + link.grace - _now())) as limit:
                await self._offer_listing(link, offer, client, mb)
        except TimeoutError:
            # The link's own deadline, or a relay request's timeout (said apart: not expiry).
            if limit is not None and limit.expired():
                self._set(link, "expired", _expired_reason(link))
            else:
                self._set(link, "failed", RELAY_SLOW)
        except dv.LinkExpired:  # a block in the deadline's last second
            self._set(link, "expired", _expired_reason(link))
        except asyncio.CancelledError:
            pass
        except (AppError, RelayError, *UNAVAILABLE, dv.DeviceError) as exc:
            self._set(link, "failed", _reason(exc))
        except Exception as exc:  # a bug: the link ends, said
            log.warning("a device link ended on an unexpected %s", type(exc).__name__)
            self._set(link, "failed", "internal error (see the daemon's log)")
        finally:
            await self._end(client, mb)

    async def _offer_steps(
        self, link: _Link, offer: dv.LinkOffer, client: RelayClient, mb: OwnedMailbox
    ) -> None:
        reply: wire.MailboxAddress | None = None
        while reply is None:  # the request: blocks that do not open leave the link usable
            for block in await self._offer_blocks(client, mb, offer):
                try:
                    answer = offer.accept_request(self.m.entropy, block, _now())
                except dv.LinkUsed:  # a further request in the fetch that used the link
                    await self._refuse(client, mb, offer, block)
                    continue
                except DecryptionError:
                    continue
                reply = offer.reply_to
                assert reply is not None
                if not same_relay(reply.relay_url, mb.relay_url):
                    raise AppError(E_DEVICE_LINK, "bad_link", "the new device's reply mailbox is "
                                   "not on the link's relay")  # fmt: skip
                await client.deposit(reply.deposit_id, answer, reply.send_token)
            if reply is None:
                await asyncio.sleep(POLL)
        while offer.code is None:
            for block in await self._offer_blocks(client, mb, offer):
                with contextlib.suppress(DecryptionError, dv.LinkUsed):
                    link.code = offer.receive_reveal(block, _now())
                    break
            else:
                await asyncio.sleep(POLL)
        self._set(link, "code")
        await self._await_user(link, client, mb, offer)
        offer.confirm(_now())
        async with self.m.lock:
            current = await self._current_locked()
            self._check_room(current)  # the identity key is never sent for nothing
            profile = self._profile(current)
        for block in offer.profile_blocks(self.m.entropy, profile, _now()):
            await client.deposit(reply.deposit_id, block, reply.send_token)
        while not offer.finished:
            for block in await self._offer_blocks(client, mb, offer):
                async with self.m.lock:
                    try:
                        # The list held NOW (it may have changed since the profile left).
                        new, final = offer.receive_done(
                            self.m.entropy, self.m.identity(), await self._current_locked(),
                            block, _now(), self._limit(),
                        )  # fmt: skip
                    except (DecryptionError, dv.LinkUsed):
                        continue
                # Not stored yet: N is listed once it says it installed (_offer_listing).
                await client.deposit(reply.deposit_id, final, reply.send_token)
                if new is None:
                    raise AppError(
                        E_TOO_MANY_DEVICES, "too_many_devices",
                        "the new device was refused: the list is full, or its ID or key is taken",
                    )  # fmt: skip
                break
            else:
                await asyncio.sleep(POLL)

    async def _offer_listing(
        self, link: _Link, offer: dv.LinkOffer, client: RelayClient, mb: OwnedMailbox
    ) -> None:
        """N's "installed": only now is N listed (the list held now, with N), then "listed"
        back. A crash or a lock before it lists nothing (docs/devices.md §4.3)."""
        reply = offer.reply_to
        assert reply is not None
        while True:
            for block in await self._offer_blocks(client, mb, offer):
                async with self.m.lock:
                    try:
                        listed, answer = offer.receive_installed(
                            self.m.entropy, self.m.identity(), await self._current_locked(),
                            block, _now(), self._limit(),
                        )  # fmt: skip
                    except (DecryptionError, dv.LinkUsed):
                        continue
                    with self.m.store.transaction():
                        self._store_list(listed)
                        self._keep_caps(*_joined_caps(offer))
                        # The contacts open sessions with N (docs/devices.md §5.3); queued
                        # (and marked awaiting) in the list's transaction: a crash between
                        # the two would leave the list held and never sent.
                        self.m.fanout.send_list(listed, self.self_id(), self.device_private())
                # N says "not confirmed" if this never reaches it; E lists N either way.
                with contextlib.suppress(RelayError, *UNAVAILABLE):
                    await client.deposit(reply.deposit_id, answer, reply.send_token)
                self._set(link, "done")
                return
            await asyncio.sleep(POLL)

    async def _offer_blocks(
        self, client: RelayClient, mb: OwnedMailbox, offer: dv.LinkOffer
    ) -> list[bytes]:
        """The link mailbox's blocks for E's step; a further request on the used link (a
        second device holding it) is answered "used" into its own reply mailbox at once
        (`LinkOffer.refuse_request`, at most MAX_REFUSALS per link) and dropped, so it fails
        at once instead of waiting for the expiry (docs/devices.md §4.2)."""
        return [b for b in await self._blocks(client, mb)
                if not await self._refuse(client, mb, offer, b)]  # fmt: skip

    async def _refuse(
        self, client: RelayClient, mb: OwnedMailbox, offer: dv.LinkOffer, block: bytes
    ) -> bool:
        """True when `block` was a further request, answered "used"."""
        try:
            to, used = offer.refuse_request(block, _now())
        except (DecryptionError, dv.DeviceError, StateError):
            return False
        if same_relay(to.relay_url, mb.relay_url):  # the core checked it: this client's relay
            with contextlib.suppress(RelayError, *UNAVAILABLE):
                await client.deposit(to.deposit_id, used, to.send_token)
        return True

    async def _current_locked(self) -> dv.DeviceList:
        current = self.held()
        assert current is not None  # own_list signed it before the link was made
        return current

    def _profile(self, current: dv.DeviceList) -> dv.LinkProfile:
        store = self.m.store
        ed_priv, x_priv = self.m.identity().raw_private()
        settings = []
        for name in RESTORABLE:
            value = store.get_setting(name)
            if value is not None and name not in NOT_CARRIED:
                settings.append((name, json.dumps(value)))
        # E's device mailbox's delete key, for N (never installed as a setting); present even
        # when empty: it tells N that this E reads the keys in N's "installed" (§4.2).
        caps = self._own_caps(current)
        own = {self.self_id().hex(): [c.to_json() for c in caps]} if caps else {}
        settings.append((SETTING_DELETE_KEYS, json.dumps(own)))
        contacts, groups = linked_groups.contacts_and_groups(store)
        contents = fmt.BackupContents(
            _ms(), ed_priv, x_priv, self.m.identity().public.binding_sig,
            str(store.get_setting(SETTING_NAME, "")), tuple(settings), contacts, (), groups,
        )  # fmt: skip
        return dv.LinkProfile(ed_priv, x_priv, self.m.identity().public.binding_sig, current,
                              contents.to_bytes(4))  # fmt: skip  # 4: older devices read it, §4.2

    # --- N: the new device ----------------------------------------------------------------

    def _check_fresh(self) -> None:
        store = self.m.store
        has_history = store_devices.has_messages(store)
        if (store.list_contacts() or store.list_requests() or has_history
                or G.list_groups(store) or self.held() is not None):  # fmt: skip
            raise AppError(E_JOIN_NOT_FRESH, "not_fresh", "only a fresh profile can join as a new "
                           "device: create one with aegis init --link LINK")  # fmt: skip

    async def join(self, text: str) -> dict[str, Any]:
        try:
            device_link = dv.DeviceLink.from_text(text)
        except (DecodeError, ProtocolError, ValueError):
            raise AppError(E_DEVICE_LINK, "bad_link", "not an AegisLink device link") from None
        if _now() >= device_link.expires:
            raise AppError(E_LINK_EXPIRED, "expired", "the device link has expired")
        self._check_fresh()
        url = device_link.mailbox.relay_url
        own = self.m.store.get_setting(SETTING_URL)
        if not (same_relay(url, own) or self.m.mailboxes.peer_url_ok(url)):
            raise AppError(E_DEVICE_LINK, "bad_link", "the link's relay breaks the policy for "
                           "relay URLs from others")  # fmt: skip
        link = self._reserve("join", device_link.expires)
        try:
            client = await self._client(url)
            try:
                mb = await self._make_mailbox(client, url)
                join, block = dv.LinkJoin.start(self.m.entropy, device_link, mb.address(),
                                                _now())  # fmt: skip
                try:
                    await client.deposit(device_link.mailbox.deposit_id, block,
                                         device_link.mailbox.send_token)  # fmt: skip
                except RelayError:
                    raise AppError(E_LINK_EXPIRED, "gone", "the device link was used already "
                                   "or has expired") from None  # fmt: skip
                self._still_set_up(link)
            except BaseException:
                await self._end(client, locals().get("mb"))
                raise
        except BaseException:
            self._release(link)
            raise
        link.task = asyncio.create_task(self._run_join(link, join, client, mb))
        return link.view()

    async def _run_join(
        self, link: _Link, join: dv.LinkJoin, client: RelayClient, mb: OwnedMailbox
    ) -> None:
        limit: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(max(0, link.expires + link.grace - _now())) as limit:
                got = await self._join_steps(link, join, client, mb)
        except BaseException as exc:
            await self._end(client, mb)
            ran_out = isinstance(exc, TimeoutError) and limit is not None and limit.expired()
            if ran_out or isinstance(exc, dv.LinkExpired):  # LinkExpired: a block in the
                self._set(link, "expired", "the link's ten minutes are over")  # last second
            elif isinstance(exc, TimeoutError):  # a relay request's own timeout
                self._set(link, "failed", RELAY_SLOW)
            elif isinstance(exc, (AppError, RelayError, *UNAVAILABLE, dv.DeviceError)):
                self._set(link, "failed", _reason(exc))
            elif isinstance(exc, Exception):  # a bug: the link ends, said
                log.warning("a device link ended on an unexpected %s", type(exc).__name__)
                self._set(link, "failed", "internal error (see the daemon's log)")
            return  # cancelled: whoever cancelled set the state
        # E accepted this device (_join_steps set `installing` as it took the final block):
        # from here until "installed" is deposited nothing cancels the link, and the state
        # always ends (the `finally`), done (with a warning if what follows the install fails,
        # or if E never says it listed this device) or failed (the profile refused before any
        # write).
        profile, new, made = got
        listed, warnings, contacts = False, [], 0
        try:
            try:
                try:
                    contacts = await _through(self._install(profile, new, made))
                except AppError as exc:  # refused before anything was written (malformed)
                    await _through(self._end(client, mb))
                    self.m._spawn(self._drop_made(made))
                    self._set(link, "failed", _reason(exc))
                    return
                except BaseException as exc:  # the transaction rolled back: nothing written
                    await _through(self._end(client, mb))
                    log.warning("a device link's install ended on an unexpected %s",
                                type(exc).__name__)  # fmt: skip
                    self._set(link, "failed", "internal error (see the daemon's log)")
                    return
                # Only now may E list this device: "installed" at once, right after the
                # commit (E's wait for it is bounded), the relay work for the address after.
                said = await _through(self._say_installed(join, client, made))
            finally:
                link.installed.set()
            warning = await self._publish(made)
            if warning:
                warnings.append(warning)
            # Installed: the daemon reconnects under the identity now, not after E's answer
            # (in a task of its own: it takes the daemon's lock, which a lock or a stop holds
            # while it waits for the link).
            self.m._spawn(self._reconfigure())
            if said:
                link.grace = 2 * dv.FINAL_GRACE
                self._set(link, "listing")
                try:
                    async with asyncio.timeout(max(0, link.expires + link.grace - _now())):
                        listed = await self._await_listed(join, client, mb)
                except (TimeoutError, RelayError, *UNAVAILABLE):
                    listed = False
            if listed:  # before _end's relay work: a lock meanwhile would keep the flag
                with contextlib.suppress(Exception):  # locked meanwhile: the flag stays, said
                    self.m.store.set_setting(SETTING_UNCONFIRMED, None)
            else:
                warnings.append(UNCONFIRMED)
            await self._end(client, mb)
            self._set(link, "done", "; ".join(warnings) or None)
            with contextlib.suppress(RuntimeError):
                self.m.ctx.events.emit("devices.joined", {"contacts": contacts,
                                                          "devices": len(new.devices)})  # fmt: skip
        except (asyncio.CancelledError, Exception) as exc:
            # A lock or a stop (on_lock said "done, unconfirmed"), or a bug after the install:
            # installed all the same, so never left `installing` or `listing` (busy for good).
            if isinstance(exc, Exception):
                log.warning("a device link ended after its install on an unexpected %s",
                            type(exc).__name__)  # fmt: skip
            await _through(self._end(client, mb))
            if link.state in ("installing", "listing"):
                self._set(link, "done", "; ".join([*warnings, UNCONFIRMED]))
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _join_steps(
        self, link: _Link, join: dv.LinkJoin, client: RelayClient, mb: OwnedMailbox
    ) -> tuple[dv.LinkProfile, dv.DeviceList, OwnedMailbox]:
        target = join.link.mailbox
        while join.code is None:
            for block in await self._blocks(client, mb):
                try:
                    reveal = join.receive_accept(self.m.entropy, block, _now())
                except dv.LinkUsed:  # E's answer to a second device: another one took the link
                    raise AppError(E_LINK_EXPIRED, "used", "this link was already used") from None
                except (DecryptionError, ProtocolError, ValueError):
                    continue
                await client.deposit(target.deposit_id, reveal, target.send_token)
                break
            else:
                await asyncio.sleep(POLL)
        link.code = join.code
        self._set(link, "code")
        while join.profile is None:
            for block in await self._blocks(client, mb):
                with contextlib.suppress(DecryptionError, dv.LinkUsed):
                    join.add_profile_block(block, _now())
            if join.profile is None:
                await asyncio.sleep(POLL)
        await self._await_user(link, client, mb)
        join.confirm(_now())
        # This device's own mailbox (its address, where its bundle goes once the identity is
        # installed), made now but stored only if E accepts this device.
        made = await self.m.mailboxes.new_mailbox(public=True)
        try:
            self._remember_link_mailbox(made.to_bytes())  # a crash before the install leaves it
            done = join.done_block(self.m.entropy, self._entry_for(made), _now())
            await client.deposit(target.deposit_id, done, target.send_token)
            final: tuple[Any, dv.DeviceList] | None = None
            while final is None:
                for block in await self._blocks(client, mb):
                    try:
                        final = join.receive_final(block, _now())
                    except (DecryptionError, dv.LinkUsed):
                        continue
                    # E lists this device now: no cancel, lock or deadline may lose it.
                    self._set(link, "installing")
                    break
                else:
                    await asyncio.sleep(POLL)
        except BaseException as exc:  # refused (full, taken), expired: nothing installed
            self.m._spawn(self._drop_made(made))
            if isinstance(exc, dv.DeviceError) and not isinstance(exc, dv.LinkExpired):
                raise AppError(E_TOO_MANY_DEVICES, "too_many_devices",
                               "the existing device refused this device") from None  # fmt: skip
            raise
        _, new = final
        return join.profile, new, made

    async def _say_installed(
        self, join: dv.LinkJoin, client: RelayClient, made: OwnedMailbox
    ) -> bool:
        """N's "installed" into the link mailbox, bounded; False when it could not go (E
        ended the link: its mailbox is gone, so E lists nothing). It carries the delete key of
        this device's device mailbox, so E can delete it if it removes this device."""
        target = join.link.mailbox
        cap = made.delete_cap()
        block = join.installed_block(self.m.entropy, caps_to_bytes([cap] if cap else []))
        try:
            await asyncio.wait_for(
                client.deposit(target.deposit_id, block, target.send_token), INSTALLED_WAIT
            )
        except (TimeoutError, RelayError, *UNAVAILABLE):
            return False
        return True

    async def _await_listed(
        self, join: dv.LinkJoin, client: RelayClient, mb: OwnedMailbox
    ) -> bool:
        """E's "listed"; False once it can no longer come (the core refuses it past
        `expires + 2·FINAL_GRACE`: a block fetched in that last second too)."""
        while True:
            for block in await self._blocks(client, mb):
                try:
                    join.receive_listed(block, _now())
                except (DecryptionError, dv.LinkUsed):
                    continue
                except dv.DeviceError:  # LinkExpired: not listed, as far as N knows
                    return False
                return True
            await asyncio.sleep(POLL)

    async def _install(
        self, profile: dv.LinkProfile, new: dv.DeviceList, made: OwnedMailbox
    ) -> int:
        """The profile into this fresh store, as a backup import does (services/backup.py),
        but without history, mailboxes or renewals: every session is this device's own."""
        try:
            contents = fmt.BackupContents.from_bytes(profile.profile)
            for c in contents.contacts:
                PublicIdentity.from_record(c.identity)
            logs = await asyncio.to_thread(
                linked_groups.check, contents.groups, len(contents.contacts)
            )
        except (DecodeError, ProtocolError, ValueError):
            raise AppError(
                E_DEVICE_LINK, "bad_profile", "the profile received is malformed"
            ) from None
        identity = profile.identity()
        m = self.m
        async with m.lock:
            self._check_fresh()
            store = m.store
            prekeys = PrekeyStore.create(m.entropy, identity, _now())
            fresh_mailboxes = store.list_mailboxes()
            with store.transaction():
                store.put_identity(prekeys.to_bytes())
                for row in fresh_mailboxes:  # they carried the discarded identity's bundle
                    store.delete_mailbox(row.id)
                    store_devices.retire_mailbox(store, row.descriptor)
                store.set_setting(SETTING_NAME, clean_name(contents.display_name, ""))
                for name, value in contents.settings:
                    parsed = json.loads(value)
                    if (name in RESTORABLE and name not in NOT_CARRIED
                            and isinstance(parsed, RESTORABLE[name])):  # fmt: skip
                        store.set_setting(name, parsed)
                cids = []
                for bc in contents.contacts:
                    cid = store.add_contact(
                        m.contacts.unique_name(clean_name(bc.name, "contact")),
                        identity_key=bc.identity.to_bytes(),
                        state=ContactState(None, False).to_bytes(),
                    ).id
                    store_devices.set_contact_flags(
                        store, cid, bc.verified, bc.blocked, bc.created_at
                    )
                    cids.append(cid)
                linked_groups.install(store, contents.groups, logs, cids)
                self._store_list(new)
                for device_id, caps in _profile_caps(contents, new, self.self_id()):
                    self._keep_caps(device_id, caps)
                # Until E says it listed this device (docs/devices.md §4.3): devices.list says so.
                store.set_setting(SETTING_UNCONFIRMED, True)
                # This profile's address now, in the same transaction as it leaves the
                # link's list: a crash between the two would lose its owner key.
                store.add_mailbox("address", made.to_bytes())
                self._forget_link_mailbox(made.to_bytes())
            m.prekeys = prekeys
            try:  # committed: from here a failure may not say "nothing installed"
                m.mailboxes.reload()
            except Exception as exc:  # the next unlock reloads them
                log.warning("after a device link's install, reloading the mailboxes failed "
                            "(%s)", type(exc).__name__)  # fmt: skip
        return len(contents.contacts) - len(contents.groups.group_contacts)  # shown ones

    async def _publish(self, made: OwnedMailbox) -> str | None:
        """After the install and "installed": the address mailbox (stored by the install)
        subscribed and the identity's bundle published there; relay work, so a failure is a
        warning, not a failed link (the profile is installed)."""
        try:
            async with self.m.lock:
                await self.m.mailboxes.subscribe_new(made)
                await self.m.address.publish_bundle(made, fresh=True)
        except (AppError, RelayError, RelayUnavailable, *UNAVAILABLE):
            return ("installed, but the address's bundle could not be published yet: the "
                    "daemon tries again on its next connection")  # fmt: skip
        return None

    async def _reconfigure(self) -> None:
        """The installed settings' network and relay, in a task of its own: it takes the
        daemon's lock, which a lock holds while it waits for the link's task (on_lock)."""
        with contextlib.suppress(AppError, RelayUnavailable, *UNAVAILABLE):
            await self.m.ctx.reconfigure()


T = TypeVar("T")


async def _through(aw: Coroutine[Any, Any, T]) -> T:
    """Run ``aw`` to its end whatever cancels the caller (a step that must not stop half-way);
    the cancellation is dropped: the caller's own state says how it ended."""
    task = asyncio.ensure_future(aw)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    return task.result()


def _ed_public(priv: bytes) -> bytes:
    return p.ed25519_public(p.ed25519_from_private(priv))


def _expired_reason(link: _Link) -> str:
    if link.role == "offer" and link.grace:  # E sent its final; N never said it installed
        return NOT_INSTALLED
    return "the link's ten minutes are over"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AppError):
        return exc.message
    if isinstance(exc, dv.TooManyDevices):
        return "the device list is full (MAX_DEVICES, or the setting max_linked_devices)"
    if isinstance(exc, dv.LinkExpired):
        return "the link's ten minutes are over"
    if isinstance(exc, dv.DeviceError):
        return "the other device's answer was refused"
    if isinstance(exc, RelayError):
        return f"the relay refused (error {exc.code})"
    return "the relay could not be reached"


def register(registry: Registry, m: Messenger) -> Devices:
    devices = Devices(m)

    @registry.method("devices.link")
    async def devices_link(ctx: CallContext, expires_in: int = dv.LINK_TTL) -> dict[str, Any]:
        if type(expires_in) is not int or not TTL_MIN <= expires_in <= dv.LINK_TTL:
            raise InvalidParamsError("expires_in", f"must be {TTL_MIN} to {dv.LINK_TTL} seconds")
        return await devices.offer(expires_in)

    @registry.method("devices.join")
    async def devices_join(ctx: CallContext, link: str) -> dict[str, Any]:
        if not isinstance(link, str):
            raise InvalidParamsError("link", "must be a string")
        return await devices.join(link)

    @registry.method("devices.status")
    async def devices_status(ctx: CallContext) -> dict[str, Any]:
        return devices.status()

    @registry.method("devices.confirm")
    async def devices_confirm(
        ctx: CallContext, accept: bool | None = None, code: str | None = None
    ) -> dict[str, Any]:
        if accept is not None and not isinstance(accept, bool):
            raise InvalidParamsError("accept", "must be true or false")
        if code is not None and (not isinstance(code, str) or len(code) > 32):
            raise InvalidParamsError("code", "must be the code the new device shows")
        return await devices.confirm(accept, code)

    @registry.method("devices.cancel")
    async def devices_cancel(ctx: CallContext) -> dict[str, Any]:
        return await devices.cancel()

    @registry.method("devices.list")
    async def devices_list(ctx: CallContext) -> dict[str, Any]:
        return devices.list_view()

    @registry.method("devices.confirm_listed")
    async def devices_confirm_listed(ctx: CallContext) -> dict[str, Any]:
        return devices.confirm_listed()

    @registry.method("devices.remove")
    async def devices_remove(ctx: CallContext, id: str) -> dict[str, Any]:
        if not isinstance(id, str):
            raise InvalidParamsError("id", "must be a string")
        return await devices.remove(id)

    return devices
