"""Replies, reactions, edits and deletions (docs/protocol.md §26), continued: an edit reaches
the quotes of its message, edit order survives a clock that went back, and the bounds on what
a hostile contact can make a daemon hold (tests/support/hostile.py): held actions per contact
and by age, actions on files and on messages deleted for everyone."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from aegisd.core import wire
from aegisd.core.attachment import data_blocks
from aegisd.store import actions as actions_store
from tests.functional.conftest import Peer, connect
from tests.functional.test_message_actions import arrived, by_text, message, offline_store, send
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def pending(peer: Peer) -> list[str]:
    s = offline_store(peer)
    try:
        return [r[0] for r in s._q("SELECT target FROM pending_actions ORDER BY id").fetchall()]
    finally:
        s.close()


def quoted_copies(peer: Peer) -> list[str]:
    s = offline_store(peer)
    try:
        return [r[0] for r in s._q("SELECT quoted FROM messages WHERE quoted IS NOT NULL")]
    finally:
        s.close()


def test_an_edit_reaches_the_quotes_and_outruns_a_clock_gone_back(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = send(alice, "bob", "the first words")
    arrived(bob, "alice", mid)
    theirs = bob.call("messages.reply", {"contact": "alice", "message_id": mid,
                                         "text": "bob quotes"})["message_id"]  # fmt: skip
    arrived(alice, "bob", theirs)
    mine = alice.call("messages.reply", {"contact": "bob", "message_id": mid,
                                         "text": "alice quotes"})["message_id"]  # fmt: skip
    arrived(bob, "alice", mine)
    alice.call("messages.edit", {"message_id": mid, "text": "the better words"})
    bob.wait_for(lambda: message(bob, "alice", mid)["edits"] == 1, "the edit")  # type: ignore[index]
    # Both sides' quotes show the latest text; the earlier one is nowhere on either disk.
    for peer, contact in ((alice, "bob"), (bob, "alice")):
        for reply in (theirs, mine):
            got = message(peer, contact, reply)
            assert got is not None
            assert got["reply_to"] == {"message_id": mid, "text": "the better words"}
        assert "the first words" not in json.dumps(quoted_copies(peer))
        assert "the first words" not in json.dumps(peer.events())

    # The last edit went out stamped an hour ahead (a clock set back since): the next one
    # is still ordered after it, not dropped by bob as older.
    ahead = now_ms() + HOUR_MS
    for peer in (alice, bob):
        s = offline_store(peer)
        try:
            with s.transaction():
                s._q("UPDATE messages SET edit_sent_at = ? WHERE id = ?", (ahead, mid))
        finally:
            s.close()
    alice.call("messages.edit", {"message_id": mid, "text": "the best words"})
    got = bob.wait_for(
        lambda: (m := message(bob, "alice", mid)) and m["edits"] == 2 and m, "the second edit"
    )
    assert got["text"] == "the best words"
    assert message(bob, "alice", theirs)["reply_to"]["text"] == "the best words"  # type: ignore[index]


def descriptor(url: str, mid: bytes) -> wire.AttachmentPayload:
    return wire.AttachmentPayload(
        mid, now_ms(), os.urandom(32), 1000, data_blocks(1000), os.urandom(32), url, "file.txt",
    )  # fmt: skip


def test_held_actions_are_bounded_and_files_and_deleted_messages_refused(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    f, d = os.urandom(16), os.urandom(16)
    held = [os.urandom(16) for _ in range(actions_store_limit() + 1)]
    with hostile(alice.home, "bob") as h:
        # A reaction to a file before the file, then the file, then an edit and a deletion of
        # it (never allowed for a file).
        blocks = h.payload_blocks(wire.ReactionPayload(f, "🎉"))
        blocks += h.payload_blocks(descriptor(url, f))
        blocks += h.payload_blocks(wire.EditPayload(f, now_ms(), "forged name"))
        blocks += h.payload_blocks(wire.DeletePayload(f))
        # A message deleted for everyone takes no reaction.
        blocks += h.payload_blocks(wire.TextPayload(d, now_ms(), "soon deleted"))
        blocks += h.payload_blocks(wire.DeletePayload(d))
        blocks += h.payload_blocks(wire.ReactionPayload(d, "👍"))
        # One more held action than a contact may have held: the oldest goes.
        for target in held:
            blocks += h.payload_blocks(wire.ReactionPayload(target, "👀"))
        blocks += h.payload_blocks(wire.TextPayload(os.urandom(16), now_ms(), "marker"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: by_text(bob, "alice", "marker"), "the hostile blocks")
    got_f = message(bob, "alice", f.hex())
    assert got_f is not None and not got_f["deleted"] and got_f["edits"] == 0
    assert got_f["reactions"] == [{"emoji": "🎉", "count": 1, "mine": False}]
    assert "forged name" not in json.dumps(bob.events())
    got_d = message(bob, "alice", d.hex())
    assert got_d is not None and got_d["deleted"] and got_d["reactions"] == []
    assert pending(bob) == [t.hex() for t in held[1:]]

    # The evicted one's message comes: nothing to apply. The newest one's: applied. One held
    # for more than 24 hours: its message comes, the reaction is not applied.
    s = offline_store(bob)
    try:
        with s.transaction():
            s._q("UPDATE pending_actions SET created_at = created_at - ? WHERE target = ?",
                 (25 * HOUR_MS, held[1].hex()))  # fmt: skip
    finally:
        s.close()
    with hostile(alice.home, "bob") as h:
        blocks = []
        for target in (held[0], held[1], held[-1]):
            blocks += h.payload_blocks(wire.TextPayload(target, now_ms(), f"t{target.hex()}"))
        h.deposit(url, blocks)
    for target, reacted in ((held[0], False), (held[1], False), (held[-1], True)):
        got = bob.wait_for(lambda t=target: message(bob, "alice", t.hex()), "a held target")
        assert bool(got["reactions"]) is reacted, target
    assert len(pending(bob)) == actions_store_limit() - 2

    # The maintenance loop's pruning takes those past 24 hours; a message deleted for me
    # takes those held for it; deleting the conversation takes the rest.
    s = offline_store(bob)
    try:
        with s.transaction():
            s._q("UPDATE pending_actions SET created_at = created_at - ? WHERE target = ?",
                 (25 * HOUR_MS, held[2].hex()))  # fmt: skip
            assert actions_store.prune_pending(s, now_ms() - 24 * HOUR_MS) == 1
        s.delete_message(held[3].hex())
    finally:
        s.close()
    left = pending(bob)
    assert held[2].hex() not in left and held[3].hex() not in left
    assert len(left) == actions_store_limit() - 4
    bob.call("conversations.delete", {"contact": "alice"})
    assert pending(bob) == []


def actions_store_limit() -> int:
    from aegisd.services.actions import PENDING_PER_CONTACT

    return PENDING_PER_CONTACT


def test_a_deletion_or_edit_reaches_the_quotes_of_a_message_deleted_for_me(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    pin, typo = send(alice, "bob", "my pin is 4711"), send(alice, "bob", "the frist words")
    arrived(bob, "alice", pin)
    arrived(bob, "alice", typo)
    own = send(bob, "alice", "bob's own words")
    arrived(alice, "bob", own)
    for quoted in (pin, typo, own):
        r = bob.call("messages.reply", {"contact": "alice", "message_id": quoted, "text": "ok"})
        arrived(alice, "bob", r["message_id"])
    for mid in (pin, typo, own):  # bob: delete for me, the quotes keep their copies
        bob.call("messages.delete", {"message_id": mid})
    alice.call("messages.edit", {"message_id": typo, "text": "the first words"})
    alice.call("messages.delete", {"message_id": pin, "for_everyone": True})
    bob.wait_for(lambda: "my pin is 4711" not in quoted_copies(bob), "the deletion")
    bob.wait_for(lambda: "the first words" in quoted_copies(bob), "the edit")
    assert sorted(quoted_copies(bob)) == ["bob's own words", "the first words"]
    # A peer cannot touch the quotes of our own messages, deleted for me or not.
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.EditPayload(bytes.fromhex(own), now_ms(), "forged"))
        blocks += h.payload_blocks(wire.DeletePayload(bytes.fromhex(own)))
        blocks += h.payload_blocks(wire.TextPayload(os.urandom(16), now_ms(), "marker"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: by_text(bob, "alice", "marker"), "the hostile blocks")
    assert sorted(quoted_copies(bob)) == ["bob's own words", "the first words"]


def test_an_edit_stamped_within_a_day_of_its_message_counts_after_a_day_here(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """An edit sent again after a renewal (§23) reaches a restored side that has had its
    message for more than 24 hours: its window counts from the edit's own stamp against the
    message's ``sent_at``; one stamped more than 24 hours after it still goes nowhere."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    sent = now_ms() - 30 * HOUR_MS
    early, late = os.urandom(16), os.urandom(16)
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.TextPayload(early, sent, "draft one"))
        blocks += h.payload_blocks(wire.TextPayload(late, sent, "draft two"))
        h.deposit(url, blocks)
    for mid in (early, late):
        bob.wait_for(lambda x=mid: message(bob, "alice", x.hex()), "the texts")
    s = offline_store(bob)  # stored here 30 hours ago (restored from a backup, say)
    try:
        with s.transaction():
            s._q("UPDATE messages SET created_at = ? WHERE contact_id IS NOT NULL "
                 "AND body LIKE 'draft %'", (sent,))  # fmt: skip
    finally:
        s.close()
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.EditPayload(early, sent + HOUR_MS, "final one"))
        blocks += h.payload_blocks(wire.EditPayload(late, sent + 25 * HOUR_MS, "final two"))
        blocks += h.payload_blocks(wire.TextPayload(os.urandom(16), now_ms(), "marker"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: by_text(bob, "alice", "marker"), "the hostile blocks")
    assert message(bob, "alice", early.hex())["text"] == "final one"  # type: ignore[index]
    assert message(bob, "alice", late.hex())["text"] == "draft two"  # type: ignore[index]
