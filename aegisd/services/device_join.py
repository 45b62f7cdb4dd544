"""A device link on the new device N (docs/devices.md §4, `devices.join`): a fresh profile
answers a link, shows the code, takes the profile, says it is done, and once E's final block
lists it installs the profile (the backup format's contents, without history or mailboxes:
sessions and mailboxes are per device), says "installed" (with its device mailbox's delete
key) and waits for E's "listed". The slot, the link's mailboxes and what both sides share
are services/device_link.py's.

Nothing here logs a link, a code, a key or a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core.errors import DecodeError, DecryptionError, ProtocolError
from aegisd.core.identity import PublicIdentity
from aegisd.core.prekeys import PrekeyStore
from aegisd.relayurl import SETTING_URL, same_relay
from aegisd.rpc import AppError
from aegisd.store import devices as store_devices
from aegisd.store import groups as G
from aegisd.store.devices import SETTING_DELETE_KEYS, SETTING_UNCONFIRMED
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayClient, RelayError

from . import linked_groups
from .backup import RESTORABLE
from .contacts import SETTING_NAME
from .device_link import (
    E_DEVICE_LINK,
    E_JOIN_NOT_FRESH,
    E_LINK_EXPIRED,
    E_TOO_MANY_DEVICES,
    INSTALLED_WAIT,
    NOT_CARRIED,
    POLL,
    RELAY_SLOW,
    UNCONFIRMED,
    LinkSlot,
    _Link,
    _reason,
)
from .mailbox import ContactState, DeleteCap, OwnedMailbox, caps_from_bytes, caps_to_bytes
from .names import clean_name

log = logging.getLogger("aegisd.devices")


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
                                                       fmt.MAX_CAPS_PER_DEVICE)))  # fmt: skip
        except (ValueError, TypeError):
            continue
    return out


def _now() -> int:
    return int(time.time())


class JoinSide(LinkSlot):
    """N's side of a link."""

    def _check_fresh(self) -> None:
        store = self.m.store
        has_history = store_devices.has_messages(store)
        if (store.list_contacts() or store.list_requests() or has_history
                or G.list_groups(store) or self.devices.held() is not None):  # fmt: skip
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
            done = join.done_block(self.m.entropy, self.devices._entry_for(made), _now())
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
                self.devices._store_list(new)
                for device_id, caps in _profile_caps(contents, new, self.devices.self_id()):
                    self.devices._keep_caps(device_id, caps)
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
