"""Issue 17: the conversations list, reading marks read, full-text search and export, between
real daemons on a real relay, the CLI as a subprocess.

- conversations.list: every contact and group, newest activity first, unread counts that
  move when a message arrives and when it is read; `aegis messages` (and a group's) marks
  what it shows read by default, the sender sees "read"; --no-mark-read does not; the
  paging hint is a command that works.
- messages.search: words, phrases, prefixes, newest first, named conversations, paging;
  hostile queries are a -32602, never a crash; a deleted message's rare word is found no
  more, neither by search nor in the FTS5 shadow tables nor in any page of the database
  (decrypted with its key, free pages included).
- aegis export: 0600, refuses to overwrite, --force, text (days, times, who, files, hostile
  text neutralised) and JSON (the API's objects)."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from aegisd.store import Keyring
from tests.functional.conftest import Peer, connect
from tests.functional.test_cli_messaging import aegis, ok
from tests.functional.test_groups import invited, key_of, members
from tests.functional.test_hostile_contact import offline_store
from tests.functional.test_hostile_text import HOSTILE, unsafe
from tests.sqlcipher_pages import holds

T = 60.0
RARE = "zwxqplonkeq"


def history(peer: Peer, contact: str) -> list[dict[str, Any]]:
    r = peer.call("messages.history", {"contact": contact, "limit": 500})
    return list(r["messages"])


def arrived(peer: Peer, contact: str, text: str) -> dict[str, Any]:
    got: dict[str, Any] = peer.wait_for(
        lambda: next((m for m in history(peer, contact) if m["text"] == text), None),
        f"{text!r} at {peer.name}", T)  # fmt: skip
    return got


def convs(peer: Peer) -> list[dict[str, Any]]:
    return list(peer.call("conversations.list")["conversations"])


def by_name(peer: Peer) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in convs(peer)}


def group_with(owner: Peer, member: Peer, name: str) -> tuple[int, int]:
    """A group of two (both contacts already): its reference at the owner and the member."""
    g = owner.call("group.create", {"name": name})["group"]
    owner.call("group.invite", {"group": g, "contact": member.name})
    member.call("group.accept", {"invitation": invited(member)})
    member.wait_for(lambda: key_of(member) in members(member), "the add", T)
    owner.wait_for(lambda: len(members(owner)) == 2, "two members", T)
    return g, int(member.call("group.list")["groups"][0]["group"])


def test_conversations_unread_counts_and_reading_marks_read(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    connect(alice, carol)
    before = by_name(alice)
    assert before["bob"]["unread"] == 0 and before["bob"]["last_message"] is None

    bob.call("messages.send", {"contact": "alice", "text": "hello from bob"})
    arrived(alice, "bob", "hello from bob")
    time.sleep(0.01)
    carol.call("messages.send", {"contact": "alice", "text": "hi from carol\nsecond   line"})
    arrived(alice, "carol", "hi from carol\nsecond   line")
    c = convs(alice)
    assert [x["name"] for x in c] == ["carol", "bob"]  # newest activity first
    assert [x["unread"] for x in c] == [1, 1]
    last = c[0]["last_message"]
    assert last["preview"] == "hi from carol second line" and last["direction"] == "in"
    assert c[0]["kind"] == "contact" and c[0]["contact"] == "carol" and c[0]["group"] is None

    # A group is a conversation too: new, it is the latest activity; a message in it counts.
    g_alice, g_bob = group_with(alice, bob, "Club 5e1")
    top = convs(alice)[0]
    assert top["kind"] == "group" and top["group"] == g_alice and top["name"] == "Club 5e1"
    bob.call("group.send", {"group": g_bob, "text": "gathering at noon"})
    alice.wait_for(lambda: convs(alice)[0]["unread"] == 1, "the group message", T)
    top = convs(alice)[0]
    assert top["last_message"]["preview"] == "gathering at noon"
    assert top["last_message"]["from"] == key_of(bob)

    # A new message moves bob to the top with 2 unread.
    bob.call("messages.send", {"contact": "alice", "text": "again"})
    alice.wait_for(lambda: convs(alice)[0]["name"] == "bob", "bob on top", T)
    assert convs(alice)[0]["unread"] == 2
    out = ok(aegis(alice, "conversations"))
    assert out.splitlines()[0].split("  ")[1:3] == ["bob", "(2 unread)"], out
    assert "chats" in ok(aegis(alice, "--help"))

    # Reading (the default) marks what was shown read; bob sees "read".
    r = aegis(alice, "messages", "bob")
    assert "bob: again" in ok(r) and "older messages" not in r.stderr
    assert by_name(alice)["bob"]["unread"] == 0
    bob.wait_for(lambda: all(m["status"] == "read" for m in history(bob, "alice")
                             if m["direction"] == "out"), "alice's read receipts", T)  # fmt: skip
    # --no-mark-read leaves carol's unread; --mark-read (kept) marks it.
    ok(aegis(alice, "messages", "carol", "--no-mark-read"))
    assert by_name(alice)["carol"]["unread"] == 1
    ok(aegis(alice, "messages", "carol", "--mark-read"))
    assert by_name(alice)["carol"]["unread"] == 0

    # The group's messages: read by default too, the author sees "read by 1 of 1".
    assert "gathering at noon" in ok(aegis(alice, "group", "messages", "Club 5e1"))
    assert by_name(alice)["Club 5e1"]["unread"] == 0

    def read_by_alice() -> bool:
        page = bob.call("group.history", {"group": g_bob})["messages"]
        return any(m["text"] == "gathering at noon" and m["delivery"]["read"] == 1 for m in page)

    bob.wait_for(read_by_alice, "alice's group read receipt", T)

    # Exactly what is shown is marked: `--limit 1` shows the newest of 3, 2 stay unread.
    for i in range(3):
        bob.call("group.send", {"group": g_bob, "text": f"plan {i}"})
        time.sleep(0.01)
    alice.wait_for(lambda: by_name(alice)["Club 5e1"]["unread"] == 3, "3 group messages", T)
    shown = ok(aegis(alice, "messages", "--group", "Club 5e1", "--limit", "1"))
    assert "plan 2" in shown and "plan 1" not in shown and "plan 0" not in shown
    assert by_name(alice)["Club 5e1"]["unread"] == 2
    ok(aegis(alice, "group", "messages", "Club 5e1", "--limit", "1"))  # the same one again
    assert by_name(alice)["Club 5e1"]["unread"] == 2
    ok(aegis(alice, "group", "messages", "Club 5e1", "--limit", "3"))
    assert by_name(alice)["Club 5e1"]["unread"] == 0

    # Paging back: the hint on stderr is a command that shows the older page.
    for i in range(3):
        alice.call("messages.send", {"contact": "carol", "text": f"page {i}"})
    r = aegis(alice, "messages", "carol", "--limit", "2")
    assert "page 1" in ok(r) and "page 0" not in r.stdout
    hint = r.stderr.strip()
    assert hint.startswith("older messages: aegis messages carol --before "), r.stderr
    argv = shlex.split(hint.removeprefix("older messages: aegis "))
    again = aegis(alice, *argv)
    assert "page 0" in ok(again) and "page 2" not in again.stdout
    assert "older messages" not in again.stderr  # the oldest page: nothing more
    last_page = aegis(alice, "messages", "carol", "--limit", "50")
    assert "older messages" not in last_page.stderr


def test_search_finds_words_and_phrases_newest_first_and_forgets_a_deleted_message(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    texts = ["the quick brown fox", "a quick red fox", "brown bread", f"{RARE} is Rare"]
    for t in texts:
        bob.call("messages.send", {"contact": "alice", "text": t})
        arrived(alice, "bob", t)
        time.sleep(0.01)  # distinct arrival times: "newest first" is well defined
    alice.call("messages.send", {"contact": "bob", "text": "my own Fox"})

    def found(query: str, **extra: Any) -> list[str]:
        r = alice.call("messages.search", {"query": query, **extra})
        return [h["message"]["text"] for h in r["results"]]

    assert found("quick fox") == ["a quick red fox", "the quick brown fox"]
    assert found("fox") == ["my own Fox", "a quick red fox", "the quick brown fox"]
    assert found('"quick brown"') == ["the quick brown fox"]
    assert found('"brown fox"  quick') == ["the quick brown fox"]
    assert found("bre*") == ["brown bread"]
    assert found("FOX", contact="bob", limit=1) == ["my own Fox"]
    page = alice.call("messages.search", {"query": "fox", "limit": 2})
    assert page["next_offset"] == 2
    rest = alice.call("messages.search", {"query": "fox", "limit": 2, "offset": 2})
    assert [h["message"]["text"] for h in rest["results"]] == ["the quick brown fox"]
    assert rest["next_offset"] is None
    hit = page["results"][1]
    assert hit["kind"] == "contact" and hit["contact"] == "bob" and hit["group"] is None
    assert hit["message"]["direction"] == "in" and hit["message"]["status"] == "received"

    # FTS5 syntax from the user is never FTS5 syntax: words, or a clear -32602.
    for q in ["AND", "fox OR", 'NEAR(fox quick)', "text:fox", "^fox", "-fox", "fox)",
              '"unterminated fox', "a\"b", "fox*  *", "\x00fox", "NOT fox"]:  # fmt: skip
        try:
            alice.call("messages.search", {"query": q})
        except RpcCallError as exc:  # pragma: no cover - must not happen
            raise AssertionError(f"{q!r}: {exc}") from None
    assert found("fox OR") == []  # "or" is a word like any other here
    # a lone surrogate ("\ud800" in the JSON) separates words, as a control does: no -32603
    assert found("fox\ud800") == found("fox") != []
    for q in ["", "   ", "!!! ???", "*", "x" * 600, " ".join(["w"] * 20), "\udc80\ud800"]:
        with pytest.raises(RpcCallError) as err:
            alice.call("messages.search", {"query": q})
        assert err.value.code == -32602 and err.value.data.get("field") == "query", q
    with pytest.raises(RpcCallError) as err:
        alice.call("messages.search", {"query": "fox", "contact": "nobody"})
    assert err.value.code == 1020

    # The CLI: newest first, each with its conversation.
    shown = ok(aegis(alice, "search", "quick", "fox")).splitlines()
    assert len(shown) == 2 and "[bob]  bob: a quick red fox" in shown[0]
    assert "no messages found" in ok(aegis(alice, "search", "nothingsuch"))

    # Erasure: the rare word is in the store (positive control), then deleted everywhere.
    rare = next(m for m in history(alice, "bob") if RARE in m["text"])
    assert found(RARE) == [f"{RARE} is Rare"]
    key = Keyring.load(alice.home / "keyring.json").unlock(None)
    db = alice.home / "aegis.db"
    alice.stop()
    assert holds(db, key, RARE.encode()), "the checker must see the word before the deletion"
    alice.start()
    alice.call("messages.delete", {"message_id": rare["message_id"]})
    assert found(RARE) == [] and found("rare") == []
    alice.stop()
    s = offline_store(alice)
    try:
        shadow = [r[0] for r in s._q(
            "SELECT name FROM sqlite_master WHERE name LIKE '%messages_fts%' AND type = 'table'"
        ).fetchall()]  # fmt: skip
        assert "messages_fts_data" in shadow and "messages_fts_idx" in shadow
        for table in shadow:
            for row in s._q(f"SELECT * FROM {table}").fetchall():
                for value in row:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    assert RARE.encode() not in raw, table
        assert s._q("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?",
                    (f'"{RARE}"',)).fetchone()[0] == 0  # fmt: skip
    finally:
        s.close()
    assert not Path(str(db) + "-wal").exists() or Path(str(db) + "-wal").stat().st_size == 0
    assert not holds(db, key, RARE.encode()), "a page of the database still holds the word"
    alice.start()
    assert found("fox")[0] == "my own Fox"  # the index lives on


def test_group_messages_are_searched_and_exported(
    peers: Callable[[str], Peer], tmp_short: Path,
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    g_alice, g_bob = group_with(alice, bob, "Hikers 77")
    bob.call("group.send", {"group": g_bob, "text": "meet at the trailhead"})
    alice.wait_for(lambda: alice.call("messages.search", {"query": "trailhead"})["results"],
                   "the group message", T)  # fmt: skip
    hit = alice.call("messages.search", {"query": "trailhead"})["results"][0]
    assert hit["kind"] == "group" and hit["group"] == g_alice
    assert hit["group_name"] == "Hikers 77" and hit["message"]["from"] == key_of(bob)
    assert alice.call("messages.search", {"query": "trailhead", "group": g_alice})["results"]
    assert not alice.call("messages.search", {"query": "trailhead", "contact": "bob"})["results"]
    assert "[#" in ok(aegis(alice, "search", "trailhead"))

    out = tmp_short / "group.txt"
    ok(aegis(alice, "export", "--group", "Hikers 77", "--output", str(out)))
    text = out.read_text()
    assert "== Group #" in text and "Hikers 77 ==" in text
    assert ": meet at the trailhead" in text


def test_export_text_and_json_private_refusing_and_forced(
    peers: Callable[[str], Peer], tmp_short: Path,
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    bob.call("messages.send", {"contact": "alice", "text": HOSTILE})
    arrived(alice, "bob", HOSTILE)
    alice.call("messages.send", {"contact": "bob", "text": "a reply\nin two lines"})
    src = tmp_short / "notes 1.txt"
    src.write_text("file body")
    alice.call("attachments.send", {"contact": "bob", "path": str(src)})

    out = tmp_short / "bob.txt"
    r = aegis(alice, "export", "bob", "--output", str(out))
    assert "wrote 3 messages of 1 conversations" in ok(r)
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    day = time.strftime("%Y-%m-%d")
    assert "== Conversation with bob ==" in text and f"--- {day} ---" in text
    assert "  me: a reply\n    in two lines" in text
    assert "me: [file] notes 1.txt" in text
    assert unsafe(text) == [], "a raw control reached the export"
    assert "bob: hi␛]52;c;ZXZpbA==␇" in text and "<U+202E>evil" in text
    assert "\n    2026-12-03 14:05:10  bob: a forged message" in text

    # An existing file: refused (unchanged) without --force; replaced, 0600 again, with it.
    os.chmod(out, 0o644)
    r = aegis(alice, "export", "bob", "--format", "json", "--output", str(out))
    assert r.returncode == 1 and "--force" in r.stderr and out.read_text() == text
    ok(aegis(alice, "export", "bob", "--format", "json", "--output", str(out), "--force"))
    assert out.stat().st_mode & 0o777 == 0o600
    doc = json.loads(out.read_text())
    assert doc["aegislink_export"] == 1 and len(doc["conversations"]) == 1
    conv = doc["conversations"][0]
    assert conv["kind"] == "contact" and conv["contact"] == "bob"
    api = history(alice, "bob")
    assert [m["message_id"] for m in conv["messages"]] == [m["message_id"] for m in api]
    assert conv["messages"][0]["text"] == HOSTILE  # JSON keeps the exact text, escaped
    assert "\x1b" not in out.read_text() and "\x9b" not in out.read_text()
    assert set(conv["messages"][0]) == set(api[0])  # the API's objects, every field

    # A symlink is not followed: refused without --force, replaced itself with it.
    victim = tmp_short / "victim"
    victim.write_text("keep")
    link = tmp_short / "link.txt"
    link.symlink_to(victim)
    assert aegis(alice, "export", "--all", "--output", str(link)).returncode == 1
    ok(aegis(alice, "export", "--all", "--output", str(link), "--force"))
    assert victim.read_text() == "keep" and not link.is_symlink()
    assert link.stat().st_mode & 0o777 == 0o600
    # A directory in the way, even with --force: a clear error, no temporary copy left.
    (tmp_short / "adir").mkdir()
    r = aegis(alice, "export", "--all", "--output", str(tmp_short / "adir"), "--force")
    assert r.returncode == 1 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in os.listdir(tmp_short) if p.endswith(".tmp")]
    # One of NAME, --group, --all; an unknown contact is an error before any file is made.
    assert aegis(alice, "export", "--output", str(tmp_short / "x")).returncode == 2
    assert aegis(alice, "export", "nobody", "--output", str(tmp_short / "y")).returncode == 1
    assert not (tmp_short / "y").exists()
