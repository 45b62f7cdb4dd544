"""Store access for the attachments table (schema migration `_attachments`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .db import Store

_SELECT = (
    "SELECT id, contact_id, direction, name, size, blocks, digest, seed, relay_url, state, done, "
    "error, sent_at, created_at, updated_at FROM attachments "
)


@dataclass(frozen=True)
class AttachmentRow:
    id: str
    contact_id: int
    direction: str
    name: str
    size: int
    blocks: int
    digest: bytes
    seed: bytes
    relay_url: str
    state: str
    done: int
    error: str | None
    sent_at: int | None
    created_at: int
    updated_at: int

    def __repr__(self) -> str:  # the seed is key material
        return f"AttachmentRow(id={self.id!r}, state={self.state!r})"


def _row(r: Any) -> AttachmentRow:
    return AttachmentRow(
        r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7]), r[8], r[9], r[10], r[11],
        r[12], r[13], r[14],
    )  # fmt: skip


def _ms() -> int:
    return time.time_ns() // 1_000_000


def add(store: Store, row: AttachmentRow) -> None:
    with store.transaction():
        store.query(
            "INSERT INTO attachments (id, contact_id, direction, name, size, blocks, digest, "
            "seed, relay_url, state, done, error, sent_at, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.contact_id, row.direction, row.name, row.size, row.blocks, row.digest,
             row.seed, row.relay_url, row.state, row.done, row.error, row.sent_at,
             row.created_at, row.updated_at),
        )  # fmt: skip


def get(store: Store, attachment_id: str) -> AttachmentRow | None:
    r = store.query(_SELECT + "WHERE id = ?", (attachment_id,)).fetchone()
    return None if r is None else _row(r)


def listing(store: Store, contact_id: int | None = None, limit: int = 500) -> list[AttachmentRow]:
    """The newest `limit` attachments, oldest first (a long history must not hide new files)."""
    if contact_id is None:
        rows = store.query(
            _SELECT + "ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
        ).fetchall()
    else:
        rows = store.query(
            _SELECT + "WHERE contact_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
            (contact_id, limit),
        ).fetchall()
    return [_row(r) for r in reversed(rows)]


def unfinished(store: Store) -> list[AttachmentRow]:
    """Transfers to resume: uploads and downloads under way."""
    rows = store.query(
        _SELECT + "WHERE state IN ('uploading', 'downloading') ORDER BY created_at"
    ).fetchall()
    return [_row(r) for r in rows]


def set_progress(store: Store, attachment_id: str, done: int) -> None:
    with store.transaction():
        store.query(
            "UPDATE attachments SET done = ?, updated_at = ? WHERE id = ?",
            (done, _ms(), attachment_id),
        )


def set_state(store: Store, attachment_id: str, state: str, error: str | None = None) -> None:
    with store.transaction():
        store.query(
            "UPDATE attachments SET state = ?, error = ?, updated_at = ? WHERE id = ?",
            (state, error, _ms(), attachment_id),
        )


def delete(store: Store, attachment_id: str) -> bool:
    with store.transaction():
        cur = store.query("DELETE FROM attachments WHERE id = ?", (attachment_id,))
    return bool(cur.rowcount)


def of_conversation(store: Store, contact_id: int) -> list[str]:
    """The files that are messages of this contact's conversation (a group's copies, which
    serve group messages, are not)."""
    return [str(r[0]) for r in store.query(
        "SELECT a.id FROM attachments a JOIN messages m ON m.id = a.id WHERE m.contact_id = ?",
        (contact_id,),
    ).fetchall()]  # fmt: skip


def with_files(store: Store) -> set[str]:
    """Ids whose encrypted copy in the profile is still needed: every received file (kept
    encrypted), sent files whose upload has not finished (the spool to upload from), and
    files another device of ours sent (direction 'out', fetched here: 'downloading' or
    'complete'; a file this device sent ends 'uploaded', its spool gone)."""
    return {
        r[0]
        for r in store.query(
            "SELECT id FROM attachments WHERE direction = 'in' "
            "OR state IN ('uploading', 'failed', 'downloading', 'complete')"
        ).fetchall()
    }


def link_group_message(store: Store, attachment_id: str, seq: int) -> None:
    """A received group file: its row names its group message (schema `_group_file_links`)."""
    with store.transaction():
        store.query("UPDATE attachments SET group_seq = ? WHERE id = ?", (seq, attachment_id))


def of_group_message(store: Store, seq: int) -> str | None:
    """The attachment id of a group message that is a received file, else None."""
    r = store.query("SELECT id FROM attachments WHERE group_seq = ?", (seq,)).fetchone()
    return None if r is None else str(r[0])


def of_group_seq(store: Store, seq: int) -> list[str]:
    """Every attachment of a group message: a received file, or our copies of a file sent."""
    return [str(r[0]) for r in store.query(
        "SELECT id FROM attachments WHERE group_seq = ?", (seq,)).fetchall()]  # fmt: skip


def pending_group_files(store: Store, contact_id: int) -> tuple[int, int]:
    """A member's received group files still downloading: how many, how many bytes."""
    r = store.query(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM attachments WHERE contact_id = ? "
        "AND direction = 'in' AND state = 'downloading' AND group_seq IS NOT NULL",
        (contact_id,),
    ).fetchone()
    return int(r[0]), int(r[1])


@dataclass(frozen=True)
class Extras:
    """A file's caption and its place in a batch (schema `_file_captions_and_typing`)."""

    caption: str = ""
    batch_id: str | None = None
    batch_index: int = 0
    batch_count: int = 1


def set_extras(store: Store, attachment_id: str, extras: Extras) -> None:
    with store.transaction():
        store.query(
            "INSERT OR REPLACE INTO attachment_extras (attachment_id, caption, batch_id, "
            "batch_index, batch_count) VALUES (?, ?, ?, ?, ?)",
            (attachment_id, extras.caption, extras.batch_id, extras.batch_index,
             extras.batch_count),
        )  # fmt: skip


def extras(store: Store, attachment_id: str) -> Extras:
    r = store.query(
        "SELECT caption, batch_id, batch_index, batch_count FROM attachment_extras "
        "WHERE attachment_id = ?",
        (attachment_id,),
    ).fetchone()
    return Extras() if r is None else Extras(r[0], r[1], r[2], r[3])
