"""Encrypted backups: ``backup.export`` and ``backup.import`` (docs/backup.md, docs/api.md).

Export takes a consistent snapshot under the messenger's lock, then derives the key and
encrypts in a worker thread, and writes the file atomically (temporary file in the same
directory, mode 0600, fsync, then a link that refuses to replace an existing file unless
``force``). Import reads and fully verifies the file (key, every chunk, the contents' strict
parser, every identity's signature) before it writes anything, then restores in one
transaction and starts the session renewals (services/renewal.py).

Progress: ``backup.progress`` events {operation, stage, done, total}. Nothing here logs a path,
a passphrase or content.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aegisd import droplog, passphrase_strength
from aegisd.core import backup as fmt
from aegisd.core import group as core_group
from aegisd.core import wire
from aegisd.core.errors import BundleError, DecodeError, GroupError
from aegisd.core.identity import IdentityKeyPair, PublicIdentity
from aegisd.core.prekeys import PrekeyStore
from aegisd.rpc import AppError, CallContext, InvalidParamsError, Registry
from aegisd.rpc import errors as E
from aegisd.rpc.methods import Handler
from aegisd.store import group_actions as group_db
from aegisd.store import groups as G
from aegisd.store.db import Store
from aegisd.transport.network import ProxyUrlError, check_proxy_url

from . import device_reset
from .contacts import SETTING_NAME
from .disappearing import MAX_SKEW_MS
from .groups_state import JOINING_KEY, stored_invitation
from .mailbox import ContactState, OwnedMailbox
from .messenger import Messenger
from .names import clean_name
from .renewal import SETTING_PENDING, describe_pending

# Application error codes 1040-1049 (docs/api.md, "Errors").
E_BACKUP_EXISTS = 1040
E_WEAK_PASSPHRASE = E.WEAK_PASSPHRASE  # the rule and its error are shared with the profile's
E_NOT_A_BACKUP = 1042
E_BACKUP_KEY = 1043
E_BACKUP_DAMAGED = 1044
E_BACKUP_TRUNCATED = 1045
E_NOT_FRESH = 1046
E_BACKUP_IO = 1047

#: Settings worth carrying to a new device (and their types). The relay URL and the network
#: mode are the new profile's own choice (aegis init); network.proxy is restored only when the
#: new profile connects directly (never weaken or swap what the user chose on this machine).
SETTING_TIMERS = "messages.disappearing_timers"
#: The groups' timers likewise: [[group's place, seconds, changed_at ms], ...] (§25.11).
SETTING_GROUP_TIMERS = "messages.group_disappearing_timers"
RESTORABLE: dict[str, tuple[type, ...]] = {
    "privacy.read_receipts": (bool,),
    "privacy.receipt_delay_max": (int, float),
    "privacy.send_jitter_max": (int, float),
    "privacy.group_spread_max": (int, float),
    "privacy.typing_indicators": (bool,),
    "privacy.mailbox_rotation": (int, float),
    "events.retention_days": (int, float),
    "network.proxy": (str,),
    "network.isolation": (bool,),
    "messages.disappearing_default": (int,),
    # Not a stored setting: the conversations' timers, [[contact's place, seconds, changed_at
    # ms], ...] (docs/protocol.md §27), carried here so the file format (and its version)
    # stays as it is.
    SETTING_TIMERS: (list,),
    SETTING_GROUP_TIMERS: (list,),
}
MAX_FILE_BYTES = 4 << 30


def _timers_name(i: int, base: str = SETTING_TIMERS) -> str:
    """The setting carrying the i-th part of the timers: SETTING_TIMERS, then
    SETTING_TIMERS.1, .2, ... (docs/backup.md); the groups' alike under their own name."""
    return base if i == 0 else f"{base}.{i}"


def _is_timers_name(name: str, base: str = SETTING_TIMERS) -> bool:
    tail = name.removeprefix(base + ".")
    return tail != name and tail.isdigit() and tail[0] != "0" and len(tail) <= 3


def _timer_chunks(timers: list[list[int]]) -> list[str]:
    """The timers as JSON lists of at most MAX_SETTING_VALUE bytes each: none is left out."""
    chunks: list[str] = []
    part: list[str] = []
    size = 2  # "[]"
    for t in timers:
        item = json.dumps(t)
        if part and size + 2 + len(item) > fmt.MAX_SETTING_VALUE:  # ", " before it
            chunks.append("[" + ", ".join(part) + "]")
            part, size = [], 2
        size += len(item) + (2 if part else 0)
        part.append(item)
    if part:
        chunks.append("[" + ", ".join(part) + "]")
    return chunks


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _mailbox_out(mb: OwnedMailbox) -> fmt.BackupMailbox:
    return fmt.BackupMailbox(
        mb.relay_url, mb.sign_seed, mb.box_secret, mb.owner_id, mb.deposit_id,
        mb.relay_box_pub, mb.token,
    )  # fmt: skip


def _mailbox_in(mb: fmt.BackupMailbox) -> OwnedMailbox:
    return OwnedMailbox(
        mb.relay_url, mb.sign_seed, mb.box_secret, mb.owner_id, mb.deposit_id,
        mb.relay_box_pub, mb.token,
    )  # fmt: skip


def _file_error(exc: fmt.BackupError) -> AppError:
    if isinstance(exc, fmt.BackupKeyError):
        return AppError(E_BACKUP_KEY, "wrong_passphrase", str(exc))
    if isinstance(exc, fmt.BackupTruncated):
        return AppError(E_BACKUP_TRUNCATED, "truncated", str(exc))
    if isinstance(exc, fmt.BackupDamaged):
        return AppError(E_BACKUP_DAMAGED, "damaged", str(exc))
    return AppError(E_NOT_A_BACKUP, "not_a_backup", str(exc))


class Backups:
    def __init__(self, messenger: Messenger) -> None:
        self.m = messenger

    def _progress(self, operation: str, stage: str) -> Callable[[int, int], None]:
        """A thread-safe progress reporter: an event at most every tenth of the way."""
        loop = asyncio.get_running_loop()
        last = [-1]

        def report(done: int, total: int) -> None:
            tenth = (10 * done // total) if total else 10
            if tenth != last[0]:
                last[0] = tenth
                data = {"operation": operation, "stage": stage, "done": done, "total": total}
                loop.call_soon_threadsafe(self.m.ctx.events.emit, "backup.progress", data)

        return report

    def _stage(self, operation: str, stage: str) -> None:
        self.m.ctx.events.emit(
            "backup.progress", {"operation": operation, "stage": stage, "done": 0, "total": 0}
        )

    # --- export -------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[fmt.BackupContents, int]:
        m = self.m
        store = m.store
        ed_priv, x_priv = m.identity().raw_private()
        settings = []
        for name in RESTORABLE:
            value = store.get_setting(name)
            if value is not None:
                settings.append((name, json.dumps(value)))
        contacts: list[fmt.BackupContact] = []
        index: dict[int, int] = {}  # contact id -> its place in the backup
        n_messages = 0
        by_contact: dict[int, list[fmt.BackupMailbox]] = {}
        others = []
        for row in store.list_mailboxes():
            mb = _mailbox_out(OwnedMailbox.from_bytes(row.descriptor))
            if row.role == "contact" and row.contact_id is not None:
                by_contact.setdefault(row.contact_id, []).append(mb)
            elif row.role != "contact":
                others.append(mb)
        for c in store.list_contacts():
            state = ContactState.from_bytes(c.state)
            renewing = (
                store._q(
                    # Either side: a contact that is renewing the session (ours after an
                    # import, or theirs) is a contact with a history, not a set-up.
                    "SELECT 1 FROM renewals WHERE contact_id = ? AND done = 0",
                    (c.id,),
                ).fetchone()
                is not None
            )
            if c.identity_key is None or not (state.established or renewing):
                continue  # a contact set-up still under way cannot be renewed: not exported
            reactions = _reactions_out(store, c.id)
            messages = tuple(
                fmt.BackupMessage(r[0], r[1] == "out", r[2], r[3], r[4], r[5], r[6],
                                  _extras_out(r[7:], reactions.get(r[0], ())))
                for r in store._q(
                    # A message with a disappearing timer is never in a backup: the file may
                    # outlive its deadline anywhere (docs/threat-model.md, §27); nor is the
                    # copy of its text in a reply that quotes it (`timed`). Nor a timer line:
                    # history of the timer (carried itself in SETTING_TIMERS), it would come
                    # back as a plain text one could quote or react to, with a local id.
                    "SELECT m.id, m.direction, m.body, m.status, m.sent_at, m.created_at, "
                    "m.status_at, m.reply_to, m.quoted, m.quoted_dir, m.edited_at, m.edits, "
                    "m.edit_sent_at, m.deleted, q.timer_s > 0 AS timed FROM messages m "
                    "LEFT JOIN messages q ON q.id = m.reply_to AND q.contact_id = m.contact_id "
                    "WHERE m.contact_id = ? AND m.timer_s = 0 AND m.timer_change IS NULL "
                    "ORDER BY m.seq",
                    (c.id,),
                ).fetchall()
            )  # fmt: skip
            n_messages += len(messages)
            index[c.id] = len(contacts)
            contacts.append(
                fmt.BackupContact(
                    c.name,
                    PublicIdentity.from_bytes(c.identity_key).record(),
                    c.verified,
                    c.blocked,
                    c.created_at,
                    state.send_to,
                    messages,
                    tuple(by_contact.get(c.id, ())),
                )
            )
        timers = [[index[cid], *store.get_timer(cid)] for cid in index]
        chunks = _timer_chunks([t for t in timers if t[1]])
        # the groups' timers, by their places in the backup (the order of G.list_groups)
        group_timers = [[i, *group_db.get_timer(store, row.id)]
                        for i, row in enumerate(G.list_groups(store))]  # fmt: skip
        group_chunks = _timer_chunks([t for t in group_timers if t[1]])
        if len(settings) + len(chunks) + len(group_chunks) > fmt.MAX_SETTINGS:
            raise AppError(E.TOO_LARGE, "too_large",
                           "too many conversations with a disappearing timer for one backup")
        for i, chunk in enumerate(chunks):
            settings.append((_timers_name(i), chunk))
        for i, chunk in enumerate(group_chunks):
            settings.append((_timers_name(i, SETTING_GROUP_TIMERS), chunk))
        contents = fmt.BackupContents(
            _ms(),
            ed_priv,
            x_priv,
            m.identity().public.binding_sig,
            str(store.get_setting(SETTING_NAME, "")),
            tuple(settings),
            tuple(contacts),
            tuple(others),
            _groups_out(store, index),
            device_reset.export(store),
        )
        return contents, n_messages

    async def export(
        self, path: str, passphrase: str, force: bool, kdf: fmt.KdfParams
    ) -> dict[str, Any]:
        target = Path(path)
        if not target.is_absolute():
            raise InvalidParamsError("path", "must be an absolute path")
        problem = passphrase_strength.problem(passphrase)
        if problem is not None:
            raise E.weak_passphrase(problem)
        try:
            fmt.check_kdf(kdf)
        except fmt.NotABackup as exc:
            raise InvalidParamsError("kdf", str(exc).replace("the backup's ", "")) from None
        if not target.parent.is_dir():
            raise AppError(E_BACKUP_IO, "io_error", "the directory for the backup does not exist")
        if target.exists() and not force:
            raise AppError(
                E_BACKUP_EXISTS, "exists", "the file exists; choose another name or use --force"
            )
        async with self.m.lock:
            contents, n_messages = self._snapshot()
        plaintext = contents.to_bytes()
        self._stage("export", "kdf")
        data = await asyncio.to_thread(
            fmt.encrypt,
            self.m.entropy,
            passphrase,
            plaintext,
            kdf,
            self._progress("export", "encrypt"),
        )
        self._stage("export", "write")
        try:
            await asyncio.to_thread(_write_atomic, target, data, force)
        except FileExistsError:
            raise AppError(
                E_BACKUP_EXISTS, "exists", "the file exists; choose another name or use --force"
            ) from None
        except OSError as exc:
            raise AppError(
                E_BACKUP_IO, "io_error", f"cannot write the backup: {exc.strerror}"
            ) from None
        self._stage("export", "done")
        return {
            "path": str(target),
            "bytes": len(data),
            "contacts": len(contents.contacts),
            "messages": n_messages,
            "groups": len(contents.groups.groups),
            "kdf": {"memory_kib": kdf.memory_kib, "passes": kdf.passes, "lanes": kdf.lanes},
        }

    # --- import -------------------------------------------------------------------------------

    def _check_fresh(self) -> None:
        store = self.m.store
        has_history = store._q("SELECT 1 FROM messages LIMIT 1").fetchone() is not None
        # A group made here would be owned by the identity the import replaces.
        has_groups = bool(G.list_groups(store) or G.count_invitations(store))
        if store.list_contacts() or store.list_requests() or has_history or has_groups:
            raise AppError(
                E_NOT_FRESH,
                "not_fresh",
                "a backup can only be imported into a fresh profile (no contacts, requests, "
                "messages or groups): create one with aegis init --home DIR",
            )

    async def import_(self, path: str, passphrase: str) -> dict[str, Any]:
        target = Path(path)
        if not target.is_absolute():
            raise InvalidParamsError("path", "must be an absolute path")
        self._check_fresh()
        try:
            data = await asyncio.to_thread(_read_limited, target)
        except OSError as exc:
            raise AppError(
                E_BACKUP_IO, "io_error", f"cannot read the backup: {exc.strerror}"
            ) from None
        self._stage("import", "kdf")
        try:
            plaintext = await asyncio.to_thread(
                fmt.decrypt, passphrase, data, self._progress("import", "decrypt")
            )
        except fmt.BackupError as exc:
            raise _file_error(exc) from None
        try:
            contents = fmt.BackupContents.from_bytes(plaintext)
            identity = IdentityKeyPair.from_raw(
                contents.ed_priv, contents.x_priv, contents.binding_sig
            )
            for c in contents.contacts:
                PublicIdentity.from_record(c.identity)
            # Each log as the core loads it: its head gives the members (never the file's word).
            logs = [core_group.GroupLog.from_record(g.log) for g in contents.groups.groups]
            listed = device_reset.check(contents.devices, identity.public)
        except (DecodeError, BundleError, GroupError, ValueError):
            raise AppError(
                E_NOT_A_BACKUP, "not_a_backup", "the backup's contents are malformed"
            ) from None
        settings: dict[str, Any] = {}
        timer_chunks: list[list[Any]] = []  # the timers' second and later settings
        group_chunks: list[list[Any]] = []
        for name, value in contents.settings:
            parsed = json.loads(value)
            if name in RESTORABLE and isinstance(parsed, RESTORABLE[name]):
                settings[name] = parsed
            elif _is_timers_name(name) and isinstance(parsed, list):
                timer_chunks.append(parsed)
            elif _is_timers_name(name, SETTING_GROUP_TIMERS) and isinstance(parsed, list):
                group_chunks.append(parsed)
        if "network.proxy" in settings:
            try:  # a proxy URL the daemon would refuse is not carried over
                settings["network.proxy"] = check_proxy_url(settings["network.proxy"])
            except ProxyUrlError:
                del settings["network.proxy"]
        self._stage("import", "restore")
        m = self.m
        async with m.lock:
            self._check_fresh()  # again, under the lock
            store = m.store
            if m.ctx.network_mode() != "direct":
                # Tor or a proxy chosen on this machine: keep it (never weaken or swap it).
                settings.pop("network.proxy", None)
                settings.pop("network.isolation", None)
            elif settings.get("network.proxy"):
                settings["network.mode"] = "proxy"  # the backup's proxy, as it was used there
            fresh_mailboxes = store.list_mailboxes()
            prekeys = PrekeyStore.create(m.entropy, identity, _ms() // 1000)
            n_messages = 0
            renewing = 0
            cids: list[int] = []  # by the contacts' places in the backup
            with store.transaction():
                store.put_identity(prekeys.to_bytes())
                for row in fresh_mailboxes:
                    store.delete_mailbox(row.id)
                    # This profile's own first mailboxes carried the discarded identity's bundle.
                    store._q(
                        "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)",
                        (row.descriptor,),
                    )
                store._q("DELETE FROM outbox")
                store.set_setting(SETTING_NAME, clean_name(contents.display_name, ""))
                timers = settings.pop(SETTING_TIMERS, []) + [
                    t for chunk in timer_chunks for t in chunk
                ]
                group_timers = settings.pop(SETTING_GROUP_TIMERS, []) + [
                    t for chunk in group_chunks for t in chunk
                ]
                for name, value in settings.items():
                    store.set_setting(name, value)
                for mb in contents.mailboxes:
                    store._q(
                        "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (NULL, ?)",
                        (_mailbox_in(mb).to_bytes(),),
                    )
                for bc in contents.contacts:
                    name = m.contacts.unique_name(clean_name(bc.name, "contact"))
                    cid = store.add_contact(
                        name,
                        identity_key=bc.identity.to_bytes(),
                        state=ContactState(bc.send_to, False).to_bytes(),
                    ).id
                    cids.append(cid)
                    store._q(
                        "UPDATE contacts SET verified = ?, blocked = ?, created_at = ? "
                        "WHERE id = ?",
                        (int(bc.verified), int(bc.blocked), bc.created_at, cid),
                    )
                    for msg in bc.messages:
                        # A queued message's blocks were sealed in the old session, which is
                        # not in the backup: it did not leave, and says so.
                        status = "failed" if msg.status == "queued" else msg.status
                        x = msg.extras
                        added = store._q(
                            "INSERT OR IGNORE INTO messages (id, contact_id, direction, body, "
                            "status, sent_at, created_at, status_at, reply_to, quoted, "
                            "quoted_dir, edited_at, edits, edit_sent_at, deleted) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                msg.message_id, cid, "out" if msg.outgoing else "in", msg.body,
                                status, msg.sent_at, msg.created_at, msg.status_at, x.reply_to,
                                x.quoted, x.quoted_dir, x.edited_at, x.edits, x.edit_sent_at,
                                int(x.deleted),
                            ),
                        ).rowcount  # fmt: skip
                        for rx in x.reactions if added else ():
                            store._q(
                                "INSERT OR IGNORE INTO reactions (message_id, direction, emoji, "
                                "created_at) VALUES (?, ?, ?, ?)",
                                (msg.message_id, "out" if rx.reactor is None else "in",
                                 rx.emoji, rx.created_at),
                            )  # fmt: skip
                        n_messages += 1
                    renew = bc.send_to is not None and not bc.blocked
                    for mb in bc.mailboxes:
                        # Kept until the renewal with this contact is done; a contact that is
                        # not renewed (blocked) must not reach the old device either: at once.
                        store._q(
                            "INSERT INTO retired_mailboxes (contact_id, descriptor) VALUES (?, ?)",
                            (cid if renew else None, _mailbox_in(mb).to_bytes()),
                        )
                    if renew:
                        store._q(
                            "INSERT INTO renewals (contact_id, side, requested_at) "
                            "VALUES (?, 'restored', 0)",
                            (cid,),
                        )
                        renewing += 1
                for t in timers:  # hostile like the rest: only well-formed entries
                    if (isinstance(t, list) and len(t) == 3
                            and all(type(v) is int for v in t) and 0 <= t[0] < len(cids)
                            and wire.timer_ok(t[1]) and 0 <= t[2] < 2**63):
                        # A stamp far ahead would beat every later change (§27.2).
                        store.set_timer(cids[t[0]], t[1], min(t[2], _ms() + MAX_SKEW_MS))
                refs = _groups_in(store, contents.groups, logs, cids)
                # An import is a reset of the person's devices (docs/devices.md §10).
                device_reset.restore(m, contents.devices, listed)
                for t in group_timers:  # checked as the contacts' timers are
                    if (isinstance(t, list) and len(t) == 3
                            and all(type(v) is int for v in t) and 0 <= t[0] < len(refs)
                            and wire.timer_ok(t[1]) and 0 <= t[2] < 2**63):
                        group_db.set_timer(store, refs[t[0]], t[1],
                                           min(t[2], _ms() + MAX_SKEW_MS))  # fmt: skip
                store.set_setting(SETTING_PENDING, True)
                m.ctx.events.emit(
                    "backup.imported",
                    {"contacts": len(contents.contacts), "messages": n_messages,
                     "groups": len(logs)},
                )  # fmt: skip
            m.prekeys = prekeys
            m.mailboxes.reload()
        # Every connection anew: the discarded identity's mailboxes are gone, and the network
        # settings may have changed. The renewals start once the relay is reached.
        await m.ctx.reconfigure()
        self._stage("import", "done")
        return {
            "contacts": len(contents.contacts),
            "messages": n_messages,
            "groups": len(logs),
            "renewing": renewing,
        }


def _reactions_out(store: Store, contact_id: int) -> dict[str, list[fmt.BackupReaction]]:
    """The reactions on a contact's exported messages (backup contents version 4)."""
    out: dict[str, list[fmt.BackupReaction]] = {}
    for mid, direction, emoji, at in store._q(
        "SELECT r.message_id, r.direction, r.emoji, r.created_at FROM reactions r "
        "JOIN messages m ON m.id = r.message_id WHERE m.contact_id = ? AND m.timer_s = 0 "
        "ORDER BY r.message_id, r.direction",
        (contact_id,),
    ).fetchall():
        try:  # one stored before §26.2's present rule, which the file's reader would refuse
            wire.check_reaction(emoji)
        except ValueError:
            continue
        if emoji:
            out.setdefault(mid, []).append(
                fmt.BackupReaction(None if direction == "out" else b"", emoji, at))
    return out


def _extras_out(row: tuple[Any, ...], reactions: list[fmt.BackupReaction] | tuple[()]
                ) -> fmt.BackupExtras:  # fmt: skip
    """A message's extras from its row's (reply_to, quoted, quoted_dir, edited_at, edits,
    edit_sent_at, deleted, timed): ``timed``, the quoted message has a disappearing timer, so
    its text stays out of the file (the quote then reads as deleted after an import)."""
    reply_to, quoted, quoted_dir, edited_at, edits, edit_sent_at, deleted, timed = row
    if deleted:  # the mark alone (docs/backup.md §2 "Extras")
        return fmt.BackupExtras(reply_to=reply_to, quoted_dir=quoted_dir, deleted=True)
    return fmt.BackupExtras(
        reply_to=reply_to,
        quoted=None if timed or quoted_dir is None else quoted,
        quoted_dir=quoted_dir,
        edited_at=edited_at,
        edits=int(edits) if edited_at is not None else 0,
        edit_sent_at=edit_sent_at if edited_at is not None else None,
        reactions=tuple(reactions),
    )


def _group_reactions_out(store: Store, ref: int) -> dict[int, list[fmt.BackupReaction]]:
    """The reactions on a group's exported messages, by message seq (contents version 4)."""
    out: dict[int, list[fmt.BackupReaction]] = {}
    for seq, member, emoji, at in store._q(
        "SELECT r.seq, r.member, r.emoji, r.created_at FROM group_reactions r "
        "JOIN group_messages m ON m.seq = r.seq WHERE m.group_ref = ? AND m.timer_s = 0 "
        "ORDER BY r.seq, r.member",
        (ref,),
    ).fetchall():
        key = bytes(member)
        try:
            wire.check_reaction(emoji)
        except ValueError:
            continue
        if emoji and len(key) in (0, 32):
            out.setdefault(int(seq), []).append(fmt.BackupReaction(key or None, emoji, at))
    return out


def _group_extras_in(store: Store, seq: int, x: fmt.BackupExtras) -> None:
    """A restored group message's quote, marks and reactions (contents version 4)."""
    if x == fmt.NO_EXTRAS:
        return
    quoted_author: bytes | None = None
    if x.quoted_dir == "out":
        quoted_author = b""
    elif x.quoted_dir == "in" and x.reply_to is not None:
        parsed = G.parse_api_id(x.reply_to)
        quoted_author = parsed[0] if parsed is not None and len(parsed[0]) == 32 else None
    store._q(
        "UPDATE group_messages SET reply_to = ?, quoted = ?, quoted_author = ?, edited_at = ?, "
        "edits = ?, edit_sent_at = ?, deleted = ? WHERE seq = ?",
        (x.reply_to, x.quoted if quoted_author is not None else None, quoted_author,
         x.edited_at, x.edits, x.edit_sent_at, int(x.deleted), seq),
    )  # fmt: skip
    for rx in x.reactions:
        store._q(
            "INSERT OR IGNORE INTO group_reactions (seq, member, emoji, created_at) "
            "VALUES (?, ?, ?, ?)",
            (seq, rx.reactor or b"", rx.emoji, rx.created_at),
        )


def _groups_out(store: Store, index: dict[int, int]) -> fmt.BackupGroups:
    """The groups for a backup. A contact that is not exported (a set-up still under way)
    takes with it its per-member statuses, its invitations and the ones we sent it."""
    hidden = tuple(sorted(index[cid] for cid in G.group_contact_ids(store) if cid in index))
    groups: list[fmt.BackupGroup] = []
    place: dict[int, int] = {}  # group ref -> its place in the backup
    for row in G.list_groups(store):
        messages = []
        timed = {
            G.api_id(bytes(a), bytes(w))
            for a, w in store._q(
                "SELECT author, wire_id FROM group_messages WHERE group_ref = ? AND timer_s > 0",
                (row.id,),
            ).fetchall()
        }
        reactions = _group_reactions_out(store, row.id)
        for (seq, author, wire_id, direction, body, sent_at, created, reply_to, quoted,
             quoted_author, edited_at, edits, edit_sent_at, deleted) in store._q(
            # as for a contact's: a message with a disappearing timer is never in a backup,
            # nor a timer line (the group's timer is in SETTING_GROUP_TIMERS)
            "SELECT seq, author, wire_id, direction, body, sent_at, created_at, reply_to, "
            "quoted, quoted_author, edited_at, edits, edit_sent_at, deleted "
            "FROM group_messages WHERE group_ref = ? AND timer_s = 0 "
            "AND timer_change IS NULL ORDER BY seq",
            (row.id,),
        ).fetchall():  # fmt: skip
            sender = bytes(author) or None
            quoted_dir = (None if quoted_author is None
                          else "out" if not bytes(quoted_author) else "in")  # fmt: skip
            extras = _extras_out(
                (reply_to, quoted, quoted_dir, edited_at, edits, edit_sent_at, deleted,
                 reply_to in timed),
                reactions.get(int(seq), ()),
            )  # fmt: skip
            if (direction == "in") != (sender is not None):
                continue  # not a row the service writes
            statuses = tuple(
                sorted((index[cid], st) for cid, st in G.statuses(store, seq).items()
                       if cid in index and st in fmt.GROUP_STATUSES)
            ) if sender is None else ()  # fmt: skip
            messages.append(
                fmt.BackupGroupMessage(G.text_id_of(bytes(wire_id)), sender, body,
                                       sent_at, created, statuses, extras)
            )  # fmt: skip
        place[row.id] = len(groups)
        groups.append(
            fmt.BackupGroup(wire.GroupLogRecord.from_bytes(row.log), row.created_at,
                            tuple(messages))
        )  # fmt: skip
    invitations = []
    for inv in G.list_invitations(store):
        payload = stored_invitation(inv.payload)  # one damaged on disk is left out
        if inv.contact_id in index and payload is not None:
            invitations.append(fmt.BackupInvitation(index[inv.contact_id], payload, inv.created_at))
    sent = [
        fmt.BackupSentInvite(bytes(r[0]), place[int(r[1])], index[int(r[2])], int(r[3]))
        for r in store._q(
            "SELECT invite_id, group_ref, contact_id, version FROM group_invites_sent "
            "ORDER BY created_at"
        ).fetchall()
        if int(r[1]) in place and int(r[2]) in index
    ]
    joining = []
    for ref, i in place.items():
        j = store.get_setting(f"{JOINING_KEY}{ref}")
        if isinstance(j, dict) and j.get("contact") in index:
            joining.append(fmt.BackupJoining(i, bytes.fromhex(j["invite"]), index[j["contact"]]))
    return fmt.BackupGroups(hidden, tuple(groups), tuple(invitations), tuple(sent),
                            tuple(joining))  # fmt: skip


def _groups_in(
    store: Store, backup: fmt.BackupGroups, logs: list[core_group.GroupLog], cids: list[int]
) -> list[int]:
    """Restore the groups (inside the import's transaction), returning their references by
    their places in the backup. Group contacts stay hidden:
    they are contacts rows, renewed like every other."""
    for i in backup.group_contacts:
        G.mark_group_contact(store, cids[i])
    refs = []
    for bg, log in zip(backup.groups, logs, strict=True):
        ref = G.add_group(
            store, log.head.group_id, log.record().to_bytes(),
            [(member.key, member.role) for member in log.head.members],
        )  # fmt: skip
        store._q("UPDATE groups SET created_at = ? WHERE id = ?", (bg.created_at, ref))
        refs.append(ref)
        for msg in bg.messages:
            # incoming: read (a restored history is not news, and sends no read receipts)
            seq = G.add_message(
                store, ref, G.wire_id_of(msg.message_id), "out" if msg.sender_key is None else "in",
                msg.body, sender_key=msg.sender_key, sent_at=msg.sent_at,
                created_at=msg.created_at,
                read_at=None if msg.sender_key is None else msg.created_at,
            )  # fmt: skip
            if seq is None:  # not expected (the parser refuses a repeated (sender, id) in a
                # group, and wire_id_of is one to one), but never a crash
                droplog.dropped("skipped a repeated group message in a backup")
                continue
            for contact, status in msg.statuses:
                G.set_statuses(store, seq, [cids[contact]], status)
            _group_extras_in(store, seq, msg.extras)
    for inv in backup.invitations:
        store._q(
            "INSERT INTO group_invitations (contact_id, payload, created_at) VALUES (?, ?, ?)",
            (cids[inv.contact], wire.encode_payload(inv.payload), inv.created_at),
        )
    for s in backup.sent_invites:
        # The file keeps neither the invitation's base version nor its chain (docs/backup.md
        # §7): taken as the group's final base now and no chain, so an accepting answer gets
        # every change of the chain resent (a duplicate is refused by the invitee, harmlessly).
        base = logs[s.group].base.version
        G.add_sent_invite(store, s.invite_id, refs[s.group], cids[s.contact], s.version,
                          base, ())
    for j in backup.joining:
        # the introduction links made at the accept are not restored (their mailboxes go at
        # the import): a refusal has none to revoke
        store.set_setting(f"{JOINING_KEY}{refs[j.group]}",
                          {"invite": j.invite_id.hex(), "contact": cids[j.contact], "links": []})
    return refs


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise OSError(27, "File too large")
        return f.read()


#: link() errors that mean "this file system has no hard links", not "the name is taken".
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS,
                  errno.EMLINK}  # fmt: skip


def _write_atomic(target: Path, data: bytes, force: bool) -> None:
    """Temporary file (0600) beside the target, fsync, then link (refuses an existing file)
    or, with ``force``, rename over it; then fsync the directory."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                # A file system without hard links (FAT on a USB stick, some network shares):
                # claim the name exclusively (still no overwrite), then rename over the claim.
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.replace(tmp, target)
            else:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def register(registry: Registry, m: Messenger) -> None:
    backups = Backups(m)

    def method(name: str) -> Callable[[Handler], Handler]:
        return registry.method(name, unlocked=True)

    @method("backup.export")
    async def backup_export(
        ctx: CallContext,
        path: str,
        passphrase: str,
        force: bool = False,
        kdf_memory_kib: int = fmt.DEFAULT_KDF.memory_kib,
        kdf_passes: int = fmt.DEFAULT_KDF.passes,
        kdf_lanes: int = fmt.DEFAULT_KDF.lanes,
    ) -> dict[str, Any]:
        for field, value in (
            ("kdf_memory_kib", kdf_memory_kib), ("kdf_passes", kdf_passes),
            ("kdf_lanes", kdf_lanes),
        ):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidParamsError(field, "must be an integer")
        if not isinstance(passphrase, str) or not passphrase:
            raise InvalidParamsError("passphrase", "must be a non-empty string")
        return await backups.export(
            path, passphrase, bool(force), fmt.KdfParams(kdf_memory_kib, kdf_passes, kdf_lanes)
        )

    @method("backup.import")
    async def backup_import(ctx: CallContext, path: str, passphrase: str) -> dict[str, Any]:
        if not isinstance(passphrase, str) or not passphrase:
            raise InvalidParamsError("passphrase", "must be a non-empty string")
        return await backups.import_(path, passphrase)

    @method("backup.status")
    async def backup_status(ctx: CallContext) -> dict[str, Any]:
        return {"renewals_pending": describe_pending(m.store)}
