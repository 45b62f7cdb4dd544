"""Cover traffic and slots (issue 13; docs/protocol.md §24), with real daemons and a relay.

The daemons run with --test-methods so that a test can shorten the level's interval
(privacy.set interval): the mechanism is the same as at 20 minutes, only faster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import DaemonProc
from tests.functional.test_backup import CHEAP, PASS
from tests.relay.conftest import RelayProcess

from .conftest import Peer, connect

FAST = 0.3  # seconds between slots, on average


@pytest.fixture
def make(tmp_short: Path, relay_proc: RelayProcess) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"

    def _make(name: str) -> Peer:
        p = Peer(tmp_short / name, url, name)
        made.append(p)
        p.stop()
        p.proc = DaemonProc(p.home, ["--test-methods"], None)
        p.proc.wait_ready()
        return p

    try:
        yield _make
    finally:
        for p in made:
            p.stop()


def history(p: Peer, contact: str) -> list[dict[str, object]]:
    return list(p.call("messages.history", {"contact": contact, "limit": 500})["messages"])


def test_texts_wait_for_slots_receipts_ride_them_and_cover_is_never_shown(
    make: Callable[[str], Peer],
) -> None:
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    assert alice.call("privacy.get")["level"] == "off"  # a relay on loopback: off by default
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": 3600})  # slots an hour apart
    sent = [alice.call("messages.send", {"contact": "bob", "text": f"hi {i}"})["message_id"]
            for i in range(5)]  # fmt: skip
    time.sleep(1.5)
    # Waiting for a slot: nothing left, nothing arrived.
    assert {m["status"] for m in history(alice, "bob")} == {"queued"}
    assert history(bob, "alice") == []
    alice.call("privacy.set", {"interval": FAST})  # bob's slots stay an hour apart
    got = bob.wait_for(lambda: len(history(bob, "alice")) == 5 and history(bob, "alice"),
                       "the five texts")  # fmt: skip
    assert [m["text"] for m in got] == [f"hi {i}" for i in range(5)]
    bob.call("messages.mark_read", {"contact": "alice"})
    time.sleep(0.5)
    assert {m["status"] for m in history(alice, "bob")} == {"sent"}  # receipts wait for slots
    bob.call("privacy.set", {"interval": FAST})
    alice.wait_for(lambda: {m["status"] for m in history(alice, "bob")} == {"read"},
                   "read receipts")  # fmt: skip
    # Receipts rode slots in batches: ten receipts (five delivered, five read) in one block of
    # each kind (a third if one of bob's hour-apart slots happened to come in between).
    slots = bob.call("privacy.get")["slots"]["sent"]
    assert 1 <= slots["receipts"] <= 3, slots
    # Cover flows both ways and is never shown: no event, no history row.
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["sent"]["cover"] >= 5, "cover")
    time.sleep(2 * FAST)
    assert len(history(bob, "alice")) == 5 and len(history(alice, "bob")) == 5
    types = {e["type"] for e in bob.call("events.list", {"limit": 1000})["events"]}
    assert "message.received" in types
    received = bob.call("events.list", {"types": ["message.received"], "limit": 1000})
    assert len(received["events"]) == 5
    assert sent


def test_a_restart_keeps_waiting_blocks_and_level_off_sends_them_at_once(
    make: Callable[[str], Peer],
) -> None:
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    alice.call("privacy.set", {"level": "strong", "interval": 3600})
    mid = alice.call("messages.send", {"contact": "bob", "text": "across a restart"})
    alice.stop()
    alice.proc = DaemonProc(alice.home, ["--test-methods"], None)
    alice.proc.wait_ready()
    alice.wait_connected()
    time.sleep(1.0)
    assert history(bob, "alice") == []  # still waiting for its slot after the restart
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", "privacy", "--level", "off",
                        "--home", str(alice.home)], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("level: off"), r.stdout + r.stderr
    got = bob.wait_for(lambda: history(bob, "alice"), "the text, once cover is off")
    assert got[0]["text"] == "across a restart"
    assert mid["status"] == "queued"


def test_privacy_cli_and_api(make: Callable[[str], Peer]) -> None:
    alice = make("alice")
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", "privacy", "--level", "default",
                        "--home", str(alice.home)], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "72 blocks (1.2 MB) per contact per day each way" in r.stdout
    assert "waits 20 minutes on average" in r.stdout
    got = alice.call("privacy.get")
    assert (got["level"], got["level_chosen"], got["interval"]) == ("default", True, 1200.0)
    r = subprocess.run([sys.executable, "-m", "aegis_cli.main", "privacy", "--level", "max",
                        "--home", str(alice.home)], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2 and "'max' is not one of" in r.stderr


def test_contact_mailboxes_come_from_a_pool_made_ahead_with_loop_cover(
    make: Callable[[str], Peer],
) -> None:
    """With cover on, each daemon keeps mailboxes made ahead (at random times) that receive
    loop cover; a new contact takes one, so its mailbox is not born with the contact."""
    alice, bob = make("alice"), make("bob")
    for p in (alice, bob):
        p.wait_connected()
        p.call("privacy.set", {"level": "default", "interval": FAST})
    for p in (alice, bob):
        p.wait_for(lambda p=p: (s := p.call("privacy.get")["slots"])["pool"] == 2
                   and s["sent"]["loop"] >= 3, "a full pool with loop cover")  # fmt: skip
        p.call("privacy.set", {"interval": 3600})  # no refill for a while: see what is taken
    connect(alice, bob)
    for p in (alice, bob):
        assert p.call("privacy.get")["slots"]["pool"] == 1, p.name  # one taken, for the contact
    mid = alice.call("messages.send", {"contact": "bob", "text": "into a pooled mailbox"})
    for p in (alice, bob):
        p.call("privacy.set", {"interval": FAST})
    got = bob.wait_for(lambda: history(bob, "alice"), "the text")
    assert got[0]["text"] == "into a pooled mailbox" and mid["message_id"]
    bob.call("messages.send", {"contact": "alice", "text": "and back"})
    alice.wait_for(lambda: history(alice, "bob")[-1]["text"] == "and back", "the answer")
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["pool"] == 2, "the pool refilled")


def test_a_contact_away_has_its_mailbox_filled_by_the_one_it_writes_to(
    make: Callable[[str], Peer],
) -> None:
    """While bob is away, alice deposits loop cover into her own mailbox for bob at bob's rate,
    so that her mailbox does not go quiet when bob's connections close (the relay would pair
    them); she drops her own blocks unopened, and stops when bob is back."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": FAST})
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["sent"]["cover"] >= 3, "cover")

    def fills_in(seconds: float) -> int:
        before = alice.call("privacy.get")["slots"]["sent"]["fill"]
        time.sleep(seconds)
        return int(alice.call("privacy.get")["slots"]["sent"]["fill"]) - int(before)

    # With bob there, filling happens only in his natural silences (about a fifth of the time).
    present = fills_in(30 * FAST)
    bob.stop()
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["filling"] == 1,
                   "alice filling her mailbox for bob")  # fmt: skip
    away = fills_in(30 * FAST)  # about 30 at bob's rate
    assert away >= 12 and away > present, (away, present)
    assert history(alice, "bob") == []  # her own loop blocks: dropped, never shown
    bob.proc = DaemonProc(bob.home, ["--test-methods"], None)
    bob.proc.wait_ready()
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["filling"] == 0,
                   "filling stops when bob is back")  # fmt: skip
    back = fills_in(30 * FAST)
    assert back < away, (back, away)
    assert history(alice, "bob") == []
    err = alice.proc.stderr() if alice.proc is not None else ""
    assert "did not decrypt" not in err


def test_rotation_a_lock_and_a_file_keep_working_under_cover(
    make: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": FAST})

    # A mailbox rotation: its announcement and acknowledgement ride slots.
    alice.call("contacts.rotate_mailbox", {"name": "bob"})
    alice.wait_for(lambda: alice.events(types=["contact.mailbox_rotated"]), "the rotation")
    bob.call("messages.send", {"contact": "alice", "text": "to the new mailbox"})
    alice.wait_for(lambda: [m for m in history(alice, "bob") if m["text"] == "to the new mailbox"],
                   "a text into the new mailbox")  # fmt: skip

    # A lock stops the ticks (the store is closed); an unlock starts them again.
    alice.call("passphrase.change", {"new_passphrase": "velvet orbit lantern zebra"})
    assert alice.call("lock") == {"locked": True}
    bob.call("messages.send", {"contact": "alice", "text": "while locked"})
    time.sleep(3 * FAST)
    assert alice.call("unlock", {"passphrase": "velvet orbit lantern zebra"})["locked"] is False
    cover = alice.call("privacy.get")["slots"]["sent"]["cover"]
    alice.wait_for(lambda: alice.call("privacy.get")["slots"]["sent"]["cover"] >= cover + 3,
                   "cover again after the unlock")  # fmt: skip
    alice.wait_for(lambda: [m for m in history(alice, "bob") if m["text"] == "while locked"],
                   "the text sent while alice was locked")  # fmt: skip

    # A file: the blobs go at once, the descriptor waits for a slot; it arrives whole.
    data = os.urandom(100_000)
    src = tmp_short / "f.bin"
    src.write_bytes(data)
    aid = alice.call("attachments.send", {"contact": "bob", "path": str(src)})["attachment_id"]
    bob.wait_for(lambda: (a := bob.call("attachments.list", {"contact": "alice"})["attachments"])
                 and a[0]["state"] == "complete", "the file", 90)  # fmt: skip
    out = tmp_short / "saved.bin"
    bob.call("attachments.save", {"attachment_id": aid, "path": str(out)})
    assert out.read_bytes() == data
    # Nothing but the two texts and the file's message in the history (no cover, no loops).
    texts = [m["text"] for m in history(bob, "alice")]
    assert texts[:2] == ["to the new mailbox", "while locked"] and len(texts) == 3


def test_a_renewal_after_a_backup_works_under_cover(
    make: Callable[[str], Peer], tmp_short: Path
) -> None:
    """The renewal (outside the slots) and the texts after it (in them) with cover on at both
    ends; the restored profile's cover drops what it cannot open and shows nothing."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": FAST})
    path = tmp_short / "alice.aegisbackup"
    alice.call("backup.export", {"path": str(path), "passphrase": PASS, **CHEAP})
    alice.stop()
    new = make("alice2")
    new.call("privacy.set", {"level": "default", "interval": FAST})
    assert new.call("backup.import", {"path": str(path), "passphrase": PASS})["renewing"] == 1
    for peer in (bob, new):
        peer.wait_for(lambda p=peer: p.events(types=["contact.session_renewed"]),
                      "the renewed session")  # fmt: skip
    new.call("messages.send", {"contact": "bob", "text": "restored"})
    bob.wait_for(lambda: [m for m in history(bob, "alice") if m["text"] == "restored"], "text")
    bob.call("messages.send", {"contact": "alice", "text": "welcome back"})
    new.wait_for(lambda: [m for m in history(new, "bob") if m["text"] == "welcome back"],
                 "bob's answer")  # fmt: skip
    new.wait_for(lambda: new.call("privacy.get")["slots"]["sent"]["cover"] >= 3, "cover")
    assert [m["text"] for m in history(new, "bob")][-2:] == ["restored", "welcome back"]


def test_relay_move_under_cover_takes_pool_mailboxes(
    make: Callable[[str], Peer], tmp_short: Path, relay_proc: RelayProcess
) -> None:
    """With cover on, a relay move announces one contact per pool mailbox (made at random
    times at the new relay), each in its contact's slot; it completes and texts flow."""
    sub = tmp_short / "relay2"
    sub.mkdir()
    new = RelayProcess(sub, {})
    new.start()
    try:
        alice, bob, carol = make("alice"), make("bob"), make("carol")
        connect(alice, bob)
        connect(alice, carol)
        for p in (alice, bob, carol):
            p.call("privacy.set", {"level": "strong", "interval": FAST})
        alice.call("relay.set", {"url": f"ws://127.0.0.1:{new.port}/v1/ws"})
        alice.wait_connected()
        alice.wait_for(lambda: alice.events(types=["relay.moved"]), "the move", timeout=60)
        moved = {e["data"]["contact"] for e in alice.events(types=["contact.mailbox_rotated"])}
        assert moved == {"bob", "carol"}
        for p in (bob, carol):
            p.call("messages.send", {"contact": "alice", "text": f"{p.name} after the move"})
            alice.wait_for(lambda p=p: any(
                m["text"] == f"{p.name} after the move" for m in history(alice, p.name)
            ), "the text")  # fmt: skip
    finally:
        new.close()
