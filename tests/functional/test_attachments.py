"""Encrypted file attachments end to end: a real relay process, two real daemons with real
SQLCipher profiles, on loopback (docs/protocol.md §22)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.core import wire
from tests.functional.conftest import Peer, connect
from tests.functional.test_cli_messaging import aegis, ok, one_line_error
from tests.relay.conftest import RelayProcess

MB = 1024 * 1024
STORED_BLOB_LEN = wire.BLOCK_SIZE + 24 + 16  # the relay's at-rest XSalsa20-Poly1305 of a block
SEALED_BLOCK_LEN = wire.BLOCK_SIZE + 24 + 16  # a queued block, re-encrypted to its owner


def relay_db(relay: RelayProcess) -> sqlite3.Connection:
    return sqlite3.connect(relay.data / "relay.sqlite3", timeout=10)


def blob_sizes(relay: RelayProcess) -> list[int]:
    with relay_db(relay) as db:
        return [r[0] for r in db.execute("SELECT length(block) FROM blobs")]


def attachment(peer: Peer, aid: str) -> dict[str, Any]:
    out: dict[str, Any] = peer.call("attachments.get", {"attachment_id": aid})
    return out


def wait_state(peer: Peer, aid: str, state: str, timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        try:
            a = attachment(peer, aid)
        except RpcCallError:
            return None
        assert a["state"] != "failed" or state == "failed", a
        return a if a["state"] == state else None

    out: dict[str, Any] = peer.wait_for(check, f"attachment {state}", timeout)
    return out


def error_code(call: Callable[[], Any]) -> int:
    with pytest.raises(RpcCallError) as e:
        call()
    return e.value.code


def test_20mb_file_resumes_after_kills_and_arrives_bit_exact(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bob.stop()  # the blobs stay on the relay until Bob comes back: we can look at them
    data = os.urandom(20 * MB)
    src = tmp_short / "big.bin"
    src.write_bytes(data)

    sent = alice.call("attachments.send", {"contact": "bob", "path": str(src)})
    aid = sent["attachment_id"]
    assert sent["size"] == len(data) and sent["state"] == "uploading"
    data_blocks = -(-len(data) // wire.ATTACHMENT_CHUNK_LEN)
    assert sent["blocks"] == wire.padme(data_blocks) > data_blocks  # padded: 1282 -> 1344

    # Kill the sender mid-upload (some windows confirmed, not all).
    progress = alice.wait_for(lambda: (a := attachment(alice, aid))["done"] >= 64 and a,
                              "upload progress", 60)  # fmt: skip
    seen = max(e["seq"] for e in alice.events())
    alice.kill()
    killed_at = progress["done"]
    assert killed_at < sent["blocks"], "the upload finished before the kill: use a bigger file"
    alice.start()
    up = wait_state(alice, aid, "uploaded")
    assert up["done"] == up["blocks"]
    # Resumed, not restarted: after the kill, progress went on from where it was.
    later = [e["data"]["done"] for e in alice.events(since=seen, types=["attachment.progress"])
             if e["data"]["attachment_id"] == aid]  # fmt: skip
    assert later and min(later) > killed_at and later[-1] == sent["blocks"]

    # The relay holds exactly the padded number of blobs, every one the same size; the
    # descriptor waits in Bob's mailbox as one more block of the one size.
    sizes = blob_sizes(relay_proc)
    assert len(sizes) == sent["blocks"] and set(sizes) == {STORED_BLOB_LEN}
    with relay_db(relay_proc) as db:
        queued = {r[0] for r in db.execute("SELECT length(block) FROM messages")}
    assert queued == {SEALED_BLOCK_LEN}

    bob.start()
    got = bob.wait_for(lambda: bob.call("attachments.list", {"contact": "alice"})["attachments"],
                       "the descriptor")  # fmt: skip
    assert got[0]["attachment_id"] == aid and got[0]["name"] == "big.bin"
    # Kill the recipient mid-download too: it resumes where it was.
    fetched = bob.wait_for(lambda: (a := attachment(bob, aid))["done"] >= 64 and a,
                           "download progress", 60)  # fmt: skip
    seen = max(e["seq"] for e in bob.events())
    bob.kill()
    assert fetched["done"] < fetched["blocks"] and fetched["state"] == "downloading"
    bob.start()
    done = wait_state(bob, aid, "complete")
    later = [e["data"]["done"] for e in bob.events(since=seen, types=["attachment.progress"])
             if e["data"]["attachment_id"] == aid]  # fmt: skip
    assert later and min(later) > fetched["done"] and later[-1] == sent["blocks"]
    assert done["size"] == len(data) and done["direction"] == "in"

    # At rest in Bob's profile the file is encrypted: no piece of the plaintext in it.
    stored = (bob.home / "attachments" / f"{aid}.blocks").read_bytes()
    assert len(stored) == sent["blocks"] * wire.BLOCK_SIZE
    assert data[:64] not in stored and data[MB : MB + 64] not in stored

    out = tmp_short / "saved.bin"
    saved = bob.call("attachments.save", {"attachment_id": aid, "path": str(out)})
    assert saved["size"] == len(data)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert out.read_bytes() == data
    assert out.stat().st_mode & 0o077 == 0

    # Complete and verified: Bob deleted the blobs; Alice sees the file delivered.
    bob.wait_for(lambda: not blob_sizes(relay_proc), "the blobs deleted at the relay")
    alice.wait_for(
        lambda: alice.call("messages.history", {"contact": "bob"})["messages"][-1]["status"]
        == "delivered", "the delivery receipt")  # fmt: skip
    kinds = [e["type"] for e in bob.events(types=["attachment.received", "attachment.completed"])]
    assert kinds == ["attachment.received", "attachment.completed"]
    # Saving again without overwrite is refused; the saved file is untouched.
    assert error_code(lambda: bob.call("attachments.save",
                                       {"attachment_id": aid, "path": str(out)})) == 1033
    assert out.stat().st_size == len(data)


def test_a_corrupted_block_is_detected_and_reported(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bob.stop()
    data = os.urandom(300_000)
    src = tmp_short / "report.pdf"
    src.write_bytes(data)
    aid = alice.call("attachments.send", {"contact": "bob", "path": str(src)})["attachment_id"]
    wait_state(alice, aid, "uploaded")
    # Flip one byte of one stored block on the relay's disk.
    with relay_db(relay_proc) as db:
        rowid, block = db.execute("SELECT rowid, block FROM blobs ORDER BY rowid "
                                  "LIMIT 1 OFFSET 7").fetchone()  # fmt: skip
        bad = bytearray(block)
        bad[5000] ^= 0x01
        db.execute("UPDATE blobs SET block = ? WHERE rowid = ?", (bytes(bad), rowid))
    bob.start()
    failed = bob.wait_for(
        lambda: next((a for a in bob.call("attachments.list")["attachments"]
                      if a["state"] == "failed"), None), "the failure", 60)  # fmt: skip
    assert failed["attachment_id"] == aid and "corrupted" in failed["error"]
    events = bob.events(types=["attachment.failed", "attachment.completed"])
    assert [e["type"] for e in events] == ["attachment.failed"]
    assert events[0]["data"]["attachment_id"] == aid
    # Nothing to save; a retry fetches again and fails the same way (the relay cannot heal).
    assert error_code(lambda: bob.call("attachments.save", {
        "attachment_id": aid, "path": str(tmp_short / "x")})) == 1032  # fmt: skip
    assert not (tmp_short / "x").exists()
    assert bob.call("attachments.retry", {"attachment_id": aid})["state"] == "downloading"
    again = wait_state(bob, aid, "failed", 60)
    assert "corrupted" in again["error"]


def test_cli_small_file_limits_and_bad_input(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    data = b"hello, attachment\n" * 100
    src = tmp_short / "notes.txt"
    src.write_bytes(data)

    # Through the CLI: --json prints the id at once; the list shows it; Bob saves it.
    r = json.loads(ok(aegis(alice, "send", "bob", "--file", str(src), "--json")))
    aid = r["attachment_id"]
    assert r["blocks"] == 1 and r["name"] == "notes.txt"
    wait_state(alice, aid, "uploaded")
    listed = ok(aegis(alice, "attachments", "bob"))
    assert aid in listed and "notes.txt" in listed and "-> bob" in listed
    bob.wait_for(lambda: bob.call("attachments.list")["attachments"], "the descriptor")
    wait_state(bob, aid, "complete")
    target = tmp_short / "out"
    target.mkdir()
    ok(aegis(bob, "attachment", "save", aid, str(target)))  # a directory: the file's name
    assert (target / "notes.txt").read_bytes() == data
    # The short id `aegis listen` prints is enough, as with git.
    ok(aegis(bob, "attachment", "save", aid[:8], str(target / "short.txt")))
    assert (target / "short.txt").read_bytes() == data
    line = one_line_error(aegis(bob, "attachment", "save", aid, str(target)))  # exists
    assert line.endswith("(use --overwrite)")  # the CLI's option, not the API's param
    line = one_line_error(aegis(bob, "attachment", "save", "00" * 16, str(target / "y")))
    assert line == f"aegis: error: no such attachment {'00' * 16}"
    # Never into the profile: the plaintext would sit beside the store (or replace its files).
    for inside in (bob.home, bob.home / "attachments", bob.home / "attachments" / ".." / "y.txt"):
        assert error_code(lambda p=inside: bob.call("attachments.save", {  # type: ignore[misc]
            "attachment_id": aid, "path": str(p), "overwrite": True})) == 1030  # fmt: skip
    assert not (bob.home / "notes.txt").exists() and not (bob.home / "y.txt").exists()
    assert sorted(os.listdir(bob.home / "attachments")) == [f"{aid}.blocks"]
    # Without overwrite nothing at the name is replaced, not even a dangling symlink.
    link = target / "link.txt"
    link.symlink_to(tmp_short / "nowhere")
    assert error_code(lambda: bob.call("attachments.save", {
        "attachment_id": aid, "path": str(link)})) == 1033  # fmt: skip
    assert link.is_symlink() and not (tmp_short / "nowhere").exists()
    bob.call("attachments.save", {"attachment_id": aid, "path": str(link), "overwrite": True})
    assert not link.is_symlink() and link.read_bytes() == data  # the link replaced, not followed
    assert not (tmp_short / "nowhere").exists()
    assert sorted(os.listdir(target)) == ["link.txt", "notes.txt", "short.txt"]  # no temporary left
    # A stored copy damaged on Bob's disk: one clear error, the file failed, nothing written.
    stored = bob.home / "attachments" / f"{aid}.blocks"
    damaged = bytearray(stored.read_bytes())
    damaged[100] ^= 0x01
    stored.write_bytes(bytes(damaged))
    with pytest.raises(RpcCallError) as e:
        bob.call("attachments.save", {"attachment_id": aid, "path": str(target / "z.txt")})
    assert e.value.code == 1032 and "damaged" in str(e.value)
    assert sorted(os.listdir(target)) == ["link.txt", "notes.txt", "short.txt"]
    assert "damaged" in attachment(bob, aid)["error"] and attachment(bob, aid)["state"] == "failed"
    assert "<- alice" in ok(aegis(bob, "attachments"))
    # The file's message arrived like any message (clients and notifications follow these).
    got = [e["data"] for e in bob.events(types=["message.received"])]
    assert {"message_id": aid, "contact": "alice", "text": "[file] notes.txt", "timer": 0} in [
        {k: v for k, v in d.items() if k != "sent_at"} for d in got]  # fmt: skip

    # Bad input: one clear error each, nothing sent.
    line = one_line_error(aegis(alice, "send", "bob", "--file", str(tmp_short / "missing")))
    assert "no such file" in line
    assert "directory" in one_line_error(aegis(alice, "send", "bob", "--file", str(target)))
    assert "contact" in one_line_error(aegis(alice, "send", "carol", "--file", str(src)))
    one_line_error(aegis(alice, "send", "bob", "hi", "--file", str(src)), code=2)
    call = alice.call
    assert error_code(lambda: call("attachments.send",
                                   {"contact": "bob", "path": "notes.txt"})) == -32602
    assert error_code(lambda: call("attachments.send",
                                   {"contact": "nobody", "path": str(src)})) == 1020
    assert error_code(lambda: call("attachments.send",
                                   {"contact": "bob", "path": str(target)})) == 1030

    # The size limit: configurable, a clear error above it, bounded by one relay quota.
    assert call("attachments.config")["max_size"] == 100_000_000
    assert "1000 bytes" in ok(aegis(alice, "attachments", "--max-size", "1000"))
    one_line_error(aegis(alice, "attachments", "bob", "--max-size", "5"), code=2)  # per profile
    assert call("attachments.config")["max_size"] == 1000
    big = tmp_short / "big.bin"
    big.write_bytes(os.urandom(1001))
    line = one_line_error(aegis(alice, "send", "bob", "--file", str(big)))
    assert "limit of 1000 bytes" in line
    assert error_code(lambda: call("attachments.config", {"max_size": 0})) == -32602
    ceiling = call("attachments.config")["max_size_ceiling"]
    assert ceiling == wire.ATTACHMENT_MAX_BLOCKS * wire.ATTACHMENT_CHUNK_LEN
    assert error_code(lambda: call("attachments.config", {"max_size": ceiling + 1})) == -32602
    # The CLI says it in its own words: the option, and sizes people read.
    line = one_line_error(aegis(alice, "attachments", "--max-size", str(ceiling + 1)))
    assert line == (f"aegis: error: --max-size must be between 1 and {ceiling} bytes "
                    f"({ceiling / 1e6:.1f} MB)")  # fmt: skip
    assert "2.5 MB" in ok(aegis(alice, "attachments", "--max-size", "2.5MB"))
    assert call("attachments.config")["max_size"] == 2_500_000
    call("attachments.config", {"max_size": 1000})
    outgoing = call("attachments.list", {"contact": "bob"})["attachments"]
    assert [a["attachment_id"] for a in outgoing] == [aid]  # the refused sends left nothing
    assert sorted(os.listdir(alice.home / "attachments")) == []  # the spool went after upload
    # A spool left by a crash after the upload ended (before its unlink) goes at the next start.
    alice.stop()
    (alice.home / "attachments" / f"{aid}.blocks").write_bytes(b"\x01" * wire.BLOCK_SIZE)
    alice.start()
    alice.wait_for(lambda: not os.listdir(alice.home / "attachments"), "the stale spool removed")

    # The recipient's own limit: a larger file waits (failed, with the reason) until Bob
    # raises his limit and retries.
    call("attachments.config", {"max_size": 100_000_000})
    bob.call("attachments.config", {"max_size": 1000})
    aid2 = call("attachments.send", {"contact": "bob", "path": str(big)})["attachment_id"]
    refused = bob.wait_for(lambda: next((a for a in bob.call("attachments.list")["attachments"]
                                         if a["attachment_id"] == aid2), None), "the descriptor")
    assert refused["state"] == "failed" and "limit of 1000 bytes" in refused["error"]
    assert error_code(lambda: bob.call("attachments.retry", {"attachment_id": aid2})) == 1031
    bob.call("attachments.config", {"max_size": 2000})
    ok(aegis(bob, "attachment", "retry", aid2))
    wait_state(bob, aid2, "complete")
    bob.call("attachments.save", {"attachment_id": aid2, "path": str(tmp_short / "big2")})
    assert (tmp_short / "big2").read_bytes() == big.read_bytes()

    # A file name of 255 bytes (the most a name may have) is saved under that name.
    long_src = tmp_short / ("n" * 251 + ".txt")
    long_src.write_bytes(data)
    aid3 = call("attachments.send", {"contact": "bob", "path": str(long_src)})["attachment_id"]
    bob.wait_for(lambda: any(a["attachment_id"] == aid3 for a in
                             bob.call("attachments.list")["attachments"]), "the descriptor")
    wait_state(bob, aid3, "complete")
    saved = bob.call("attachments.save", {"attachment_id": aid3, "path": str(target)})
    assert saved["path"] == str(target / long_src.name)
    assert (target / long_src.name).read_bytes() == data

    # Relay unreachable (a proxy that refuses): the upload waits, it does not fail. Deleted
    # then, the file never leaves: its message turns failed instead of staying queued.
    call("settings.set", {"proxy": "socks5://127.0.0.1:9"})
    aid4 = call("attachments.send", {"contact": "bob", "path": str(src)})["attachment_id"]
    assert attachment(alice, aid4)["state"] == "uploading"
    assert error_code(lambda: call("attachments.retry", {"attachment_id": aid4})) == 1034
    assert os.listdir(alice.home / "attachments") == [f"{aid4}.blocks"]
    ok(aegis(alice, "attachment", "delete", aid4))
    assert os.listdir(alice.home / "attachments") == []
    assert error_code(lambda: attachment(alice, aid4)) == 1020
    history = call("messages.history", {"contact": "bob"})["messages"]
    assert [m["status"] for m in history if m["message_id"] == aid4] == ["failed"]
    statuses = [e["data"] for e in alice.events(types=["message.status"])]
    assert {"message_id": aid4, "contact": "bob", "status": "failed"} in statuses

    # Removing a contact stops its transfers and deletes its files in the profile at once.
    aid5 = call("attachments.send", {"contact": "bob", "path": str(src)})["attachment_id"]
    assert os.listdir(alice.home / "attachments") == [f"{aid5}.blocks"]
    call("contacts.remove", {"name": "bob"})
    assert os.listdir(alice.home / "attachments") == []
    assert error_code(lambda: attachment(alice, aid5)) == 1020
    assert len(os.listdir(bob.home / "attachments")) == 3  # aid (damaged), aid2, aid3
    bob.call("contacts.remove", {"name": "alice"})
    assert os.listdir(bob.home / "attachments") == [] and not bob.call("attachments.list")[
        "attachments"]  # fmt: skip
    call("settings.set", {"proxy": ""})
