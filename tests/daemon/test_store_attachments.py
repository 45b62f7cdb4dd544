"""The attachments table (aegisd/store/attachments.py) on a real SQLCipher profile."""

from __future__ import annotations

from pathlib import Path

from aegisd.store import KdfParams, create_profile
from aegisd.store import attachments as db
from aegisd.store.attachments import AttachmentRow

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def _row(aid: str, contact_id: int, created: int) -> AttachmentRow:
    return AttachmentRow(aid, contact_id, "in", "f", 1, 1, bytes(32), bytes(32),
                         "wss://relay.example", "complete", 1, None, created, created, created)


def test_listing_shows_the_newest_files_when_there_are_more_than_the_limit(tmp_path: Path) -> None:
    store = create_profile(tmp_path / "p", "correct horse battery staple", FAST)
    try:
        bob = store.add_contact("bob")
        carol = store.add_contact("carol")
        for i in range(12):
            db.add(store, _row(f"{i:032x}", bob.id, 1000 + i))
        db.add(store, _row("c" * 32, carol.id, 5000))
        newest = [r.id for r in db.listing(store, None, limit=5)]
        assert newest[-1] == "c" * 32 and len(newest) == 5
        assert newest[:4] == [f"{i:032x}" for i in range(8, 12)]
        of_bob = [r.id for r in db.listing(store, bob.id, limit=3)]
        assert of_bob == [f"{i:032x}" for i in range(9, 12)]  # the newest three, oldest first
    finally:
        store.close()


def test_deleting_a_files_message_forgets_its_attachment_events(tmp_path: Path) -> None:
    store = create_profile(tmp_path / "p", "correct horse battery staple", FAST)
    try:
        bob = store.add_contact("bob")
        kept = store.add_message(bob.id, "in", "[file] keep.txt", status="received")
        gone = store.add_message(bob.id, "in", "[file] secret-plans.pdf", status="received")
        for mid, name in ((kept.id, "keep.txt"), (gone.id, "secret-plans.pdf")):
            store.append_event("attachment.received", {"attachment_id": mid, "name": name})
            store.append_event("attachment.completed", {"attachment_id": mid, "name": name})
        assert store.delete_message(gone.id)
        left = [e.data["name"] for e in store.events_after(0)]
        assert left == ["keep.txt", "keep.txt"]
    finally:
        store.close()
