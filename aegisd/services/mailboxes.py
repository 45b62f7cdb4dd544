"""The mailboxes this profile owns at relays, and the relay link that receives on them.

- ``owned``: every mailbox of ours (the address, invitations, contacts', the cover pool),
  by owner id, as loaded from the store (``reload``); the link subscribes all of those at the
  profile's relay, and, during a relay move, a drain link per other relay still holding some.
- ``client(about)``: a connection for owner commands (the link decides which).
- Making mailboxes: ``new_mailbox`` (a CREATE at the relay: its proof of work takes seconds,
  so callers make it before they take the protocol lock: ``made_ahead``), ``create`` (store
  one, taken from the cover pool when it can), ``to_pool``, ``retire`` and
  ``delete_at_relay`` (now, or later if the relay cannot be reached).
- The URL policies: ``url_ok`` for a relay of ours, ``peer_url_ok`` for one someone else
  chose.

This module imports no other service (host.py is types only): what it uses of the messenger
(and, through it, of the inbox, rotation, renewals, cover and mailbox_loss) is
``MailboxesHost``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from aegisd.netmode import own_extra
from aegisd.relayurl import (
    SETTING_INSECURE,
    SETTING_URL,
    RelayUrlError,
    check_peer_relay_url,
    check_relay_url,
    endpoint_key,
    same_relay,
)
from aegisd.rpc import AppError
from aegisd.rpc import errors as E
from aegisd.store import Store
from aegisd.store import cover as cover_slots
from aegisd.store.db import MailboxRow
from aegisd.transport.relaylink import (
    UNAVAILABLE,
    Handler,
    RelayLink,
    RelayUnavailable,
    with_relay,
)
from relay.client import RelayClient, RelayError
from relay.wire import E_BAD_FRAME, E_FULL, E_LIMIT, E_RATE_LIMITED

from .host import ServiceHost
from .mailbox import OwnedMailbox, box_public, delete_public, new_delete_seed, new_keys

log = logging.getLogger("aegisd.messenger")

SETTING_MOVE = "relay.move"  # {"from": url, "at": ms}: contacts' mailboxes moving (relay.set)
#: Mailboxes a profile may own (address, invitations, contacts, the cover pool): below the
#: relay's default 1000 subscriptions per connection (relay/config.py), so that the link's
#: one connection receives on every one of them. A contact's renewals stop well before
#: (renewal.OWN_MAILBOX_RESERVE_AT): the rest is the user's own.
MAX_OWN_MAILBOXES = 950
SETTING_MAX_MAILBOXES = "mailboxes.max"  # MAX_OWN_MAILBOXES, lowered by tests


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


class CoverView(Protocol):
    def changed(self) -> None: ...


class MoveView(Protocol):
    async def continue_move(self) -> None: ...


class RenewalsView(Protocol):
    async def relay_delete(self, mb: OwnedMailbox) -> str: ...


class InboxView(Protocol):
    @property
    def on_block(self) -> Handler: ...


class LossView(Protocol):
    def on_refused(self, owner_id: bytes, code: int) -> bool: ...


class MailboxesHost(ServiceHost, Protocol):
    """What the mailboxes use of the messenger."""

    @property
    def cover(self) -> CoverView: ...
    @property
    def rotation(self) -> MoveView: ...
    @property
    def renewals(self) -> RenewalsView: ...
    @property
    def inbox(self) -> InboxView: ...
    @property
    def loss(self) -> LossView: ...

    def _on_relay_state(self, up: bool, reason: str | None) -> None: ...
    def _link_ended(self) -> None: ...
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Mailboxes:
    def __init__(self, host: MailboxesHost) -> None:
        self.m = host
        self.link: RelayLink | None = None
        self.relay_reason: str | None = "no relay configured"
        self.owned: dict[bytes, tuple[MailboxRow, OwnedMailbox]] = {}
        # After a relay move: one link per other relay that still holds mailboxes of ours,
        # receiving on them until every contact has switched (or the bound passed).
        self.drains: dict[str, RelayLink] = {}
        # Relays (URLs) that refused a CREATE with a delete key, for this run: an older relay
        # (new_mailbox); a restart tries again, in case it was upgraded.
        self.no_delete_keys: set[str] = set()
        #: Told when the mailboxes owned may have changed (device_caps.py: their delete keys
        #: go to the own devices).
        self.change_listeners: list[Callable[[], None]] = []

    def start_link(self) -> None:
        url = self.m.store.get_setting(SETTING_URL)
        if url:
            self.relay_reason = "connecting"
            self.link = RelayLink(
                url,
                handler=self.m.inbox.on_block,
                subscriptions=lambda: self.subscriptions(str(url)),
                on_state=self.m._on_relay_state,
                network=self.m.ctx.network(),
                on_refused=self.m.loss.on_refused,
            )
            self.link.start()
        self.reconcile_drains()

    def reconcile_drains(self) -> None:
        """A receiving link for each other relay that holds mailboxes of ours (a relay move
        under way); none once they are gone."""
        main = self.link.url if self.link is not None else None
        wanted: dict[str, str] = {}  # endpoint -> a URL of it (as a mailbox stores it)
        if self.m.ctx.store is not None:
            for _, mb in self.owned.values():
                key = endpoint_key(mb.relay_url)
                if not same_relay(mb.relay_url, main) and self.url_ok(mb.relay_url):
                    wanted.setdefault(key, mb.relay_url)
        for key in set(wanted) - set(self.drains):
            url = wanted[key]
            link = RelayLink(
                url,
                handler=self.m.inbox.on_block,
                subscriptions=functools.partial(self.subscriptions, url),
                on_state=lambda up, reason: None,  # status is about the profile's relay
                network=self.m.ctx.network(),
                on_refused=self.m.loss.on_refused,
                name="old relay",  # its log lines are told apart from the profile's relay
            )
            self.drains[key] = link
            link.start()
        for key in set(self.drains) - set(wanted):
            self.m._spawn(self.drains.pop(key).stop())

    async def stop_drains(self, finish: bool = False) -> None:
        drains, self.drains = list(self.drains.values()), {}
        for link in drains:
            await link.stop(finish=finish)

    async def stop_link(self, finish: bool = False) -> None:
        """Stops the profile's relay link; it reports no down, so the host is told here.
        ``finish``: a block being handled commits first (relaylink.RelayLink.stop)."""
        if self.link is not None:
            await self.link.stop(finish=finish)
            self.link = None
        self.m._link_ended()

    async def restart_link(self) -> None:
        """After a change of the network settings: every connection is made anew, once the
        block each is handling (a first contact storing its session) has committed."""
        await self.stop_link(finish=True)
        await self.stop_drains(finish=True)
        self.start_link()

    def reload(self) -> None:
        self.owned = {}
        for row in [*self.m.store.list_mailboxes(), *cover_slots.pool_rows(self.m.store)]:
            mb = OwnedMailbox.from_bytes(row.descriptor)
            self.owned[mb.owner_id] = (row, mb)
        self._changed()

    def _changed(self) -> None:
        for listener in self.change_listeners:
            listener()

    def subscriptions(self, url: str) -> list[tuple[bytes, Any]]:
        """The mailboxes of ours at the relay at ``url``."""
        return [(mb.owner_id, mb.signing_key) for _, mb in self.owned.values()
                if same_relay(mb.relay_url, url)]  # fmt: skip

    def url_ok(self, url: str) -> bool:
        """The URL policy for a relay of ours: the profile's flag, or, for the old relay of a
        move under way that was set with --insecure-plaintext-relay, that relay's own flag (its
        old mailboxes are still drained and deleted: connectivity.move_insecure)."""
        return own_relay_ok(url, bool(self.m.store.get_setting(SETTING_INSECURE, False)),
                            self.m.store.get_setting(SETTING_MOVE))  # fmt: skip

    def peer_url_ok(self, url: str) -> bool:
        """The stricter policy for a relay URL someone else chose (a contact's mailbox, a
        stranger's reply address, a file's relay): relayurl.check_peer_relay_url."""
        try:
            check_peer_relay_url(url, self.own_urls())
        except RelayUrlError:
            return False
        return True

    def own_urls(self) -> list[str]:
        """The user's own relays: the relay, and the old one of a move under way (as
        Network.own_hosts: connectivity.network)."""
        url = self.m.store.get_setting(SETTING_URL)
        return [str(u) for u in (url, *own_extra(self.m.store)) if u]

    def relay_url(self) -> str:
        url = self.m.store.get_setting(SETTING_URL)
        if not url:
            raise AppError(E.NOT_READY, "no_relay", "no relay configured: aegis relay set URL")
        return str(url)

    @contextlib.asynccontextmanager
    async def client(self, about: bytes | None = None) -> AsyncIterator[RelayClient]:
        """A connection for owner commands (the link decides which: docs/protocol.md §20.7);
        ``about``: commands about that mailbox alone, which may go on its own subscription."""
        if self.link is None:
            self.relay_url()
            raise E.relay_unavailable()
        try:
            async with self.link.owner_of(about) as client:
                yield client
        except RelayUnavailable:
            raise E.relay_unavailable() from None

    async def made_ahead(self, *, public: bool) -> OwnedMailbox | None:
        """A mailbox made at the relay BEFORE the caller takes the lock: its CREATE's proof of
        work takes seconds (2**22 hashes on a relay with default settings, docs/protocol.md
        §20.2), and messages.send and every receive wait for the lock. None when a private one
        can come from the pool (cover.py) instead."""
        if not public and cover_slots.pool_rows(self.m.store):
            return None
        return await self.new_mailbox(public=public)

    async def create(
        self, role: str, *, public: bool, contact_id: int | None = None,
        made: OwnedMailbox | None = None, **extra: Any,
    ) -> tuple[int, OwnedMailbox]:
        """Store a mailbox of ours (``made`` ahead by made_ahead, taken from the pool, or
        made now); the caller holds the lock."""
        if self.stale(made):
            made = None
        if role == "contact" and not public:
            # Made ahead, at a random time, and already receiving loop cover (cover.py): the
            # relay does not see a mailbox born the moment a contact is.
            with self.m.store.transaction():
                descriptor = cover_slots.pool_take(self.m.store)
                if descriptor is not None:
                    row_id = self.m.store.add_mailbox(
                        role, descriptor, contact_id=contact_id, **extra
                    )
            if descriptor is not None:
                mb = OwnedMailbox.from_bytes(descriptor)
                row = self.m.store.get_mailbox(row_id)
                assert row is not None
                self.owned[mb.owner_id] = (row, mb)  # subscribed already, as a pool mailbox
                self._changed()
                if made is not None:  # made ahead for nothing: it goes to the pool (not lost)
                    try:
                        await self.to_pool(made)
                    except BaseException:
                        self.unused(row_id)  # cancelled: the caller never learns of the row
                        raise
                self.m.cover.changed()  # the pool wants a new one
                return row_id, mb
        mb = made if made is not None else await self.new_mailbox(public=public)
        row_id = self.m.store.add_mailbox(role, mb.to_bytes(), contact_id=contact_id, **extra)
        row = self.m.store.get_mailbox(row_id)
        assert row is not None
        self.owned[mb.owner_id] = (row, mb)
        self._changed()
        try:
            await self.subscribe_new(mb)
        except BaseException:
            self.unused(row_id)  # cancelled (the link stopped): the caller never learns of it
            raise
        return row_id, mb

    def unused(self, row_id: int) -> None:
        """A mailbox create() stored for a caller that then did not commit what it was for
        (cancelled, or its transaction failed): not left subscribed under a role with nothing
        behind it. A private one goes back to the pool (to the relay, nothing changed), a
        public one is deleted (at the relay later)."""
        row = self.m.store.get_mailbox(row_id)
        if row is None or row.contact_id is not None:
            return
        mb = OwnedMailbox.from_bytes(row.descriptor)
        with self.m.store.transaction():
            self.m.store.delete_mailbox(row_id)
            if mb.token:
                cover_slots.pool_add(self.m.store, row.descriptor)
        self.reload()
        if not mb.token:
            self.m._spawn(self.delete_at_relay(mb))

    async def subscribe_new(self, mb: OwnedMailbox) -> None:
        """Subscribe a mailbox just made (the link subscribes all of them on every reconnect).
        A refusal is said, with the count: a mailbox not subscribed receives nothing."""
        if self.link is None:
            return
        try:
            await self.link.subscribe(mb.owner_id, mb.signing_key)
        except RelayError as exc:
            log.warning("the relay refused to subscribe a new mailbox (error %d; the profile "
                        "owns %d mailboxes)", exc.code, len(self.owned))  # fmt: skip
        except UNAVAILABLE:
            pass  # the next connection subscribes it

    async def add_pool_mailbox(self) -> None:
        """One more mailbox for the pool (cover.py calls this at random times, without the
        lock: the CREATE's proof is solved first, then the lock is taken to store it)."""
        mb = await self.new_mailbox(public=False)
        async with self.m.lock:
            await self.to_pool(mb)

    def stale(self, mb: OwnedMailbox | None) -> bool:
        """A mailbox made ahead (its proof solved outside the lock) at a relay the profile has
        left meanwhile (relay.set): deleted there, not kept. Call with the lock held."""
        if mb is None or same_relay(mb.relay_url, self.m.store.get_setting(SETTING_URL)):
            return False
        self.m._spawn(self.delete_at_relay(mb))
        return True

    async def to_pool(self, mb: OwnedMailbox) -> None:
        if self.m.ctx.store is None:
            return  # locked meanwhile: the relay expires it unused
        if self.stale(mb):
            return
        with self.m.store.transaction():
            cover_slots.pool_add(self.m.store, mb.to_bytes())
        self.reload()
        if self.m.store.get_setting(SETTING_MOVE):
            self.m._spawn(self.m.rotation.continue_move())  # a relay move waits for pool mailboxes
        await self.subscribe_new(mb)

    async def new_mailbox(self, *, public: bool) -> OwnedMailbox:
        """A mailbox made at the relay (with a send token unless public). Refused past the
        profile's mailbox limit (MAX_OWN_MAILBOXES); a relay limit that a connection of its
        own does not get round is reported as such (rate_limited), not as unreachable."""
        limit = int(self.m.store.get_setting(SETTING_MAX_MAILBOXES, MAX_OWN_MAILBOXES))
        if len(self.owned) >= limit:
            raise AppError(
                E.TOO_MANY_MAILBOXES, "too_many_mailboxes",
                f"this profile has {len(self.owned)} mailboxes, the most one relay connection "
                "receives on: revoke unused invitations or remove contacts",
            )  # fmt: skip
        sign_seed, box_secret = new_keys()
        # Every mailbox gets a delete-only key, so the profile's other devices can delete it
        # (docs/devices.md §6, §7) without the owner key; except at a relay that refused one.
        url = self.relay_url()
        delete_seed = b"" if url in self.no_delete_keys else new_delete_seed()
        token = b"" if public else self.m.entropy.random(32)

        async def make(client: RelayClient) -> OwnedMailbox:
            created = await client.create(
                OwnedMailbox(url, sign_seed, b"", b"", b"", b"", b"").signing_key,
                box_public(box_secret),
                public=public,
                delete_pub=delete_public(delete_seed) if delete_seed else None,
            )
            mb = OwnedMailbox(
                url,
                sign_seed,
                box_secret,
                created.owner_id,
                created.deposit_id,
                created.relay_box_pub,
                token,
                delete_seed,
            )
            if token:
                await client.token_add(mb.owner_id, mb.signing_key, token)
            return mb

        def older_relay(exc: RelayError) -> bool:
            """A relay from before delete keys answers a CREATE with one ``bad_frame`` (and
            closes the connection, docs/relay-protocol.md §11): remembered for its URL for
            this run, and the mailbox made again without one on a connection of its own."""
            nonlocal delete_seed
            if exc.code != E_BAD_FRAME or not delete_seed:
                return False
            self.no_delete_keys.add(url)
            delete_seed = b""
            log.warning("the relay refused a mailbox with a delete key (a relay older than "
                        "delete keys): mailboxes there are made without one, and no other "
                        "device of this profile can delete them")  # fmt: skip
            return True

        try:
            try:
                async with self.client() as client:
                    return await make(client)
            except RelayError as exc:
                if exc.code != E_LIMIT and not older_relay(exc):
                    raise
            # The link's connection made as many mailboxes as the relay lets one connection
            # make (issue 15 item 12), or the relay closed it (an older relay's bad_frame): a
            # short-lived connection of its own makes this one.
            while True:  # twice at most: older_relay holds once
                own, _ = await with_relay(url, None, self.m.ctx.network())
                try:
                    return await make(own)
                except RelayError as exc:
                    if not older_relay(exc):
                        raise
                finally:
                    await own.close()
        except RelayError as exc:
            if exc.code == E_FULL:  # its mailbox table or storage is full: say so
                raise E.relay_full() from None
            if exc.code in (E_LIMIT, E_RATE_LIMITED):  # a limit a connection of its own hit too
                raise AppError(
                    E.RATE_LIMITED, "rate_limited",
                    "the relay makes no more mailboxes for now (one of its limits): try again "
                    "later",
                ) from None  # fmt: skip
            raise E.relay_unavailable() from None
        except (*UNAVAILABLE, RelayUnavailable):
            raise E.relay_unavailable() from None

    async def retire(self, row_id: int) -> None:
        row = self.m.store.get_mailbox(row_id)
        if row is None:
            return
        mb = OwnedMailbox.from_bytes(row.descriptor)
        self.m.store.delete_mailbox(row_id)
        self.owned.pop(mb.owner_id, None)
        await self.delete_at_relay(mb)

    async def delete_at_relay(self, mb: OwnedMailbox) -> None:
        """Delete at the mailbox's own relay (after a move, not this profile's); one that
        cannot be reached now is deleted on a later connection (renewal.py retire_due)."""
        if await self.m.renewals.relay_delete(mb) == "away" and self.m.ctx.store is not None:
            self.m.store._q(
                "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)",
                (mb.to_bytes(),),
            )

    def drop_contact_mailbox(self, store: Store, contact_id: int) -> None:
        """An unanswered first contact failed for good (delivery.py): the mailbox made for its
        answer goes, here now (inside the caller's transaction) and at the relay later."""
        row = store.mailbox_for_contact(contact_id)
        if row is not None:
            store.delete_mailbox(row.id)
            mb = OwnedMailbox.from_bytes(row.descriptor)
            self.owned.pop(mb.owner_id, None)
            self.m._spawn(self.delete_at_relay(mb))
