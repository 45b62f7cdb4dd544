"""A device link on the existing device E (docs/devices.md §4, `devices.link`): the link
made, the new device's request answered, the code its user types, the profile sent (the
identity key only after that confirmation), then the final block and, once the new device
says it installed the profile, the list signed with it and "listed" back. The slot, the
link's mailboxes and what both sides share are services/device_link.py's.

Nothing here logs a link, a code, a key or a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aegisd.core import backup as fmt
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.errors import DecryptionError
from aegisd.relayurl import same_relay
from aegisd.rpc import AppError
from aegisd.store.devices import SETTING_DELETE_KEYS, SETTING_MAX_LINKED
from aegisd.transport.relaylink import UNAVAILABLE
from relay.client import RelayClient, RelayError

from . import linked_groups
from .backup import RESTORABLE
from .contacts import SETTING_NAME
from .device_link import (
    E_DEVICE_LINK,
    E_TOO_MANY_DEVICES,
    NOT_CARRIED,
    POLL,
    RELAY_SLOW,
    LinkSlot,
    _expired_reason,
    _Link,
    _reason,
)
from .mailbox import DeleteCap, OwnedMailbox, caps_from_bytes

log = logging.getLogger("aegisd.devices")


def _joined_caps(offer: dv.LinkOffer) -> tuple[bytes, list[DeleteCap]]:
    """The device N's "installed" just listed, and the delete capabilities it carried (none
    if malformed: N is listed all the same, only its mailboxes cannot be deleted from here)."""
    entry = offer.joined
    assert entry is not None  # receive_installed succeeded
    try:
        return entry.device_id, caps_from_bytes(offer.installed_extra, fmt.MAX_CAPS_PER_DEVICE)
    except ValueError:
        return entry.device_id, []


def _now() -> int:
    return int(time.time())


def _ms() -> int:
    return time.time_ns() // 1_000_000


class OfferSide(LinkSlot):
    """E's side of a link."""

    def _limit(self) -> int:
        linked = self.m.store.get_setting(SETTING_MAX_LINKED)
        return dv.MAX_DEVICES if linked is None else min(dv.MAX_DEVICES, 1 + int(linked))

    def _check_room(self, current: dv.DeviceList) -> None:
        limit = self._limit()
        if len(current.devices) >= limit:
            raise AppError(E_TOO_MANY_DEVICES, "too_many_devices", f"this profile has {limit} "
                           "devices already (settings max_linked_devices)")  # fmt: skip

    async def offer(self, expires_in: int) -> dict[str, Any]:
        link = self._reserve("offer", _now() + expires_in)
        try:
            current = await self.devices.own_list()
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
                        self.devices._store_list(listed)
                        self.devices._keep_caps(*_joined_caps(offer))
                        # The contacts open sessions with N (docs/devices.md §5.3); queued
                        # (and marked awaiting) in the list's transaction: a crash between
                        # the two would leave the list held and never sent.
                        self.m.fanout.send_list(
                            listed, self.devices.self_id(), self.devices.device_private()
                        )
                # N says "not confirmed" if this never reaches it; E lists N either way.
                with contextlib.suppress(RelayError, *UNAVAILABLE):
                    await client.deposit(reply.deposit_id, answer, reply.send_token)
                self._set(link, "done")
                return
            await asyncio.sleep(POLL)

    async def _current_locked(self) -> dv.DeviceList:
        current = self.devices.held()
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
        caps = self.devices._own_caps(current)
        own = {self.devices.self_id().hex(): [c.to_json() for c in caps]} if caps else {}
        settings.append((SETTING_DELETE_KEYS, json.dumps(own)))
        contacts, groups = linked_groups.contacts_and_groups(store)
        contents = fmt.BackupContents(
            _ms(), ed_priv, x_priv, self.m.identity().public.binding_sig,
            str(store.get_setting(SETTING_NAME, "")), tuple(settings), contacts, (), groups,
        )  # fmt: skip
        return dv.LinkProfile(ed_priv, x_priv, self.m.identity().public.binding_sig, current,
                              contents.to_bytes(4))  # fmt: skip  # 4: older devices read it, §4.2
