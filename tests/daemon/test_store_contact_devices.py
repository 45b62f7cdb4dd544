"""The contact device tables (docs/devices.md §5) on a real SQLCipher store: a contact without
a list keeps its one session as before; sessions per device come and go with the list."""

from __future__ import annotations

from aegisd.store import KdfParams, create_profile, open_profile
from aegisd.store import contact_devices as cd
from aegisd.store import schema as schema_mod

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def test_lists_and_device_sessions_round_trip_and_go_with_the_contact(tmp_path):
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        bob = store.add_contact("bob")
        store.put_session(bob.id, b"legacy")
        assert cd.held_list(store, bob.id) is None and cd.device_sessions(store, bob.id) == []
        with store.transaction():
            cd.put_list(store, bob.id, b"list-1", 1, 100)
            cd.set_session_device(store, bob.id, b"a" * 16)
            cd.put_device_session(store, bob.id, b"b" * 16, b"s-b", 100)
            cd.put_device_session(store, bob.id, b"c" * 16, b"s-c", 100)
            cd.set_device_send_to(store, bob.id, b"b" * 16, b"mailbox-b")
        assert cd.held_list(store, bob.id) == cd.HeldList(b"list-1", 1, b"a" * 16)
        with store.transaction():
            cd.put_list(store, bob.id, b"list-2", 2, 101)  # keeps the session device
            cd.put_device_session(store, bob.id, b"b" * 16, b"s-b2", 101)  # keeps send_to
        assert cd.held_list(store, bob.id) == cd.HeldList(b"list-2", 2, b"a" * 16)
        assert cd.device_sessions(store, bob.id) == [
            cd.DeviceSession(b"b" * 16, b"s-b2", b"mailbox-b"),
            cd.DeviceSession(b"c" * 16, b"s-c", None),
        ]
        with store.transaction():
            assert cd.drop_device_sessions(store, bob.id, frozenset({b"b" * 16})) == 1
        assert [s.device_id for s in cd.device_sessions(store, bob.id)] == [b"b" * 16]
        assert store.get_session(bob.id) == b"legacy"  # the contact's own row is untouched
        store.remove_contact(bob.id)
        assert cd.held_list(store, bob.id) is None and cd.device_sessions(store, bob.id) == []
    finally:
        store.close()


def test_the_migration_keeps_existing_sessions(tmp_path, monkeypatch):
    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._contact_devices)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, "pass phrase", FAST)
    bob = store.add_contact("bob")
    store.put_session(bob.id, b"state")
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, "pass phrase")
    try:
        assert store.schema_version == schema_mod.SCHEMA_VERSION
        assert store.get_session(bob.id) == b"state"
        assert cd.held_list(store, bob.id) is None and cd.device_sessions(store, bob.id) == []
    finally:
        store.close()
