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


def test_a_setting_set_to_none_is_deleted(tmp_path: Path) -> None:
    """Per-copy, per-contact and per-invitation entries go once done with: no row stays
    (review of the group files, finding 2)."""
    store = create_profile(tmp_path / "p", "correct horse battery staple", FAST)
    try:
        store.set_setting("group.file.ab", {"group": 1, "message": "m"})
        store.set_setting("group.file.ab", None)
        assert store.get_setting("group.file.ab", "absent") == "absent"
        rows = store._q("SELECT count(*) FROM settings WHERE name = 'group.file.ab'")
        assert rows.fetchone()[0] == 0
    finally:
        store.close()


def test_a_group_file_row_names_its_group_message(tmp_path: Path) -> None:
    """A received group file remembers its group message: only that message is a file (the
    same author and id in another group is not), and a member's pending files are counted."""
    from aegisd.store import groups as G

    store = create_profile(tmp_path / "p", "correct horse battery staple", FAST)
    try:
        bob = store.add_contact("bob")
        one = G.add_group(store, b"1" * 32, b"log", [(b"b" * 32, 3)])
        two = G.add_group(store, b"2" * 32, b"log", [(b"b" * 32, 3)])
        wid = b"w" * 16
        seq = G.add_message(store, one, wid, "in", "[file] f", sender_key=b"b" * 32)
        other = G.add_message(store, two, wid, "in", "[file] f", sender_key=b"b" * 32)
        assert seq is not None and other is not None
        aid = G.api_id(b"b" * 32, wid)
        db.add(store, _row(aid, bob.id, 1000))
        db.add(store, _row("d" * 32, bob.id, 1000))  # a one-to-one file: not counted
        assert db.pending_group_files(store, bob.id) == (0, 0)
        db.link_group_message(store, aid, seq)
        assert db.of_group_message(store, seq) == aid
        assert db.of_group_message(store, other) is None
        assert db.pending_group_files(store, bob.id) == (0, 0)  # complete: not pending
        db.set_state(store, aid, "downloading")
        db.set_state(store, "d" * 32, "downloading")
        assert db.pending_group_files(store, bob.id) == (1, 1)
    finally:
        store.close()


def test_the_migration_drops_null_settings_and_orphan_copy_entries(tmp_path, monkeypatch):
    from aegisd.store import open_profile
    from aegisd.store import schema as schema_mod

    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._group_file_links)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, "pass phrase", FAST)
    bob = store.add_contact("bob")
    db.add(store, _row("a" * 32, bob.id, 1000))
    with store.transaction():
        for name, value in (("group.intro.x", "null"), ("group.file." + "a" * 32, '{"group": 1}'),
                            ("group.file." + "b" * 32, '{"group": 1}'), ("kept", "3")):
            store._q("INSERT INTO settings (name, value) VALUES (?, ?)", (name, value))
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, "pass phrase")
    try:
        names = [r[0] for r in store._q("SELECT name FROM settings ORDER BY name").fetchall()]
        assert "group.intro.x" not in names and "group.file." + "b" * 32 not in names
        assert "group.file." + "a" * 32 in names and "kept" in names
        assert db.get(store, "a" * 32) is not None
    finally:
        store.close()
