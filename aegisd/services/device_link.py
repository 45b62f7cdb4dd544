"""A device link under way, on either side (docs/devices.md §4): linking a new device to this
profile (`devices.link`, the existing device E) or this fresh profile to an existing one
(`devices.join`, the new device N), the confirmation code both screens show (`devices.confirm`
on each), `devices.status` and `devices.cancel`. Here: the one link slot, the link's
mailboxes and what both sides share; E's side is device_offer.py's, N's device_join.py's. The
device list the link changes is services/devices.py's.

The link's messages run over mailboxes of their own on the link's relay, on a connection of
their own (not the profile's receiving link): the link mailbox (E's, made with a send token and
never stored: a restart voids the link, as the core's LinkOffer is in memory only) and N's
reply mailbox. Both are polled with FETCH and deleted at the relay when the link ends.

What the new device receives (`P.profile`, docs/devices.md §4.2): the backup format's contents
(docs/backup.md §2) with the display name, the settings that are the profile's, and every
established contact (name, identity, verified, blocked) with no messages, no mailboxes and no
`send_to`: the sessions and mailboxes are per device (the fan-out opens them once listed).

Nothing here logs a link, a code, a key or a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aegisd.core import devices as dv
from aegisd.core.errors import DecryptionError, StateError
from aegisd.relayurl import same_relay
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc import errors as E
from aegisd.store import devices as store_devices
from aegisd.store.devices import SETTING_LINK_MB
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable, with_relay
from relay.client import RelayClient, RelayError

from .backup import SETTING_TIMERS
from .mailbox import DeleteCap, OwnedMailbox, box_public, delete_public, new_delete_seed, new_keys
from .messenger import Messenger

log = logging.getLogger("aegisd.devices")

# Application error codes 1090-1099 (docs/api.md, "Errors"); 1095 is services/devices.py's.
E_DEVICE_LINK = 1090
E_LINK_EXPIRED = 1091
E_LINK_STATE = 1092
E_TOO_MANY_DEVICES = 1093
E_JOIN_NOT_FRESH = 1094

# The device settings' names: aegisd/store/devices.py owns them. A link's profile carries
# SETTING_DELETE_KEYS always (`{}` when E has none): the marker that E reads N's "installed".
# The delete capabilities taken from one device are bounded by fmt.MAX_CAPS_PER_DEVICE.
MAX_LINK_MAILBOXES = 16  # a bound on the link mailboxes: one link at a time makes at most 3
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


def _now() -> int:
    return int(time.time())


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


class OwnDevices(Protocol):
    """What a link uses of the device list (services/devices.py Devices)."""

    def self_id(self) -> bytes: ...
    def device_private(self) -> bytes: ...
    def held(self) -> dv.DeviceList | None: ...
    async def own_list(self) -> dv.DeviceList: ...
    def _store_list(self, device_list: dv.DeviceList) -> None: ...
    def _entry_for(self, mb: OwnedMailbox) -> dv.DeviceEntry: ...
    def _keep_caps(self, device_id: bytes, caps: list[DeleteCap]) -> None: ...
    def _own_caps(self, current: dv.DeviceList) -> list[DeleteCap]: ...


class LinkSlot:
    """The one link slot, and what both sides' runs share (device_offer.py is E's side,
    device_join.py N's)."""

    def __init__(self, messenger: Messenger, devices: OwnDevices) -> None:
        self.m = messenger
        self.devices = devices
        self.link: _Link | None = None

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
