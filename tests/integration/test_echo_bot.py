"""contrib/echo_bot.py on one daemon; another daemon talks to it end to end through a real
relay process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import Peer, connect

ROOT = Path(__file__).resolve().parents[2]
BOT = ROOT / "contrib" / "echo_bot.py"


def start_bot(home: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AEGIS_HOME", None)
    bot = subprocess.Popen(
        [sys.executable, str(BOT), "--home", str(home), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert bot.stderr is not None
    line = bot.stderr.readline()  # "echo-bot: listening" once subscribed
    assert line.strip() == "echo-bot: listening", line
    return bot


def stop_bot(bot: subprocess.Popen[str]) -> str:
    bot.terminate()
    _, err = bot.communicate(timeout=20)
    assert bot.returncode == 0, err
    return err


def incoming(peer: Peer, contact: str) -> list[str]:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return [m["text"] for m in msgs if m["direction"] == "in"]


def test_echo_bot_answers_every_message(peers: Callable[[str], Peer], tmp_short: Path) -> None:
    alice, bot_peer = peers("alice"), peers("echobot")
    connect(alice, bot_peer)
    state = tmp_short / "bot.seq"
    bot = start_bot(bot_peer.home, "--state", str(state))
    try:
        texts = ["hello", "zwei Wörter", "a\nmultiline message"]
        for t in texts:
            alice.call("messages.send", {"contact": "echobot", "text": t})
        want = [f"echo: {t}" for t in texts]
        alice.wait_for(lambda: incoming(alice, "echobot") == want, "three echoes")
        # The bot's daemon restarts: the bot follows it, and answers what came meanwhile.
        bot_peer.stop()
        alice.call("messages.send", {"contact": "echobot", "text": "while you were away"})
        time.sleep(0.5)
        bot_peer.start()
        want.append("echo: while you were away")
        alice.wait_for(lambda: incoming(alice, "echobot") == want, "the echo after a restart")
        # The messages the bot answered are marked read on its side.
        bot_peer.wait_for(
            lambda: all(
                m["status"] == "read"
                for m in bot_peer.call("messages.history", {"contact": "alice"})["messages"]
                if m["direction"] == "in"
            ),
            "the bot to mark messages read",
        )
    finally:
        err = stop_bot(bot)
    # The bot restarts from its state file: nothing answered twice.
    assert int(state.read_text()) > 0
    bot = start_bot(bot_peer.home, "--state", str(state))
    try:
        alice.call("messages.send", {"contact": "echobot", "text": "last"})
        want.append("echo: last")
        alice.wait_for(lambda: incoming(alice, "echobot") == want, "the last echo")
        time.sleep(1.0)
        assert incoming(alice, "echobot") == want  # and no duplicate arrives late
    finally:
        err += stop_bot(bot)
    for t in ("hello", "Wörter", "multiline", "away", "alice"):
        assert t not in err, err


def group_texts(peer: Peer, group: int) -> list[tuple[str, str]]:
    msgs = peer.call("group.history", {"group": group, "limit": 500})["messages"]
    return [(m["direction"], m["text"]) for m in msgs]


def test_echo_bot_in_a_group(peers: Callable[[str], Peer]) -> None:
    """Issue 16: the bot leaves group invitations to its operator unless --accept-groups;
    in a group it answers in the group, and never answers an answer."""
    alice, bot_peer = peers("alice"), peers("echobot")
    connect(alice, bot_peer)
    bot = start_bot(bot_peer.home)
    try:
        waiting = alice.call("group.create", {"name": "For the operator"})["group"]
        alice.call("group.invite", {"group": waiting, "contact": "echobot"})
        assert bot.stderr is not None
        line = bot.stderr.readline()
        assert line.startswith("echo-bot: a group invitation waits for the operator"), line
        assert len(bot_peer.call("group.invitations")["invitations"]) == 1
        assert bot_peer.call("group.list")["groups"] == []
    finally:
        err = stop_bot(bot)
    bot = start_bot(bot_peer.home, "--accept-groups")
    try:
        g = alice.call("group.create", {"name": "Echoes"})["group"]
        alice.call("group.invite", {"group": g, "contact": "echobot"})
        alice.wait_for(
            lambda: len(alice.call("group.get", {"group": g})["members"]) == 2, "the bot's join"
        )
        assert [i["name"] for i in bot_peer.call("group.invitations")["invitations"]] == [
            "For the operator"  # the earlier one still waits: accepting is for new ones
        ]
        alice.call("group.send", {"group": g, "text": "hello group"})
        want = [("out", "hello group"), ("in", "echo: hello group")]
        alice.wait_for(lambda: group_texts(alice, g) == want, "the echo in the group")
        # ... and marks what it answered read, as for texts: "read by 1 of 1"
        alice.wait_for(
            lambda: alice.call("group.history", {"group": g})["messages"][0]["delivery"]["read"]
            == 1, "the bot's read receipt",
        )  # fmt: skip
        # An answer is not answered (two bots in a group would echo each other for ever).
        alice.call("group.send", {"group": g, "text": "echo: from another bot"})
        alice.call("group.send", {"group": g, "text": "last"})
        want += [("out", "echo: from another bot"), ("out", "last"), ("in", "echo: last")]
        alice.wait_for(lambda: group_texts(alice, g) == want, "the last echo")
        time.sleep(1.0)
        assert group_texts(alice, g) == want  # nothing more arrives late
    finally:
        err += stop_bot(bot)
    for t in ("hello", "Echoes", "For the", "alice", "last"):
        assert t not in err, err


def test_echo_bot_answers_a_reply_with_a_reply_and_mirrors_reactions(
    peers: Callable[[str], Peer],
) -> None:
    """Issue 17: a bot sees replies and reactions. A reply is answered as a reply quoting it;
    a reaction is mirrored on the same message (and removed with it)."""
    alice, bot_peer = peers("alice"), peers("echobot")
    connect(alice, bot_peer)
    bot = start_bot(bot_peer.home)
    try:

        def history() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = alice.call(
                "messages.history", {"contact": "echobot", "limit": 500})["messages"]
            return out

        alice.call("messages.send", {"contact": "echobot", "text": "hi"})
        echo = alice.wait_for(
            lambda: next((m for m in history() if m["text"] == "echo: hi"), None), "the echo")
        alice.call("messages.reply",
                   {"contact": "echobot", "message_id": echo["message_id"], "text": "about that"})
        answer = alice.wait_for(
            lambda: next((m for m in history() if m["text"] == "echo: about that"), None),
            "the answer to the reply")
        assert answer["reply_to"] is not None
        assert answer["reply_to"]["text"] == "about that"  # it quotes the reply, not the echo

        def reactions() -> list[dict[str, Any]]:
            return next(m for m in history() if m["message_id"] == echo["message_id"])["reactions"]

        alice.call("messages.react", {"message_id": echo["message_id"], "emoji": "👍"})
        alice.wait_for(lambda: reactions() == [{"emoji": "👍", "count": 2, "mine": True}],
                       "the bot's mirrored reaction")
        alice.call("messages.react", {"message_id": echo["message_id"], "emoji": ""})
        alice.wait_for(lambda: reactions() == [], "the mirrored reaction removed")
    finally:
        err = stop_bot(bot)
    for t in ("about that", "hi", "👍", "alice"):
        assert t not in err, err
