"""Session renewal after a backup import (docs/protocol.md §23).

Restored side (R, identity I, no ratchet sessions): for each contact C it creates a new
receiving mailbox, publishes a fresh bundle on a new address mailbox, and deposits a renewal
block (aegisd/core/renewal.py) to the mailbox C gave the old profile. C checks it opens under
I's identity key and is newer than any renewal it accepted before, runs PQXDH against R's new
bundle and sends its first-contact block (a hello whose invitation ID is the renewal ID, reply
mailbox: a new mailbox of C) to R's new mailbox. R checks the sender is C's stored identity,
answers with a hello inside the new session, and deletes the old profile's mailboxes for C at
the relay; C, on that hello, deletes its own old mailbox for I. Both emit
``contact.session_renewed``. C re-sends, in the new session, the texts I never confirmed.

Nothing here logs an address, an identity or content.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aegisd import droplog
from aegisd.core import pqxdh, renewal, wire
from aegisd.core.errors import BundleError, DecodeError, DecryptionError
from aegisd.core.identity import PublicIdentity
from aegisd.core.session import accept_first_contact, initiate_session
from aegisd.relayurl import endpoint_key, same_relay
from aegisd.rpc import AppError
from aegisd.store import actions as actions_store
from aegisd.store import contact_devices as cd
from aegisd.store.db import Contact
from aegisd.transport.relaylink import UNAVAILABLE, RelayUnavailable, with_relay
from relay.client import RelayError
from relay.wire import E_BUSY, E_INTERNAL, E_LIMIT, E_RATE_LIMITED

from . import device_reset
from .bundle_fetch import fetch_bundle, retryable
from .delivery import Recipient
from .host import ServiceHost
from .mailbox import ContactState, OwnedMailbox, address_to_bytes

if TYPE_CHECKING:
    from aegisd.core.identity import IdentityKeyPair
    from aegisd.core.prekeys import PrekeyStore
    from aegisd.transport.network import Network

    from .address import Address
    from .delivery import Delivery
    from .fanout import Fanout
    from .mailboxes import Mailboxes

log = logging.getLogger("aegisd.renewal")

#: What Renewals.relay_delete says of a mailbox it was asked to delete at its relay.
DeleteResult = Literal["deleted", "refused", "away"]
#: Relay answers to a DELETE that mean "not now": the mailbox may still be there.
#: Failed tries after which a queued deletion is given up: a relay never reachable again must
#: not keep a row, and its key, for ever. At most one counts per TRY_INTERVAL seconds, however
#: often the daemon connects, so a row is given up only after failing for 64 hours at least.
MAX_DELETE_TRIES = 64
TRY_INTERVAL = 3600
TRY_LATER = frozenset({E_RATE_LIMITED, E_LIMIT, E_BUSY, E_INTERNAL})

SETTING_PENDING = "backup.renewal_pending"
#: A renewal request older than this (the relay's default message TTL) or more than a day
#: ahead of our clock is refused (with the per-contact monotonic bound: no replays).
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_SKEW_MS = 24 * 3600 * 1000
#: Renewal requests of one contact tried per day (issue 15 item 12): each makes the daemon
#: fetch a bundle at the contact's relay and, answered, a mailbox at ours; a restore is rare
#: (a second try the same day is allowed for). A request counts once the bundle's relay has
#: answered (a bundle that is denied or does not verify counts too); past the limit, a
#: request is dropped (counted) until the day is over.
RENEWALS_PER_DAY = 3
DAY_MS = 24 * 3600 * 1000
ANSWERED_KEY = "renewal.answered."  # + contact id: the times (ms) of the tries this day
#: Mailboxes this profile may own before a contact's request no longer makes one: the rest of
#: the relay's per-connection limits (1000 subscriptions and creations by default) stays for
#: the user's own operations (invitations, contacts, rotation).
OWN_MAILBOX_RESERVE_AT = 800
#: Our reactions, edits and deletions sent again in a renewed session (from the conversation's
#: newest messages that carry one): bounded, a restore must not set off a flood of blocks.
RESEND_ACTIONS = 64
#: Our deletions for everyone sent again, first and under their own bound: a deletion left out
#: brings a text back on the restored side, a reaction or an edit left out loses less.
RESEND_DELETIONS = 1000


class RenewalsHost(ServiceHost, Protocol):
    """What session renewal uses of the messenger."""

    prekeys: PrekeyStore | None

    @property
    def delivery(self) -> Delivery: ...
    @property
    def mailboxes(self) -> Mailboxes: ...

    def network(self) -> Network: ...
    @property
    def address(self) -> Address: ...
    @property
    def fanout(self) -> Fanout: ...

    def identity(self) -> IdentityKeyPair: ...
    def _reload_prekeys(self) -> None: ...
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class Renewals:
    def __init__(self, messenger: RenewalsHost) -> None:
        self.m = messenger
        self._requests: list[tuple[Contact, wire.RenewPayload]] = []
        # (contact id, new mailbox row id): the old mailboxes go once the commit is in
        self._retire: list[tuple[int, int]] = []
        # One run of the deletion queue at a time (the connection and a list change both
        # start one): two would dial each relay twice and count each failure twice.
        self._retiring = asyncio.Lock()

    # --- the restored side ------------------------------------------------------------------

    async def resume(self) -> None:
        """Start (or continue) the renewals an import left pending. Relay errors propagate as
        AppError; a later connection tries again."""
        m = self.m
        if not m.store.get_setting(SETTING_PENDING):
            return
        _, address = await m.address.ensure()
        async with m.lock:
            store = m.store
            # The restored device's list, before any renewal can complete (docs/devices.md §10).
            device_reset.sign_list(m, address)
            rows = store._q(
                "SELECT contact_id FROM renewals WHERE side = 'restored' AND done = 0 "
                "AND renew_id IS NULL ORDER BY contact_id"
            ).fetchall()
            name = str(store.get_setting("profile.display_name", ""))
            for (contact_id,) in rows:
                c = store.get_contact(contact_id)
                if c is None or c.identity_key is None:
                    continue
                state = ContactState.from_bytes(c.state)
                if state.send_to is None:
                    continue
                mb_id, mb = await m.mailboxes.create("contact", public=False, contact_id=c.id)
                renew_id = m.entropy.random(wire.MESSAGE_ID_LEN)
                now = _ms()
                payload = wire.RenewPayload(renew_id, now, mb.address(), address.deposit_id, name)
                block = renewal.seal(
                    m.entropy,
                    m.identity(),
                    PublicIdentity.from_bytes(c.identity_key),
                    wire.encode_payload(payload),
                )
                with store.transaction():
                    store._q(
                        "UPDATE renewals SET renew_id = ?, requested_at = ?, new_mailbox = ? "
                        "WHERE contact_id = ? AND side = 'restored'",
                        (renew_id, now, mb_id, c.id),
                    )
                    store.enqueue_blocks(address_to_bytes(state.send_to), [block], contact_id=c.id)
            store.set_setting(SETTING_PENDING, None)
        m.delivery.wake()

    async def retire_due(self) -> None:
        """Delete at the relay the mailboxes queued that are due (on every connection, until
        none is left): the old profile's address and invitations, those of contacts that are
        not renewed (blocked) or whose renewal is done, another own device's at its removal.
        Grouped by relay: a relay away is asked no more this time, the rows at other relays
        go on; each try that fails counts, and a row past MAX_DELETE_TRIES leaves the queue
        (its mailbox lives on until the relay's expiry). The lock is not held while a relay
        is dialled. Never raises for a relay away (the connection's next steps go on). One
        run at a time: a second waits for the first, then finds only what is left."""
        async with self._retiring:
            await self._retire_due()

    async def _retire_due(self) -> None:
        m = self.m
        async with m.lock:
            if m.ctx.store is None:
                return
            due = [(int(r[0]), bytes(r[1])) for r in m.store._q(
                "SELECT id, descriptor FROM retired_mailboxes r WHERE r.contact_id IS NULL "
                "OR EXISTS (SELECT 1 FROM renewals n WHERE n.contact_id = r.contact_id "
                "AND n.side = 'restored' AND n.done = 1) ORDER BY id").fetchall()]  # fmt: skip
        away: set[str] = set()
        for row_id, descriptor in due:
            mb = OwnedMailbox.from_bytes(descriptor)
            relay = endpoint_key(mb.relay_url)
            if relay in away:
                continue
            done = await self.relay_delete(mb)
            if done == "away":
                away.add(relay)
            async with m.lock:
                if m.ctx.store is None:
                    return
                if done == "deleted":
                    m.store._q("DELETE FROM retired_mailboxes WHERE id = ?", (row_id,))
                    continue
                # A URL the policy refuses, or a relay away: counted (once an interval),
                # dropped past the limit.
                now = int(time.time())
                m.store._q("UPDATE retired_mailboxes SET attempts = attempts + 1, last_try = ? "
                           "WHERE id = ? AND last_try <= ?",
                           (now, row_id, now - TRY_INTERVAL))  # fmt: skip
                m.store._q("DELETE FROM retired_mailboxes WHERE id = ? AND attempts >= ?",
                           (row_id, MAX_DELETE_TRIES))  # fmt: skip

    async def relay_delete(self, mb: OwnedMailbox) -> DeleteResult:
        """DELETE one of our mailboxes at its own relay (which may not be this profile's), with
        its owner key or its delete key: "deleted" once the relay answered OK or `denied` (no
        such mailbox: gone already, or a key it does not take: a relay or node from before
        delete keys answers that too, and asking again would never change it), "refused" for
        a relay URL the policy forbids (never dialled: the mailbox may live on), "away" when
        the relay cannot be reached or says "not now" (`rate_limited`, `limit`, `busy`,
        `internal`): the mailbox may live on, ask again later."""
        m = self.m
        if not m.mailboxes.url_ok(mb.relay_url):
            return "refused"
        try:
            if m.mailboxes.link is not None and same_relay(m.mailboxes.link.url, mb.relay_url):
                async with m.mailboxes.client() as client:
                    await client.delete(mb.owner_id, mb.signing_key)
                return "deleted"
            client, own = await with_relay(mb.relay_url, m.mailboxes.link, m.network())
            try:
                await client.delete(mb.owner_id, mb.signing_key)
            finally:
                if own:
                    await client.close()
        except RelayError as exc:
            return "away" if exc.code in TRY_LATER else "deleted"
        except (AppError, RelayUnavailable, *UNAVAILABLE):  # AppError: this relay not linked now
            return "away"
        return "deleted"

    def receive_first_contact(self, c: Contact, block: bytes) -> None:
        """A block on a mailbox of a contact we have no session with: the answer to our
        renewal request, if it is one (inside the receive transaction)."""
        m = self.m
        store = m.store
        row = store._q(
            "SELECT renew_id, new_mailbox FROM renewals WHERE contact_id = ? "
            "AND side = 'restored' AND done = 0 AND renew_id IS NOT NULL",
            (c.id,),
        ).fetchone()
        if row is None or c.identity_key is None or m.prekeys is None:
            return
        renew_id = bytes(row[0])
        try:
            fc = accept_first_contact(m.entropy, m.prekeys, block)
            hello = wire.decode_payload(fc.fragment.data)
        except (DecryptionError, DecodeError):
            m._reload_prekeys()
            droplog.dropped("dropped a block that did not open")
            return
        expected = PublicIdentity.from_bytes(c.identity_key)
        if (
            not isinstance(hello, wire.HelloPayload)
            or not fc.sender.same_keys(expected)
            or not hmac.compare_digest(hello.invitation_id, renew_id)
            or not m.mailboxes.peer_url_ok(hello.reply_to.relay_url)
        ):
            store.put_identity(m.prekeys.to_bytes())  # burnt one-time keys stay burnt
            droplog.dropped("dropped a first contact that does not answer our renewal")
            return
        with store.transaction():
            store.put_identity(m.prekeys.to_bytes())
            store.put_session(c.id, fc.session.to_bytes())
            store.update_contact(c.id, state=ContactState(hello.reply_to, True).to_bytes())
            store._q(
                "UPDATE renewals SET done = 1 WHERE contact_id = ? AND side = 'restored'", (c.id,)
            )
            mb_row = store.get_mailbox(int(row[1]))
            fresh = store.get_contact(c.id)
            assert fresh is not None and mb_row is not None
            mb = OwnedMailbox.from_bytes(mb_row.descriptor)
            name = str(store.get_setting("profile.display_name", ""))
            m.delivery.enqueue([Recipient(fresh, fc.session)],
                               wire.HelloPayload(mb.address(), name, b""),
                               slotted=False)  # the answer of a renewal, like a first contact's
            # The restored device's list, with the hello naming it (docs/devices.md §10).
            m.fanout.send_held(c.id)
            m.ctx.events.emit("contact.session_renewed", {"contact": c.name})
        self._retire.append((c.id, int(row[1])))

    # --- the contact's side -----------------------------------------------------------------

    def on_undecryptable(self, c: Contact, block: bytes) -> bool:
        """A block on a contact's mailbox that our session cannot open: a renewal request
        from that contact? True if it was one (handled after the receive, or dropped)."""
        m = self.m
        if c.identity_key is None or c.blocked:
            return False
        peer = PublicIdentity.from_bytes(c.identity_key)
        try:
            payload = renewal.open_block(m.identity(), peer, block)
        except DecryptionError:
            return False
        try:
            req = renewal.decode(payload)
        except DecodeError:
            droplog.dropped("dropped a renewal block that did not parse")
            return True
        now = _ms()
        last = m.store._q(
            "SELECT requested_at FROM renewals WHERE contact_id = ? AND side = 'peer'", (c.id,)
        ).fetchone()
        if (
            (last is not None and req.created_at_ms <= last[0])
            # Made before we (re-)added this contact: it was meant for an earlier contact row
            # (removed with its replay bound), so it is a replay into the new one.
            or req.created_at_ms < c.created_at
            or req.created_at_ms < now - MAX_AGE_MS
            or req.created_at_ms > now + MAX_SKEW_MS
            or not m.mailboxes.peer_url_ok(req.reply_to.relay_url)
        ):
            droplog.dropped("dropped a stale or replayed renewal request")
            return True
        if len(self._answered(c.id, now)) >= RENEWALS_PER_DAY:
            droplog.dropped("dropped a renewal request (over a contact's daily limit)")
            return True
        if len(m.mailboxes.owned) >= OWN_MAILBOX_RESERVE_AT:
            droplog.dropped("dropped a renewal request (too many mailboxes: kept for your own)")
            return True
        self._requests.append((c, req))
        return True

    def _answered(self, contact_id: int, now: int) -> list[int]:
        """When this contact's renewal requests were tried, within the last day."""
        times = self.m.store.get_setting(f"{ANSWERED_KEY}{contact_id}") or []
        return [int(t) for t in times if isinstance(t, int) and now - DAY_MS < t <= now]

    def _count_try(self, contact_id: int) -> None:
        now = _ms()
        self.m.store.set_setting(
            f"{ANSWERED_KEY}{contact_id}", [*self._answered(contact_id, now), now]
        )

    async def _answer(self, c: Contact, req: wire.RenewPayload) -> None:
        m = self.m
        assert c.identity_key is not None
        expected = PublicIdentity.from_bytes(c.identity_key)
        try:
            base, x, k = await fetch_bundle(
                req.reply_to.relay_url, req.bundle_address, m.mailboxes.link, m.network()
            )
        except AppError as exc:
            if not retryable(exc):
                # `denied`, `bad_frame` or any other refusal: asking again would meet it again
                # (and a `bad_frame` closes the connection, the shared one too, at every retry
                # until the block's MAX_AGE): the request is dropped, its block acknowledged.
                # It counts against the contact's daily limit (the daemon did connect).
                self._count_try(c.id)
                droplog.dropped("dropped a renewal request whose bundle the relay refused")
                return
            # A limit or an unreachable relay is no reason to drop the request: later.
            raise AppError(1010, "relay_unavailable", "the relay is not reachable") from None
        try:
            bundle = pqxdh.verify_bundle(base, x, k, expected=expected)
        except (DecodeError, BundleError):
            self._count_try(c.id)
            droplog.dropped("dropped a renewal request whose bundle does not verify")
            return
        store = m.store
        # An earlier request's mailbox, unless that renewal completed (then it is the mailbox
        # of the session in use): not answered (done = 0) or refused (done = 2), it is
        # superseded by the one made now (an answer to it could no longer be opened anyway).
        # Whatever its state, it is never left behind: the row below forgets it.
        pending = store._q(
            "SELECT new_mailbox FROM renewals WHERE contact_id = ? AND side = 'peer' "
            "AND done != 1", (c.id,),
        ).fetchone()  # fmt: skip
        new_id, new = await m.mailboxes.create("contact", public=False, contact_id=c.id)
        name = str(store.get_setting("profile.display_name", ""))
        hello = wire.HelloPayload(new.address(), name, req.renew_id)
        session, block = initiate_session(
            m.entropy, m.identity(), bundle, wire.encode_payload(hello)
        )
        with store.transaction():
            self._count_try(c.id)
            store.put_session(c.id, session.to_bytes())
            store.update_contact(c.id, state=ContactState(req.reply_to, False).to_bytes())
            # An import is a reset of the person's devices (docs/devices.md §10): the session
            # row is the restored device's, every session with an old device goes (nothing more
            # is sent to them); the list held stays, for its version, until the restored
            # device's list replaces it.
            cd.drop_device_sessions(store, c.id, frozenset())
            cd.set_session_device(store, c.id, None)
            # Blocks still queued were sealed in the old session: the restored side cannot
            # open them. The texts among them are sent again below.
            store._q("DELETE FROM outbox WHERE contact_id = ?", (c.id,))
            store.set_setting(f"rotation.contact.{c.id}", None)
            store._q(
                "INSERT INTO renewals (contact_id, side, renew_id, requested_at, new_mailbox) "
                "VALUES (?, 'peer', ?, ?, ?) ON CONFLICT (contact_id, side) DO UPDATE SET "
                "renew_id = excluded.renew_id, requested_at = excluded.requested_at, "
                "new_mailbox = excluded.new_mailbox, done = 0",
                (c.id, req.renew_id, req.created_at_ms, new_id),
            )
            store.enqueue_blocks(address_to_bytes(req.reply_to), [block], contact_id=c.id)
            fresh = store.get_contact(c.id)
            assert fresh is not None
            # Texts the old device never confirmed (no delivery receipt) go again, with the
            # same message IDs: the restored side shows each one once (a reply as a reply; one
            # deleted for everyone not at all).
            for mid, body, created, reply_to in store._q(
                "SELECT id, body, created_at, reply_to FROM messages WHERE contact_id = ? "
                "AND direction = 'out' AND status IN ('queued', 'sent') AND deleted = 0 "
                "ORDER BY seq",
                (c.id,),
            ).fetchall():
                wire_id, quoted_id = _wire_id(mid), _wire_id(reply_to)
                if wire_id is None:
                    continue
                text: wire.Payload = (
                    wire.TextPayload(wire_id, created, body) if quoted_id is None
                    else wire.ReplyPayload(wire_id, created, quoted_id, body)
                )  # fmt: skip
                m.delivery.enqueue([Recipient(fresh, session)], text, message_id=mid)
            # Our reactions, edits and deletions, rebuilt from what is stored: those queued in
            # the old session or deposited after the backup are lost to the restored side,
            # and the backup keeps none of them (docs/backup.md).
            for a in actions_store.own_actions(
                store, c.id, RESEND_ACTIONS, RESEND_DELETIONS
            ):
                target = _wire_id(a.message_id)
                if target is None:
                    continue
                if a.kind == "react":
                    try:  # stored under an older, looser rule (§26.2): not sent again
                        wire.check_reaction(a.text)
                    except ValueError:
                        continue
                action: wire.Payload = (
                    wire.DeletePayload(target) if a.kind == "delete"
                    else wire.ReactionPayload(target, a.text) if a.kind == "react"
                    else wire.EditPayload(target, a.edit_sent_at or _ms(), a.text)
                )  # fmt: skip
                m.delivery.enqueue([Recipient(fresh, session)], action)
            m.ctx.events.emit("contact.session_renewing", {"contact": c.name})
        m.delivery.wake()
        if pending is not None and pending[0] is not None and int(pending[0]) != new_id:
            await m.mailboxes.retire(int(pending[0]))  # here and at the relay (or later)

    def on_hello(self, c: Contact) -> bool:
        """The restored contact answered in the new session (inside the receive transaction):
        the renewal is complete. True if this hello completed one."""
        store = self.m.store
        row = store._q(
            "SELECT new_mailbox FROM renewals WHERE contact_id = ? AND side = 'peer' AND done = 0",
            (c.id,),
        ).fetchone()
        if row is None:
            return False
        store._q("UPDATE renewals SET done = 1 WHERE contact_id = ? AND side = 'peer'", (c.id,))
        self.m.ctx.events.emit("contact.session_renewed", {"contact": c.name})
        self._retire.append((c.id, int(row[0])))
        return True

    def on_refused(self, c: Contact) -> bool:
        """The relay refused a renewal deposit for good (inside the outbox transaction): the
        mailbox is gone. The most likely cause on the restored side: the backup is older than
        a mailbox rotation the old device completed. Keep the contact and its history, stop
        waiting, and say so. True if a renewal was under way with this contact."""
        m = self.m
        store = m.store
        row = store._q(
            "SELECT side FROM renewals WHERE contact_id = ? AND done = 0 ORDER BY side DESC",
            (c.id,),
        ).fetchone()
        if row is None:
            return False
        # On the contact's side the mailbox made for the answer can never be written to (the
        # restored side's mailbox is gone, it never learnt ours): it goes, here and at the
        # relay, or a contact could leak one per request (review of issue 15, finding 3).
        for (new_id,) in store._q(
            "SELECT new_mailbox FROM renewals WHERE contact_id = ? AND side = 'peer' "
            "AND done = 0 AND new_mailbox IS NOT NULL", (c.id,),
        ).fetchall():  # fmt: skip
            mb_row = store.get_mailbox(int(new_id))
            if mb_row is not None:
                mb = OwnedMailbox.from_bytes(mb_row.descriptor)
                store.delete_mailbox(mb_row.id)
                m.mailboxes.owned.pop(mb.owner_id, None)
                m._spawn(m.mailboxes.delete_at_relay(mb))
        store._q("UPDATE renewals SET done = 2 WHERE contact_id = ? AND done = 0", (c.id,))
        reason = FAILED_RESTORED if row[0] == "restored" else FAILED_PEER
        self.m.ctx.events.emit("contact.renewal_failed", {"contact": c.name, "reason": reason})
        return True

    # --- after the receive transaction --------------------------------------------------------

    async def after_receive(self) -> None:
        """Relay work for what the last block started (under the messenger's lock). Relay
        failures raise AppError, so that the block is not acknowledged and comes again."""
        while self._requests:
            c, req = self._requests[0]
            await self._answer(c, req)
            self._requests.pop(0)
        while self._retire:
            await self._retire_old(*self._retire.pop())

    def reset(self) -> None:
        self._requests.clear()
        self._retire.clear()

    async def _retire_old(self, contact_id: int, keep: int) -> None:
        """Delete the mailboxes that served the old session with this contact."""
        m = self.m
        store = m.store
        for r in store.list_mailboxes("contact"):
            if r.contact_id == contact_id and r.id != keep:
                await m.mailboxes.retire(r.id)
        for row_id, descriptor in store._q(
            "SELECT id, descriptor FROM retired_mailboxes WHERE contact_id = ?", (contact_id,)
        ).fetchall():
            if await self.relay_delete(OwnedMailbox.from_bytes(bytes(descriptor))) == "away":
                return  # retire_due() tries again on the next connection
            store._q("DELETE FROM retired_mailboxes WHERE id = ?", (row_id,))


def _wire_id(message_id: str | None) -> bytes | None:
    """A one-to-one message's wire id (its id is the 16 bytes in hex), or None."""
    if message_id is None or len(message_id) != 2 * wire.MESSAGE_ID_LEN:
        return None
    try:
        return bytes.fromhex(message_id)
    except ValueError:
        return None


def _ms() -> int:
    return time.time_ns() // 1_000_000


FAILED_RESTORED = (
    "the mailbox from the backup no longer exists (the old device moved on after the backup "
    "was made): add the contact again with a new invitation"
)
FAILED_PEER = "the restored profile's new mailbox no longer exists"


def failure(store: Any, contact_id: int) -> str | None:
    """Why the session renewal with this contact failed for good (then it stays failed in
    contacts.list and status, like a refused first contact), or None."""
    row = store._q(
        "SELECT side FROM renewals WHERE contact_id = ? AND done = 2 ORDER BY side DESC",
        (contact_id,),
    ).fetchone()
    if row is None:
        return None
    return FAILED_RESTORED if row[0] == "restored" else FAILED_PEER


def describe_pending(store: Any) -> int:
    """How many renewals this profile still waits for (either side)."""
    return int(store._q("SELECT count(*) FROM renewals WHERE done = 0").fetchone()[0])
