"""Files another device of ours sent (take_sent: direction 'out', fetched here) on a real
SQLCipher store and profile directory (services/attachments.py, docs/devices.md §6): the
unlock keeps their encrypted copies (they are not an upload's leftover spool), and a blocked
contact's stop their fetch as a received file's does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aegisd.services.attachments import BLOCKED_TEXT, Attachments
from aegisd.store import Store, create_profile
from aegisd.store import attachments as db
from aegisd.store.attachments import AttachmentRow
from tests.daemon.test_own_sync_rows import FAST, _bob


class Host:
    def __init__(self, home: Path, store: Store) -> None:
        self.events: list[tuple[str, Any]] = []
        self.ctx = SimpleNamespace(paths=SimpleNamespace(home=home), events=SimpleNamespace(
            emit=lambda kind, data: self.events.append((kind, data))))  # fmt: skip
        self.store = store
        self.attachments = Attachments(self)  # type: ignore[arg-type]


def _transcribed(store: Store, contact_id: int, aid: str, state: str) -> None:
    store.add_message(contact_id, "out", "[file] notes.bin", status="sent", message_id=aid)
    db.add(store, AttachmentRow(aid, contact_id, "out", "notes.bin", 10, 1, b"d" * 32,
                                b"s" * 32, "ws://127.0.0.1:9/v1/ws", state, 0, None, 1, 1, 1))


def test_the_unlock_keeps_and_a_block_stops_a_file_sent_by_another_device(
    tmp_path: Path,
) -> None:
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        host = Host(tmp_path / "p", store)
        files = host.attachments
        c = _bob(store)
        done, fetching = "aa" * 16, "bb" * 16
        _transcribed(store, c.id, done, "complete")
        _transcribed(store, c.id, fetching, "downloading")
        files.directory.mkdir(mode=0o700)
        for aid in (done, fetching):
            files._file(aid).write_bytes(b"blocks")
        store.update_contact(c.id, blocked=True)  # blocked before the fix that stops them

        asyncio.run(files.on_unlock())
        assert files._file(done).exists()  # fetched here: the only copy this device has
        row = db.get(store, fetching)
        assert row is not None and (row.state, row.error) == ("failed", BLOCKED_TEXT)
        assert not files._workers

        # Blocked now: a fetch under way stops as a received file's does.
        with store.transaction():
            db.set_state(store, fetching, "downloading")
        asyncio.run(files.stop_downloads(c.id, BLOCKED_TEXT))
        row = db.get(store, fetching)
        assert row is not None and row.state == "failed"
        assert db.with_files(store) == {done, fetching}
    finally:
        store.close()
