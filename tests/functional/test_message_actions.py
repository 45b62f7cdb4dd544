"""Replies, reactions, edits and deletions (docs/protocol.md §26) between real daemons through a
real relay; a hostile contact's payloads (tests/support/hostile.py) for what no daemon of ours
sends: edits of someone else's message, of a deleted or old one, and actions arriving before
their message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from aegisd.store.db import Store
from aegisd.store.keyring import Keyring
from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess
from tests.support.hostile import hostile


def history(peer: Peer, contact: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = peer.call(
        "messages.history", {"contact": contact, "limit": 500}
    )["messages"]
    return out


def message(peer: Peer, contact: str, message_id: str) -> dict[str, Any] | None:
    return next((m for m in history(peer, contact) if m["message_id"] == message_id), None)


def by_text(peer: Peer, contact: str, text: str) -> dict[str, Any] | None:
    return next((m for m in history(peer, contact) if m["text"] == text), None)


def send(peer: Peer, contact: str, text: str) -> str:
    return str(peer.call("messages.send", {"contact": contact, "text": text})["message_id"])


def arrived(peer: Peer, contact: str, message_id: str) -> dict[str, Any]:
    got = peer.wait_for(lambda: message(peer, contact, message_id), "the message")
    assert isinstance(got, dict)
    return got


def error_of(call: Callable[[], Any]) -> str:
    with pytest.raises(RpcCallError) as info:
        call()
    return str(info.value.data["error"])


def offline_store(peer: Peer) -> Store:
    """The profile's store opened beside its running daemon (SQLCipher in WAL mode)."""
    key = Keyring.load(peer.home / "keyring.json").unlock(None)
    return Store.open(peer.home / "aegis.db", key)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def cli(peer: Peer, *args: str) -> subprocess.CompletedProcess[str]:
    """The `aegis` CLI against the peer's daemon, its output in UTF-8 (emoji kept)."""
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(peer.home)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"}, encoding="utf-8",
    )  # fmt: skip


def test_a_reply_keeps_its_quote_after_the_original_is_deleted(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    original = send(alice, "bob", "the original words")
    arrived(bob, "alice", original)
    reply = alice.call("messages.reply", {"contact": "bob", "message_id": original,
                                          "text": "quoting myself"})["message_id"]  # fmt: skip
    got = arrived(bob, "alice", reply)
    assert got["reply_to"] == {"message_id": original, "text": "the original words"}
    assert got["text"] == "quoting myself"
    event = next(e["data"] for e in bob.events(types=["message.received"])
                 if e["data"]["message_id"] == reply)  # fmt: skip
    assert event["reply_to"] == original and "the original words" not in json.dumps(event)
    # Bob deletes the original for himself: the reply still shows its quote.
    bob.call("messages.delete", {"message_id": original})
    assert message(bob, "alice", original) is None
    assert message(bob, "alice", reply)["reply_to"]["text"] == "the original words"  # type: ignore[index]
    # The other direction, and a reply to a message the recipient deleted before it came.
    gone = send(bob, "alice", "bob's soon-gone words")
    arrived(alice, "bob", gone)
    back = bob.call("messages.reply", {"contact": "alice", "message_id": gone,
                                       "text": "about that"})["message_id"]  # fmt: skip
    assert arrived(alice, "bob", back)["reply_to"]["text"] == "bob's soon-gone words"
    second = send(alice, "bob", "another one")
    arrived(bob, "alice", second)
    bob.call("messages.delete", {"message_id": second})
    late = alice.call("messages.reply", {"contact": "bob", "message_id": second,
                                         "text": "did you see it?"})["message_id"]  # fmt: skip
    assert arrived(bob, "alice", late)["reply_to"] == {"message_id": second, "text": None}
    # The CLI shows both kinds of quote.
    r = cli(bob, "messages", "alice")
    assert r.returncode == 0, r.stderr
    assert "[reply to \u201cthe original words\u201d] quoting myself" in r.stdout
    assert "[reply to a message not found or deleted] did you see it?" in r.stdout
    # Only a message of the same conversation can be quoted.
    assert error_of(lambda: alice.call("messages.reply", {
        "contact": "bob", "message_id": "ab" * 16, "text": "x"})) == "not_found"  # fmt: skip


def test_reactions_are_replaced_removed_and_counted(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = send(alice, "bob", "react to this")
    arrived(bob, "alice", mid)

    def reactions(peer: Peer, contact: str) -> list[dict[str, Any]]:
        m = message(peer, contact, mid)
        assert m is not None
        return list(m["reactions"])

    bob.call("messages.react", {"message_id": mid, "emoji": "👍"})
    alice.wait_for(lambda: reactions(alice, "bob") == [
        {"emoji": "👍", "count": 1, "mine": False}], "bob's reaction")  # fmt: skip
    alice.call("messages.react", {"message_id": mid, "emoji": "👍"})
    assert reactions(alice, "bob") == [{"emoji": "👍", "count": 2, "mine": True}]
    bob.wait_for(lambda: reactions(bob, "alice") == [
        {"emoji": "👍", "count": 2, "mine": True}], "alice's reaction")  # fmt: skip
    # Replaced: one reaction per person.
    bob.call("messages.react", {"message_id": mid, "emoji": "❤️"})
    alice.wait_for(lambda: reactions(alice, "bob") == [
        {"emoji": "❤️", "count": 1, "mine": False},
        {"emoji": "👍", "count": 1, "mine": True}], "the replaced reaction")  # fmt: skip
    # Removed.
    bob.call("messages.react", {"message_id": mid, "emoji": ""})
    alice.wait_for(lambda: reactions(alice, "bob") == [
        {"emoji": "👍", "count": 1, "mine": True}], "the removal")  # fmt: skip
    kinds = [e["data"]["emoji"] for e in alice.events(types=["message.reaction"])]
    assert kinds == ["👍", "❤️", None]
    # Hostile values are refused by the API before anything is sent.
    for bad in ("👍" * 17, "\x1b[2J", "\u202e", "eleven char", "bit.ly/x1y"):
        assert error_of(lambda b=bad: bob.call(  # type: ignore[misc]
            "messages.react", {"message_id": mid, "emoji": b})) == "invalid_params"  # fmt: skip
    r = cli(alice, "messages", "bob")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "react to this" in x)
    assert line.endswith("]  [👍 1*]"), line  # after the status: the reactions, yours starred


def test_edits_within_the_window_and_the_refused_ones(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = send(alice, "bob", "teh first version")
    arrived(bob, "alice", mid)
    edited_at = alice.call("messages.edit", {"message_id": mid, "text": "the second version"})
    assert edited_at["message_id"] == mid
    got = bob.wait_for(
        lambda: (m := message(bob, "alice", mid)) and m["edits"] == 1 and m, "the edit"
    )
    assert got["text"] == "the second version" and got["edited_at"] >= got["created_at"]
    alice.call("messages.edit", {"message_id": mid, "text": "the third version"})
    bob.wait_for(lambda: message(bob, "alice", mid)["edits"] == 2, "the second edit")  # type: ignore[index]
    # No earlier version in the event log: the received event holds the latest text, and
    # only the latest edit's event is kept.
    events = json.dumps(bob.events())
    assert "teh first version" not in events and "the second version" not in events
    assert [e["data"]["text"] for e in bob.events(types=["message.edited"])] == [
        "the third version"]  # fmt: skip
    # Refused by the sender's daemon: someone else's message; a deleted one.
    theirs = send(bob, "alice", "bob's own text")
    arrived(alice, "bob", theirs)
    assert error_of(lambda: alice.call("messages.edit", {
        "message_id": theirs, "text": "forged"})) == "not_allowed"  # fmt: skip
    doomed = send(alice, "bob", "to be deleted")
    arrived(bob, "alice", doomed)
    alice.call("messages.delete", {"message_id": doomed, "for_everyone": True})
    assert error_of(lambda: alice.call("messages.edit", {
        "message_id": doomed, "text": "again"})) == "not_allowed"  # fmt: skip
    bob.wait_for(lambda: message(bob, "alice", doomed)["deleted"], "the deletion")  # type: ignore[index]
    old = send(alice, "bob", "an old message")
    arrived(bob, "alice", old)
    s = offline_store(bob)  # sent and received 25 hours ago, as far as bob's daemon knows
    try:
        with s.transaction():
            s._q("UPDATE messages SET created_at = created_at - ?, sent_at = sent_at - ? "
                 "WHERE id = ?", (25 * 3600 * 1000, 25 * 3600 * 1000, old))  # fmt: skip
    finally:
        s.close()

    # Refused by the recipient: what a modified client sends.
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with hostile(alice.home, "bob") as h:
        blocks = []
        for target in (theirs, doomed, old):
            blocks += h.payload_blocks(wire.EditPayload(bytes.fromhex(target), now_ms(), "forged"))
        blocks += h.payload_blocks(wire.DeletePayload(bytes.fromhex(theirs)))
        blocks += h.payload_blocks(wire.TextPayload(os.urandom(16), now_ms(), "marker"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: by_text(bob, "alice", "marker"), "the hostile blocks")
    assert message(bob, "alice", theirs)["text"] == "bob's own text"  # type: ignore[index]
    assert not message(bob, "alice", theirs)["deleted"]  # type: ignore[index]
    assert message(bob, "alice", doomed)["text"] == ""  # type: ignore[index]
    assert message(bob, "alice", old)["text"] == "an old message"  # type: ignore[index]
    assert message(bob, "alice", old)["edits"] == 0  # type: ignore[index]
    assert "forged" not in json.dumps(bob.events())


def test_actions_arriving_before_their_message_are_applied(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    x, y = os.urandom(16), os.urandom(16)
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.EditPayload(x, now_ms() + 1000, "x as edited"))
        blocks += h.payload_blocks(wire.ReactionPayload(x, "🎉"))
        blocks += h.payload_blocks(wire.DeletePayload(y))
        blocks += h.payload_blocks(wire.EditPayload(x, now_ms() - 1000, "an older edit"))
        blocks += h.payload_blocks(wire.TextPayload(x, now_ms(), "x as first sent"))
        blocks += h.payload_blocks(wire.TextPayload(y, now_ms(), "y, deleted before it came"))
        h.deposit(url, blocks)
    got_y = bob.wait_for(lambda: message(bob, "alice", y.hex()), "y")
    got_x = message(bob, "alice", x.hex())
    assert got_x is not None
    assert got_x["text"] == "x as edited" and got_x["edits"] == 1
    assert got_x["reactions"] == [{"emoji": "🎉", "count": 1, "mine": False}]
    assert got_y["deleted"] and got_y["text"] == ""
    assert "y, deleted before it came" not in json.dumps(bob.events())
    s = offline_store(bob)
    try:
        assert s._q("SELECT count(*) FROM pending_actions").fetchone()[0] == 0
    finally:
        s.close()


def test_delete_for_everyone_removes_the_text_and_its_events(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = send(alice, "bob", "words to take back")
    arrived(bob, "alice", mid)
    bob.call("messages.react", {"message_id": mid, "emoji": "😮"})
    quoting = bob.call("messages.reply", {"contact": "alice", "message_id": mid,
                                          "text": "really?"})["message_id"]  # fmt: skip
    arrived(alice, "bob", quoting)
    alice.wait_for(lambda: message(alice, "bob", mid)["reactions"], "the reaction")  # type: ignore[index]
    assert "words to take back" in json.dumps(bob.events())

    assert alice.call("messages.delete", {"message_id": mid, "for_everyone": True}) == {
        "deleted": True, "for_everyone": True}  # fmt: skip
    mine = message(alice, "bob", mid)
    assert mine is not None and mine["deleted"] and mine["text"] == "" and not mine["reactions"]
    got = bob.wait_for(
        lambda: (m := message(bob, "alice", mid)) and m["deleted"] and m, "the deletion"
    )
    assert got["text"] == "" and got["reactions"] == [] and got["edited_at"] is None
    assert message(bob, "alice", quoting)["reply_to"] == {"message_id": mid, "text": None}  # type: ignore[index]
    assert [e["data"] for e in bob.events(types=["message.deleted"])] == [
        {"message_id": mid, "contact": "alice"}]  # fmt: skip
    assert "words to take back" not in json.dumps(bob.events())
    s = offline_store(bob)
    try:
        rows = s._q("SELECT count(*) FROM messages WHERE body LIKE '%take back%' "
                    "OR quoted LIKE '%take back%'").fetchone()[0]  # fmt: skip
    finally:
        s.close()
    assert rows == 0
    # A deleted message takes no more actions; someone else's cannot be deleted for everyone.
    assert error_of(lambda: bob.call("messages.react", {
        "message_id": mid, "emoji": "👍"})) == "not_allowed"  # fmt: skip
    other = send(bob, "alice", "bob's")
    arrived(alice, "bob", other)
    assert error_of(lambda: alice.call("messages.delete", {
        "message_id": other, "for_everyone": True})) == "not_allowed"  # fmt: skip
    # Delete for me in the CLI.
    r = cli(alice, "delete", other)
    assert r.returncode == 0 and "deleted here" in r.stdout, r.stderr
    assert message(alice, "bob", other) is None
    assert message(bob, "alice", other) is not None


def test_actions_on_another_conversations_message_are_refused(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """A contact that learnt the id of a message of another conversation (carol's, to bob)
    cannot quote, react to, edit or delete it at bob's."""
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    connect(carol, bob)
    cid = send(carol, "bob", "carol's words")
    arrived(bob, "carol", cid)
    target = bytes.fromhex(cid)
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.ReplyPayload(os.urandom(16), now_ms(), target, "across"))
        blocks += h.payload_blocks(wire.ReactionPayload(target, "👎"))
        blocks += h.payload_blocks(wire.EditPayload(target, now_ms(), "rewritten"))
        blocks += h.payload_blocks(wire.DeletePayload(target))
        blocks += h.payload_blocks(wire.TextPayload(os.urandom(16), now_ms(), "marker"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: by_text(bob, "alice", "marker"), "the hostile blocks")
    assert by_text(bob, "alice", "across") is None
    kept = message(bob, "carol", cid)
    assert kept is not None and kept["text"] == "carol's words" and not kept["deleted"]
    assert kept["reactions"] == [] and kept["edits"] == 0
    shown = json.dumps(bob.events())
    assert "across" not in shown and "rewritten" not in shown
    assert not bob.events(types=["message.reaction", "message.edited", "message.deleted"])
