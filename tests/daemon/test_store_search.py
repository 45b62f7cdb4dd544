"""The search index (store/search.py, schema `_message_search_index`) on a real SQLCipher
store: the migration indexes the history it finds; triggers keep the index in step with an
insert, an edit (UPDATE of the text), a blanked text, a deletion and a cascade (contact or
group removed), whoever makes them; a deleted word is in no page of the file, decrypted."""

from __future__ import annotations

import time

import pytest

from aegisd.store import KdfParams, Keyring, create_profile, open_profile
from aegisd.store import actions as A
from aegisd.store import groups as G
from aegisd.store import schema as schema_mod
from aegisd.store import search as S
from tests.sqlcipher_pages import holds

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def hits(store, query, **kw):
    return S.search(store, S.fts_query(query), limit=50, **kw)


def test_the_migration_indexes_the_history_it_finds(tmp_path, monkeypatch):
    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._message_search_index)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, None, FAST)
    c = store.add_contact("ann")
    # Raw SQL: today's Store.add_message writes columns that later migrations add.
    old_seq = store._q(
        "INSERT INTO messages (id, contact_id, direction, body, status, created_at, status_at)"
        " VALUES ('aa', ?, 'in', 'an old Crème brûlée', 'received', ?, ?)",
        (c.id, int(time.time() * 1000), int(time.time() * 1000)),
    ).lastrowid
    time.sleep(0.01)  # "newest first" needs distinct times: both rows have seq 1
    ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
    # raw SQL too: G.add_message writes the timer columns of a later migration
    g = store._q(
        "INSERT INTO group_messages (group_ref, author, wire_id, direction, body, created_at)"
        " VALUES (?, x'', ?, 'out', 'old group words', ?)",
        (ref, b"1" * 16, int(time.time() * 1000)),
    ).lastrowid
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, None)
    try:
        assert store.schema_version == schema_mod.SCHEMA_VERSION
        assert hits(store, "creme BRULEE") == [("contact", old_seq)]
        assert hits(store, '"group words"') == [("group", g)]
        assert hits(store, "old") == [("group", g), ("contact", old_seq)]  # newest first
    finally:
        store.close()


def test_triggers_follow_edits_deletions_and_cascades(tmp_path):
    store = create_profile(tmp_path / "p", None, FAST)
    try:
        ann, bob = store.add_contact("ann"), store.add_contact("bob")
        a = store.add_message(ann.id, "in", "first draft", status="received")
        b = store.add_message(bob.id, "out", "bob's draft")
        assert hits(store, "draft") == [("contact", b.seq), ("contact", a.seq)]
        assert hits(store, "draft", contact_id=ann.id) == [("contact", a.seq)]
        # an edit by plain SQL (as the edits feature does): new words in, old words out
        store._q("UPDATE messages SET body = 'second version' WHERE id = ?", (a.id,))
        assert hits(store, "first") == [] and hits(store, "second") == [("contact", a.seq)]
        store._q("UPDATE messages SET body = '' WHERE id = ?", (a.id,))  # blanked
        assert hits(store, "second") == []
        store.delete_message(b.id)
        assert hits(store, "draft") == []
        c = store.add_message(ann.id, "in", "cascade one", status="received")
        store.remove_contact(ann.id)  # its messages go by ON DELETE CASCADE
        assert hits(store, "cascade") == [] and store.get_message(c.id) is None
        ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
        G.add_message(store, ref, b"1" * 16, "in", "cascade two", sender_key=b"a" * 32)
        assert hits(store, "cascade") == [("group", hits(store, "two")[0][1])]
        assert hits(store, "cascade", group_ref=ref + 1) == []
        G.delete_group(store, ref)
        assert hits(store, "cascade") == []
        rows = store._q("SELECT count(*) FROM messages_fts_docsize").fetchone()[0]
        assert rows == 0  # nothing of the deleted rows left in the index
    finally:
        store.close()


def test_a_deleted_word_is_in_no_page_of_the_file(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, None, FAST)
    c = store.add_contact("ann")
    for i in range(300):  # an index of many segments, merged as FTS5 does
        store.add_message(c.id, "in", f"filler words number {i} lorem ipsum", status="received")
    rare = store.add_message(c.id, "in", "a qqzvlorptex here", status="received")
    store.add_message(c.id, "in", "one more after it", status="received")
    store.close()
    key = Keyring.load(home / "keyring.json").unlock(None)
    db = home / "aegis.db"
    assert holds(db, key, b"qqzvlorptex")  # the check sees it while it is there
    store = open_profile(home, None)
    store.delete_message(rare.id)
    assert hits(store, "qqzvlorptex") == []
    store.close()
    assert not holds(db, key, b"qqzvlorptex")
    assert holds(db, key, b"one more after it")


@pytest.mark.parametrize("query", ["", "  ", "!!", "*", '""', "x" * 513, "a " * 17])
def test_queries_with_nothing_to_search_or_too_much_are_refused(query):
    with pytest.raises(S.BadQuery):
        S.fts_query(query)


def test_user_syntax_is_quoted_never_fts5_syntax():
    assert S.fts_query('fox OR "brown dog" -x NEAR(a b) bre*') == (
        '"fox" "OR" "brown dog" "-x" "NEAR(a" "b)" "bre"*')
    assert S.fts_query('say "a ""quoted"" word') == '"say" "a " "quoted" " word"'
    assert S.fts_query("a\x00b") == '"a" "b"'
    assert S.fts_query("a\ud800b") == '"a" "b"'  # a lone surrogate: no UTF-8 carries it


def test_a_later_rebuild_of_a_message_table_gets_its_triggers_back(tmp_path, monkeypatch):
    """A migration that rebuilds `messages` (new table, copy, drop, rename) drops the
    triggers with the old table; the next open makes them again and rebuilds the index."""
    home = tmp_path / "p"
    store = create_profile(home, None, FAST)
    c = store.add_contact("ann")
    kept = store.add_message(c.id, "in", "kept words", status="received")
    gone = store.add_message(c.id, "in", "dropped words", status="received")
    store.close()

    def rebuild(db):
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
        db.execute(sql.replace("CREATE TABLE messages", "CREATE TABLE messages_new", 1))
        db.execute("INSERT INTO messages_new SELECT * FROM messages WHERE id != ?", (gone.id,))
        db.execute("DROP TABLE messages")
        db.execute("ALTER TABLE messages_new RENAME TO messages")

    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", [*schema_mod.MIGRATIONS, rebuild])
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION + 1)
    store = open_profile(home, None)
    try:
        assert hits(store, "words") == [("contact", kept.seq)]  # the dropped row's tokens went
        assert _docsize(store) == {kept.seq}  # in the index itself, not only through the join
        new = store.add_message(c.id, "in", "fresh words", status="received")
        assert hits(store, "fresh") == [("contact", new.seq)]  # the insert trigger is back
        store.delete_message(new.id)
        assert hits(store, "fresh") == [] and _docsize(store) == {kept.seq}
        assert not _in_index(store, "messages_fts", b"fresh")  # the delete trigger is back
    finally:
        store.close()


def _idx_terms(store, fts="messages_fts"):
    return {bytes(r[0]) for r in store._q(f"SELECT term FROM {fts}_idx").fetchall()}


def _pin_store(home, n=2858):
    """The review's reproduction: words sharing long prefixes, then `optimize`, so that
    some whole words are `%_idx` terms (a leaf page's first term)."""
    store = create_profile(home, None, FAST)
    c = store.add_contact("ann")
    with store.transaction():
        ids = {
            f"pin{i:06d}".encode(): store.add_message(
                c.id, "in", f"my code is pin{i:06d}", status="received").id
            for i in range(0, n * 3, 3)
        }  # fmt: skip
    store._q("INSERT INTO messages_fts (messages_fts) VALUES ('optimize')")
    whole = sorted(t for t in _idx_terms(store) if t.startswith(b"0pin") and len(t) == 10)
    assert whole, "no whole word among the _idx terms: the reproduction does not hold"
    word = whole[len(whole) // 2][1:]  # the leading '0' is the column's prefix byte
    return store, ids, word


def test_a_deleted_word_leaves_the_idx_table_at_the_rebuild(tmp_path):
    home = tmp_path / "p"
    store, ids, word = _pin_store(home)
    key = Keyring.load(home / "keyring.json").unlock(None)
    db = home / "aegis.db"
    try:
        assert not store.search_dirty()
        store.delete_message(ids[word])
        assert hits(store, word.decode()) == []
        # secure-delete dropped it from the segments, not from _idx: the rebuild's reason
        assert b"0" + word in _idx_terms(store) and store.search_dirty()
        assert store.rebuild_dirty_search() == 1
        assert b"0" + word not in _idx_terms(store) and not store.search_dirty()
        assert not holds(db, key, word)  # the checkpoint took the old pages out of the WAL
        assert hits(store, "pin000003") != []  # the rest still found
    finally:
        store.close()


def test_a_deletion_before_a_crash_is_rebuilt_at_the_next_open(tmp_path):
    home = tmp_path / "p"
    store, ids, word = _pin_store(home)
    key = Keyring.load(home / "keyring.json").unlock(None)
    store.delete_message(ids[word])
    crashed = tmp_path / "crashed"  # the files as a kill would leave them: no close
    crashed.mkdir()
    for f in home.iterdir():
        if f.is_file():
            (crashed / f.name).write_bytes(f.read_bytes())
            (crashed / f.name).chmod(0o600)
    store.close()
    assert not holds(home / "aegis.db", key, word)  # close rebuilds before the checkpoint
    store = open_profile(crashed, None)
    try:
        assert not store.search_dirty() and b"0" + word not in _idx_terms(store)
    finally:
        store.close()
    assert not holds(crashed / "aegis.db", key, word)


def test_an_sqlite_too_old_for_secure_delete_is_refused_clearly(tmp_path, monkeypatch):
    from aegisd.store.errors import StoreError

    home = tmp_path / "p"
    create_profile(home, None, FAST).close()
    monkeypatch.setattr("aegisd.store.db.MIN_SQLITE", (99, 0, 0))
    with pytest.raises(StoreError, match=r"needs SQLite 99\.0\.0 or later"):
        open_profile(home, None)


def _docsize(store, fts="messages_fts"):
    return {int(r[0]) for r in store._q(f"SELECT id FROM {fts}_docsize").fetchall()}


def _in_index(store, fts, word):
    """Whether any row of the index's shadow tables (segments, _idx terms) holds ``word``."""
    blocks = store._q(f"SELECT block FROM {fts}_data").fetchall()
    in_data = any(word in bytes(b[0]) for b in blocks)
    return in_data or any(word in t for t in _idx_terms(store, fts))


def _delete_message(store, m, c):
    store.delete_message(m.id)


def _delete_conversation(store, m, c):
    store.delete_conversation(c.id)


def _remove_contact(store, m, c):
    store.remove_contact(c.id)


def _delete_for_everyone(store, m, c):
    A.mark_deleted(store, m.id, c.id)


def _edit(store, m, c):
    A.edit(store, m.id, "other text now", 1, None)


@pytest.mark.parametrize(
    "path", [_delete_message, _delete_conversation, _remove_contact, _delete_for_everyone, _edit]
)
def test_every_deletion_path_takes_the_word_out_of_messages_fts(tmp_path, path):
    """Checked in the index's own tables and in the decrypted pages, not through a search
    (which joins on the message table and would pass with the index out of step)."""
    home = tmp_path / "p"
    store = create_profile(home, None, FAST)
    key = Keyring.load(home / "keyring.json").unlock(None)
    keep = store.add_contact("keep")
    kept = store.add_message(keep.id, "in", "unrelated kept words", status="received")
    c = store.add_contact("ann")
    m = store.add_message(c.id, "in", "the zqxwvojute word", status="received")
    assert _in_index(store, "messages_fts", b"zqxwvojute") and m.seq in _docsize(store)
    path(store, m, c)
    if path is _edit or path is _delete_for_everyone:  # the row stays, its old words go
        assert _docsize(store) == {kept.seq, m.seq}
    else:
        assert _docsize(store) == {kept.seq}
    assert not _in_index(store, "messages_fts", b"zqxwvojute") and store.search_dirty()
    store.close()  # rebuilds, then truncates the WAL
    assert not holds(home / "aegis.db", key, b"zqxwvojute")
    assert holds(home / "aegis.db", key, b"unrelated kept words")


def test_a_group_deletion_takes_its_words_out_of_group_messages_fts(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, None, FAST)
    key = Keyring.load(home / "keyring.json").unlock(None)
    other = G.add_group(store, b"h" * 32, b"log", [(b"a" * 32, 3)])
    kept = G.add_message(store, other, b"2" * 16, "out", "unrelated kept words")
    ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
    G.add_message(store, ref, b"1" * 16, "in", "the zqxwvojute word", sender_key=b"a" * 32)
    assert _in_index(store, "group_messages_fts", b"zqxwvojute")
    G.delete_group(store, ref)
    assert _docsize(store, "group_messages_fts") == {kept}
    assert not _in_index(store, "group_messages_fts", b"zqxwvojute") and store.search_dirty()
    store.close()
    assert not holds(home / "aegis.db", key, b"zqxwvojute")


def test_a_deletion_that_leaves_no_dead_idx_term_rebuilds_nothing(tmp_path):
    store, ids, word = _pin_store(tmp_path / "p")
    try:
        # A word that is no %_idx term, and whose prefixes there are other words' too: the
        # deletion leaks nothing, so the 30 s loop does not rewrite the whole index for it.
        terms = _idx_terms(store)
        other = next(w for w in sorted(ids) if b"0" + w not in terms and all(
            any(o != w and o.startswith(t[1:]) for o in ids)
            for t in terms if t[1:] and w.startswith(t[1:])))  # fmt: skip
        store.delete_message(ids[other])
        assert store.search_dirty() and not store.search_leaks("messages_fts")
        assert store.rebuild_dirty_search() == 0 and not store.search_dirty()
        store.delete_message(ids[word])  # a whole word among the terms: rebuilt
        assert store.search_leaks("messages_fts")
        assert store.rebuild_dirty_search() == 1 and b"0" + word not in _idx_terms(store)
        assert not store.search_leaks("messages_fts")
    finally:
        store.close()


def test_the_wal_is_emptied_at_every_open(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, None, FAST)
    c = store.add_contact("ann")
    store.add_message(c.id, "in", "in the wal", status="received")
    killed = tmp_path / "killed"  # the files as a kill would leave them: no close
    killed.mkdir()
    for f in home.iterdir():
        if f.is_file():
            (killed / f.name).write_bytes(f.read_bytes())
            (killed / f.name).chmod(0o600)
    store.close()
    assert (killed / "aegis.db-wal").stat().st_size > 0
    store = open_profile(killed, None)
    try:
        assert (killed / "aegis.db-wal").stat().st_size == 0
    finally:
        store.close()


def test_the_rebuild_loop_survives_an_error(tmp_path, monkeypatch, caplog):
    import asyncio
    from types import SimpleNamespace

    from aegisd.services import messenger

    store = create_profile(tmp_path / "p", None, FAST)
    try:
        with store.transaction():  # a mark no rebuild can serve: every round fails
            store._q("INSERT INTO fts_dirty (fts) VALUES ('not_an_index')")
        monkeypatch.setattr(messenger, "SEARCH_REBUILD_INTERVAL", 0.01)
        host = SimpleNamespace(ctx=SimpleNamespace(store=store))

        async def run() -> None:
            loop = asyncio.ensure_future(messenger.Messenger._search_rebuild_loop(host))
            await asyncio.sleep(0.2)
            assert not loop.done()  # still running: the error was logged, not raised
            loop.cancel()

        asyncio.run(run())
        failures = [r for r in caplog.records if "search index failed" in r.getMessage()]
        assert len(failures) >= 2 and all("not_an_index" not in r.getMessage() for r in failures)
    finally:
        with store.transaction():
            store._q("DELETE FROM fts_dirty")
        store.close()
