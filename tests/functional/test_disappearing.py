"""Disappearing messages end to end (docs/protocol.md §27): a real relay, real daemons, real
SQLCipher profiles. A timer set on one side shows on both; a message vanishes from the
sender's store after its timer from when it was queued, and from the recipient's after its
timer from when it was read, with its events and a file's copy; the erased text is in no
decrypted page of the database or its WAL; a deadline that passed while the daemon was
stopped is met at the next start."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.store.db import Store
from aegisd.store.keyring import Keyring
from tests import sqlcipher_pages
from tests.functional.conftest import Peer, connect
from tests.functional.test_cli_messaging import aegis, ok


def _key(peer: Peer) -> bytes:
    return Keyring.load(peer.home / "keyring.json").unlock(None)


def plain_pages(peer: Peer) -> bytes:
    """Every page of the database file and every frame of its WAL, decrypted: live, free and
    stale pages alike (tests/sqlcipher_pages.py)."""
    out = list(sqlcipher_pages.pages(peer.home / "aegis.db", _key(peer)))
    # The header after the salt: page size 4096, reserve 80, payload fractions 64/32/32.
    assert out[0][:2] == b"\x10\x00" and out[0][4:8] == b"\x50\x40\x20\x20", "not decrypted"
    return b"".join(out)


def history(peer: Peer, contact: str) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = peer.call(
        "messages.history", {"contact": contact, "limit": 500}
    )["messages"]
    return msgs


def message(peer: Peer, contact: str, mid: str) -> dict[str, Any] | None:
    return next((m for m in history(peer, contact) if m["message_id"] == mid), None)


def events_of(peer: Peer, mid: str) -> list[dict[str, Any]]:
    """The events about a message, but the one that says it expired (id and contact only)."""
    return [
        e for e in peer.events()
        if mid in (e["data"].get("message_id"), e["data"].get("attachment_id"))
        and e["type"] != "message.expired"
    ]  # fmt: skip


def timer_of(peer: Peer, contact: str) -> int:
    return int(peer.call("conversations.get_timer", {"contact": contact})["seconds"])


def test_timer_shown_to_both_and_messages_erased_everywhere(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    assert timer_of(alice, "bob") == timer_of(bob, "alice") == 0

    # Either side sets it; both see it, with a line in the history and an event.
    got = alice.call("conversations.set_timer", {"contact": "bob", "seconds": 3600})
    assert got["seconds"] == 3600 and got["label"] == "1 hour"
    bob.wait_for(lambda: timer_of(bob, "alice") == 3600, "alice's timer")
    line = [m for m in history(bob, "alice") if "timer_change" in m]
    assert [(m["direction"], m["timer_change"]) for m in line] == [("in", 3600)]
    assert bob.events(types=["conversation.timer"])[-1]["data"] == {
        "contact": "alice", "seconds": 3600, "by": "contact", "message_id": line[0]["message_id"],
    }  # fmt: skip
    ok(aegis(bob, "disappear", "alice", "2s"))  # the CLI, from the other side
    alice.wait_for(lambda: timer_of(alice, "bob") == 2, "bob's timer")
    shown = ok(aegis(alice, "messages", "bob"))
    assert "(disappearing messages: 2 seconds)" in shown
    assert "you set disappearing messages to 1 hour" in shown
    assert "bob set disappearing messages to 2 seconds" in shown
    assert alice.call("contacts.list")["contacts"][0]["timer"] == 2

    # Out of range: refused, nothing changes.
    for bad in (-1, 4 * 7 * 86_400 + 1, 2**40, True):
        with pytest.raises(RpcCallError) as e:
            alice.call("conversations.set_timer", {"contact": "bob", "seconds": bad})
        assert e.value.code == -32602
    assert timer_of(alice, "bob") == 2

    # A text: gone from Alice's store 2 s after she queued it; Bob keeps it until he reads it.
    secret = f"vanishing-{os.urandom(6).hex()}"
    mid = alice.call("messages.send", {"contact": "bob", "text": secret})["message_id"]
    sent = message(alice, "bob", mid)
    assert sent is not None and sent["timer"] == 2 and sent["expires_at"] is not None
    got_in = bob.wait_for(lambda: message(bob, "alice", mid), "the text")
    assert got_in["timer"] == 2 and got_in["expires_at"] is None  # not read: no deadline
    alice.wait_for(lambda: message(alice, "bob", mid) is None, "the sender's erasure")
    assert events_of(alice, mid) == []
    assert alice.events(types=["message.expired"])[-1]["data"] == {
        "message_id": mid, "contact": "bob"
    }
    assert message(bob, "alice", mid) is not None  # still unread: still there
    bob.call("messages.mark_read", {"contact": "alice"})
    read = message(bob, "alice", mid)
    assert read is not None and read["expires_at"] is not None
    bob.wait_for(lambda: message(bob, "alice", mid) is None, "the recipient's erasure")
    assert events_of(bob, mid) == []  # message.received (with the text) went too

    # A file: its row and its encrypted copy go with its message, on both sides (a longer
    # timer, so that the upload is over before it runs out).
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 10})
    bob.wait_for(lambda: timer_of(bob, "alice") == 10, "the 10 s timer")
    src = tmp_short / "secret.txt"
    src.write_bytes(b"file body " * 100)
    aid = alice.call("attachments.send", {"contact": "bob", "path": str(src)})["attachment_id"]
    bob.wait_for(
        lambda: any(a["attachment_id"] == aid and a["state"] == "complete"
                    for a in bob.call("attachments.list")["attachments"]),
        "the file",
    )  # fmt: skip
    copy = bob.home / "attachments" / f"{aid}.blocks"
    assert copy.exists()
    bob.call("messages.mark_read", {"contact": "alice"})
    bob.wait_for(lambda: message(bob, "alice", aid) is None, "the file's erasure")
    assert not copy.exists() and bob.call("attachments.list")["attachments"] == []
    assert events_of(bob, aid) == []
    alice.wait_for(lambda: message(alice, "bob", aid) is None, "the sent file's erasure")
    assert alice.call("attachments.list")["attachments"] == []
    assert not (alice.home / "attachments" / f"{aid}.blocks").exists()

    # The erased text is in no page of either store, live or stale (a text kept without a
    # timer is found, so the pages were read right).
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 0})
    bob.wait_for(lambda: timer_of(bob, "alice") == 0, "the timer off")
    kept = f"kept-{os.urandom(6).hex()}"
    kid = alice.call("messages.send", {"contact": "bob", "text": kept})["message_id"]
    bob.wait_for(lambda: message(bob, "alice", kid), "the kept text")
    for peer in (alice, bob):
        pages = plain_pages(peer)
        assert kept.encode() in pages, peer.name
        assert secret.encode() not in pages, peer.name
        s = Store.open(peer.home / "aegis.db", _key(peer))
        try:
            assert s._q("PRAGMA secure_delete").fetchone()[0] == 1
            has_fts = s._q(
                "SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'"
            ).fetchone()
            if has_fts:  # the search index (another branch): the word is gone from it too
                hits = s._q(
                    "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?", (f'"{secret}"',)
                ).fetchone()[0]
                assert hits == 0
        finally:
            s.close()
    for peer in (alice, bob):
        peer.stop()
        assert secret.encode() not in plain_pages(peer), peer.name


def test_a_deadline_passed_while_stopped_is_met_at_the_next_start(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 10})
    mid = alice.call("messages.send", {"contact": "bob", "text": "gone while away"})["message_id"]
    alice.stop()
    key = _key(alice)

    def stored() -> Any:
        s = Store.open(alice.home / "aegis.db", key)
        try:
            return s.get_message(mid)
        finally:
            s.close()

    msg = stored()
    assert msg is not None and msg.expires_at is not None, "erased before the daemon stopped"
    deadline = msg.expires_at
    alice.wait_for(lambda: time.time() * 1000 > deadline + 200, "the deadline to pass", 30)
    assert stored() is not None  # nothing erased it while the daemon was stopped
    alice.start()
    alice.wait_for(lambda: message(alice, "bob", mid) is None, "the erasure at start")
    assert events_of(alice, mid) == []
    alice.stop()
    assert b"gone while away" not in plain_pages(alice)


def test_the_default_timer_applies_to_new_contacts_and_is_announced(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    assert alice.call("settings.get")["disappearing_default"] == 0
    out = ok(aegis(alice, "disappear", "--default", "1d"))
    assert "new conversations: disappearing messages 1 day" in out
    assert alice.call("settings.get")["disappearing_default"] == 86_400
    with pytest.raises(RpcCallError):
        alice.call("settings.set", {"disappearing_default": 10**9})
    connect(alice, bob)  # Alice adds Bob: her default applies, and Bob is told
    assert timer_of(alice, "bob") == 86_400
    bob.wait_for(lambda: timer_of(bob, "alice") == 86_400, "the announced default")
    assert "disappearing messages with alice: 1 day" in ok(aegis(bob, "disappear", "alice"))


def test_a_backup_carries_the_timers_but_no_timed_message(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    from tests.functional.test_backup import CHEAP, PASS

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("messages.send", {"contact": "bob", "text": "before any timer"})
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 3600})
    alice.call("messages.send", {"contact": "bob", "text": "timed, not in backups"})
    alice.call("settings.set", {"disappearing_default": 300})
    path = tmp_short / "alice.aegisbackup"
    out = alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = peers("alice2")
    new.wait_connected()
    result = new.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert result["messages"] == out["messages"]
    got = [m["text"] for m in history(new, "bob")]
    assert "before any timer" in got and "timed, not in backups" not in got
    assert timer_of(new, "bob") == 3600
    assert new.call("settings.get")["disappearing_default"] == 300


def test_changes_made_at_once_converge_and_a_bad_timer_is_refused(
    peers: Callable[[str], Peer], relay_proc: Any
) -> None:
    import struct

    from aegisd.core import wire
    from tests.support.hostile import hostile

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    # Both change it before either hears of the other's change: both end on the same value.
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 60})
    bob.call("conversations.set_timer", {"contact": "alice", "seconds": 120})
    def changes() -> list[dict[str, Any]]:
        return alice.events(types=["conversation.timer"]) + bob.events(
            types=["conversation.timer"]
        )

    alice.wait_for(lambda: any(e["data"]["by"] == "contact" for e in changes()),
                   "the changes to cross")  # fmt: skip
    alice.wait_for(lambda: timer_of(alice, "bob") == timer_of(bob, "alice"), "the same timer")
    agreed = timer_of(alice, "bob")
    assert agreed in (60, 120)

    # A contact's software that sends a timer out of range: dropped, nothing changes, no event.
    before = len(bob.events(types=["conversation.timer"]))
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    with hostile(alice.home, "bob") as h:
        now = time.time_ns() // 1_000_000 + 10**9  # later than anything: it would win
        bad = bytes([wire.VERSION, wire.PAYLOAD_TIMER]) + struct.pack(
            ">QI", now, wire.TIMER_MAX_S + 1
        )
        after = wire.TextPayload(os.urandom(wire.MESSAGE_ID_LEN), now, "after the bad timer")
        h.deposit(url, h.session.encrypt(h.entropy, bad) + h.payload_blocks(after))
    bob.wait_for(
        lambda: any(m["text"] == "after the bad timer" for m in history(bob, "alice")),
        "the text after the bad timer",
    )
    assert timer_of(bob, "alice") == agreed
    assert len(bob.events(types=["conversation.timer"])) == before


def test_a_deadline_passed_while_locked_is_met_at_unlock(peers: Callable[[str], Peer]) -> None:
    passphrase = "wobble quintet marrow dune"
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("passphrase.change", {"new_passphrase": passphrase})
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 10})
    mid = alice.call("messages.send", {"contact": "bob", "text": "gone while locked"})[
        "message_id"
    ]
    alice.call("lock")
    key = Keyring.load(alice.home / "keyring.json").unlock(passphrase)

    def stored() -> Any:
        s = Store.open(alice.home / "aegis.db", key)
        try:
            return s.get_message(mid)
        finally:
            s.close()

    msg = stored()
    assert msg is not None and msg.expires_at is not None, "erased before the lock"
    deadline = msg.expires_at
    alice.wait_for(lambda: time.time() * 1000 > deadline + 200, "the deadline to pass", 30)
    assert stored() is not None  # locked: nothing could erase it
    alice.call("unlock", {"passphrase": passphrase})
    alice.wait_for(lambda: message(alice, "bob", mid) is None, "the erasure at unlock")


def test_a_quote_goes_with_the_message_it_quotes(peers: Callable[[str], Peer]) -> None:
    """A reply keeps a copy of the text it quotes (docs/protocol.md §26.1); when the quoted
    message's timer runs out, that copy goes too, on the sender's and the recipient's side."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 3})
    mid = alice.call("messages.send", {"contact": "bob", "text": "quotable secret"})["message_id"]
    bob.wait_for(lambda: message(bob, "alice", mid), "the timed text")
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 0})
    bob.wait_for(lambda: timer_of(bob, "alice") == 0, "the timer off")
    rid = bob.call("messages.reply", {"contact": "alice", "message_id": mid,
                                      "text": "noted"})["message_id"]  # fmt: skip
    got = alice.wait_for(lambda: message(alice, "bob", rid), "the reply")
    assert got["reply_to"] == {"message_id": mid, "text": "quotable secret"}
    assert message(bob, "alice", rid)["reply_to"]["text"] == "quotable secret"  # type: ignore[index]
    bob.call("messages.mark_read", {"contact": "alice"})  # starts bob's copy's timer
    alice.wait_for(lambda: message(alice, "bob", mid) is None, "the sender's erasure")
    bob.wait_for(lambda: message(bob, "alice", mid) is None, "the recipient's erasure")
    for peer, name in ((alice, "bob"), (bob, "alice")):
        reply = message(peer, name, rid)
        assert reply is not None and reply["reply_to"] == {"message_id": mid, "text": None}
    alice.stop()
    bob.stop()
    assert b"quotable secret" not in plain_pages(alice)
    assert b"quotable secret" not in plain_pages(bob)


def test_a_hostile_contact_can_neither_lock_nor_flood_the_timer(
    peers: Callable[[str], Peer], relay_proc: Any
) -> None:
    from aegisd.core import wire
    from tests.support.hostile import hostile

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    now = time.time_ns() // 1_000_000
    with hostile(alice.home, "bob") as h:
        # The largest stamp: it would beat every later change, and overflow ours.
        blocks = h.payload_blocks(wire.TimerPayload(2**63 - 1, 1))
        blocks += h.payload_blocks(wire.TimerPayload(now + 86_400_000 + 60_000, 1))
        # 30 changes of value in a row, then 20 of the stamp alone.
        for i in range(30):
            blocks += h.payload_blocks(wire.TimerPayload(now + i, 3600 if i % 2 else 60))
        for i in range(20):
            blocks += h.payload_blocks(wire.TimerPayload(now + 100 + i, 3600))
        blocks += h.payload_blocks(
            wire.TextPayload(os.urandom(wire.MESSAGE_ID_LEN), now, "after the timers"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: any(m["text"] == "after the timers" for m in history(bob, "alice")),
                 "the text after the timers")  # fmt: skip
    assert timer_of(bob, "alice") == 3600
    # One line for the 30 changes (nothing between them), ten events (the hourly limit), none
    # for a stamp alone or the refused stamps.
    lines = [m for m in history(bob, "alice") if "timer_change" in m]
    assert [(m["direction"], m["timer_change"]) for m in lines] == [("in", 3600)]
    assert len(bob.events(types=["conversation.timer"])) == 10
    # Our own change still wins and is stamped near our clock (no overflow).
    got = bob.call("conversations.set_timer", {"contact": "alice", "seconds": 0})
    assert got["seconds"] == 0
    assert got["changed_at"] < time.time_ns() // 1_000_000 + 60_000
    assert [m["timer_change"] for m in history(bob, "alice") if "timer_change" in m] == [3600, 0]


def test_an_own_reply_wakes_the_erasure(peers: Callable[[str], Peer]) -> None:
    """A reply's deadline is met when due, not at the erasure loop's next look (up to 60 s
    later: the loop sleeps that long when no deadline runs)."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    mid = alice.call("messages.send", {"contact": "bob", "text": "untimed"})["message_id"]
    bob.wait_for(lambda: message(bob, "alice", mid), "the text")
    bob.call("conversations.set_timer", {"contact": "alice", "seconds": 1})
    rid = bob.call("messages.reply", {"contact": "alice", "message_id": mid,
                                      "text": "a timed reply"})["message_id"]  # fmt: skip
    assert message(bob, "alice", rid) is not None
    bob.wait_for(lambda: message(bob, "alice", rid) is None, "the reply's erasure", timeout=20)


def test_an_action_for_an_erased_message_is_not_held(
    peers: Callable[[str], Peer], relay_proc: Any
) -> None:
    """An edit arriving after its message was erased is dropped, not held for a day with its
    new text (docs/protocol.md §26.5, §27.4)."""
    from aegisd.core import wire
    from tests.functional.test_message_actions import offline_store
    from tests.support.hostile import hostile

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 1})
    bob.wait_for(lambda: timer_of(bob, "alice") == 1, "the timer")
    mid = alice.call("messages.send", {"contact": "bob", "text": "short-lived"})["message_id"]
    bob.wait_for(lambda: message(bob, "alice", mid), "the timed text")
    bob.call("messages.mark_read", {"contact": "alice"})
    bob.wait_for(lambda: message(bob, "alice", mid) is None, "the erasure")
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    now = time.time_ns() // 1_000_000
    with hostile(alice.home, "bob") as h:
        blocks = h.payload_blocks(wire.EditPayload(bytes.fromhex(mid), now, "late new text"))
        blocks += h.payload_blocks(wire.ReactionPayload(bytes.fromhex(mid), "🎉"))
        blocks += h.payload_blocks(
            wire.TextPayload(os.urandom(wire.MESSAGE_ID_LEN), now, "after the edit"))
        h.deposit(url, blocks)
    bob.wait_for(lambda: any(m["text"] == "after the edit" for m in history(bob, "alice")),
                 "the text after the edit")  # fmt: skip
    s = offline_store(bob)
    try:
        assert s._q("SELECT count(*) FROM pending_actions").fetchone()[0] == 0
    finally:
        s.close()


_KILLED_ERASURE = """
import os, sys
from pathlib import Path
from aegisd.store.db import Store
from aegisd.store.keyring import Keyring
home = Path(sys.argv[1])
s = Store.open(home / "aegis.db", Keyring.load(home / "keyring.json").unlock(None))
# An erasure of what the search index does not hold (an event's text; a message's own
# deletion marks the index for a rebuild, whose checkpoint at the next open would hide this).
mid = "ab" * 16
s.append_event("message.received", {"message_id": mid, "text": "killed before its checkpoint"})
s.checkpoint()  # the text is in the database file
with s.transaction():
    s._forget_events(mid)  # the erasure commits (zeroed pages in the WAL), then kill -9
os._exit(0)
"""


def test_an_erasure_killed_before_its_checkpoint_is_checkpointed_at_unlock(
    peers: Callable[[str], Peer],
) -> None:
    import subprocess
    import sys

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    subprocess.run([sys.executable, "-c", _KILLED_ERASURE, str(alice.home)], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    db, needle = alice.home / "aegis.db", b"killed before its checkpoint"
    assert sqlcipher_pages.holds(db, _key(alice), needle)  # the old page, in the file
    alice.start()
    alice.wait_for(lambda: not sqlcipher_pages.holds(db, _key(alice), needle),
                   "the checkpoint at unlock")  # fmt: skip


def test_texts_sent_after_a_timer_change_arrive_after_it_despite_send_jitter(
    peers: Callable[[str], Peer],
) -> None:
    """With send jitter each block draws its own delay; blocks to one contact still leave in
    the order they were queued, so texts sent right after a timer change carry it at the
    recipient too (docs/protocol.md §27.3)."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("settings.set", {"send_jitter_max": 2})
    alice.call("conversations.set_timer", {"contact": "bob", "seconds": 3600})
    mids = [alice.call("messages.send", {"contact": "bob", "text": f"text {i}"})["message_id"]
            for i in range(5)]  # fmt: skip
    bob.wait_for(lambda: all(message(bob, "alice", m) for m in mids), "the texts", timeout=30)
    assert [message(bob, "alice", m)["timer"] for m in mids] == [3600] * 5  # type: ignore[index]


def test_a_backup_carries_every_timer_and_no_stamp_far_ahead(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """Timers past one backup setting's 4096 bytes go in further settings, none left out;
    a stamp far ahead in a (hostile) backup is brought down to a day ahead (§27.2)."""
    from tests.functional.test_backup import CHEAP, PASS

    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    s = Store.open(alice.home / "aegis.db", _key(alice))
    try:  # 300 blocked copies of bob (blocked: no renewal after the import), each timed
        c = s.contact_by_name("bob")
        assert c is not None
        now = time.time_ns() // 1_000_000
        s.set_timer(c.id, 60, 2**63 - 1)
        for i in range(300):
            made = s.add_contact(f"copy{i}", identity_key=c.identity_key, state=c.state)
            with s.transaction():
                s._q("UPDATE contacts SET blocked = 1 WHERE id = ?", (made.id,))
            s.set_timer(made.id, 61 + i, now + i)
    finally:
        s.close()
    alice.start()
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = peers("alice2")
    new.wait_connected()
    new.call("backup.import", {"path": str(path), "passphrase": PASS})
    assert [timer_of(new, f"copy{i}") for i in range(300)] == [61 + i for i in range(300)]
    got = new.call("conversations.get_timer", {"contact": "bob"})
    assert got["seconds"] == 60
    assert got["changed_at"] <= time.time_ns() // 1_000_000 + 86_400_000
