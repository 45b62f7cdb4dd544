"""Replies, reactions, edits and deletions of one-to-one messages (docs/protocol.md §26).

Each is an ordinary payload (0x12-0x15) sent through the delivery service like a text: in the
same fixed-size ratchet blocks, so the relay cannot tell one from a text. Receiving happens
inside the receive transaction (inbox.py), the protocol lock held. Everything a peer sends is
checked here against the conversation it came in (docs/protocol.md §26): an action on a
message of another conversation, an edit or deletion of a message that is not the sender's,
an edit past the window, is dropped (counted) with no state change and no event.

Not yet for groups: these payloads are one-to-one only (a group-only contact's are dropped
by the inbox, like its texts).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import wire
from aegisd.core.errors import DecodeError
from aegisd.core.session import Session
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc import errors as E
from aegisd.store import actions as actions_store
from aegisd.store import attachments as attachment_store
from aegisd.store.db import Contact, Message

from .delivery import Delivery, Recipient
from .disappearing import erased
from .host import ServiceHost

#: How long after a message an edit of it is taken: the recipient checks it against its own
#: receipt time of the message, the sender against its sending time (stricter). Like Signal's
#: 24 h: long enough to fix a typo noticed later, short enough that an old conversation cannot
#: be rewritten after the fact.
EDIT_WINDOW_MS = 24 * 3600 * 1000
#: Actions held for a message not arrived yet (reordered delivery): per contact, and how long.
PENDING_PER_CONTACT = 32
PENDING_MAX_AGE_MS = 24 * 3600 * 1000

E_NOT_ALLOWED = 1050


def _ms() -> int:
    return time.time_ns() // 1_000_000


def not_allowed(message: str) -> AppError:
    return AppError(E_NOT_ALLOWED, "not_allowed", message)


class ContactsView(Protocol):
    def by_name(self, name: str) -> Contact: ...


class LossView(Protocol):
    def check_usable(self) -> None: ...


class ActionsHost(ServiceHost, Protocol):
    """What the actions service uses of the messenger."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def loss(self) -> LossView: ...


def _wire_id(message_id: str) -> bytes | None:
    """A one-to-one message's wire id: its id is the 16 bytes in hex (others have none)."""
    if len(message_id) != 2 * wire.MESSAGE_ID_LEN:
        return None
    try:
        return bytes.fromhex(message_id)
    except ValueError:
        return None


def _check_text(text: str) -> None:
    if len(text.encode()) > wire.MAX_TEXT_BYTES:
        raise AppError(
            E.TOO_LARGE, "too_large", f"a message holds at most {wire.MAX_TEXT_BYTES} bytes"
        )


class Actions:
    def __init__(self, host: ActionsHost) -> None:
        self.m = host

    # --- sending ------------------------------------------------------------------------

    def _session(self, c: Contact) -> Session:
        if c.blocked:
            raise AppError(E.BLOCKED, "blocked", "this contact is blocked")
        blob = self.m.store.get_session(c.id)
        if blob is None:
            raise AppError(E.NOT_READY, "not_ready", "no session with this contact")
        return Session.from_bytes(blob)

    def _own_target(self, message_id: str) -> tuple[Message, Contact, bytes]:
        """A one-to-one message of ours or the contact's, not deleted, with its contact."""
        msg = self.m.store.get_message(message_id)
        wire_id = _wire_id(message_id)
        c = None if msg is None else self.m.store.get_contact(msg.contact_id)
        if msg is None or c is None or wire_id is None:
            raise E.not_found("message")
        if actions_store.extras(self.m.store, [msg.id])[msg.id].deleted:
            raise not_allowed("the message was deleted")
        return msg, c, wire_id

    async def reply(self, name: str, quoted_id: str, text: str) -> dict[str, Any]:
        _check_text(text)
        self.m.loss.check_usable()
        async with self.m.lock:
            c = self.m.contacts.by_name(name)
            quoted = self.m.store.get_message(quoted_id)
            quoted_wire = _wire_id(quoted_id)
            if quoted is None or quoted.contact_id != c.id or quoted_wire is None:
                raise E.not_found("message in this conversation")
            if actions_store.extras(self.m.store, [quoted.id])[quoted.id].deleted:
                raise not_allowed("the message was deleted")
            session = self._session(c)
            wire_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
            payload = wire.ReplyPayload(wire_id, _ms(), quoted_wire, text)
            with self.m.store.transaction():
                mid = self.m.store.add_message(
                    c.id, "out", text, status="queued", message_id=wire_id.hex()
                ).id
                actions_store.set_reply(
                    self.m.store, mid, quoted.id, quoted.body, quoted.direction
                )
                self.m.delivery.enqueue([Recipient(c, session)], payload, message_id=mid,
                                        delay=self.m.delivery.send_jitter())  # fmt: skip
        self.m.delivery.wake()
        return {"message_id": mid, "status": "queued"}

    async def react(self, message_id: str, emoji: str) -> dict[str, Any]:
        try:
            wire.check_reaction(emoji)
        except ValueError as exc:
            raise InvalidParamsError("emoji", str(exc)) from None
        self.m.loss.check_usable()
        async with self.m.lock:
            msg, c, wire_id = self._own_target(message_id)
            session = self._session(c)
            with self.m.store.transaction():
                actions_store.set_reaction(self.m.store, msg.id, "out", emoji, _ms())
                self.m.delivery.enqueue([Recipient(c, session)],
                                        wire.ReactionPayload(wire_id, emoji),
                                        delay=self.m.delivery.send_jitter())  # fmt: skip
        self.m.delivery.wake()
        return {"message_id": msg.id, "emoji": emoji or None}

    async def edit(self, message_id: str, text: str) -> dict[str, Any]:
        _check_text(text)
        self.m.loss.check_usable()
        async with self.m.lock:
            msg, c, wire_id = self._own_target(message_id)
            if msg.direction != "out":
                raise not_allowed("only your own messages can be edited")
            if attachment_store.get(self.m.store, msg.id) is not None:
                raise not_allowed("a file cannot be edited")
            now = _ms()
            if now - msg.created_at > EDIT_WINDOW_MS:
                raise not_allowed("a message can be edited for 24 hours after it was sent")
            session = self._session(c)
            # The recipient keeps the edit with the greatest edited_at_ms: greater than the
            # last one sent even if this clock went back since.
            last = actions_store.extras(self.m.store, [msg.id])[msg.id].edit_sent_at
            order = now if last is None else max(now, last + 1)
            with self.m.store.transaction():
                actions_store.edit(self.m.store, msg.id, text, now, order)
                self.m.delivery.enqueue([Recipient(c, session)],
                                        wire.EditPayload(wire_id, order, text),
                                        delay=self.m.delivery.send_jitter())  # fmt: skip
        self.m.delivery.wake()
        return {"message_id": msg.id, "edited_at": now}

    async def delete(self, message_id: str, for_everyone: bool) -> dict[str, Any]:
        if not for_everyone:
            if not self.m.store.delete_message(message_id):
                raise E.not_found("message")
            return {"deleted": True, "for_everyone": False}
        self.m.loss.check_usable()
        async with self.m.lock:
            msg, c, wire_id = self._own_target(message_id)
            if msg.direction != "out":
                raise not_allowed("only your own messages can be deleted for everyone")
            if attachment_store.get(self.m.store, msg.id) is not None:
                raise not_allowed("a file cannot be deleted for everyone yet")
            session = self._session(c)
            with self.m.store.transaction():
                actions_store.mark_deleted(self.m.store, msg.id, c.id)
                self.m.delivery.enqueue([Recipient(c, session)], wire.DeletePayload(wire_id),
                                        delay=self.m.delivery.send_jitter())  # fmt: skip
        self.m.delivery.wake()
        return {"deleted": True, "for_everyone": True}

    def prune_held(self) -> None:
        """The maintenance loop's: held actions past their 24 hours go (§26.5)."""
        with self.m.store.transaction():
            actions_store.prune_pending(self.m.store, _ms() - PENDING_MAX_AGE_MS)

    # --- receiving (inside the receive transaction) ---------------------------------------

    def on_payload(self, c: Contact, session: Session, p: wire.ActionPayload) -> None:
        if isinstance(p, wire.ReplyPayload):
            self._on_reply(c, session, p)
            return
        target_id = p.target_id.hex()
        target = self.m.store.get_message(target_id)
        if target is None and erased(self.m.store, c.id, target_id):
            return  # erased at its deadline (§27.4): nothing to hold it for
        if target is None:
            # Deleted for me here: replies' copies of it still follow (§26.4).
            if isinstance(p, wire.DeletePayload):
                actions_store.absent_target(self.m.store, c.id, target_id, None)
            elif isinstance(p, wire.EditPayload):
                actions_store.absent_target(self.m.store, c.id, target_id, p.text)
            # Maybe its message is still on the way (§26.5): held, bounded, applied when it comes.
            dropped = actions_store.hold(
                self.m.store, c.id, target_id, wire.encode_payload(p), _ms(),
                per_contact=PENDING_PER_CONTACT, max_age_ms=PENDING_MAX_AGE_MS,
            )  # fmt: skip
            for _ in range(dropped):
                droplog.dropped("dropped a held action (over a contact's limit)")
            return
        self._apply(c, target, p)

    def on_text(self, c: Contact, message_id: str) -> None:
        """A text (or reply) of the contact just stored: the actions held for it, in order."""
        since = _ms() - PENDING_MAX_AGE_MS
        for raw, _ in actions_store.take_pending(self.m.store, c.id, message_id, since=since):
            try:
                p = wire.decode_payload(raw)
            except DecodeError:
                continue
            target = self.m.store.get_message(message_id)
            if target is not None and isinstance(
                p, (wire.ReactionPayload, wire.EditPayload, wire.DeletePayload)
            ):
                self._apply(c, target, p)

    def _on_reply(self, c: Contact, session: Session, p: wire.ReplyPayload) -> None:
        mid = p.message_id.hex()
        if self.m.store.get_message(mid) is not None:
            return  # a duplicate id: never show a message twice
        quoted = self.m.store.get_message(p.quoted_id.hex())
        if quoted is not None and quoted.contact_id != c.id:
            droplog.dropped("dropped a reply quoting a message of another conversation")
            return
        text: str | None = None
        if quoted is not None and not actions_store.extras(self.m.store, [quoted.id])[
            quoted.id
        ].deleted:
            text = quoted.body
        self.m.store.add_message(c.id, "in", p.text, status="received", message_id=mid,
                                 sent_at=p.sent_at_ms)  # fmt: skip
        actions_store.set_reply(self.m.store, mid, p.quoted_id.hex(), text,
                                None if quoted is None else quoted.direction)  # fmt: skip
        # The event names the quoted message, never its text (one copy fewer to erase).
        self.m.ctx.events.emit(
            "message.received",
            {"message_id": mid, "contact": c.name, "text": p.text, "sent_at": p.sent_at_ms,
             "reply_to": p.quoted_id.hex(), "timer": self.m.store.get_timer(c.id)[0]},
        )  # fmt: skip
        self.m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED, [p.message_id])
        self.on_text(c, mid)

    def _apply(
        self, c: Contact, target: Message,
        p: wire.ReactionPayload | wire.EditPayload | wire.DeletePayload,
    ) -> None:  # fmt: skip
        if target.contact_id != c.id:
            droplog.dropped("dropped an action on a message of another conversation")
            return
        extras = actions_store.extras(self.m.store, [target.id])[target.id]
        if extras.deleted:
            droplog.dropped("dropped an action on a deleted message")
            return
        now = _ms()
        if isinstance(p, wire.ReactionPayload):
            if actions_store.set_reaction(self.m.store, target.id, "in", p.emoji, now):
                self.m.ctx.events.emit(
                    "message.reaction",
                    {"message_id": target.id, "contact": c.name, "emoji": p.emoji or None},
                )
            return
        if target.direction != "in":
            droplog.dropped("dropped an edit or deletion of a message not the sender's")
            return
        if attachment_store.get(self.m.store, target.id) is not None:
            droplog.dropped("dropped an edit or deletion of a file")
            return
        if isinstance(p, wire.DeletePayload):
            actions_store.mark_deleted(self.m.store, target.id, c.id)
            self.m.ctx.events.emit("message.deleted", {"message_id": target.id, "contact": c.name})
            return
        # Past 24 hours since it was stored here, an edit still counts when its own stamp is
        # within 24 hours of the message's: one sent again after a renewal (§23, §26.3).
        if now - target.created_at > EDIT_WINDOW_MS and (
            target.sent_at is None or p.edited_at_ms - target.sent_at > EDIT_WINDOW_MS
        ):
            droplog.dropped("dropped an edit past the edit window")
            return
        if extras.edit_sent_at is not None and p.edited_at_ms <= extras.edit_sent_at:
            return  # an older edit overtaken by a newer one (reordered): the newer stays
        actions_store.edit(self.m.store, target.id, p.text, now, p.edited_at_ms)
        self.m.ctx.events.emit(
            "message.edited",
            {"message_id": target.id, "contact": c.name, "text": p.text, "edited_at": now},
        )
