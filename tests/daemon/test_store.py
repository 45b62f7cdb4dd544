"""The SQLCipher store and its keyring, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path

import pytest

from aegisd.store import (
    DEFAULT_KDF,
    KdfParams,
    Keyring,
    KeyringError,
    NoPassphrase,
    NoProfile,
    ProfileExists,
    SchemaError,
    Store,
    StoreError,
    WrongPassphrase,
    create_profile,
    open_profile,
)
from aegisd.store import schema as schema_mod

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)
PASS = "correct horse battery staple"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_default_kdf_is_at_least_64mib_3_passes_4_lanes():
    assert DEFAULT_KDF.memory_kib >= 64 * 1024
    assert DEFAULT_KDF.time_cost >= 3
    assert DEFAULT_KDF.parallelism >= 4


def test_create_uses_default_kdf_and_stores_parameters(tmp_path):
    kr, _key = Keyring.create(tmp_path / "k.json", PASS)
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["kdf"]["name"] == "argon2id"
    assert doc["kdf"]["memory_kib"] == DEFAULT_KDF.memory_kib
    assert doc["kdf"]["time_cost"] == DEFAULT_KDF.time_cost
    assert doc["kdf"]["parallelism"] == DEFAULT_KDF.parallelism
    assert kr.kdf_params == DEFAULT_KDF


def test_profile_files_and_modes(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, PASS, FAST)
    store.close()
    assert _mode(home) == 0o700
    assert _mode(home / "keyring.json") == 0o600
    assert _mode(home / "aegis.db") == 0o600
    with pytest.raises(ProfileExists):
        create_profile(home, PASS, FAST)


def test_unlock_with_right_and_wrong_passphrase(tmp_path):
    home = tmp_path / "p"
    create_profile(home, PASS, FAST).close()
    store = open_profile(home, PASS)
    assert store.schema_version == schema_mod.SCHEMA_VERSION
    store.close()
    with pytest.raises(WrongPassphrase) as exc:
        open_profile(home, "not it")
    assert str(exc.value) == "wrong passphrase"
    with pytest.raises(NoPassphrase):
        open_profile(home, None)


def test_passphrase_is_nfc_normalised(tmp_path):
    home = tmp_path / "p"
    create_profile(home, "caf\u00e9", FAST).close()  # precomposed
    open_profile(home, "cafe\u0301").close()  # decomposed: same passphrase


def test_empty_passphrase_refused(tmp_path):
    with pytest.raises(ValueError):
        create_profile(tmp_path / "p", "", FAST)


def test_no_profile(tmp_path):
    with pytest.raises(NoProfile):
        open_profile(tmp_path, PASS)


def test_change_passphrase_rewraps_without_reencrypting(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, PASS, FAST)
    store.set_setting("x", 1)
    store.close()
    db_before = hashlib.sha256((home / "aegis.db").read_bytes()).digest()
    kr = Keyring.load(home / "keyring.json")
    key = kr.unlock(PASS)
    with pytest.raises(WrongPassphrase):
        kr.change_passphrase("wrong", "new one", FAST)
    kr.change_passphrase(PASS, "new one", FAST)
    assert _mode(home / "keyring.json") == 0o600
    assert hashlib.sha256((home / "aegis.db").read_bytes()).digest() == db_before
    with pytest.raises(WrongPassphrase):
        open_profile(home, PASS)
    assert Keyring.load(home / "keyring.json").unlock("new one") == key
    store = open_profile(home, "new one")
    assert store.get_setting("x") == 1
    store.close()
    # Remove the passphrase (key file), then set one again.
    kr = Keyring.load(home / "keyring.json")
    kr.change_passphrase("new one", None)
    assert not Keyring.load(home / "keyring.json").has_passphrase
    assert Keyring.load(home / "keyring.json").unlock(None) == key
    kr.change_passphrase(None, "third", FAST)
    assert Keyring.load(home / "keyring.json").unlock("third") == key


def test_no_passphrase_profile_key_file(tmp_path):
    home = tmp_path / "p"
    create_profile(home, None).close()
    kf = home / "keyring.json"
    assert _mode(kf) == 0o600
    assert json.loads(kf.read_text())["protection"] == "none"
    open_profile(home, None).close()
    with pytest.raises(NoPassphrase):
        open_profile(home, "something")
    os.chmod(kf, 0o644)
    with pytest.raises(KeyringError, match="0600"):
        open_profile(home, None)


def test_tampered_kdf_parameters_are_detected(tmp_path):
    home = tmp_path / "p"
    create_profile(home, PASS, KdfParams(2048, 1, 1)).close()
    kf = home / "keyring.json"
    doc = json.loads(kf.read_text())
    doc["kdf"]["memory_kib"] = 1024
    kf.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphrase):
        open_profile(home, PASS)


def test_damaged_keyring(tmp_path):
    home = tmp_path / "p"
    create_profile(home, PASS, FAST).close()
    kf = home / "keyring.json"
    kf.write_text("{not json")
    with pytest.raises(KeyringError):
        open_profile(home, PASS)
    kf.write_text(json.dumps({"format": "aegis-keyring", "version": 99}))
    with pytest.raises(KeyringError, match="version"):
        open_profile(home, PASS)


def test_wrong_raw_key_is_one_clear_error(tmp_path):
    home = tmp_path / "p"
    create_profile(home, PASS, FAST).close()
    with pytest.raises(StoreError, match="does not open"):
        Store.open(home / "aegis.db", secrets.token_bytes(32))


def test_secure_delete_and_pragmas(tmp_path):
    store = create_profile(tmp_path / "p", None)
    assert store._db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._db.execute("PRAGMA cipher_version").fetchone()[0].startswith("4.")
    store.close()


def test_newer_schema_is_refused(tmp_path):
    home = tmp_path / "p"
    store = create_profile(home, None)
    store._db.execute("UPDATE schema_version SET version = 999")
    store.close()
    with pytest.raises(SchemaError, match="999"):
        open_profile(home, None)


def test_migrations_run_in_order_and_atomically(tmp_path, monkeypatch):
    home = tmp_path / "p"
    create_profile(home, None).close()
    base = schema_mod.SCHEMA_VERSION

    def add_table(db):
        db.execute("CREATE TABLE extra (x INTEGER)")

    def broken(db):
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration failed")

    monkeypatch.setattr(schema_mod, "MIGRATIONS", [*schema_mod.MIGRATIONS, add_table, broken])
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", base + 2)
    with pytest.raises(RuntimeError):
        open_profile(home, None)
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS[:-1])
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", base + 1)
    store = open_profile(home, None)
    assert store.schema_version == base + 1
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert "extra" in tables and "half_done" not in tables
    store.close()


def test_transaction_is_all_or_nothing(tmp_path):
    store = create_profile(tmp_path / "p", None)
    c = store.add_contact("alice")
    with pytest.raises(RuntimeError), store.transaction():
        store.put_session(c.id, b"ratchet-2")
        store.add_message(c.id, "in", "hello")
        with store.transaction():  # nested: joins the outer one
            store.append_event("message.received", {"n": 1})
        raise RuntimeError("crash before commit")
    assert store.get_session(c.id) is None
    assert store.history(c.id) == []
    assert store.last_event_seq() == 0
    with store.transaction():
        store.put_session(c.id, b"ratchet-2")
        m = store.add_message(c.id, "in", "hello")
    assert store.get_session(c.id) == b"ratchet-2"
    assert [x.id for x in store.history(c.id)] == [m.id]
    store.close()


def test_contacts_sessions_identity_settings(tmp_path):
    store = create_profile(tmp_path / "p", None)
    assert store.get_identity() is None
    store.put_identity(b"\x00id")
    store.put_identity(b"\x01id")
    assert store.get_identity() == b"\x01id"
    a = store.add_contact("alice", identity_key=b"ik", state=b"mb")
    with pytest.raises(StoreError):
        store.add_contact("alice")
    store.update_contact(a.id, verified=True, name="alice2")
    got = store.get_contact(a.id)
    assert got is not None and got.verified and got.name == "alice2"
    assert store.contact_by_name("alice2") == got
    with pytest.raises(ValueError):
        store.update_contact(a.id, bogus=1)
    store.put_session(a.id, b"s1")
    store.add_message(a.id, "out", "x")
    store.enqueue_blocks(b"dest", [b"blk"], contact_id=a.id)
    store.remove_contact(a.id)
    assert store.list_contacts() == []
    assert store.get_session(a.id) is None
    assert store.outbox_size() == 0
    store.set_setting("read_receipts", False)
    assert store.get_setting("read_receipts") is False
    assert store.get_setting("missing", 7) == 7
    store.close()


def test_message_status_only_moves_forward(tmp_path):
    store = create_profile(tmp_path / "p", None)
    c = store.add_contact("bob")
    m = store.add_message(c.id, "out", "hi")
    assert m.status == "queued" and len(m.id) == 32
    assert store.set_message_status(m.id, "sent")
    assert store.set_message_status(m.id, "read")
    assert not store.set_message_status(m.id, "delivered")  # late receipt
    assert not store.set_message_status(m.id, "read")  # duplicate
    got = store.get_message(m.id)
    assert got is not None and got.status == "read"
    with pytest.raises(ValueError):
        store.set_message_status(m.id, "received")
    m2 = store.add_message(c.id, "out", "lost")
    assert store.set_message_status(m2.id, "expired")
    i = store.add_message(c.id, "in", "yo", sent_at=5)
    assert i.status == "received" and i.sent_at == 5
    assert store.set_message_status(i.id, "read")
    store.close()


def test_history_pagination_and_deletion(tmp_path):
    store = create_profile(tmp_path / "p", None)
    c = store.add_contact("bob")
    ids = [store.add_message(c.id, "in", f"m{i}").id for i in range(10)]
    page = store.history(c.id, limit=4)
    assert [m.id for m in page] == ids[6:]
    page2 = store.history(c.id, before_seq=page[0].seq, limit=4)
    assert [m.id for m in page2] == ids[2:6]
    assert store.delete_message(ids[0])
    assert not store.delete_message(ids[0])
    assert store.delete_conversation(c.id) == 9
    store.close()


def test_event_sequence_is_monotonic_even_after_pruning(tmp_path):
    store = create_profile(tmp_path / "p", None)
    seqs = [store.append_event("t.x", {"i": i}).seq for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [e.data["i"] for e in store.events_after(seqs[1])] == [2, 3, 4]
    assert store.prune_events(seqs[-1]) == 5
    assert store.first_event_seq() is None
    assert store.last_event_seq() == seqs[-1]
    assert store.append_event("t.x", {}).seq == seqs[-1] + 1
    store.close()


def test_outbox_keeps_exact_blocks(tmp_path):
    now = [1000]
    home = tmp_path / "p"
    create_profile(home, None).close()
    key = Keyring.load(home / "keyring.json").unlock(None)
    store = Store.open(home / "aegis.db", key, clock=lambda: now[0])
    c = store.add_contact("bob")
    m = store.add_message(c.id, "out", "hi")
    blocks = [secrets.token_bytes(64) for _ in range(3)]
    ids = store.enqueue_blocks(b"mailbox", blocks, message_id=m.id, contact_id=c.id)
    store.close()
    store = Store.open(home / "aegis.db", key, clock=lambda: now[0])  # survives a restart
    due = store.pending_blocks()
    assert [d.block for d in due] == blocks and [d.id for d in due] == ids
    store.block_attempted(ids[0], retry_at=2000)
    assert [d.id for d in store.pending_blocks()] == ids[1:]
    assert [d.id for d in store.pending_blocks(now=2000)] == ids
    for i in ids:
        store.block_deposited(i)
    assert store.outbox_size() == 0
    store.close()


def test_at_rest_no_plaintext_in_any_file(tmp_path):
    marker = "AEGIS-PLAINTEXT-MARKER-" + secrets.token_hex(8)
    home = tmp_path / "p"
    store = create_profile(home, PASS, FAST)
    key = Keyring.load(home / "keyring.json").unlock(PASS)
    c = store.add_contact(marker)
    store.add_message(c.id, "in", marker * 20)
    store.append_event("message.received", {"body": marker})
    store.set_setting("s", marker)
    store.put_identity(marker.encode())
    store.enqueue_blocks(marker.encode(), [marker.encode()])
    # Scan while open (WAL holds the writes) and after close.
    for _ in range(2):
        files = [p for p in home.rglob("*") if p.is_file()]
        assert files
        for f in files:
            raw = f.read_bytes()
            assert marker.encode() not in raw, f.name
            assert marker.encode("utf-16-le") not in raw, f.name
            assert key not in raw and key.hex().encode() not in raw, f.name
        store.close()


def test_events_pruned_by_age_keep_numbering(tmp_path):
    now = [1_000_000]
    home = tmp_path / "p"
    create_profile(home, None).close()
    key = Keyring.load(home / "keyring.json").unlock(None)
    store = Store.open(home / "aegis.db", key, clock=lambda: now[0])
    old = [store.append_event("t.old", {"i": i}).seq for i in range(3)]
    now[0] += 10_000
    new = store.append_event("t.new", {}).seq
    assert store.prune_events_before(now[0] - 5_000) == 3
    assert [e.seq for e in store.events_after(0)] == [new]
    assert store.prune_events_before(now[0] + 1) == 0  # the newest always stays
    assert store.append_event("t.next", {}).seq == new + 1 > old[-1]
    store.close()


@pytest.mark.parametrize(
    ("settings", "mode"),
    [
        ({"relay.url": "wss://r.example/v1/ws", "network.proxy": "socks5://127.0.0.1:9050"},
         "proxy"),
        ({"relay.url": "wss://r.example/v1/ws"}, "direct"),
        ({"relay.url": "wss://r.example/v1/ws", "network.proxy": None}, "direct"),
        ({}, None),  # no relay yet: the default applies once one is set
    ],
)  # fmt: skip
def test_network_mode_migration_keeps_what_old_profiles_did(tmp_path, monkeypatch, settings, mode):
    """A profile made before network modes keeps its connections: a proxy if it had one, else
    direct (never silently Tor, never silently direct through a missing proxy)."""
    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._network_mode)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, None)
    for k, v in settings.items():
        store.set_setting(k, v)
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, None)
    assert store.schema_version == schema_mod.SCHEMA_VERSION
    assert store.get_setting("network.mode") == mode
    store.close()
    fresh = create_profile(tmp_path / "new", None)  # a new profile: its init decides
    assert fresh.get_setting("network.mode") is None
    fresh.close()


def test_renewal_resends_every_deletion_first_then_the_newest_edits_and_reactions(tmp_path):
    from aegisd.store import actions as A

    store = Store.open(tmp_path / "a.db", os.urandom(32), create=True)
    try:
        c = store.add_contact("bob")
        old = store.add_message(c.id, "out", "an old regret", status="sent")
        A.mark_deleted(store, old.id, c.id)
        newer = []
        for i in range(80):  # more messages with a reaction than the window of 64
            m = store.add_message(c.id, "in", f"text {i}", status="received")
            A.set_reaction(store, m.id, "out", "👍", 1)
            newer.append(m.id)
        edited = store.add_message(c.id, "out", "draft", status="sent")
        A.edit(store, edited.id, "final", 2, 3)
        got = A.own_actions(store, c.id, 64, 1000)
        assert got[0] == A.OwnAction(old.id, "delete", "", None)  # older than the window
        rest = got[1:]
        assert len(rest) == 64 and rest[-1] == A.OwnAction(edited.id, "edit", "final", 3)
        assert [a.message_id for a in rest[:-1]] == newer[-63:]
        assert A.own_actions(store, c.id, 64, 0)[0].kind != "delete"  # their own bound
    finally:
        store.close()
