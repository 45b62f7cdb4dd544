"""A contact's text on the user's terminal (issue 15, item 11): escape sequences (OSC 52
clipboard writes, title changes, screen clears), C1 controls, carriage returns that forge a
"me -> ..." line and bidi overrides are shown visibly by `aegis messages` and `aegis listen`,
never passed to the terminal. Two real daemons, a real relay, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.functional.conftest import Peer, connect
from tests.functional.test_cli_messaging import aegis, ok

ESC = "\x1b"
#: What a hostile contact sends: every trick at once, and a second line that forges a header.
HOSTILE = (
    "hi\x1b]52;c;ZXZpbA==\x07"  # OSC 52: write the clipboard
    "\x1b]0;pwned\x07"  # set the window title
    "\x1b[2J\x1b[H"  # clear the screen
    "\x9b2J\x9d0;t\x9c"  # the same with C1 controls
    "\r2026-12-03 14:05:09  me -> alice: send me your passphrase"  # overwrite the line
    "\u202eevil\u202c \u2066iso\u2069\u200f"  # bidi overrides and isolates
    "\n2026-12-03 14:05:10  bob: a forged message\x1b[1A\x08\x7f"
)
FORBIDDEN = [ESC, "\r", "\x07", "\x08", "\x7f", *map(chr, range(0x80, 0xA0)),
             "\u202e", "\u202c", "\u2066", "\u2069", "\u200f"]  # fmt: skip


def unsafe(text: str) -> list[str]:
    return [repr(ch) for ch in FORBIDDEN if ch in text]


def test_messages_and_listen_show_a_hostile_text_safely(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.call("messages.send", {"contact": "bob", "text": HOSTILE})
    bob.wait_for(
        lambda: [m for m in bob.call("messages.history", {"contact": "alice"})["messages"]
                 if m["direction"] == "in"],
        "the hostile message",
    )  # fmt: skip

    out = ok(aegis(bob, "messages", "alice"))
    assert unsafe(out) == [], out
    # Every line of the message after its first is indented: none passes for a header.
    rows = out.rstrip("\n").split("\n")
    assert len(rows) == 2, rows
    assert rows[0].split("  ", 1)[1].startswith("alice: hi␛]52;c;ZXZpbA==␇"), rows[0]
    assert "<U+202E>evil" in rows[0] and "␍2026-12-03" in rows[0]
    assert rows[1].startswith("    2026-12-03 14:05:10  bob: a forged message␛[1A"), rows[1]
    # --json stays the exact text (escaped by JSON only).
    js = json.loads(ok(aegis(bob, "messages", "alice", "--json")))
    assert [m["text"] for m in js["messages"]] == [HOSTILE]

    # aegis listen replays the event: the same text, as safely.
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegis_cli.main", "listen", "--since", "0", "--type",
         "message.received", "--home", str(bob.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        got = [proc.stdout.readline(), proc.stdout.readline()]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    text = "".join(got)
    assert unsafe(text) == [], text
    assert " alice: hi␛]52" in got[0]
    assert got[1].startswith("    2026-12-03 14:05:10  bob: a forged"), got


def test_file_names_from_a_peer(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    """A file name a peer chose reaches `aegis attachments` and `aegis messages` without
    controls (the receiving daemon cleans it too: this is the frontends' side)."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    evil = tmp_short / "a\x1b]0;t\x07\u202egpj.exe"
    evil.write_bytes(b"x" * 100)
    alice.call("attachments.send", {"contact": "bob", "path": str(evil)})
    bob.wait_for(lambda: bob.call("attachments.list")["attachments"], "the attachment")
    time.sleep(0.2)
    out = ok(aegis(bob, "attachments"))
    assert unsafe(out) == [], out
    out = ok(aegis(bob, "messages", "alice"))
    assert unsafe(out) == [], out
