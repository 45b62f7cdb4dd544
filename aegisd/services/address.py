"""The public address, its prekeys at the relay, and invitations.

- The address mailbox (public: anyone with the address link may deposit a first contact)
  holds the profile's prekey bundle: ``ensure`` makes it on first need and publishes the
  bundle base and one-time prekeys; ``replenish_prekeys`` rotates due prekeys and tops the
  one-time ones up (after a first contact used some, ``request_top_up``; and at random
  times, ``prekey_loop``, against a drainer).
- ``link_text`` is the address link (``rotate``: a new address; the old one and every
  invitation die with it). An invitation is a private mailbox of its own pointing at the
  address's bundle, used once, until it expires or is revoked.

Nothing here logs an address, an ID or a key. This module imports no other service but the
mailboxes (host.py is types only): what it uses of the messenger is ``AddressHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from aegisd.core import wire
from aegisd.core.identity import IdentityKeyPair
from aegisd.core.prekeys import PrekeyStore
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc import errors as E
from aegisd.store.db import MailboxRow
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable
from relay.client import RelayClient, RelayError
from relay.wire import ITEM_MLKEM, ITEM_X25519

from .host import ServiceHost
from .mailbox import OwnedMailbox
from .mailboxes import Mailboxes

SETTING_ADDRESS_RENEWED = "address.renewed"  # {"at": ms}: until address.get / address.rotate
INVITE_TTL_DEFAULT = 7 * 24 * 3600
INVITE_TTL_MAX = 90 * 24 * 3600
ONE_TIME_LOW = 20  # replenish the relay's one-time prekeys below this many of a kind
ONE_TIME_BATCH = 50
#: How often the relay's count of one-time prekeys is checked (BUNDLE_STATUS, an owner command
#: on the address mailbox): anyone with the address link can take them, at the relay's one-time
#: rate (about one a minute), without ever making a first contact. A random wait in this range
#: (seconds), drawn afresh each time: on no exact beat the relay could match to a profile. The
#: command goes on the connection that holds the address's subscription anyway (in isolated
#: mode too: RelayLink.owner_of), so it opens no connection of its own.
PREKEY_CHECK_MIN = 300.0
PREKEY_CHECK_MAX = 900.0


class AddressHost(ServiceHost, Protocol):
    """What the address uses of the messenger."""

    prekeys: PrekeyStore | None

    @property
    def mailboxes(self) -> Mailboxes: ...

    def identity(self) -> IdentityKeyPair: ...
    def superseded(self) -> str | None: ...
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def _now() -> int:
    return int(time.time())


class Address:
    def __init__(self, host: AddressHost) -> None:
        self.m = host
        self.top_up_pending = False  # a prekey top-up is queued (first contacts coalesce)

    def mailbox(self) -> tuple[MailboxRow, OwnedMailbox] | None:
        rows = self.m.store.list_mailboxes("address")
        if not rows:
            return None
        return rows[-1], OwnedMailbox.from_bytes(rows[-1].descriptor)

    async def ensure(self) -> tuple[MailboxRow, OwnedMailbox]:
        """The public (first-contact) mailbox, created with its bundle on first need."""
        async with self.m.lock:
            found = self.mailbox()
            if found is not None:
                return found
        made = await self.m.mailboxes.made_ahead(public=True)  # the proof: outside the lock
        async with self.m.lock:
            found = self.mailbox()
            if found is not None:  # another call made one meanwhile: this one is not needed
                if made is not None:
                    self.m._spawn(self.m.mailboxes.delete_at_relay(made))
                return found
            row_id, mb = await self.m.mailboxes.create("address", public=True, made=made)
            await self.publish_bundle(mb, fresh=True)
            row = self.m.store.get_mailbox(row_id)
            assert row is not None
            return row, mb

    async def publish_bundle(self, mb: OwnedMailbox, *, fresh: bool) -> None:
        assert self.m.prekeys is not None
        try:
            async with self.m.mailboxes.client() as client:
                await client.bundle_base(
                    mb.owner_id, mb.signing_key, self.m.prekeys.bundle_base().to_bytes()
                )
                if fresh:
                    await self.add_one_time(client, mb, ONE_TIME_BATCH)
        except (*UNAVAILABLE, RelayError):
            raise E.relay_unavailable() from None

    async def add_one_time(self, client: RelayClient, mb: OwnedMailbox, count: int) -> None:
        assert self.m.prekeys is not None
        now = _now()
        xs, kems = self.m.prekeys.generate_one_time(self.m.entropy, count, now)
        # Bounded: a drainer makes the daemon publish new keys for ever (prune_one_time).
        self.m.prekeys.prune_one_time(now)
        self.m.store.put_identity(self.m.prekeys.to_bytes())  # before publishing: never lose one
        await client.bundle_add(
            mb.owner_id, mb.signing_key, ITEM_X25519, [x.to_bytes() for x in xs]
        )
        await client.bundle_add(
            mb.owner_id, mb.signing_key, ITEM_MLKEM, [k.to_bytes() for k in kems]
        )

    async def replenish_prekeys(self, republish: bool = False) -> None:
        """Rotate due prekeys; republish the bundle base when it changed (and, with
        `republish`, always: an earlier publication may have been cut short); top up the
        one-time prekeys."""
        async with self.m.lock:
            found = self.mailbox()
            if found is None or self.m.prekeys is None:
                return
            _, mb = found
            async with self.m.mailboxes.client(mb.owner_id) as client:
                if self.m.prekeys.rotate(self.m.entropy, _now()) or republish:
                    self.m.store.put_identity(self.m.prekeys.to_bytes())
                    await client.bundle_base(
                        mb.owner_id, mb.signing_key, self.m.prekeys.bundle_base().to_bytes()
                    )
                xs, kems = await client.bundle_status(mb.owner_id, mb.signing_key)
                if min(xs, kems) < ONE_TIME_LOW:
                    await self.add_one_time(client, mb, ONE_TIME_BATCH)

    def request_top_up(self) -> None:
        """After a first contact (it used one-time keys): top up the relay's soon, once for
        any number of first contacts arriving meanwhile."""
        if not self.top_up_pending:
            self.top_up_pending = True
            self.m._spawn(self.top_up())

    async def top_up(self) -> None:
        self.top_up_pending = False
        with contextlib.suppress(*UNAVAILABLE, RelayError, RelayUnavailable, AppError):
            await self.replenish_prekeys()

    async def prekey_loop(self) -> None:
        while True:
            await asyncio.sleep(random.SystemRandom().uniform(PREKEY_CHECK_MIN, PREKEY_CHECK_MAX))
            if not self.m.superseded():
                await self.top_up()

    def link_for(
        self,
        kind: int,
        mb: OwnedMailbox,
        bundle_mb: OwnedMailbox,
        invitation_id: bytes,
        expires: int,
    ) -> str:
        return wire.ContactLink(
            kind=kind,
            identity=self.m.identity().public.record(),
            mailbox=mb.address(),
            bundle_address=bundle_mb.deposit_id,
            invitation_id=invitation_id,
            expires=expires,
        ).to_text()

    async def link_text(self, rotate: bool = False) -> dict[str, Any]:
        if rotate:
            old = self.mailbox()
            made = await self.m.mailboxes.made_ahead(public=True)  # the proof: outside the lock
            async with self.m.lock:
                _, mb = await self.m.mailboxes.create("address", public=True, made=made)
                await self.publish_bundle(mb, fresh=True)
            if old is not None:
                await self.m.mailboxes.retire(old[0].id)
                # Invitations point at the old address's bundle: they die with it.
                async with self.m.lock:
                    for r in self.m.store.list_mailboxes("invitation"):
                        await self.m.mailboxes.retire(r.id)
            self.m.ctx.events.emit("address.rotated", {})
        _, mb = await self.ensure()
        self.m.store.set_setting(SETTING_ADDRESS_RENEWED, None)  # the user has the new link now
        return {"link": self.link_for(wire.LINK_ADDRESS, mb, mb, b"", 0)}

    async def create_invitation(self, expires_in: int) -> dict[str, Any]:
        if not 60 <= expires_in <= INVITE_TTL_MAX:
            raise InvalidParamsError(
                "expires_in", f"must be between 60 and {INVITE_TTL_MAX} seconds"
            )
        await self.ensure()  # its errors before the proof
        invitation_id = self.m.entropy.random(16)
        expires = _now() + expires_in
        made = await self.m.mailboxes.new_mailbox(public=False)  # the proof: outside the lock
        async with self.m.lock:
            _, mb = await self.m.mailboxes.create(
                "invitation", public=False, invitation_id=invitation_id, expires_at=expires,
                made=made,
            )
        # The address now, not from before the proof: a relay.set meanwhile deleted that one.
        _, address = await self.ensure()
        link = self.link_for(wire.LINK_INVITATION, mb, address, invitation_id, expires)
        return {"invitation": invitation_id.hex(), "link": link, "expires_at": expires}

    def list_invitations(self) -> list[dict[str, Any]]:
        return [
            {"invitation": (r.invitation_id or b"").hex(), "expires_at": r.expires_at}
            for r in self.m.store.list_mailboxes("invitation")
        ]

    async def revoke_invitation(self, invitation: str) -> None:
        async with self.m.lock:  # not while a first contact for it is being handled
            for r in self.m.store.list_mailboxes("invitation"):
                if r.invitation_id is not None and r.invitation_id.hex() == invitation:
                    await self.m.mailboxes.retire(r.id)
                    return
        raise E.not_found("invitation")

    async def expire_invitations(self) -> None:
        async with self.m.lock:
            for r in self.m.store.list_mailboxes("invitation"):
                if r.expires_at is not None and r.expires_at < _now():
                    await self.m.mailboxes.retire(r.id)
