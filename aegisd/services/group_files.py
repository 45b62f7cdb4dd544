"""Files to a group (docs/protocol.md §25.10): one copy per member.

The sender encrypts the file once per other member, each copy under a seed of its own, into
its own spool; each copy is uploaded like a one-to-one file (its own connection and quota,
attachments.py) and, once all its blocks are up, its descriptor goes to that member alone
inside a group file payload (0x11) carrying the group message's id. Each member fetches its
own copy, verifies it and deletes it at the relay, as for a file from a contact (a member on
several devices leaves it to expire, docs/protocol.md §22.5: each device fetches it): no blob is
fetched by two members, so the relay cannot link the members by the blobs they fetch, and
nobody has to decide when a shared blob may go. The price is N - 1 uploads (bytes, time,
proofs of work): the figures are in docs/threat-model.md and bench/group_files.py.

Which copy is whose is a setting per copy (``COPY_KEY``: the group and message it belongs
to), committed with its row and dropped once its descriptor is queued, as introductions do
(groups_state.INTRO_KEY). Imports groups_state, attachments and the delivery layer (none of
them imports it back).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aegisd import droplog
from aegisd.core import group as core
from aegisd.core import wire
from aegisd.core.attachment import clean_file_name
from aegisd.core.identity import PublicIdentity
from aegisd.core.session import Session
from aegisd.rpc import AppError
from aegisd.store import attachments as A
from aegisd.store import group_actions as GA
from aegisd.store import groups as G
from aegisd.store.attachments import AttachmentRow
from aegisd.store.db import Contact

from .attachment_disk import Spooled
from .attachments import check_caption, file_text
from .delivery import Recipient
from .groups_state import DepartedContacts, GroupBase, GroupsHost, now_ms

#: Setting per outgoing copy, until its descriptor is queued: {"group": ref, "message": mid}.
COPY_KEY = "group.file."
#: A member's received files still downloading, at most (count, bytes): a group contact is
#: one the user never added; beyond, a file is kept failed, never fetched (docs/api.md).
SETTING_PENDING_FILES = "groups.files.max_pending"
SETTING_PENDING_BYTES = "groups.files.max_pending_bytes"
MAX_PENDING_FILES = 10
MAX_PENDING_BYTES = 250_000_000
TOO_MANY_TEXT = ("too many files from this member: its earlier files are still downloading "
                 "(aegis attachment retry fetches it once they are done)")
#: Copies encrypted at once while a send prepares them (each a thread reading the file).
SPOOL_PARALLEL = 2


class GroupFiles(GroupBase):
    def __init__(self, host: GroupsHost, pruner: DepartedContacts | None = None) -> None:
        super().__init__(host, pruner)
        host.attachments.copy_hook = self.uploaded
        host.attachments.delete_hook = self.forget
        # groups_inbound.py sets it: the group actions held for a message just stored
        self.actions_hook: Any = lambda ref, author, wire_id: None

    # --- sending --------------------------------------------------------------------------

    async def send(self, ref: int, path: str, caption: str | None = None) -> dict[str, Any]:
        files = self.m.attachments
        caption = check_caption(caption)
        p, limit = files.check_source(path)
        self.m.check_usable()
        async with self.m.lock:
            recipients, _, _ = self._targets(self._my_head(ref))
        # the relay the copies go to (not needed when nobody is to get one)
        relay_url = self.m.mailboxes.relay_url() if recipients else ""
        # One copy per member, encrypted before anything commits (the source may change or
        # go once the call returns); outside the lock: it reads the whole file N - 1 times.
        # Every copy's id is chosen before any is written, so that whatever happens (a copy
        # that fails, the call cancelled) every spool made is discarded, none left behind.
        ids = {r.contact.id: files.new_id() for r in recipients}
        copies: dict[int, Spooled] = {}
        gate = asyncio.Semaphore(SPOOL_PARALLEL)

        async def one(cid: int) -> None:
            async with gate:
                copies[cid] = await files.spool(p, limit, ids[cid])

        # return_exceptions: a failure does not leave the others writing unseen; shield: a
        # cancelled call lets the copies under way end (a thread cannot be stopped), and
        # discards them then.
        work = asyncio.gather(*(one(cid) for cid in ids), return_exceptions=True)
        committed: list[str] = []
        try:
            for result in await asyncio.shield(work):
                if isinstance(result, BaseException):
                    raise result
            if len({(c.size, c.digest) for c in copies.values()}) > 1:
                # read N - 1 times: every member must get the same file
                raise files.bad_file("the file changed while it was read")
            async with self.m.lock:
                head = self._my_head(ref)
                # Judged again: a member removed while the copies were made gets none.
                recipients, skipped, strangers = self._targets(head)
                for r in recipients:
                    if r.contact.id not in copies:  # reachable only since: counted, not sent
                        skipped[r.contact.id] = "unreachable"
                sent = [r for r in recipients if r.contact.id in copies]
                wire_id = self.m.entropy.random(wire.MESSAGE_ID_LEN)
                mid = G.api_id(b"", wire_id)
                name = clean_file_name(p.name)
                now = now_ms()
                with self.m.store.transaction():
                    seq = G.add_message(self.m.store, ref, wire_id, "out",
                                        file_text(name, caption), sent_at=now)  # fmt: skip
                    assert seq is not None  # 16 random bytes of ours
                    G.set_statuses(self.m.store, seq, [r.contact.id for r in sent], "queued")
                    for cid, status in skipped.items():
                        G.set_statuses(self.m.store, seq, [cid], status)
                    G.add_unsent(self.m.store, seq, strangers)
                    for r in sent:
                        copy = copies[r.contact.id]
                        A.add(self.m.store, copy.row(r.contact.id, relay_url, now))
                        # the copy names its message: a file is not edited, and its copies
                        # go with the message (deleted, or erased by its timer)
                        A.link_group_message(self.m.store, copy.id, seq)
                        if caption:  # each copy's descriptor carries it (0x1A, §25.10)
                            A.set_extras(self.m.store, copy.id, A.Extras(caption))
                        self.m.store.set_setting(f"{COPY_KEY}{copy.id}",
                                                 {"group": ref, "message": mid})  # fmt: skip
                committed = [copies[r.contact.id].id for r in sent]
        finally:
            # copies not committed (a failure, or their member gone meanwhile) go
            left = [aid for aid in ids.values() if aid not in committed]
            if work.done():
                files.discard(left)
            else:  # cancelled while copies are written: they go once written
                work.add_done_callback(lambda _: files.discard(left))
        for aid in committed:
            files.start(aid)
        return {"message_id": mid, "name": name, "caption": caption,
                "recipients": len(committed),
                "unreachable": len(strangers) + len(skipped),
                "attachments": committed}  # fmt: skip

    async def uploaded(self, row: AttachmentRow) -> bool:
        """An upload is complete (attachments.py's hook): if it is a group's copy, queue its
        descriptor to its member, unless the member has left the group meanwhile (then the
        copy is dropped: nothing sent after a removal reaches the removed)."""
        key = f"{COPY_KEY}{row.id}"
        meta = self.m.store.get_setting(key)
        if meta is None:
            return False
        unsent = False
        async with self.m.lock:
            ref, mid = int(meta["group"]), str(meta["message"])
            seq = G.find_message(self.m.store, ref, mid)
            c = self.m.store.get_contact(row.contact_id)
            blob = self.m.store.get_session(row.contact_id)
            head = None
            if G.get_group(self.m.store, ref) is not None:
                head = self._load(ref)[1].head
            member = None
            if head is not None and c is not None and c.identity_key is not None:
                member = head.member(PublicIdentity.from_bytes(c.identity_key).ed_pub)
            with self.m.store.transaction():
                self.m.store.set_setting(key, None)
                if (head is None or c is None or blob is None or member is None
                        or c.blocked or seq is None):  # fmt: skip
                    A.set_state(self.m.store, row.id, "failed", "not sent: the member left "
                                "the group or is blocked, or the group or its message is gone")
                    if c is not None and seq is not None:
                        status = "blocked" if c.blocked else "unreachable"
                        G.set_statuses(self.m.store, seq, [c.id], status)
                    droplog.dropped("a group file copy not sent (its member is gone)")
                    unsent = True
                else:
                    unsent = not self._announce(row, ref, seq, mid, c, blob, head)
        if unsent:  # its blobs never named to anyone: they go now
            await self.m.attachments.delete_blobs(row)
        else:
            self.m.delivery.wake()
        return True

    def _announce(self, row: AttachmentRow, ref: int, seq: int, mid: str, c: Contact,
                  blob: bytes, head: core.GroupState) -> bool:  # fmt: skip
        """The copy's descriptor to its member (inside the transaction); False when it
        cannot be sent (the copy failed: its blobs are to go)."""
        descriptor = wire.AttachmentPayload(
            bytes.fromhex(mid), row.sent_at or now_ms(), row.seed, row.size, row.blocks,
            row.digest, row.relay_url, row.name, A.extras(self.m.store, row.id).caption,
        )  # fmt: skip
        payload = wire.GroupFilePayload(head.group_id, head.version, descriptor)
        try:  # refuses before it writes anything
            self.m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload,
                                    delay=self.m.delivery.send_jitter())  # fmt: skip
        except AppError as exc:  # the member cannot be reached (its session failed)
            A.set_state(self.m.store, row.id, "failed", exc.message)
            G.set_statuses(self.m.store, seq, [c.id], "failed")
            return False
        A.set_state(self.m.store, row.id, "uploaded")
        self.m.ctx.events.emit("attachment.completed", {
            "attachment_id": row.id, "contact": None, "direction": "out",
            "group": ref, "message_id": mid,
        })  # fmt: skip
        return True

    def forget(self, row: AttachmentRow) -> None:
        """A copy deleted (attachments.delete) before its descriptor went: it never will, and
        its member counts as failed (inside the deleting transaction)."""
        key = f"{COPY_KEY}{row.id}"
        meta = self.m.store.get_setting(key)
        if meta is None:
            return
        self.m.store.set_setting(key, None)
        seq = G.find_message(self.m.store, int(meta["group"]), str(meta["message"]))
        if seq is not None and G.statuses(self.m.store, seq).get(row.contact_id) == "queued":
            G.set_statuses(self.m.store, seq, [row.contact_id], "failed")

    # --- receiving (groups_inbound.py decided the sender may post) -------------------------

    def deliver(self, ref: int, c: Contact, session: Session, sender: PublicIdentity,
                p: wire.GroupFilePayload) -> None:  # fmt: skip
        """A member's file, inside the receive transaction: the group's history gains
        ``[file] NAME``, the attachment downloads as one from a contact would (the same
        limits: size, relay URL policy, downloads per contact)."""
        files = self.m.attachments
        # Named by (group, author, id) like a text (§25.9): another member's copy of the id
        # names another file, and cannot suppress this one.
        mid = G.api_id(sender.ed_pub, p.file.message_id)
        # The attachment's id is local and random: it names the spool file on disk, which
        # must not show who sent it (the author's key is in ``mid``); the row points to its
        # group message instead (``link_group_message``).
        aid = self.m.entropy.random(wire.MESSAGE_ID_LEN).hex()
        if not files.acceptable(p.file, aid):
            return
        name = clean_file_name(p.file.name)
        text = file_text(name, p.file.caption)  # as a contact's: history and search show it
        seq = G.add_message(self.m.store, ref, p.file.message_id, "in", text,
                            sender_key=sender.ed_pub, sent_at=p.file.sent_at_ms)  # fmt: skip
        if seq is None:
            return  # this author's duplicate
        self.m.ctx.events.emit("group.message", {
            "group": ref, "message_id": mid, "from": sender.ed_pub.hex(),
            "from_contact": files.shown(c), "text": text,
            "sent_at": p.file.sent_at_ms, "attachment_id": aid,
            "timer": GA.get_timer(self.m.store, ref)[0],
            **({"caption": p.file.caption} if p.file.caption else {})})  # fmt: skip
        count, size = A.pending_group_files(self.m.store, c.id)
        # The first pending file is bounded by max_size alone (a limit above the byte cap
        # must not refuse every large file); the next ones by the member's caps.
        store = self.m.store
        most = int(store.get_setting(SETTING_PENDING_FILES, MAX_PENDING_FILES))
        most_bytes = int(store.get_setting(SETTING_PENDING_BYTES, MAX_PENDING_BYTES))
        over = count >= most or (count > 0 and size + p.file.size > most_bytes)
        files.take_descriptor(c, p.file, aid, refused=TOO_MANY_TEXT if over else None)
        A.link_group_message(self.m.store, aid, seq)
        self.actions_hook(ref, sender.ed_pub, p.file.message_id)  # actions held for it
        self.m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED,
                                      [p.file.message_id])  # fmt: skip
