"""Replies, reactions, edits, deletions and timers in groups (docs/protocol.md §25.11).

Each is a one-to-one action (§26, §27) wrapped in a group action payload (0x19) with the
group, the sender's version and the author of the message it names, fanned out to every
other member as a group text is: one ``Delivery.enqueue`` call, the same fixed-size blocks
and outbox, so the relay cannot tell it from a text. The rules are the recipient's, as for
one-to-one conversations (actions.py): a message is named by (author, group message id);
an edit or a deletion for everyone only by its author (the session's identity, never a
field); one reaction per member per message; a timer change by any member. What breaks a
rule is dropped (counted) with no state change and no event. groups_inbound.py has already
judged the sender a member (§25.6) before ``deliver``. Imports groups_state, disappearing
(its labels) and the delivery layer (none imports it back).
"""

from __future__ import annotations

import collections
from typing import Any

from aegisd import droplog
from aegisd.core import wire
from aegisd.core.errors import DecodeError
from aegisd.core.identity import PublicIdentity
from aegisd.core.session import Session
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.rpc import errors as E
from aegisd.store import attachments as A
from aegisd.store import group_actions as GA
from aegisd.store import groups as G
from aegisd.store.db import Contact

from .delivery import Recipient
from .disappearing import label
from .groups_state import DepartedContacts, GroupBase, GroupsHost, now_ms, sendable

#: As for one-to-one messages (actions.py, disappearing.py): the edit window, the actions
#: held for a message not arrived yet (per sender in a group, per group, and how long), a
#: timer stamp's skew bound and the timer change events per sender in a group per hour.
EDIT_WINDOW_MS = 24 * 3600 * 1000
PENDING_PER_SENDER = 16
PENDING_PER_GROUP = 64
PENDING_MAX_AGE_MS = 24 * 3600 * 1000
MAX_SKEW_MS = 86_400_000
STAMP_MAX = 2**63 - 1
VISIBLE_PER_HOUR = 10
#: Erased group messages remembered (per daemon run): an action arriving for one is dropped,
#: not held for a day with an edit's text.
ERASED_KEPT = 1024
E_NOT_ALLOWED = 1050


def not_allowed(message: str) -> AppError:
    return AppError(E_NOT_ALLOWED, "not_allowed", message)


def _check_text(text: str) -> None:
    if len(text.encode()) > wire.MAX_TEXT_BYTES:
        raise AppError(
            E.TOO_LARGE, "too_large", f"a message holds at most {wire.MAX_TEXT_BYTES} bytes"
        )


class GroupActions(GroupBase):
    def __init__(self, host: GroupsHost, pruner: DepartedContacts | None = None) -> None:
        super().__init__(host, pruner)
        self._recent: dict[tuple[int, bytes], collections.deque[int]] = {}
        self._erased: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()

    # --- helpers --------------------------------------------------------------------------

    def _message(self, ref: int, message_id: str) -> tuple[int, G.GroupMessageRow]:
        seq = G.find_message(self.m.store, ref, message_id)
        found = None if seq is None else G.message_at(self.m.store, seq)
        if found is None or found[0] != ref:
            raise E.not_found("message in this group")
        return found[1].seq, found[1]

    def _not_deleted(self, seq: int) -> None:
        extras = GA.extras(self.m.store, [seq])[seq]
        if extras.deleted:
            raise not_allowed("the message was deleted")
        if extras.timer_change is not None:  # a local line: its id was never sent
            raise not_allowed("a timer change is not a message")

    def _author(self, row: G.GroupMessageRow) -> bytes:
        """The message's author as the wire names it: our own key for ours."""
        return row.sender_key or self._me()

    def _send(self, ref: int, make: Any, *, store: Any = None) -> tuple[int, int, int]:
        """Fan an action of ours out to the group's other members (under the lock, inside a
        transaction): ``make(head)`` gives the payload, ``store()`` writes what it stores.
        Returns (recipients, unreachable, stored's result or 0)."""
        head = self._my_head(ref)
        recipients, skipped, strangers = self._targets(head)
        payload = make(head)
        with self.m.store.transaction():
            out = store(recipients, skipped, strangers) if store is not None else 0
            if recipients:
                self.m.delivery.enqueue(recipients, payload, delay=self.m.delivery.send_jitter(),
                                        spread=self.m.delivery.group_spread())  # fmt: skip
        return len(recipients), len(strangers) + len(skipped), out

    # --- the user's calls -----------------------------------------------------------------

    async def reply(self, ref: int, quoted_id: str, text: str) -> dict[str, Any]:
        _check_text(text)
        self.m.check_usable()
        async with self.m.lock:
            qseq, quoted = self._message(ref, quoted_id)
            self._not_deleted(qseq)
            wire_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
            action = wire.ReplyPayload(wire_id, now_ms(), quoted.wire_id, text)

            def store(recipients: list[Recipient], skipped: dict[int, str],
                      strangers: list[bytes]) -> int:  # fmt: skip
                seq = G.add_message(self.m.store, ref, wire_id, "out", text,
                                    sent_at=action.sent_at_ms)  # fmt: skip
                assert seq is not None  # 16 random bytes of ours
                GA.set_reply(self.m.store, seq, quoted.id, quoted.body, quoted.sender_key or b"")
                G.set_statuses(self.m.store, seq, [r.contact.id for r in recipients], "queued")
                for cid, status in skipped.items():
                    G.set_statuses(self.m.store, seq, [cid], status)
                G.add_unsent(self.m.store, seq, strangers)
                return seq

            sent, unreachable, _ = self._send(ref, lambda head: wire.GroupActionPayload(
                head.group_id, head.version, self._author(quoted), action), store=store)
        self.m.delivery.wake()
        return {"message_id": G.api_id(b"", wire_id), "group": ref, "recipients": sent,
                "unreachable": unreachable}  # fmt: skip

    async def react(self, ref: int, message_id: str, emoji: str) -> dict[str, Any]:
        try:
            wire.check_reaction(emoji)
        except ValueError as exc:
            raise InvalidParamsError("emoji", str(exc)) from None
        self.m.check_usable()
        async with self.m.lock:
            seq, row = self._message(ref, message_id)
            self._not_deleted(seq)
            self._send(ref, lambda head: wire.GroupActionPayload(
                head.group_id, head.version, self._author(row),
                wire.ReactionPayload(row.wire_id, emoji)),
                store=lambda *_: GA.set_reaction(self.m.store, seq, b"", emoji, now_ms()))
        self.m.delivery.wake()
        return {"message_id": row.id, "group": ref, "emoji": emoji or None}

    def _own(self, ref: int, message_id: str, what: str) -> tuple[int, G.GroupMessageRow]:
        seq, row = self._message(ref, message_id)
        self._not_deleted(seq)
        if row.direction != "out" or GA.extras(self.m.store, [seq])[seq].timer_change is not None:
            raise not_allowed(f"only your own messages can be {what}")
        if A.of_group_message(self.m.store, seq) is not None:
            raise not_allowed(f"a file cannot be {what}")
        return seq, row

    async def edit(self, ref: int, message_id: str, text: str) -> dict[str, Any]:
        _check_text(text)
        self.m.check_usable()
        async with self.m.lock:
            seq, row = self._own(ref, message_id, "edited")
            now = now_ms()
            if now - row.created_at > EDIT_WINDOW_MS:
                raise not_allowed("a message can be edited for 24 hours after it was sent")
            last = GA.extras(self.m.store, [seq])[seq].edit_sent_at
            order = now if last is None else max(now, last + 1)
            self._send(ref, lambda head: wire.GroupActionPayload(
                head.group_id, head.version, self._me(),
                wire.EditPayload(row.wire_id, order, text)),
                store=lambda *_: GA.edit(self.m.store, ref, seq, row.id, text, now, order))
        self.m.delivery.wake()
        return {"message_id": row.id, "group": ref, "edited_at": now}

    async def delete(self, ref: int, message_id: str, for_everyone: bool) -> dict[str, Any]:
        if not for_everyone:  # delete for me: the row, its events, quotes and file go
            async with self.m.lock:
                seq, row = self._message(ref, message_id)
                aids = A.of_group_seq(self.m.store, seq)
            for aid in aids:
                await self.m.attachments.forget([aid])
            async with self.m.lock:
                with self.m.store.transaction():
                    GA.erase(self.m.store, ref, seq, row.id, aids)
            return {"deleted": True, "for_everyone": False, "group": ref}
        self.m.check_usable()
        async with self.m.lock:
            seq, row = self._own(ref, message_id, "deleted for everyone")
            self._send(ref, lambda head: wire.GroupActionPayload(
                head.group_id, head.version, self._me(), wire.DeletePayload(row.wire_id)),
                store=lambda *_: GA.mark_deleted(self.m.store, ref, seq, row.id))
        self.m.delivery.wake()
        return {"deleted": True, "for_everyone": True, "group": ref}

    def describe_timer(self, ref: int) -> dict[str, Any]:
        self._load(ref)  # not found: refused
        seconds, changed_at = GA.get_timer(self.m.store, ref)
        return {"group": ref, "contact": None, "seconds": seconds,
                "label": label(seconds), "changed_at": changed_at or None}  # fmt: skip

    async def set_timer(self, ref: int, seconds: int) -> dict[str, Any]:
        """Any member may set it (as either side of a one-to-one conversation): shown to all."""
        self.m.check_usable()
        async with self.m.lock:
            now = now_ms()
            in_force = min(GA.get_timer(self.m.store, ref)[1], now + MAX_SKEW_MS)
            changed_at = min(max(now, in_force + 1), STAMP_MAX)
            self._send(ref, lambda head: wire.GroupActionPayload(
                head.group_id, head.version, bytes(wire.ED25519_LEN),
                wire.TimerPayload(changed_at, seconds)),
                store=lambda *_: self._timer_set(ref, seconds, changed_at))
        self.m.delivery.wake()
        return self.describe_timer(ref)

    def _timer_set(self, ref: int, seconds: int, changed_at: int) -> None:
        self._record_timer(ref, seconds, changed_at, None)
        self.m.sync_groups.changed(ref)  # to this profile's other devices (0x4A)

    def synced_timer(self, ref: int, a: wire.TimerPayload) -> None:
        """The group's timer at another device of ours (own_sync_groups.py, 0x4A, inside
        the receive's transaction): the later change wins, as a member's (§25.11); shown as
        ours (that device's user set it, or a member whose change this one missed)."""
        if a.changed_at_ms == 0 or a.changed_at_ms > now_ms() + MAX_SKEW_MS:
            return  # never set there, or stamped too far ahead
        seconds, changed_at = GA.get_timer(self.m.store, ref)
        if (a.changed_at_ms, a.seconds) <= (changed_at, seconds):
            return
        if a.seconds == seconds:
            GA.set_timer(self.m.store, ref, seconds, a.changed_at_ms)
            return
        self._record_timer(ref, a.seconds, a.changed_at_ms, None)

    def _record_timer(self, ref: int, seconds: int, changed_at: int, by: bytes | None,
                      emit: bool = True, from_contact: str | None = None) -> None:  # fmt: skip
        GA.set_timer(self.m.store, ref, seconds, changed_at)
        # a line of its own, never sent (its id is local): "[timer] 1 hour"; one member's
        # consecutive changes rewrite its line (as one-to-one, §27.2): the history always
        # shows the timer in force, and a member changing it over and over fills nothing
        body, now = f"[timer] {label(seconds)}", now_ms()
        seq = GA.merge_timer_line(self.m.store, ref, by or b"", body, seconds, now)
        if seq is None:
            seq = G.add_message(self.m.store, ref, self.m.entropy.random(wire.MESSAGE_ID_LEN),
                                "out" if by is None else "in", body,
                                sender_key=by, read_at=now)  # fmt: skip
            assert seq is not None
            GA.mark_timer_line(self.m.store, seq, seconds)
        if emit:
            at = G.message_at(self.m.store, seq)
            self.m.ctx.events.emit("conversation.timer", {
                "group": ref, "contact": None, "seconds": seconds,
                "by": "self" if by is None else by.hex(), "from_contact": from_contact,
                "message_id": at[1].id if at else None})  # fmt: skip

    def share_timer(self, c: Contact, only: int | None = None) -> None:
        """The timer in force (its pair, even off and never set: every add and new session
        sends the same) to a member we just added or whose session just became ready
        (inside its transaction), for each group (or ``only``) we both are members of: a
        change it missed (it joined later, or had no session with the member who made it)
        reaches it thus; one it has already changes nothing (§25.11)."""
        blob = self.m.store.get_session(c.id)
        if blob is None or c.identity_key is None or c.blocked or not sendable(c):
            return
        ident = PublicIdentity.from_bytes(c.identity_key)
        refs = [only] if only is not None else [g.id for g in G.list_groups(self.m.store)]
        session = Session.from_bytes(blob)
        for ref in refs:
            if G.get_group(self.m.store, ref) is None:
                continue  # gone since (left, or the invitation refused)
            head = self._load(ref)[1].head
            member = head.member(ident.ed_pub)
            if (head.member(self._me()) is None or member is None
                    or not member.identity.same_keys(ident)):  # fmt: skip
                continue
            seconds, changed_at = GA.get_timer(self.m.store, ref)
            self.m.delivery.enqueue([Recipient(c, session)], wire.GroupActionPayload(
                head.group_id, head.version, bytes(wire.ED25519_LEN),
                wire.TimerPayload(changed_at, seconds)))  # fmt: skip

    def prune_held(self) -> None:
        with self.m.store.transaction():
            GA.prune_pending(self.m.store, now_ms() - PENDING_MAX_AGE_MS)

    def note_erased(self, ref: int, api_id: str) -> None:
        self._erased[(ref, api_id)] = None
        while len(self._erased) > ERASED_KEPT:
            self._erased.popitem(last=False)

    # --- receiving (inside the receive transaction; the sender judged a member) -----------

    def deliver(self, ref: int, c: Contact, session: Session, sender: PublicIdentity,
                p: wire.GroupActionPayload) -> None:  # fmt: skip
        shown = None if c.id in G.group_contact_ids(self.m.store) else c.name
        a = p.action
        if isinstance(a, wire.TimerPayload):
            self._on_timer(ref, sender, a, shown)
            return
        if isinstance(a, wire.ReplyPayload):
            self._on_reply(ref, c, session, sender, p.author, a, shown)
            return
        if isinstance(a, (wire.EditPayload, wire.DeletePayload)) and p.author != sender.ed_pub:
            droplog.dropped("dropped a group edit or deletion of a message not the sender's")
            return
        author = b"" if p.author == self._me() else p.author
        api_id = G.api_id(author, a.target_id)
        seq = G.find_message(self.m.store, ref, api_id)
        if seq is None:
            if (ref, api_id) in self._erased:
                return  # erased at its deadline: nothing to hold it for
            dropped = GA.hold(self.m.store, ref, c.id, author, a.target_id,
                              wire.encode_payload(p), now_ms(), per_group=PENDING_PER_GROUP,
                              per_sender=PENDING_PER_SENDER,
                              max_age_ms=PENDING_MAX_AGE_MS)  # fmt: skip
            for _ in range(dropped):
                droplog.dropped("dropped a held group action (over a sender's or a group's limit)")
            return
        self._apply(ref, seq, api_id, sender, a, shown)

    def _on_timer(self, ref: int, sender: PublicIdentity, a: wire.TimerPayload,
                  shown: str | None) -> None:  # fmt: skip
        now = now_ms()
        if a.changed_at_ms > now + MAX_SKEW_MS:
            droplog.dropped("dropped a group timer change stamped more than a day ahead")
            return
        seconds, changed_at = GA.get_timer(self.m.store, ref)
        if (a.changed_at_ms, a.seconds) <= (changed_at, seconds):
            return  # the later change wins; at equal times the larger value (§27)
        if a.seconds == seconds:
            GA.set_timer(self.m.store, ref, seconds, a.changed_at_ms)
            return
        # the line is always written (or rewritten); only the events are counted, per
        # (group, sender): one member cannot silence the others' changes (§25.11)
        recent = self._recent.setdefault((ref, sender.ed_pub), collections.deque())
        while recent and recent[0] <= now - 3_600_000:
            recent.popleft()
        visible = len(recent) < VISIBLE_PER_HOUR
        if visible:
            recent.append(now)
        else:
            droplog.dropped("a member's group timer changes past the hourly limit: no event")
        self._record_timer(ref, a.seconds, a.changed_at_ms, sender.ed_pub, visible, shown)

    def _on_reply(self, ref: int, c: Contact, session: Session, sender: PublicIdentity,
                  quoted_author: bytes, a: wire.ReplyPayload,
                  shown: str | None) -> None:  # fmt: skip
        local = b"" if quoted_author == self._me() else quoted_author
        quoted_api = G.api_id(local, a.quoted_id)
        qseq = G.find_message(self.m.store, ref, quoted_api)  # in this group only
        text = None
        if qseq is not None and not GA.extras(self.m.store, [qseq])[qseq].deleted:
            found = G.message_at(self.m.store, qseq)
            text = found[1].body if found else None
        seq = G.add_message(self.m.store, ref, a.message_id, "in", a.text,
                            sender_key=sender.ed_pub, sent_at=a.sent_at_ms)  # fmt: skip
        if seq is None:
            return  # this author's duplicate: never shown twice
        GA.set_reply(self.m.store, seq, quoted_api, text, None if qseq is None else local)
        mid = G.api_id(sender.ed_pub, a.message_id)
        self.m.ctx.events.emit("group.message", {
            "group": ref, "message_id": mid, "from": sender.ed_pub.hex(), "from_contact": shown,
            "text": a.text, "sent_at": a.sent_at_ms, "reply_to": quoted_api,
            "timer": GA.get_timer(self.m.store, ref)[0]})  # fmt: skip
        self.m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED,
                                      [a.message_id])  # fmt: skip
        self.on_message(ref, sender.ed_pub, a.message_id)

    def on_message(self, ref: int, author: bytes, wire_id: bytes) -> None:
        """A member's text, reply or file just stored: the actions held for it, in order."""
        since = now_ms() - PENDING_MAX_AGE_MS
        for cid, raw in GA.take_pending(self.m.store, ref, author, wire_id, since=since):
            c = self.m.store.get_contact(cid)
            try:
                p = wire.decode_payload(raw)
            except DecodeError:
                continue
            if c is None or c.identity_key is None or not isinstance(p, wire.GroupActionPayload):
                continue
            sender = PublicIdentity.from_bytes(c.identity_key)
            head = self._load(ref)[1].head
            member = head.member(sender.ed_pub)
            if member is None or not member.identity.same_keys(sender):
                continue  # removed since it was held (§25.6)
            api_id = G.api_id(author, wire_id)
            seq = G.find_message(self.m.store, ref, api_id)
            a = p.action
            if seq is not None and isinstance(
                a, (wire.ReactionPayload, wire.EditPayload, wire.DeletePayload)
            ):
                shown = None if c.id in G.group_contact_ids(self.m.store) else c.name
                self._apply(ref, seq, api_id, sender, a, shown)

    def _apply(self, ref: int, seq: int, api_id: str, sender: PublicIdentity,
               a: wire.ReactionPayload | wire.EditPayload | wire.DeletePayload,
               shown: str | None) -> None:  # fmt: skip
        extras = GA.extras(self.m.store, [seq])[seq]
        if extras.deleted:
            droplog.dropped("dropped a group action on a deleted message")
            return
        if extras.timer_change is not None:
            droplog.dropped("dropped a group action on a timer line")
            return
        now = now_ms()
        base = {"group": ref, "message_id": api_id, "from": sender.ed_pub.hex(),
                "from_contact": shown, "contact": None}  # fmt: skip
        if isinstance(a, wire.ReactionPayload):
            if GA.set_reaction(self.m.store, seq, sender.ed_pub, a.emoji, now):
                self.m.ctx.events.emit("message.reaction", {**base, "emoji": a.emoji or None})
            return
        found = G.message_at(self.m.store, seq)
        if found is None or found[1].sender_key != sender.ed_pub:
            droplog.dropped("dropped a group edit or deletion of a message not the sender's")
            return
        if A.of_group_message(self.m.store, seq) is not None:
            droplog.dropped("dropped a group edit or deletion of a file")
            return
        if isinstance(a, wire.DeletePayload):
            GA.mark_deleted(self.m.store, ref, seq, api_id)
            self.m.ctx.events.emit("message.deleted", base)
            return
        row = found[1]
        if now - row.created_at > EDIT_WINDOW_MS and (
            row.sent_at is None or a.edited_at_ms - row.sent_at > EDIT_WINDOW_MS
        ):
            droplog.dropped("dropped a group edit past the edit window")
            return
        if extras.edit_sent_at is not None and a.edited_at_ms <= extras.edit_sent_at:
            return  # an older edit overtaken by a newer one (reordered): the newer stays
        GA.edit(self.m.store, ref, seq, api_id, a.text, now, a.edited_at_ms)
        self.m.ctx.events.emit("message.edited", {**base, "text": a.text, "edited_at": now})
