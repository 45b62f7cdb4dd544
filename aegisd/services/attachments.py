"""File attachments: encrypt, upload to the relay's blob area, send the descriptor, fetch,
verify, keep encrypted at rest, save (docs/protocol.md §22).

Crash safety:
- Sending: the whole file is encrypted into a spool file in the profile directory before the
  call returns (so the source may change or vanish afterwards); the attachment row and its
  message commit together after that. The upload then resumes from the last window of blocks
  the relay confirmed; blob ids derive from the file's seed, so a block put twice answers
  `exists`, which counts as done. The descriptor is enqueued (in the contact's ordered outbox)
  only once every block is up.
- Receiving: the descriptor, the message and the attachment row commit with the ratchet step.
  Fetched blocks are written at their offset in a file in the profile directory, still
  encrypted under the file's key (the key lives only in the SQLCipher store); progress is
  committed after each window is on disk.
- The relay's copy: a device deletes a file's blobs once it verified them only when the device
  list it holds names no other device (docs/devices.md §8): each of a person's devices gets
  the same descriptor and fetches the same blobs, so the first to verify must not delete them
  under the others; with several devices they expire at the relay's blob_ttl.

The files in the profile (spool, stored blocks, decrypting to a target) are
attachment_disk.py's; a group's copies (one per member) are group_files.py's, which hooks in
through ``copy_hook`` and ``delete_hook``. Nothing here logs a file name, a path, an id, a
key or file content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from aegisd import droplog
from aegisd.core import devices as dv
from aegisd.core import wire
from aegisd.core.attachment import MAX_FILE_SIZE, FileKeys, clean_file_name
from aegisd.core.errors import DecryptionError, ProtocolError
from aegisd.core.session import Session
from aegisd.rpc import AppError, InvalidParamsError
from aegisd.store import attachments as db
from aegisd.store import groups as G
from aegisd.store.attachments import AttachmentRow
from aegisd.store.db import Contact
from aegisd.transport.relaylink import FULL_BACKOFF, UNAVAILABLE, RelayUnavailable, with_relay
from relay.client import RelayClient, RelayError
from relay.wire import E_DENIED, E_EXISTS, E_FULL

from .attachment_disk import (
    BLOCK,
    Corrupt,
    LocalIOError,
    Spooled,
    TooLarge,
    encrypt_to_spool,
    fsync_dir,
    local,
    read_at,
    verify,
    write_at,
    write_plain,
)
from .delivery import BLOB_AREA, Recipient
from .host import ServiceHost

if TYPE_CHECKING:
    from aegisd.transport.network import Network

    from .delivery import Delivery
    from .mailboxes import Mailboxes

log = logging.getLogger("aegisd.attachments")

SETTING_MAX_SIZE = "attachments.max_size"
#: This profile's own device list (services/devices.py writes it: docs/devices.md §4.5).
SETTING_OWN_LIST = "devices.list"
MAX_PATH = 4096  # bytes of a path the API takes (send, save)
DEFAULT_MAX_SIZE = 100_000_000  # bytes (100 MB); at most MAX_FILE_SIZE (one relay quota)
WINDOW = 32  # blocks in flight per transfer; progress is committed per window
FETCH_TRIES = 3  # fetches of a block that fails to open before the file is reported failed
PROGRESS_INTERVAL = 0.5  # seconds between attachment.progress events of one transfer
RETRY_MAX = 60.0
#: Blocks asked of the relay per blob quota (its default blob_quota_blocks): a quota is paid in
#: proportion to its size, so the daemon asks for what is left of the file, at most this.
BLOB_QUOTA_MAX = 8192
#: Connections to a contact's relay for one file that fail in a row before the download is
#: given up (state "failed", event attachment.failed; attachments.retry starts it again):
#: the relay was chosen by the contact, which must not get to see this daemon come back for
#: ever. With the back-off below (1, 2, 4 ... 60 s between tries), about 6 minutes plus the
#: connection timeouts. A setting may lower it.
FETCH_CONNECT_TRIES = 12
SETTING_FETCH_TRIES = "attachments.fetch_tries"
UNREACHABLE_TEXT = (
    "the contact's relay for this file could not be reached (gave up after {n} tries): "
    "aegis attachment retry ID tries again"
)
REFUSED_URL_TEXT = "the contact's relay URL for this file is not allowed (see docs/threat-model.md)"
BLOCKED_TEXT = "the contact is blocked"
#: Downloads of one contact's files that run at once; the others wait their turn (a contact
#: sending many descriptors gets no more connections, and cannot hold up other contacts').
DOWNLOADS_PER_CONTACT = 2

# Application error codes 1030-1039 (docs/api.md, "Errors").
E_BAD_FILE = 1030
E_FILE_TOO_LARGE = 1031
E_NOT_COMPLETE = 1032
E_TARGET_EXISTS = 1033
E_NOT_RETRYABLE = 1034

STATES = ("uploading", "uploaded", "downloading", "complete", "failed")

# Codes shared with messaging (messenger.py; not imported from there: it imports this module).
E_NOT_FOUND, E_NOT_READY, E_BLOCKED = 1020, 1024, 1025


class _Gone(Corrupt):
    """The relay answered `denied` to every fetch of a block and of the next one: it no
    longer has the file (unfetched blobs expire after the relay's blob_ttl, 48 hours by
    default, relay-protocol.md §4.5)."""


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _bad_file(why: str) -> AppError:
    return AppError(E_BAD_FILE, "bad_file", why)


class ContactsView(Protocol):
    def by_name(self, name: str) -> Contact: ...


class AttachmentsHost(ServiceHost, Protocol):
    """What files use of the messenger."""

    @property
    def delivery(self) -> Delivery: ...
    @property
    def mailboxes(self) -> Mailboxes: ...

    def network(self) -> Network: ...
    @property
    def contacts(self) -> ContactsView: ...

    def check_usable(self) -> None: ...


class Attachments:
    def __init__(self, messenger: AttachmentsHost) -> None:
        self.m = messenger
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._locked = True  # no transfer starts before on_unlock or after on_lock
        self._download_slots: dict[int, asyncio.Semaphore] = {}  # by contact id
        #: Called when an upload is complete, before the one-to-one descriptor: True when the
        #: row was a group's copy and the hook sent its descriptor (services/group_files.py).
        self.copy_hook: Callable[[AttachmentRow], Awaitable[bool]] | None = None
        #: Called inside the transaction that deletes a row (a group's copy forgets it).
        self.delete_hook: Callable[[AttachmentRow], None] | None = None

    # --- life cycle -----------------------------------------------------------------------

    @property
    def store(self) -> Any:
        return self.m.store

    @property
    def directory(self) -> Path:
        return self.m.ctx.paths.home / "attachments"

    def _file(self, aid: str) -> Path:
        return self.directory / f"{aid}.blocks"

    async def on_unlock(self) -> None:
        self._locked = False
        # The directory is made on first use (0700): a profile without files has none.
        known = db.with_files(self.store)
        with contextlib.suppress(OSError):
            for path in list(self.directory.iterdir()):
                # Spools of sends that crashed before their commit, or after their upload
                # ended but before the spool went; copies of removed contacts.
                if path.name.split(".", 1)[0] not in known:
                    with contextlib.suppress(OSError):
                        path.unlink()
        for row in db.unfinished(self.store):
            c = self.store.get_contact(row.contact_id)
            if row.direction == "in" and (c is None or c.blocked):
                self._fail(row.id, BLOCKED_TEXT)  # blocked before the fix that stops them
                continue
            self._start(row.id)

    async def on_lock(self) -> None:
        self._locked = True
        tasks = list(self._workers.values())
        self._workers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def stop_contact(self, contact_id: int) -> list[AttachmentRow]:
        """Before a contact is removed (messenger lock held): stop its transfers; returns the
        rows that go with it (`forget_rows` inside the removal, `discard` once committed)."""
        rows = db.listing(self.store, contact_id, limit=-1)
        for row in rows:
            await self._stop(row.id)
        return rows

    async def _stop(self, aid: str) -> None:
        """A transfer's worker stopped (and awaited), if it runs."""
        task = self._workers.pop(aid, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def forget_rows(self, rows: list[AttachmentRow]) -> None:
        """Rows deleted with their contact (inside that transaction): what hooks on them
        (a group's copy: its setting, its member's status) goes too."""
        if self.delete_hook is not None:
            for row in rows:
                self.delete_hook(row)

    async def stop_downloads(self, contact_id: int, reason: str) -> None:
        """A contact blocked (messenger lock held): its files stop downloading, failed with
        ``reason`` (attachments.retry starts one again once the contact is unblocked)."""
        for row in db.listing(self.store, contact_id, limit=-1):
            if row.direction != "in" or row.state != "downloading":
                continue
            await self._stop(row.id)
            self._fail(row.id, reason)

    def shown(self, c: Contact | None) -> str | None:
        """A contact's name as events and listings show it: None for a group contact (one
        the user never added, hidden as `group.message` hides it) and a removed one."""
        return None if c is None or G.is_group_contact(self.store, c.id) else c.name

    def _start(self, aid: str) -> None:
        if self._locked:
            # Locking (or locked) meanwhile: a send or a descriptor committed just before.
            # Its row is there: the transfer resumes at the next unlock.
            return
        if aid in self._workers and not self._workers[aid].done():
            return
        self._workers[aid] = asyncio.create_task(self._run(aid), name="attachment")

    async def _run(self, aid: str) -> None:
        try:
            row = db.get(self.store, aid)
            if row is None:
                return
            if row.state == "uploading":
                await self._upload(row)
            elif row.state == "downloading":
                slots = self._download_slots.setdefault(
                    row.contact_id, asyncio.Semaphore(DOWNLOADS_PER_CONTACT)
                )
                async with slots:
                    row = db.get(self.store, aid)  # it may have changed while it waited
                    if row is not None and row.state == "downloading":
                        await self._download(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: report it, never kill the daemon
            droplog.dropped(f"attachment transfer failed: {type(exc).__name__}")
            with contextlib.suppress(Exception):
                self._fail(aid, "internal error")
        finally:
            if self._workers.get(aid) is asyncio.current_task():
                del self._workers[aid]

    # --- settings -------------------------------------------------------------------------

    def max_size(self) -> int:
        return int(self.store.get_setting(SETTING_MAX_SIZE, DEFAULT_MAX_SIZE))

    def config(self, max_size: int | None) -> dict[str, Any]:
        if max_size is not None:
            if isinstance(max_size, bool) or not isinstance(max_size, int) or not (
                1 <= max_size <= MAX_FILE_SIZE
            ):
                raise InvalidParamsError("max_size", f"must be between 1 and {MAX_FILE_SIZE}")
            self.store.set_setting(SETTING_MAX_SIZE, max_size)
        return {"max_size": self.max_size(), "max_size_ceiling": MAX_FILE_SIZE}

    # --- sending --------------------------------------------------------------------------

    async def send(self, name: str, path: str, caption: str | None = "") -> dict[str, Any]:
        """One file, with an optional caption."""
        r = await self.send_many(name, [path], caption)
        return dict(r["attachments"][0])

    async def send_many(
        self, name: str, paths: list[str], caption: str | None = ""
    ) -> dict[str, Any]:
        """Files sent together (§22.3): each its own upload (all start at once), one batch;
        the caption rides on the first. Every file is spooled before anything is stored, and
        all rows and messages commit together: the send happens whole or not at all."""
        m = self.m
        if not isinstance(paths, list) or not 1 <= len(paths) <= wire.MAX_BATCH_FILES:
            raise InvalidParamsError("paths", f"must list 1 to {wire.MAX_BATCH_FILES} files")
        caption = check_caption(caption)
        sources = [self.check_source(p) for p in paths]
        m.check_usable()
        c = m.contacts.by_name(name)
        if c.blocked:
            raise AppError(E_BLOCKED, "blocked", "this contact is blocked")
        if m.store.get_session(c.id) is None:
            raise AppError(E_NOT_READY, "not_ready", "no session with this contact")
        relay_url = m.mailboxes.relay_url()
        spooled: list[Spooled] = []
        try:
            for p, limit in sources:
                spooled.append(await self.spool(p, limit))
        except BaseException:
            self.discard([s.id for s in spooled])
            raise
        aids = [s.id for s in spooled]
        batch = aids[0] if len(aids) > 1 else None
        now = _ms()
        rows = [s.row(c.id, relay_url, now) for s in spooled]
        try:
            async with m.lock:
                c = m.contacts.by_name(name)  # still there?
                with m.store.transaction():
                    for i, row in enumerate(rows):
                        text = file_text(row.name, caption if i == 0 else "")
                        m.store.add_message(c.id, "out", text, status="queued",
                                            message_id=row.id)  # fmt: skip
                        db.add(m.store, row)
                        if batch is not None or (i == 0 and caption):
                            db.set_extras(m.store, row.id, db.Extras(
                                caption if i == 0 else "", batch, i, len(rows)))  # fmt: skip
        except BaseException:
            self.discard(aids)
            raise
        for aid in aids:
            self._start(aid)
        return {
            "batch_id": batch,
            "attachments": [{**self.describe(row, c), "message_id": row.id} for row in rows],
        }

    def check_source(self, path: str) -> tuple[Path, int]:
        """A file the user asks to send: an absolute path to a regular file within the
        limit. Returns it and the limit (checked again while it is read)."""
        if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\x00" in path:
            raise InvalidParamsError("path", "must be a file path")
        p = Path(path)
        if not p.is_absolute():
            raise InvalidParamsError("path", "must be an absolute path (the daemon's working "
                                     "directory is not yours)")
        try:
            st = p.stat()
        except FileNotFoundError:
            raise _bad_file("no such file") from None
        except OSError:
            raise _bad_file("the file cannot be read") from None
        if stat.S_ISDIR(st.st_mode):
            raise _bad_file("this is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise _bad_file("not a regular file")
        limit = self.max_size()
        if st.st_size > limit:
            raise AppError(
                E_FILE_TOO_LARGE, "too_large",
                f"the file is larger than the attachment limit of {limit} bytes "
                f"(aegis attachments --max-size changes it, up to {MAX_FILE_SIZE})",
            )  # fmt: skip
        return p, limit

    def new_id(self) -> str:
        return self.m.entropy.random(wire.MESSAGE_ID_LEN).hex()

    async def spool(self, p: Path, limit: int, aid: str | None = None) -> Spooled:
        """Encrypt the file under a fresh seed into a spool of its own (``aid``, by default a
        new attachment id); the caller commits its row (`Spooled.row`) or `discard`s it."""
        aid = self.new_id() if aid is None else aid
        seed = self.m.entropy.random(wire.ATTACHMENT_SEED_LEN)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        dst = self._file(aid)
        work = asyncio.ensure_future(asyncio.to_thread(encrypt_to_spool, p, dst, seed, limit))
        try:
            size, digest = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be stopped: the spool it may still write goes once it ends
            # (the caller's discard has run by then).
            work.add_done_callback(lambda _: _unlink_after(work, dst))
            raise
        except TooLarge:
            raise AppError(
                E_FILE_TOO_LARGE, "too_large",
                f"the file is larger than the attachment limit of {limit} bytes",
            ) from None  # fmt: skip
        except (OSError, ValueError):
            raise _bad_file("the file cannot be read") from None
        return Spooled(aid, seed, size, digest, clean_file_name(p.name))

    @staticmethod
    def bad_file(why: str) -> AppError:
        return _bad_file(why)

    def discard(self, aids: list[str]) -> None:
        """The files (spools, stored blocks) of these ids, whose rows never committed or are
        gone."""
        for aid in aids:
            with contextlib.suppress(OSError):
                self._file(aid).unlink()

    def start(self, aid: str) -> None:
        """A committed outgoing row's upload (or an incoming one's download) starts."""
        self._start(aid)

    async def _connect(self, url: str) -> RelayClient:
        # A connection of its own for each transfer: blob traffic is not tied (by connection)
        # to the profile's mailboxes.
        client, _ = await with_relay(url, None, self.m.network())
        return client

    async def _upload(self, row: AttachmentRow) -> None:
        keys = FileKeys(row.seed)
        spool = self._file(row.id)
        attempt = 0
        done = row.done
        progress = _Progress(self, row)
        while done < row.blocks:
            try:
                client = await self._connect(row.relay_url)
                try:
                    try:
                        await client.blob_quota(min(row.blocks - done, BLOB_QUOTA_MAX))
                    except RelayError as exc:
                        if exc.code == E_FULL:  # the relay's blob area is full: tell the user
                            self.m.delivery.refused_for_room(BLOB_AREA, True)
                        raise
                    self.m.delivery.room_again(BLOB_AREA)
                    with local(lambda: open(spool, "rb")) as f:
                        while done < row.blocks:
                            end = min(done + WINDOW, row.blocks)
                            data = local(functools.partial(read_at, f, done, end - done))
                            await asyncio.gather(*(
                                self._put(client, keys, i, data[(i - done) * BLOCK:
                                                                (i - done + 1) * BLOCK])
                                for i in range(done, end)
                            ))  # fmt: skip
                            done = end
                            db.set_progress(self.store, row.id, done)
                            attempt = 0
                            progress.update(done)
                finally:
                    await client.close()
            except (RelayUnavailable, RelayError, *UNAVAILABLE) as exc:
                attempt += 1
                wait = min(RETRY_MAX, 0.5 * 2 ** min(attempt, 8))
                if isinstance(exc, RelayError) and exc.code == E_FULL:
                    # The blob area is full: each try solves the quota's proof again (2**25
                    # hashes and up, ~30 s of CPU), so wait long (status says why meanwhile).
                    wait = FULL_BACKOFF
                await asyncio.sleep(wait)
            except LocalIOError:
                self._fail(row.id, "the encrypted copy of the file is missing or unreadable")
                return
        await self._uploaded(row)

    async def delete_blobs(self, row: AttachmentRow) -> None:
        """An uploaded copy that will never be announced (services/group_files.py): its blobs
        go now rather than wait for the relay's blob_ttl. Best effort: they expire anyway."""
        with contextlib.suppress(RelayUnavailable, RelayError, *UNAVAILABLE):
            client = await self._connect(row.relay_url)
            try:
                await self._delete_blobs(client, row)
            finally:
                await client.close()

    @staticmethod
    async def _delete_blobs(client: RelayClient, row: AttachmentRow) -> None:
        keys = FileKeys(row.seed)
        for start in range(0, row.blocks, WINDOW):
            await asyncio.gather(*(
                client.blob_del(keys.blob_id(i), keys.capability(i))
                for i in range(start, min(start + WINDOW, row.blocks))
            ), return_exceptions=True)  # fmt: skip

    @staticmethod
    async def _put(client: RelayClient, keys: FileKeys, index: int, block: bytes) -> None:
        try:
            await client.blob_put(keys.blob_id(index), keys.capability(index), block)
        except RelayError as exc:
            if exc.code != E_EXISTS:  # exists: put before a crash; the id is ours (seeded)
                raise

    async def _uploaded(self, row: AttachmentRow) -> None:
        m = self.m
        if self.copy_hook is not None and await self.copy_hook(row):
            # A group's copy (services/group_files.py): its descriptor went its own way.
            with contextlib.suppress(OSError):
                self._file(row.id).unlink()
            return
        async with m.lock:
            c = m.store.get_contact(row.contact_id)
            blob = m.store.get_session(row.contact_id)
            if c is None or blob is None or db.get(m.store, row.id) is None:
                return  # the contact was removed meanwhile (its rows went with it)
            ex = db.extras(m.store, row.id)
            if not ex.caption:
                # A batch's file without a caption goes as a plain 0x08, which an older
                # receiver reads too (it drops 0x17): its place in the batch is not told.
                ex = db.Extras()
            payload = wire.AttachmentPayload(
                bytes.fromhex(row.id), row.sent_at or _ms(), row.seed, row.size, row.blocks,
                row.digest, row.relay_url, row.name, ex.caption,
                bytes.fromhex(ex.batch_id) if ex.batch_id else b"", ex.batch_index,
                ex.batch_count,
            )  # fmt: skip
            try:
                with m.store.transaction():
                    db.set_state(m.store, row.id, "uploaded")
                    if m.store.get_message(row.id) is not None:
                        m.delivery.enqueue([Recipient(c, Session.from_bytes(blob))], payload,
                                           message_id=row.id,
                                           delay=m.delivery.send_jitter())  # fmt: skip
                    m.ctx.events.emit("attachment.completed", {
                        "attachment_id": row.id, "contact": c.name, "direction": "out",
                    })  # fmt: skip
            except AppError as exc:  # the contact cannot be reached (yet): say so, keep the spool
                self._fail(row.id, exc.message)
                return
        m.delivery.wake()
        with contextlib.suppress(OSError):
            self._file(row.id).unlink()  # the sender has the original

    def _fail(self, aid: str, reason: str) -> None:
        row = db.get(self.store, aid)
        if row is None:
            return
        c = self.store.get_contact(row.contact_id)
        with self.store.transaction():
            db.set_state(self.store, aid, "failed", reason)
            self.m.ctx.events.emit("attachment.failed", {
                "attachment_id": aid, "contact": self.shown(c),
                "direction": row.direction, "reason": reason,
            })  # fmt: skip

    # --- receiving ------------------------------------------------------------------------

    def on_descriptor(self, c: Contact, session: Session, p: wire.AttachmentPayload) -> None:
        """Inside the receive transaction (messenger lock held)."""
        m = self.m
        aid = p.message_id.hex()
        if m.store.get_message(aid) is not None or not self.acceptable(p):
            return  # a duplicate id (never twice), or a refused relay URL
        name = clean_file_name(p.name)
        text = file_text(name, p.caption)
        msg = m.store.add_message(c.id, "in", text, status="received", message_id=aid,
                                  sent_at=p.sent_at_ms)  # fmt: skip
        # Its message is in the history: clients (aegis listen, the notification bridge)
        # that follow message.received see the file arrive like any message.
        m.ctx.events.emit("message.received", {
            "message_id": aid, "contact": c.name, "text": text, "sent_at": p.sent_at_ms,
            "timer": msg.timer_s, **({"caption": p.caption} if p.caption else {}),
        })  # fmt: skip
        self.take_descriptor(c, p)
        m.delivery.queue_receipt(Recipient(c, session), wire.RECEIPT_DELIVERED, [p.message_id])

    def acceptable(self, p: wire.AttachmentPayload, aid: str | None = None) -> bool:
        """A descriptor that may be taken: a new id (``aid``, by default the message id in
        hex), a relay URL the policy allows."""
        aid = p.message_id.hex() if aid is None else aid
        if db.get(self.store, aid) is not None:
            return False
        if not self.m.mailboxes.peer_url_ok(p.relay_url):
            droplog.dropped("dropped an attachment whose relay URL is refused")
            return False
        return True

    def take_descriptor(self, c: Contact, p: wire.AttachmentPayload, aid: str | None = None,
                        refused: str | None = None) -> None:  # fmt: skip
        """A descriptor's attachment row, events and download (the caller stored its
        message: in the contact's or a group's history); inside the receive transaction.
        ``aid``: the attachment's id (by default the message id in hex; a group's file takes
        its group message's API id, which names the author too). ``refused``: why it is kept
        failed, never fetched (a group member over its pending files)."""
        m = self.m
        aid = p.message_id.hex() if aid is None else aid
        name = clean_file_name(p.name)
        now = _ms()
        # Our own limit applies to what we fetch too: above it the file waits, failed, until
        # the user raises the limit and retries (the relay keeps it until its TTL).
        reason = _limit_text(self.max_size()) if p.size > self.max_size() else refused
        db.add(m.store, AttachmentRow(
            aid, c.id, "in", name, p.size, p.blocks, p.digest, p.seed, p.relay_url,
            "failed" if reason else "downloading", 0, reason, p.sent_at_ms, now, now,
        ))  # fmt: skip
        ex = _extras_of(p)
        if p.extra:
            db.set_extras(m.store, aid, ex)
        m.ctx.events.emit("attachment.received", {
            "attachment_id": aid, "message_id": aid, "contact": self.shown(c), "name": name,
            "size": p.size, "sent_at": p.sent_at_ms, **_extras_fields(ex),
        })  # fmt: skip
        if reason:
            m.ctx.events.emit("attachment.failed", {
                "attachment_id": aid, "contact": self.shown(c), "direction": "in",
                "reason": reason,
            })  # fmt: skip
            return
        # Started once the transaction committed (the worker reads the row).
        asyncio.get_running_loop().call_soon(self._start, aid)

    async def _download(self, row: AttachmentRow) -> None:
        # Received before the policy, or the policy changed since:
        if not self.m.mailboxes.peer_url_ok(row.relay_url):
            self._fail(row.id, REFUSED_URL_TEXT)
            return
        keys = FileKeys(row.seed)
        path = self._file(row.id)
        tries = max(1, int(self.store.get_setting(SETTING_FETCH_TRIES, FETCH_CONNECT_TRIES)))
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            fsync_dir(self.directory)  # progress committed later must not outlive the file
        except OSError:
            self._fail(row.id, "cannot write the file in the profile directory")
            return
        attempt = 0
        done = row.done
        progress = _Progress(self, row)
        client: RelayClient | None = None
        try:
            while True:
                try:
                    if client is None:
                        client = await self._connect(row.relay_url)
                    box = PrivateKey.generate()  # one per pass: fetches are not linkable by key
                    with local(lambda: open(path, "r+b")) as f:
                        while done < row.blocks:
                            end = min(done + WINDOW, row.blocks)
                            got = await asyncio.gather(*(
                                self._fetch(client, keys, box, i, row.blocks, row.sent_at)
                                for i in range(done, end)
                            ))  # fmt: skip
                            local(functools.partial(write_at, f, done, b"".join(got)))
                            done = end
                            db.set_progress(self.store, row.id, done)
                            attempt = 0
                            progress.update(done)
                    break
                except (RelayUnavailable, *UNAVAILABLE):
                    if client is not None:
                        await client.close()
                        client = None
                    attempt += 1
                    if attempt >= tries:
                        raise _GiveUp() from None
                    await asyncio.sleep(min(RETRY_MAX, 0.5 * 2 ** min(attempt, 8)))
                except RelayError:  # busy, rate limited: later
                    attempt += 1
                    if attempt >= tries:
                        raise _GiveUp() from None
                    await asyncio.sleep(min(RETRY_MAX, 0.5 * 2 ** min(attempt, 8)))
            if not await asyncio.to_thread(verify, path, keys, row):
                raise Corrupt()
        except _Gone:
            if client is not None:
                await client.close()
            self._fail(row.id, "the file is no longer at the relay: unfetched files expire there "
                       "(after 48 hours on a relay with default settings); ask the sender to "
                       "send it again")
            return
        except Corrupt:
            if client is not None:
                await client.close()
            self._fail(row.id, "the file arrived corrupted or incomplete (a block failed its "
                       "integrity check after retries, or the relay no longer has it)")
            return
        except _GiveUp:
            if client is not None:
                await client.close()
            self._fail(row.id, UNREACHABLE_TEXT.format(n=tries))
            return
        except (LocalIOError, OSError):  # OSError: the final check's read
            if client is not None:
                await client.close()
            self._fail(row.id, "cannot write the file in the profile directory")
            return
        c = self.store.get_contact(row.contact_id)
        with self.store.transaction():
            db.set_state(self.store, row.id, "complete")
            self.m.ctx.events.emit("attachment.completed", {
                "attachment_id": row.id, "contact": self.shown(c), "direction": "in",
                "name": row.name, "size": row.size,
            })  # fmt: skip
        # Verified and kept: the relay's copy goes now (else it expires with the TTL), unless
        # another device of ours may still have to fetch it (docs/devices.md §8).
        if self.only_device():
            with contextlib.suppress(RelayUnavailable, RelayError, *UNAVAILABLE):
                if client is None:
                    client = await self._connect(row.relay_url)
                await self._delete_blobs(client, row)
        if client is not None:
            await client.close()

    def only_device(self) -> bool:
        """Whether this device is the profile's only one: no device list held (it never
        linked) or one naming this device alone. With others listed, a received file's blobs
        stay for them (every device got the same descriptor, §5.5) until the relay's
        blob_ttl: no device knows whether the others fetched them, until sync (§6) tells."""
        value = self.store.get_setting(SETTING_OWN_LIST)
        if value is None:
            return True
        try:
            held = dv.DeviceList.from_bytes(bytes.fromhex(str(value)))
        except (ValueError, ProtocolError):
            return False  # unreadable: keep the blobs (they expire anyway)
        return len(held.devices) <= 1

    @staticmethod
    async def _fetch(client: RelayClient, keys: FileKeys, box: PrivateKey, index: int,
                     total: int, sent_at: int | None = None) -> bytes:
        denied = 0
        for attempt in range(FETCH_TRIES):
            try:
                block = await client.blob_get(keys.blob_id(index), keys.capability(index), box)
                keys.open(index, total, block)  # checked now, kept encrypted
                return block
            except RelayError as exc:
                if exc.code != E_DENIED:
                    raise
                denied += 1
            except (DecryptionError, CryptoError):
                pass
            # denied (the relay lost it or its copy is corrupted: it cannot open it) or a
            # block that does not open: fetch again, a bounded number of times.
            await asyncio.sleep(0.1 * (attempt + 1))
        if denied == FETCH_TRIES and sent_at is not None and (
            _ms() - sent_at >= client.blob_ttl * 1000
        ):
            # Denied, and the file older than the relay keeps blobs (HELLO_OK): expired. The
            # time the sender gives is only believed for this wording (its blocks were put
            # after it). A file of one block, or one whose upload crossed an expiry hour (its
            # blocks expire at different hours), is told apart this way.
            raise _Gone()
        if denied == FETCH_TRIES and total > 1:
            # Denied: gone or damaged at the relay (it answers both alike). Expiry takes a
            # whole file at once, damage one block: another block of the file tells which.
            other = (index + 1) % total
            try:
                await client.blob_get(keys.blob_id(other), keys.capability(other), box)
            except RelayError as exc:
                if exc.code == E_DENIED:
                    raise _Gone() from None
        raise Corrupt()

    # --- listing and saving ---------------------------------------------------------------

    def describe(self, row: AttachmentRow, c: Contact | None = None) -> dict[str, Any]:
        if c is None:
            c = self.store.get_contact(row.contact_id)
        return {
            "attachment_id": row.id,
            "contact": self.shown(c),
            "direction": row.direction,
            "name": row.name,
            "size": row.size,
            "blocks": row.blocks,
            "done": row.done,
            "state": row.state,
            "error": row.error,
            "sent_at": row.sent_at,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            **_extras_fields(db.extras(self.store, row.id)),
        }

    def get(self, aid: str) -> AttachmentRow:
        row = db.get(self.store, aid) if isinstance(aid, str) else None
        if row is None:
            raise AppError(E_NOT_FOUND, "not_found", "no such attachment")
        return row

    def listing(self, name: str | None) -> list[dict[str, Any]]:
        cid = self.m.contacts.by_name(name).id if name is not None else None
        return [self.describe(r) for r in db.listing(self.store, cid)]

    async def save(self, aid: str, path: str, overwrite: bool) -> dict[str, Any]:
        row = self.get(aid)
        if row.direction != "in":
            raise AppError(E_NOT_COMPLETE, "not_complete",
                           "only received files can be saved (you have the original)")
        if row.state != "complete":
            raise AppError(E_NOT_COMPLETE, "not_complete",
                           f"the file is not complete yet (state: {row.state})")
        if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\x00" in path:
            raise InvalidParamsError("path", "must be a file path")
        target = Path(path)
        if not target.is_absolute():
            raise InvalidParamsError("path", "must be an absolute path")
        if target.is_dir():
            target = target / row.name
        if os.path.lexists(target) and not overwrite:
            raise AppError(E_TARGET_EXISTS, "exists",
                           "a file with this name exists there (use overwrite)")
        if not target.parent.is_dir():
            raise _bad_file("the target directory does not exist")
        # Plaintext never goes into the profile (it would sit beside the store, unencrypted,
        # and could replace the profile's own files).
        home = os.path.realpath(self.m.ctx.paths.home)
        if os.path.commonpath([os.path.realpath(target.parent), home]) == home:
            raise _bad_file("a received file cannot be saved inside the profile directory")
        try:
            ok = await asyncio.to_thread(write_plain, self._file(row.id), row, target, overwrite)
        except FileExistsError:
            raise AppError(E_TARGET_EXISTS, "exists",
                           "a file with this name exists there (use overwrite)") from None
        except OSError:
            raise _bad_file("cannot write the file there") from None
        if not ok:
            self._fail(row.id, "the stored copy in the profile is damaged or gone")
            raise AppError(E_NOT_COMPLETE, "not_complete",
                           "the stored copy is damaged; the file cannot be saved")
        return {"attachment_id": row.id, "path": str(target), "size": row.size}

    async def retry(self, aid: str) -> dict[str, Any]:
        row = self.get(aid)
        if row.state != "failed":
            raise AppError(E_NOT_RETRYABLE, "not_retryable", "only a failed transfer is retried")
        state = "uploading" if row.direction == "out" else "downloading"
        if row.direction == "in" and row.size > self.max_size():
            raise AppError(E_FILE_TOO_LARGE, "too_large", _limit_text(self.max_size()))
        if row.direction == "in":
            c = self.store.get_contact(row.contact_id)
            if c is None or c.blocked:
                raise AppError(E_BLOCKED, "blocked", "this contact is blocked")
            if not self.m.mailboxes.peer_url_ok(row.relay_url):
                raise AppError(E_NOT_RETRYABLE, "not_retryable", REFUSED_URL_TEXT)
        if row.direction == "out" and not self._file(aid).exists():
            raise AppError(E_NOT_RETRYABLE, "not_retryable",
                           "the encrypted copy is gone: send the file again")
        with self.store.transaction():
            db.set_state(self.store, aid, state)
            if row.direction == "in":
                db.set_progress(self.store, aid, 0)  # refetch all: the bad block may be early
        self._start(aid)
        return self.describe(self.get(aid))

    async def delete(self, aid: str) -> None:
        row = self.get(aid)
        await self._stop(aid)
        m = self.m
        async with m.lock:
            row = self.get(aid)
            # An outgoing file deleted before its upload ended never leaves: its message
            # would otherwise stay "queued" forever.
            unsent = row.direction == "out" and row.state in ("uploading", "failed")
            msg = m.store.get_message(aid) if unsent else None
            with m.store.transaction():
                db.delete(m.store, row.id)
                if self.delete_hook is not None:
                    self.delete_hook(row)
                if msg is not None and m.store.set_message_status(aid, "failed"):
                    c = m.store.get_contact(row.contact_id)
                    m.ctx.events.emit("message.status", {
                        "message_id": aid, "contact": c.name if c else None, "status": "failed",
                    })  # fmt: skip
        with contextlib.suppress(OSError):
            self._file(aid).unlink()


    async def forget(self, aids: list[str]) -> None:
        """Files whose messages the user deletes ("delete for me", a whole conversation): each
        goes as with attachments.delete (row, caption and batch, spool or received blocks)."""
        for aid in aids:
            if db.get(self.store, aid) is not None:
                with contextlib.suppress(AppError):  # gone meanwhile
                    await self.delete(aid)


def _unlink_after(work: asyncio.Future[Any], dst: Path) -> None:
    if not work.cancelled():
        work.exception()  # retrieved: a failed spool of a cancelled call is no error
    with contextlib.suppress(OSError):
        dst.unlink()


def check_caption(caption: Any) -> str:
    """A caption the user gives (§22.3): text of at most MAX_CAPTION_BYTES in UTF-8."""
    if caption is None:
        return ""
    if not isinstance(caption, str):
        raise InvalidParamsError("caption", "must be a string")
    try:
        n = len(caption.encode())
    except UnicodeEncodeError:
        raise InvalidParamsError("caption", "must be valid text (no lone surrogates)") from None
    if n > wire.MAX_CAPTION_BYTES:
        raise InvalidParamsError("caption", f"must be at most {wire.MAX_CAPTION_BYTES} bytes "
                                 "in UTF-8")  # fmt: skip
    return caption


def file_text(name: str, caption: str) -> str:
    """A file's message in the history (and in message.received): its name, then on the next
    line its caption, if any, so that history, search and exports carry the caption."""
    return f"[file] {name}\n{caption}" if caption else f"[file] {name}"


def _extras_of(p: wire.AttachmentPayload) -> db.Extras:
    if not p.extra:
        return db.Extras()
    lone = p.batch_count == 1  # a captioned file alone: no batch to show
    return db.Extras(p.caption, None if lone else p.batch_id.hex(), p.batch_index, p.batch_count)


def _extras_fields(ex: db.Extras) -> dict[str, Any]:
    """What describe() and attachment.received add: the caption ("" for none) and the batch
    (``batch_id`` null for a file sent alone)."""
    return {"caption": ex.caption, "batch_id": ex.batch_id, "batch_index": ex.batch_index,
            "batch_count": ex.batch_count}  # fmt: skip


class _GiveUp(Exception):
    """The contact's relay stayed unreachable for FETCH_CONNECT_TRIES connections in a row."""


def _limit_text(limit: int) -> str:
    return (f"the file is larger than your attachment size limit of {limit} bytes "
            "(aegis attachments --max-size raises it; then aegis attachment retry)")


class _Progress:
    """attachment.progress events, at most one per PROGRESS_INTERVAL, and the last one."""

    def __init__(self, svc: Attachments, row: AttachmentRow) -> None:
        self.svc = svc
        self.row = row
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.row.blocks and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        c = self.svc.store.get_contact(self.row.contact_id)
        self.svc.m.ctx.events.emit("attachment.progress", {
            "attachment_id": self.row.id, "contact": self.svc.shown(c),
            "direction": self.row.direction, "done": done, "total": self.row.blocks,
        })  # fmt: skip
