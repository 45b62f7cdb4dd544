"""Transcripts of message actions between this profile's own devices (0x48, docs/devices.md
§6, docs/protocol.md §28.6): a reply, a reaction, an edit, a deletion for everyone, a timer
change or a file this device sent to a contact is applied on the other devices as made by
us, under the same message IDs.

Sending: the service that made the action (actions.py, disappearing.py, attachments.py)
calls ``made`` inside the transaction that enqueued it for the contact; the payload goes
wrapped, byte for byte, in every live sync session (own_sync.py's ``_send``: a random delay
each, but never due before a sync payload queued earlier to the same device, so a device
gets a message before its actions unless a deposit had to be retried). Receiving
(own_sync.py dispatches here, inside the receive's transaction): a duplicate or an echo
changes nothing; an action on a message held in another conversation, or an edit or
deletion of a message not ours, is dropped and counted; an action on a message this device
does not hold yet (a contact's not received here yet, or ours overtaken by a retried
deposit) is held (store/own_sync.py: at most HELD_KEPT, for HELD_FOR) and applied when the
message is stored (``arrived``). Nothing here logs a contact, an ID or a text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from aegisd import droplog
from aegisd.core import sync_actions as sa
from aegisd.core import wire
from aegisd.core.errors import BundleError, DecodeError
from aegisd.core.identity import PublicIdentity
from aegisd.store import actions as actions_store
from aegisd.store import attachments as attachment_store
from aegisd.store import groups as group_store
from aegisd.store import own_sync as rows
from aegisd.store.db import Contact

from .host import ServiceHost


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _now() -> int:
    return int(time.time())


class TranscriptsView(Protocol):
    """What the services that make an action (actions.py, attachments.py, disappearing.py)
    use: our other devices get what this device sends (``made``)."""

    def made(self, c: Contact, payload: sa.Inner) -> None: ...


class ContactsView(Protocol):
    def with_identity(self, identity: PublicIdentity) -> Contact | None: ...


class DisappearingView(Protocol):
    def wake(self) -> None: ...
    def synced(self, c: Contact, p: wire.TimerPayload) -> None: ...


class AttachmentsView(Protocol):
    def take_sent(self, c: Contact, p: wire.AttachmentPayload) -> bool: ...


class ActionsSyncHost(ServiceHost, Protocol):
    @property
    def contacts(self) -> ContactsView: ...
    @property
    def disappearing(self) -> DisappearingView: ...
    @property
    def attachments(self) -> AttachmentsView: ...


class OwnSyncActions:
    def __init__(self, host: ActionsSyncHost, send: Callable[[bytes], None]) -> None:
        self.m = host
        self._send = send

    def made(self, c: Contact, payload: sa.Inner) -> None:
        """An action this device just enqueued for ``c`` (inside that transaction)."""
        if c.identity_key is None or group_store.is_group_contact(self.m.store, c.id):
            return
        self._send(sa.encode(sa.ActionTranscript(c.identity_key, payload)))

    # --- receiving (inside the receive's transaction) -----------------------------------

    def on_payload(self, device_id: bytes, p: sa.ActionTranscript) -> None:
        try:
            c = self.m.contacts.with_identity(PublicIdentity.from_bytes(p.contact))
        except (DecodeError, BundleError):
            c = None
        if c is None or group_store.is_group_contact(self.m.store, c.id):
            droplog.dropped("dropped a sync payload about an unknown contact")
            return
        inner = p.payload
        if isinstance(inner, wire.ReplyPayload):
            self._reply(c, inner)
        elif isinstance(inner, wire.TimerPayload):
            self.m.disappearing.synced(c, inner)
        elif isinstance(inner, wire.AttachmentPayload):
            if self.m.attachments.take_sent(c, inner):
                self.m.disappearing.wake()  # its deadline, if the conversation has a timer
                self.arrived(inner.message_id.hex())
        else:
            self._on_message(c, inner, p)

    def arrived(self, message_id: str) -> None:
        """A message was stored here (a contact's, or a transcript of ours; inside the
        receive's transaction): the actions held for it apply now, in the order they came."""
        for data in rows.take_held(self.m.store, message_id, _now()):
            try:
                p = sa.decode(data)
            except DecodeError:
                continue
            if isinstance(p, sa.ActionTranscript):
                self.on_payload(b"", p)

    def _reply(self, c: Contact, p: wire.ReplyPayload) -> None:
        store = self.m.store
        mid = p.message_id.hex()
        if store.get_message(mid) is not None:
            return  # an echo or a duplicate
        quoted = store.get_message(p.quoted_id.hex())
        if quoted is not None and quoted.contact_id != c.id:
            droplog.dropped("dropped a reply quoting a message of another conversation")
            return
        text = None
        if quoted is not None and not actions_store.extras(store, [quoted.id])[quoted.id].deleted:
            text = quoted.body
        store.add_message(c.id, "out", p.text, status="sent", message_id=mid,
                          sent_at=p.sent_at_ms)  # fmt: skip
        actions_store.set_reply(store, mid, p.quoted_id.hex(), text,
                                None if quoted is None else quoted.direction)  # fmt: skip
        self.m.ctx.events.emit("message.transcript", {
            "message_id": mid, "contact": c.name, "text": p.text, "sent_at": p.sent_at_ms,
            "reply_to": p.quoted_id.hex(),
        })  # fmt: skip
        self.m.disappearing.wake()
        self.arrived(mid)

    def _on_message(self, c: Contact, p: wire.ReactionPayload | wire.EditPayload
                    | wire.DeletePayload, transcript: sa.ActionTranscript) -> None:  # fmt: skip
        store = self.m.store
        target = store.get_message(p.target_id.hex())
        if target is None:
            # Not here yet (lost or late in its own mailbox: a contact's message, or ours
            # whose deposit was retried): held, applied when it comes (``arrived``).
            rows.hold_action(store, p.target_id.hex(), sa.encode(transcript), _now())
            return
        if target.contact_id != c.id:
            droplog.dropped("dropped a synced action on a message of another conversation")
            return
        extras = actions_store.extras(store, [target.id])[target.id]
        if extras.deleted:
            return  # deleted here already (an echo, or deleted before the action came)
        if isinstance(p, wire.ReactionPayload):
            if actions_store.set_reaction(store, target.id, "out", p.emoji, _ms()):
                self._emit("message.reaction", c, target.id, emoji=p.emoji or None)
            return
        if target.direction != "out" or attachment_store.get(store, target.id) is not None:
            droplog.dropped("dropped a synced edit or deletion of a message not ours")
            return
        if isinstance(p, wire.DeletePayload):
            actions_store.mark_deleted(store, target.id, c.id)
            self._emit("message.deleted", c, target.id)
            return
        if extras.edit_sent_at is not None and p.edited_at_ms <= extras.edit_sent_at:
            return  # this edit again, or one overtaken by a newer
        now = _ms()
        actions_store.edit(store, target.id, p.text, now, p.edited_at_ms)
        self._emit("message.edited", c, target.id, text=p.text, edited_at=now)

    def _emit(self, kind: str, c: Contact, message_id: str, **fields: Any) -> None:
        self.m.ctx.events.emit(kind, {"message_id": message_id, "contact": c.name, **fields,
                                      "by": "self"})  # fmt: skip
