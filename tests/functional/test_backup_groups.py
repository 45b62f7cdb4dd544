"""Groups in backups (issue 16): a member exports, imports into a fresh profile, and the group
works on: its log, members, history and a pending invitation are back, the sessions with a
contact and with a member known only through an introduction renew like any contact's (and
the group contact stays hidden), and messages go both ways with both (docs/protocol.md §23)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.functional.conftest import Peer, connect
from tests.functional.test_backup import CHEAP, PASS, error_of, event_types
from tests.functional.test_groups import T, group_of, invited, key_of, members, texts

NAME = "Lunar picnic 5e1d"


def test_a_member_restored_from_a_backup_keeps_its_groups(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(bob, alice)
    connect(carol, alice)  # carol knows bob only through the group's introduction
    ed = {p.name: key_of(p) for p in (alice, bob, carol)}
    g = alice.call("group.create", {"name": NAME})["group"]
    for n, p in enumerate((bob, carol), start=2):
        alice.call("group.invite", {"group": g, "contact": p.name})
        p.call("group.accept", {"invitation": invited(p)})
        alice.wait_for(lambda n=n: len(members(alice)) == n, f"alice to add {p.name}", T)
    carol.wait_for(lambda: members(carol).get(ed["bob"], {}).get("reachable"), "bob", T)
    bob.wait_for(lambda: members(bob).get(ed["carol"], {}).get("reachable"), "carol", T)
    gb = group_of(bob)["group"]  # type: ignore[index]
    bob.call("group.send", {"group": gb, "text": "before the backup"})
    carol.wait_for(lambda: "before the backup" in texts(carol), "bob's message", T)
    gc = group_of(carol)["group"]  # type: ignore[index]
    before = carol.call("group.history", {"group": gc})["messages"]
    # Backup version 4: a group message's quote, edit mark and reactions travel in the file.
    bobs = before[0]["message_id"]
    bob.call("group.send", {"group": gb, "text": "a draft"})
    carol.wait_for(lambda: "a draft" in texts(carol), "bob's draft", T)
    draft = next(m for m in carol.call("group.history", {"group": gc})["messages"]
                 if m["text"] == "a draft")["message_id"]  # fmt: skip
    mine = next(m for m in bob.call("group.history", {"group": gb})["messages"]
                if m["text"] == "a draft")["message_id"]  # fmt: skip
    bob.call("messages.edit", {"group": gb, "message_id": mine, "text": "bob's final"})
    bob.call("messages.react", {"group": gb, "message_id": mine, "emoji": "🎉"})
    carol.wait_for(lambda: next(m for m in carol.call("group.history", {"group": gc})["messages"]
                                if m["message_id"] == draft)["reactions"], "bob's reaction",
                   T)  # fmt: skip
    carol.call("messages.react", {"group": gc, "message_id": bobs, "emoji": "👍"})
    answer = carol.call("messages.reply", {"group": gc, "message_id": bobs,
                                           "text": "carol answers"})["message_id"]  # fmt: skip
    before = carol.call("group.history", {"group": gc})["messages"]
    # The group's timer is carried, a message that has one is not (docs/backup.md §2).
    carol.call("conversations.set_timer", {"group": gc, "seconds": 604800})
    bob.wait_for(lambda: bob.call("conversations.get_timer", {"group": gb})["seconds"]
                 == 604800, "carol's timer", T)  # fmt: skip
    bob.call("group.send", {"group": gb, "text": "timed words"})
    carol.wait_for(lambda: "timed words" in texts(carol), "bob's timed message", T)
    # An invitation carol has not answered yet: it is in the backup too.
    g2 = alice.call("group.create", {"name": "Second"})["group"]
    alice.call("group.invite", {"group": g2, "contact": "carol"})
    invited(carol)

    path = tmp_short / "carol.aegisbackup"
    out = carol.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    assert out["groups"] == 1 and out["contacts"] == 2  # alice, and bob (hidden)
    raw = path.read_bytes()
    for secret in (NAME.encode(), b"before the backup"):
        assert secret not in raw
    carol.stop()

    # A profile with a group of its own is not fresh: its group's owner is the identity the
    # import would replace.
    busy = peers("dave")
    busy.wait_connected()
    busy.call("group.create", {"name": "mine"})
    err = error_of(busy, "backup.import", {"path": str(path), "passphrase": PASS})
    assert err.code == 1046 and busy.call("contacts.list")["contacts"] == []

    new = peers("carol2")
    new.wait_connected()
    result = new.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert result["groups"] == 1 and result["contacts"] == 2 and result["renewing"] == 2
    assert [c["name"] for c in new.call("contacts.list")["contacts"]] == ["alice"]
    restored = group_of(new)
    assert restored is not None and restored["name"] == NAME
    assert set(members(new)) == set(ed.values())
    # the timer line is not: history of the timer, which comes back as a setting
    assert texts(new) == ["before the backup", "bob's final", "carol answers"]
    got = {m["message_id"]: m for m in new.call("group.history", {"group": restored["group"]})[
        "messages"]}  # fmt: skip
    assert got[answer]["reply_to"] == {"message_id": bobs, "text": "before the backup"}
    assert got[bobs]["reactions"] == [{"emoji": "👍", "count": 1, "mine": True}]
    assert got[draft]["edits"] == 1 and got[draft]["edited_at"] is not None
    assert got[draft]["reactions"] == [{"emoji": "🎉", "count": 1, "mine": False}]
    assert new.call("conversations.get_timer", {"group": restored["group"]})["seconds"] == 604800
    # the same message ID (author and wire ID); read: a restored history sends no receipts
    after = new.call("group.history", {"group": restored["group"]})["messages"]
    assert after[0]["message_id"] == before[0]["message_id"] and after[0]["read"] is True
    assert len(new.call("group.invitations")["invitations"]) == 1

    # The sessions renew with both, the group contact's like the contact's.
    new.wait_for(
        lambda: len(event_types(new, ["contact.session_renewed"])) == 2, "both renewals", T
    )
    new.wait_for(lambda: new.call("backup.status") == {"renewals_pending": 0}, "done", T)
    assert [c["name"] for c in new.call("contacts.list")["contacts"]] == ["alice"]  # still hidden
    assert [c["name"] for c in bob.call("contacts.list")["contacts"]] == ["alice"]
    assert all(m["reachable"] for k, m in members(new).items() if k != ed["carol"])

    # The group works, both ways, with the contact and with the introduced member.
    gn = restored["group"]
    sent = new.call("group.send", {"group": gn, "text": "restored hello"})
    assert sent["recipients"] == 2 and sent["unreachable"] == 0
    for p in (alice, bob):
        p.wait_for(lambda p=p: "restored hello" in texts(p), f"{p.name} to get it", T)
    bob.call("group.send", {"group": gb, "text": "bob again"})
    alice.call("group.send", {"group": g, "text": "alice again"})
    new.wait_for(lambda: "bob again" in texts(new), "bob's message after the import", T)
    new.wait_for(lambda: "alice again" in texts(new), "alice's message after the import", T)
    new.wait_for(
        lambda: next(m for m in new.call("group.history", {"group": gn})["messages"]
                     if m["text"] == "restored hello")["delivery"]["delivered"] == 2,
        "receipts from both", T,
    )  # fmt: skip
    # a read receipt over the renewed session reaches bob (and only bob's message is read)
    assert new.call("group.read", {"group": gn})["marked"] == 2
    bob.wait_for(  # alice has read nothing: the one read is the restored member's
        lambda: next(m for m in bob.call("group.history", {"group": gb})["messages"]
                     if m["text"] == "bob again")["delivery"]["read"] == 1,
        "the restored member's read receipt", T,
    )  # fmt: skip

    # The restored invitation can be accepted: alice adds the restored member.
    new.call("group.accept", {"invitation": invited(new)})
    alice.wait_for(
        lambda: len(alice.call("group.get", {"group": g2})["members"]) == 2, "the add", T
    )
