"""The group tables (store/groups.py): logs with their members, invitations, held payloads,
history with a status per member; a removed contact's rows go with it."""

from __future__ import annotations

from aegisd.store import KdfParams, create_profile
from aegisd.store import groups as G

FAST = KdfParams(memory_kib=1024, time_cost=1, parallelism=1)


def test_group_rows_round_trip_and_follow_their_contact(tmp_path):
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        c = store.add_contact("ann", identity_key=b"k")
        ref = G.add_group(store, b"g" * 32, b"log1", [(b"a" * 32, 3), (b"b" * 32, 1)])
        assert G.group_by_id(store, b"g" * 32) == G.get_group(store, ref)
        assert G.groups_with_member(store, b"b" * 32) == [ref]
        G.put_log(store, ref, b"log2", [(b"a" * 32, 3)])
        got = G.get_group(store, ref)
        assert got is not None and got.log == b"log2"
        assert G.groups_with_member(store, b"b" * 32) == []

        G.add_invitation(store, c.id, b"payload")
        assert G.count_invitations(store) == 1
        G.add_sent_invite(store, b"i" * 16, ref, c.id, 7, 5, [b"x" * 32, b"y" * 32])
        assert G.take_sent_invite(store, b"i" * 16, c.id + 1) is None
        assert G.take_sent_invite(store, b"i" * 16, c.id) == G.SentInvite(
            ref, 5, frozenset({b"x" * 32, b"y" * 32}))  # fmt: skip
        assert G.take_sent_invite(store, b"i" * 16, c.id) is None  # one answer each

        m1 = G.add_message(store, ref, b"1" * 16, "out", "hello")
        assert m1 is not None
        G.set_statuses(store, m1, [c.id], "queued")
        assert G.own_message_to(store, b"1" * 16, c.id) == (m1, (b"1" * 16).hex())
        assert G.own_message_to(store, b"1" * 16, c.id + 1) is None  # not sent to it
        assert G.advance_status(store, m1, c.id, "read")
        assert not G.advance_status(store, m1, c.id, "delivered")  # never backwards
        assert G.statuses(store, m1) == {c.id: "read"}
        assert [m.body for m in G.history(store, ref, before_seq=None, limit=10)] == ["hello"]

        G.hold(store, ref, c.id, b"held")
        assert G.count_held_from(store, ref, c.id) == 1
        assert G.count_held_from(store, ref, c.id + 1) == 0
        # an introduction waiting for its first contact: tries counted, gone with its group
        intro = G.add_pending_intro(store, ref, "member ab", "aegis://link")
        G.tried_pending_intro(store, intro)
        assert G.pending_intros(store) == [G.PendingIntro(intro, ref, "member ab",
                                                          "aegis://link", 1)]  # fmt: skip
        assert G.count_pending_intros(store, ref) == 1
        G.add_invitation(store, c.id, b"second")
        assert G.invitations_of(store, c.id) == [r.id for r in G.list_invitations(store)]
        assert G.drop_invitations_before(store, 0) == 0  # none that old
        d = store.add_contact("bo", identity_key=b"k2")
        G.put_log(store, ref, b"log3", [(b"a" * 32, 3), (b"d" * 32, 1)])
        assert G.shares_group(store, b"a" * 32, b"d" * 32)
        assert not G.shares_group(store, b"a" * 32, b"b" * 32)
        G.mark_group_contact(store, d.id)
        assert G.is_group_contact(store, d.id) and not G.is_group_contact(store, c.id)
        G.mark_group_contact(store, c.id)
        assert G.group_contact_ids(store) == {c.id, d.id}
        store.remove_contact(c.id)
        assert G.count_invitations(store) == 0
        assert G.held(store, ref) == []
        assert G.statuses(store, m1) == {}
        assert G.group_contact_ids(store) == {d.id}
        G.delete_group(store, ref)
        assert G.list_groups(store) == []
        assert G.pending_intros(store) == []
    finally:
        store.close()


def test_an_introduction_link_takes_only_the_member_it_was_made_for(tmp_path):
    """§25.7 step 5: a first contact on an introduction link of ours is accepted only from
    the identity of the member the link was made for; other invitations are not concerned."""
    from aegisd.core.identity import IdentityKeyPair
    from aegisd.core.primitives import SystemEntropy
    from aegisd.services.groups_inbound import GroupInbound
    from aegisd.services.groups_state import INTRO_KEY

    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:

        class Host:  # the only member the check uses
            pass

        host = Host()
        host.store = store  # type: ignore[attr-defined]
        member = IdentityKeyPair.generate(SystemEntropy()).public
        other = IdentityKeyPair.generate(SystemEntropy()).public
        inv = b"\x01" * 16
        store.set_setting(f"{INTRO_KEY}{inv.hex()}", member.ed_pub.hex())
        inbound = GroupInbound(host, None)  # type: ignore[arg-type]
        assert inbound.introduction_sender_ok(inv, member) is True
        assert inbound.introduction_sender_ok(inv, other) is False
        assert inbound.introduction_sender_ok(b"\x02" * 16, other) is None
        c = store.add_contact("member", identity_key=member.to_bytes())
        inbound.introduced(inv, c.id)
        assert G.group_contact_ids(store) == {c.id}
        assert inbound.introduction_sender_ok(inv, member) is None  # used: forgotten
    finally:
        store.close()


def test_a_group_message_is_named_by_group_author_and_id(tmp_path):
    """Two authors may use one wire id (a hostile member may copy another's): both messages
    are kept, one author's repeat is not; the API ids differ; read marks go up to a message."""
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
        other = G.add_group(store, b"h" * 32, b"log", [(b"a" * 32, 3)])
        wid = b"w" * 16
        mine = G.add_message(store, ref, wid, "out", "ours")
        ann = G.add_message(store, ref, wid, "in", "ann's", sender_key=b"a" * 32)
        bob = G.add_message(store, ref, wid, "in", "bob's", sender_key=b"b" * 32)
        assert None not in (mine, ann, bob)
        assert G.add_message(store, ref, wid, "in", "ann again", sender_key=b"a" * 32) is None
        assert G.add_message(store, other, wid, "in", "elsewhere", sender_key=b"a" * 32)
        page = G.history(store, ref, before_seq=None, limit=10)
        assert [m.body for m in page] == ["ours", "ann's", "bob's"]
        ids = [m.id for m in page]
        assert ids[0] == wid.hex() and len(set(ids)) == 3
        assert [G.find_message(store, ref, i) for i in ids] == [mine, ann, bob]
        assert G.find_message(store, ref, "not an id") is None
        assert [m.seq for m in G.unread(store, ref, ann)] == [ann]
        G.set_read(store, [ann])
        assert [m.seq for m in G.unread(store, ref)] == [bob]
    finally:
        store.close()


def test_the_migration_keys_group_messages_by_author(tmp_path, monkeypatch):
    """A profile from the schema before (group messages keyed by their wire id alone) keeps
    its group history, statuses and unsent members across the migration; incoming messages
    stored before count as read."""
    from aegisd.store import open_profile
    from aegisd.store import schema as schema_mod

    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._group_message_keys)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, "pass phrase", FAST)
    c = store.add_contact("ann", identity_key=b"k")
    ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
    out_id, in_id = "ab" * 16, "cd" * 16
    with store.transaction():
        for mid, sender, direction in ((out_id, None, "out"), (in_id, b"a" * 32, "in")):
            store._q(
                "INSERT INTO group_messages (id, group_ref, sender_key, direction, body, "
                "sent_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (mid, ref, sender, direction, f"{direction} text", 5, 7),
            )
        store._q("INSERT INTO group_message_status (message_id, contact_id, status, status_at) "
                 "VALUES (?, ?, 'delivered', 9)", (out_id, c.id))  # fmt: skip
        store._q("INSERT INTO group_message_unsent (message_id, member_key) VALUES (?, ?)",
                 (out_id, b"z" * 32))  # fmt: skip
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, "pass phrase")
    try:
        assert store.schema_version == schema_mod.SCHEMA_VERSION
        page = G.history(store, ref, before_seq=None, limit=10)
        assert [(m.id, m.body, m.sender_key, m.sent_at, m.created_at, m.read) for m in page] == [
            (out_id, "out text", None, 5, 7, False),
            (f"{(b'a' * 32).hex()}:{in_id}", "in text", b"a" * 32, 5, 7, True),
        ]
        out = page[0].seq
        assert G.statuses(store, out) == {c.id: "delivered"}
        assert G.unsent(store, out) == [b"z" * 32]
        assert G.own_message_to(store, bytes.fromhex(out_id), c.id) == (out, out_id)
        # the references follow the renamed tables: a removed contact's status goes
        store.remove_contact(c.id)
        assert G.statuses(store, out) == {}
        G.delete_group(store, ref)
        assert store._q("SELECT count(*) FROM group_message_unsent").fetchone()[0] == 0
        assert store._q("PRAGMA foreign_key_check").fetchall() == []
    finally:
        store.close()


def test_the_migration_keeps_a_text_id_and_its_hex_apart_and_the_seq_mark(tmp_path, monkeypatch):
    """A restored text id of 16 characters and the 32 hex digits of its UTF-8 were one wire
    id to the migration (its INSERT failed on every open: a bricked profile); and the seq
    AUTOINCREMENT handed out before (to a message deleted since) is never handed out again."""
    from aegisd.store import open_profile
    from aegisd.store import schema as schema_mod

    home = tmp_path / "p"
    old = schema_mod.MIGRATIONS[: schema_mod.MIGRATIONS.index(schema_mod._group_message_keys)]
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", old)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", len(old))
    store = create_profile(home, "pass phrase", FAST)
    ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
    text_id = "abcdefghijklmnop"
    hex_id = text_id.encode().hex()
    with store.transaction():
        for mid in (text_id, hex_id, "gone"):
            store._q(
                "INSERT INTO group_messages (id, group_ref, sender_key, direction, body, "
                "sent_at, created_at) VALUES (?, ?, NULL, 'out', ?, 5, 7)",
                (mid, ref, f"text {mid}"),
            )
        store._q("DELETE FROM group_messages WHERE id = 'gone'")
        mark = store._q("SELECT seq FROM sqlite_sequence WHERE name = 'group_messages'"
                        ).fetchone()[0]  # fmt: skip
    store.close()
    monkeypatch.setattr("aegisd.store.db.MIGRATIONS", schema_mod.MIGRATIONS)
    monkeypatch.setattr("aegisd.store.db.SCHEMA_VERSION", schema_mod.SCHEMA_VERSION)
    store = open_profile(home, "pass phrase")
    try:
        assert store.schema_version == schema_mod.SCHEMA_VERSION
        page = G.history(store, ref, before_seq=None, limit=10)
        assert [m.body for m in page] == [f"text {text_id}", f"text {hex_id}"]
        assert {G.text_id_of(m.wire_id) for m in page} == {text_id, hex_id}
        seq = G.add_message(store, ref, b"n" * 16, "out", "new")
        assert seq is not None and seq > mark
    finally:
        store.close()


def test_wire_id_of_is_one_to_one():
    ids = ["abcdefghijklmnop", b"abcdefghijklmnop".hex(), "x", "ab" * 16, "AB" * 16,
           "\xff", "é" * 8, "a" * 64, "a" * 15]
    wires = [G.wire_id_of(i) for i in ids]
    assert len(set(wires)) == len(ids)
    assert [G.text_id_of(w) for w in wires] == ids
    assert all(len(w) != 16 for i, w in zip(ids, wires, strict=True) if i != i.lower() or
               len(i) != 32)


def test_a_backup_with_a_text_id_and_its_hex_restores_and_exports_both(tmp_path):
    """A backup's group history holding a text id of 16 characters and the hex of its UTF-8
    (two ids to the file's parser) imports as two messages (it failed an assert) and exports
    the same two ids again; a group being joined keeps what undoes the accept."""
    from aegisd.core import backup as fmt
    from aegisd.services.backup import _groups_in, _groups_out
    from aegisd.services.groups_state import JOINING_KEY
    from tests.support.groups import group_of

    log, _people = group_of([])
    text_id = "abcdefghijklmnop"
    msgs = tuple(
        fmt.BackupGroupMessage(mid, None, f"text {mid}", 1, 2, ((0, "delivered"),))
        for mid in (text_id, text_id.encode().hex(), "m1")
    )
    backup = fmt.BackupGroups(groups=(fmt.BackupGroup(log.record(), 7, msgs),))
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        c = store.add_contact("ann", identity_key=b"k")
        with store.transaction():
            _groups_in(store, backup, [log], [c.id])
        ref = G.group_by_id(store, log.head.group_id)
        assert ref is not None
        page = G.history(store, ref.id, before_seq=None, limit=10)
        assert [m.body for m in page] == [m.body for m in msgs]
        assert all(G.statuses(store, m.seq) == {c.id: "delivered"} for m in page)
        out = _groups_out(store, {c.id: 0})
        assert [m.message_id for m in out.groups[0].messages] == [m.message_id for m in msgs]
        assert out.joining == ()
        # accepted and not added yet (group.joining.*): in the file, and back after an import
        # (its introduction links are not: their mailboxes go at the import)
        store.set_setting(f"{JOINING_KEY}{ref.id}",
                          {"invite": "ab" * 16, "contact": c.id, "links": ["x"]})  # fmt: skip
        out = _groups_out(store, {c.id: 0})
        assert out.joining == (fmt.BackupJoining(0, b"\xab" * 16, 0),)
    finally:
        store.close()
    other = create_profile(tmp_path / "q", "pass phrase", FAST)
    try:
        d = other.add_contact("inviter", identity_key=b"k")
        with other.transaction():
            _groups_in(other, out, [log], [d.id])
        ref = G.group_by_id(other, log.head.group_id)
        assert ref is not None
        assert other.get_setting(f"{JOINING_KEY}{ref.id}") == {
            "invite": "ab" * 16, "contact": d.id, "links": []}  # fmt: skip
    finally:
        other.close()


def test_a_departure_mark_dies_with_its_contact_and_is_overwritten(tmp_path):
    """A departed group contact's deadline lives in its group_contacts row: each departure
    overwrites it, a return clears it, and a later contact that reuses the id (no
    AUTOINCREMENT) starts without one (services/groups_state.py DepartedContacts)."""
    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        c = store.add_contact("member", identity_key=b"k")
        G.mark_group_contact(store, c.id)
        assert G.departed(store, c.id) is None
        G.mark_departed(store, c.id, 100, 200)
        G.mark_departed(store, c.id, 300, 400)  # removed again: the new departure counts
        assert G.departed(store, c.id) == (300, 400)
        G.clear_departed(store, c.id)
        assert G.departed(store, c.id) is None
        G.mark_departed(store, c.id, 500, 600)
        store.remove_contact(c.id)
        d = store.add_contact("another", identity_key=b"k2")
        assert d.id == c.id  # the id is reused
        G.mark_group_contact(store, d.id)
        assert G.departed(store, d.id) is None
        G.mark_departed(store, d.id + 1, 1, 2)  # not a group contact: nothing to mark
        assert G.departed(store, d.id + 1) is None
    finally:
        store.close()


def test_held_actions_are_bounded_per_sender_before_the_group(tmp_path):
    """A member's held actions past 16 push out its own oldest, never another's; the group's
    64 still caps them all (store/group_actions.py ``hold``, §25.11)."""
    from aegisd.store import group_actions as GA

    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        ann, eve = store.add_contact("ann"), store.add_contact("eve")
        ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])

        def hold(cid: int, n: int) -> int:
            return GA.hold(store, ref, cid, b"x" * 32, n.to_bytes(16, "big"), b"p", 1000 + n,
                           per_group=64, per_sender=16, max_age_ms=10**9)  # fmt: skip

        assert hold(ann.id, 0) == 0
        dropped = sum(hold(eve.id, n) for n in range(1, 41))
        assert dropped == 40 - 16
        left = store.query("SELECT contact_id, target FROM group_pending_actions ORDER BY id")
        rows = [(int(c), int.from_bytes(bytes(t), "big")) for c, t in left.fetchall()]
        assert rows == [(ann.id, 0)] + [(eve.id, n) for n in range(25, 41)]
        # the group's cap: 64 senders' worth of one each, the oldest goes
        others = [store.add_contact(f"m{i}") for i in range(64)]
        assert sum(hold(o.id, 100 + i) for i, o in enumerate(others)) == 17
        assert store.query("SELECT count(*) FROM group_pending_actions").fetchone()[0] == 64
    finally:
        store.close()


def test_a_timer_line_is_rewritten_by_its_member_and_a_file_waits_for_its_uploads(tmp_path):
    """One member's consecutive timer changes rewrite its line (another's, or a message
    between, starts a new one); our file at its deadline with a copy still uploading is put
    off, up to the grace."""
    from aegisd.store import attachments as A
    from aegisd.store import group_actions as GA
    from aegisd.store.attachments import AttachmentRow

    store = create_profile(tmp_path / "p", "pass phrase", FAST)
    try:
        bob = store.add_contact("bob")
        ref = G.add_group(store, b"g" * 32, b"log", [(b"a" * 32, 3)])
        first = G.add_message(store, ref, b"1" * 16, "in", "[timer] 1 minute", sender_key=b"c" * 32)
        assert first is not None
        GA.mark_timer_line(store, first, 60)
        assert GA.merge_timer_line(store, ref, b"c" * 32, "[timer] off", 0, 5) == first
        assert GA.merge_timer_line(store, ref, b"d" * 32, "[timer] off", 0, 5) is None
        assert GA.merge_timer_line(store, ref, b"", "[timer] off", 0, 5) is None
        G.add_message(store, ref, b"2" * 16, "in", "a text", sender_key=b"c" * 32)
        assert GA.merge_timer_line(store, ref, b"c" * 32, "[timer] off", 0, 5) is None

        GA.set_timer(store, ref, 1, 1)
        seq = G.add_message(store, ref, b"3" * 16, "out", "[file] f", created_at=1000)
        assert seq is not None
        A.add(store, AttachmentRow("e" * 32, bob.id, "out", "f", 1, 1, bytes(32), bytes(32),
                                   "wss://relay.example", "uploading", 0, None, 1000, 1000,
                                   1000))  # fmt: skip
        A.link_group_message(store, "e" * 32, seq)
        assert GA.wait_for_uploads(store, seq, 2000, grace_ms=10_000, recheck_ms=2000)
        assert GA.extras(store, [seq])[seq].expires_at == 4000
        assert not GA.wait_for_uploads(store, seq, 12_001, grace_ms=10_000, recheck_ms=2000)
        A.set_state(store, "e" * 32, "uploaded")
        assert not GA.wait_for_uploads(store, seq, 3000, grace_ms=10_000, recheck_ms=2000)
    finally:
        store.close()
