"""Issue 17 (files): captions, several files in one send, typing indicators; a real relay
process and two real daemons with real SQLCipher profiles, on loopback (docs/protocol.md
§22.3, §22.4, §22.6)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aegis_cli.listen import describe
from aegisd.core import wire
from aegisd.services.typing_indicators import INTERVAL
from aegisd.store import Keyring
from tests.functional.conftest import LiveEvents, Peer, connect
from tests.functional.test_attachments import wait_state
from tests.functional.test_cli_messaging import aegis, ok
from tests.functional.test_cover import make  # noqa: F401 (a fixture: daemons with test methods)
from tests.relay.conftest import RelayProcess
from tests.sqlcipher_pages import holds
from tests.support.hostile import hostile

# A hostile caption: an escape sequence (clipboard write), a carriage return forging a line,
# a bidi override; shown through safe_text, never raw.
RARE_CAPTION, RARE_CAPTION_2 = "qzxvbnmcaption one", "wpqlkjhcaption two"
HOSTILE = "look \x1b]52;c;ZXZpbA==\x07 here\rme -> bob: forged \u202eevil"


def _received(peer: Peer, name: str) -> list[dict[str, Any]]:
    return [a for a in peer.call("attachments.list", {"contact": name})["attachments"]
            if a["direction"] == "in"]  # fmt: skip


def test_caption_and_three_files_in_one_send(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    one = tmp_short / "one.txt"
    one.write_bytes(b"first file\n")

    sent = alice.call("attachments.send", {"contact": "bob", "path": str(one),
                                           "caption": HOSTILE})  # fmt: skip
    assert sent["caption"] == HOSTILE and sent["batch_id"] is None
    got = bob.wait_for(lambda: _received(bob, "alice"), "the captioned file")
    assert got[0]["attachment_id"] == sent["attachment_id"]
    assert got[0]["caption"] == HOSTILE and got[0]["batch_id"] is None
    assert got[0]["batch_count"] == 1
    wait_state(bob, sent["attachment_id"], "complete")
    # The history carries it under the file's name; the events too.
    texts = [m["text"] for m in bob.call("messages.history", {"contact": "alice"})["messages"]]
    assert texts == [f"[file] one.txt\n{HOSTILE}"]
    ev = bob.events(types=["message.received", "attachment.received"])
    assert [e["data"].get("caption") for e in ev] == [HOSTILE, HOSTILE]
    # Shown safely: no control reaches the terminal, the forged line is indented under it.
    shown = ok(aegis(bob, "messages", "alice"))
    assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown
    assert "␛]52;c;ZXZpbA==␇ here␍me -> bob: forged <U+202E>evil" in shown
    # aegis listen's line for the file (its describe, on the daemon's real event).
    line = describe(ev[-1])
    assert "\x1b" not in line and "\r" not in line and "one.txt" in line and "␛]52" in line

    # Three files in one send, one caption (on the first).
    files = []
    for i, size in enumerate((10, 40_000, 70_000)):
        p = tmp_short / f"f{i}.bin"
        p.write_bytes(os.urandom(size))
        files.append(p)
    batch = alice.call("attachments.send_batch", {
        "contact": "bob", "paths": [str(p) for p in files], "caption": "three of them",
    })  # fmt: skip
    bid = batch["batch_id"]
    assert bid == batch["attachments"][0]["attachment_id"]
    assert [a["batch_index"] for a in batch["attachments"]] == [0, 1, 2]
    ids = [a["attachment_id"] for a in batch["attachments"]]
    arrived = bob.wait_for(
        lambda: len(r := [a for a in _received(bob, "alice") if a["attachment_id"] in ids]) == 3
        and r, "the three files",
    )
    by_id = sorted(arrived, key=lambda a: ids.index(a["attachment_id"]))
    assert [a["name"] for a in by_id] == ["f0.bin", "f1.bin", "f2.bin"]
    assert [a["size"] for a in by_id] == [10, 40_000, 70_000]
    assert [a["caption"] for a in by_id] == ["three of them", "", ""]
    # Only the captioned file travels as 0x17 (with its batch); the others as plain 0x08,
    # which an older receiver reads too: their place in the batch is not told.
    assert [(a["batch_id"], a["batch_index"], a["batch_count"]) for a in by_id] == [
        (bid, 0, 3), (None, 0, 1), (None, 0, 1)]  # fmt: skip
    for aid, src in zip(ids, files, strict=True):
        wait_state(bob, aid, "complete")
        out = tmp_short / f"saved-{aid}"
        bob.call("attachments.save", {"attachment_id": aid, "path": str(out)})
        assert out.read_bytes() == src.read_bytes()
    # The sender's history has them in order, the caption with the first.
    mine = [m["text"] for m in alice.call("messages.history", {"contact": "bob"})["messages"]]
    assert mine[-3:] == ["[file] f0.bin\nthree of them", "[file] f1.bin", "[file] f2.bin"]

    # Bad input is refused before anything is stored: a caption over the bound, a missing
    # file among several (the others are not sent either), 33 files.
    before = len(alice.call("attachments.list", {"contact": "bob"})["attachments"])
    r = aegis(alice, "send", "bob", "--file", str(one), "--caption", "x" * 2049)
    assert r.returncode != 0 and "--caption must be at most 2048 bytes" in r.stderr
    r = aegis(alice, "send", "bob", "--file", str(one), "--file", str(tmp_short / "nope"))
    assert r.returncode != 0 and "no such file" in r.stderr
    r = aegis(alice, "send", "bob", *[a for _ in range(33) for a in ("--file", str(one))])
    assert r.returncode != 0 and "--file must list 1 to 32 files" in r.stderr
    assert len(alice.call("attachments.list", {"contact": "bob"})["attachments"]) == before

    # The CLI: two files and a caption in one command, the ids one a line.
    printed = ok(aegis(alice, "send", "bob", "--file", str(files[0]), "--file", str(files[1]),
                   "--caption", "cli pair"))  # fmt: skip
    cli_ids = printed.split()
    assert len(cli_ids) == 2
    got2 = bob.wait_for(
        lambda: len(r := [a for a in _received(bob, "alice") if a["attachment_id"] in cli_ids])
        == 2 and r, "the CLI's two files",
    )
    assert {a["caption"] for a in got2} == {"cli pair", ""}
    shown_ev = [describe(e) for e in bob.events(types=["attachment.received"])
                if e["data"]["attachment_id"] in cli_ids]  # fmt: skip
    assert any("(1 of 2): cli pair" in s for s in shown_ev)

    # A batch without a caption: every file a plain 0x08.
    plain = alice.call("attachments.send_batch", {
        "contact": "bob", "paths": [str(files[0]), str(files[1])]})["attachments"]  # fmt: skip
    plain_ids = [a["attachment_id"] for a in plain]
    got3 = bob.wait_for(
        lambda: len(r := [a for a in _received(bob, "alice") if a["attachment_id"] in plain_ids])
        == 2 and r, "the uncaptioned pair",
    )
    assert [(a["caption"], a["batch_id"]) for a in got3] == [("", None), ("", None)]


def _config(peer: Peer) -> dict[str, Any]:
    out: dict[str, Any] = peer.call("typing.config")
    return out


def _typing_events(live: LiveEvents) -> list[dict[str, Any]]:
    """What a connected client was sent: contact.typing is live, never stored (docs/api.md)."""
    return live.data()


def test_typing_only_when_both_sides_have_it_on_and_rate_limited(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    live_a, live_b = alice.live(["contact.typing"]), bob.live(["contact.typing"])
    # Off by default: nothing goes.
    assert _config(alice)["enabled"] is False and _config(bob)["enabled"] is False
    assert alice.call("messages.typing", {"contact": "bob", "typing": True}) == {
        "sent": False, "reason": "off"}  # fmt: skip
    assert _config(alice)["counts"]["sent"] == 0

    # Alice on, Bob off: Alice's first "typing" tells Bob her choice (one block); Bob drops it
    # (no event) and sends nothing back; Alice sends no more.
    assert alice.call("typing.config", {"enabled": True})["enabled"] is True
    assert alice.call("messages.typing", {"contact": "bob", "typing": True})["sent"] is True
    bob.wait_for(lambda: _config(bob)["counts"]["dropped"] == 1, "Bob to drop it")
    for _ in range(10):
        r = alice.call("messages.typing", {"contact": "bob", "typing": True})
        assert r == {"sent": False, "reason": "contact_off"}
    time.sleep(INTERVAL + 0.2)  # past the rate limit of that first one (used below)
    assert _config(alice)["counts"]["sent"] == 1
    assert _config(bob)["counts"] == {"sent": 0, "received": 0, "dropped": 1}
    assert _typing_events(live_b) == [] and _typing_events(live_a) == []
    # Bob, off, cannot send either.
    assert bob.call("messages.typing", {"contact": "alice", "typing": True})["reason"] == "off"

    # Bob switches on: he knows Alice is on, so he tells her at once (one block).
    bob.call("typing.config", {"enabled": True})
    alice.wait_for(lambda: _config(alice)["counts"]["received"] == 1, "Bob's 'on'")
    assert _typing_events(live_a) == []  # an "on" is no "typing"
    assert _config(bob)["counts"]["sent"] == 1

    # Now both are on: many typing calls, a bounded number of blocks (one per 5 s: the
    # bound is taken from the time the calls took, not assumed) and of events at Bob's.
    start = time.monotonic()
    results = [alice.call("messages.typing", {"contact": "bob", "typing": True})
               for _ in range(20)]  # fmt: skip
    bound = 1 + int((time.monotonic() - start) / INTERVAL)
    went = [r["sent"] for r in results].count(True)
    assert results[0]["sent"] is True and 1 <= went <= bound
    assert {r["reason"] for r in results[1:]} <= {"rate_limited", None}
    bob.wait_for(lambda: _typing_events(live_b), "Bob's typing event")
    assert alice.call("messages.typing", {"contact": "bob", "typing": False})["sent"] is True
    bob.wait_for(lambda: _typing_events(live_b)[-1]["typing"] is False, "the 'stopped'")
    sent_by_alice = _config(alice)["counts"]["sent"]
    assert sent_by_alice == 1 + went + 1
    bob.wait_for(lambda: _config(bob)["counts"]["received"] == sent_by_alice - 1,
                 "every block Alice sent (the first was dropped: Bob was off)")  # fmt: skip
    events = [(e["contact"], e["typing"]) for e in _typing_events(live_b)]
    assert events[0] == ("alice", True) and events[-1] == ("alice", False)
    assert len(events) <= 2 * went
    # Live, never stored: marked so, not in events.list (nor replayed), seq no number of its own.
    assert all(e["live"] is True for e in live_b.got)
    assert all(e["seq"] <= bob.call("status")["last_event_seq"] for e in live_b.got)
    assert bob.events(types=["contact.typing"]) == []
    # Subscribes after them: gets none of them. A text sent after it is a stored event, sent
    # after anything queued or replayed for the subscription: once it is in, none came.
    late = bob.live(["contact.typing", "message.received"])
    alice.call("messages.send", {"contact": "bob", "text": "after the typing"})
    bob.wait_for(lambda: late.got, "the text at the late subscriber")
    assert [e["type"] for e in late.got] == ["message.received"]

    # aegis listen shows it (its describe, on the daemon's real events).
    shown = [describe(e) for e in live_b.got]
    assert shown[0].endswith("alice: typing") and shown[-1].endswith("alice: stopped typing")

    # Alice switches off: Bob hears "off" (one more block) and stops sending to her.
    alice.call("typing.config", {"enabled": False})
    assert _config(alice)["counts"]["sent"] == sent_by_alice + 1
    bob.wait_for(lambda: _config(bob)["counts"]["received"] == sent_by_alice, "Alice's 'off'")
    assert bob.call("messages.typing", {"contact": "alice", "typing": True}) == {
        "sent": False, "reason": "contact_off"}  # fmt: skip
    assert alice.call("messages.typing", {"contact": "bob", "typing": True})["reason"] == "off"
    assert json.loads(ok(aegis(alice, "typing-indicators", "--json")))["enabled"] is False
    assert ok(aegis(bob, "typing-indicators")).strip() == "typing indicators on"

    # No page of Bob's store (database, WAL, free pages) holds a typing event.
    key = Keyring.load(bob.home / "keyring.json").unlock(None)
    bob.stop()
    assert holds(bob.home / "aegis.db", key, b"daemon.unlocked"), "the checker sees events"
    assert not holds(bob.home / "aegis.db", key, b"contact.typing")


def test_typing_is_not_slotted_under_cover_its_answer_is(
    make: Callable[[str], Peer],  # noqa: F811 (the fixture imported above)
) -> None:
    """With cover traffic on (slots an hour apart), a "typing" leaves at once: a block added
    to the cover schedule (docs/threat-model.md), while a text and the slotted "on" answer
    wait for their slots."""
    alice, bob = make("alice"), make("bob")
    connect(alice, bob)
    live_b = bob.live(["contact.typing"])
    # aegis listen --json as well: it must print the live event (not take it for one it
    # printed already: its seq is no number of its own). A stored debug event replayed from
    # --since tells when it has subscribed.
    since = bob.call("status")["last_event_seq"]
    bob.call("debug.emit", {"type": "debug.listening"})
    listen = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "--json", "listen", "--since", str(since),
         "--type", "debug.*", "--type", "contact.typing", "--home", str(bob.home)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert listen.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in listen.stdout or []],
                     daemon=True).start()  # fmt: skip
    assert json.loads(lines.get(timeout=30))["type"] == "debug.listening"
    for p in (alice, bob):
        p.call("privacy.set", {"level": "default", "interval": 3600})
        p.call("typing.config", {"enabled": True})
    assert _config(alice)["counts"]["sent"] == 0  # neither knew the other's choice
    text = alice.call("messages.send", {"contact": "bob", "text": "waits for a slot"})
    assert alice.call("messages.typing", {"contact": "bob", "typing": True})["sent"] is True
    bob.wait_for(lambda: _typing_events(live_b), "the typing event, long before any slot")
    assert _config(bob)["counts"]["sent"] == 1  # the "on" answer, queued for a slot
    # No sleep: the text is not at Bob's, and after that look Alice still has it queued (not
    # deposited: "sent" is set on deposit), so it could not have arrived before the look.
    assert bob.call("messages.history", {"contact": "alice"})["messages"] == []
    status = alice.call("messages.history", {"contact": "bob"})["messages"][0]
    assert (status["message_id"], status["status"]) == (text["message_id"], "queued")
    assert _config(alice)["counts"]["received"] == 0  # the answer waits for Bob's slot
    try:
        shown = json.loads(lines.get(timeout=30))
    finally:
        listen.terminate()
        listen.communicate(timeout=20)
    assert shown["type"] == "contact.typing" and shown["live"] is True
    assert shown["data"] == {"contact": "alice", "typing": True}


def test_deleting_a_files_message_deletes_the_file_and_its_caption(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    """"Delete for me" and conversations.delete take a file's attachment row, its caption
    (attachment_extras) and its received blocks with the message, down to the store's pages."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    src = tmp_short / "doc.txt"
    src.write_bytes(b"some file\n")
    ids = []
    for caption in (RARE_CAPTION, RARE_CAPTION_2):
        sent = alice.call("attachments.send", {"contact": "bob", "path": str(src),
                                               "caption": caption})  # fmt: skip
        ids.append(sent["attachment_id"])
    for aid in ids:
        wait_state(bob, aid, "complete")
    assert {a["caption"] for a in _received(bob, "alice")} == {RARE_CAPTION, RARE_CAPTION_2}
    blocks = [bob.home / "attachments" / f"{aid}.blocks" for aid in ids]
    assert all(p.exists() for p in blocks)
    key = Keyring.load(bob.home / "keyring.json").unlock(None)
    db = bob.home / "aegis.db"
    bob.stop()
    for rare in (RARE_CAPTION, RARE_CAPTION_2):
        assert holds(db, key, rare.encode()), "the checker must see the caption first"
    bob.start()

    assert bob.call("messages.delete", {"message_id": ids[0]}) == {
        "deleted": True, "for_everyone": False}  # fmt: skip
    assert [a["attachment_id"] for a in _received(bob, "alice")] == [ids[1]]
    assert not blocks[0].exists() and blocks[1].exists()
    assert bob.call("conversations.delete", {"contact": "alice"})["deleted"] == 1
    assert _received(bob, "alice") == [] and not blocks[1].exists()
    bob.stop()
    for rare in (RARE_CAPTION, RARE_CAPTION_2):
        assert not holds(db, key, rare.encode()), "a page of the store still holds a caption"
    bob.start()
    assert alice.call("attachments.list", {"contact": "bob"})["attachments"]  # hers stay


def test_a_peer_alternating_typing_and_stopped_is_shown_once_per_interval(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """A hostile contact's raw 0x18 payloads: "typing", "stopped", "typing", ... in one
    deposit. A "stopped" ends what shows, not the rate limit: one shown "typing" per 5 s."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bob.call("typing.config", {"enabled": True})
    live_b = bob.live(["contact.typing"])
    alice.stop()
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    marker = os.urandom(16)
    with hostile(alice.home, "bob") as h:
        blocks: list[bytes] = []
        for _ in range(6):
            blocks += h.payload_blocks(wire.TypingPayload(True, True))
            blocks += h.payload_blocks(wire.TypingPayload(True, False))
        blocks += h.payload_blocks(wire.TextPayload(marker, int(time.time() * 1000), "marker"))
        start = time.monotonic()
        h.deposit(url, blocks)
    bob.wait_for(lambda: bob.call("messages.history", {"contact": "alice"})["messages"],
                 "the marker after the typing blocks")  # fmt: skip
    bound = 1 + int((time.monotonic() - start) / INTERVAL)  # from the time taken, not assumed
    shown = [e["typing"] for e in _typing_events(live_b)]
    assert _config(bob)["counts"]["received"] == 12
    assert 1 <= shown.count(True) <= bound and shown.count(False) <= shown.count(True)
