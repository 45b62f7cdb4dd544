"""``aegis chat`` (aegis_cli/chat) driven by Textual's Pilot, in process, against a real relay
and real daemons: live messages and unread counts, the marks of a sent message, a daemon
restart in the middle of a session, and hostile text shown as the inert text it is; groups
managed (and replied to, reacted to, edited, deleted and timed), calls made, files saved,
contacts removed and a device linked from it; the main screens as Textual's SVG export draws
them at 80x24."""

from __future__ import annotations

import asyncio
import html
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from textual import events
from textual.content import Content
from textual.pilot import Pilot
from textual.widgets import Input, ListView, Static
from textual.worker import WorkerFailed

from aegis_cli.chat.app import ACTION_WORKERS, ChatApp
from aegis_cli.chat.model import contact_key
from aegis_cli.chat.screens import (
    KEYS,
    AskScreen,
    CallScreen,
    HelpScreen,
    InfoScreen,
    LinkScreen,
    SearchHit,
    SearchScreen,
)
from aegis_cli.chat.widgets import Compose, ConversationItem, MessageLog, MessageRow
from aegis_client import Event
from aegisd.paths import resolve
from tests.daemon.conftest import FAST_KDF_ARGS, PASSPHRASE, DaemonProc
from tests.functional.conftest import Peer, connect
from tests.functional.sound_server import PulseAudio
from tests.relay.conftest import RelayProcess

SIZE = (100, 30)  # fixed: the assertions read what fits in it
DEAD_PROXY = "socks5://127.0.0.1:1"  # relays through a proxy (nothing listens): calls ask first
T = 30.0


async def until(pilot: Pilot[None], pred: Callable[[], Any], what: str, t: float = T) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + t
    while loop.time() < deadline:
        value = pred()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def call(peer: Peer, method: str, params: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(peer.call, method, params)


def item(app: ChatApp, name: str) -> ConversationItem | None:
    return app.items.get(contact_key(name))


def text_of(widget: Static) -> str:
    content = widget.content
    assert isinstance(content, Content), type(content)  # never a markup string
    return content.plain


def shown_texts(app: ChatApp) -> list[str]:
    return [r.plain for r in app.query(MessageRow)]


def run_app(
    peer: Peer,
    body: Callable[[ChatApp, Pilot[None]], Awaitable[None]],
    size: tuple[int, int] = SIZE,
) -> None:
    async def main() -> None:
        app = ChatApp(resolve(peer.home).socket)
        async with app.run_test(size=size) as pilot:
            await until(pilot, app.ready.is_set, "the client to load")
            await body(app, pilot)

    asyncio.run(main())


def pair(peers: Callable[[str], Peer]) -> tuple[Peer, Peer]:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    return alice, bob


def test_live_message_unread_count_and_sent_marks(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        assert item(app, "bob") is not None and app.convs[contact_key("bob")].unread == 0
        await call(bob, "messages.send", {"contact": "alice", "text": "hello from bob"})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 1, "unread 1")
        row = item(app, "bob")
        assert row is not None
        assert "bob (1)" in text_of(row.line) and "hello from bob" in text_of(row.line)

        app.query_one("#convs").focus()
        await pilot.press("enter")  # opens the highlighted (only) conversation
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 0, "read")
        assert any("hello from bob" in t for t in shown_texts(app))
        compose = app.query_one(Compose)
        await until(pilot, lambda: compose.has_focus, "the compose box's focus")
        compose.insert("line one")
        await pilot.press("ctrl+n")
        compose.insert("line two")
        await pilot.press("enter")
        await until(pilot, lambda: any("line two" in t for t in shown_texts(app)), "my row")
        assert compose.text == ""

        def bob_has_it() -> Any:
            h = bob.call("messages.history", {"contact": "alice"})["messages"]
            return [m for m in h if m["text"] == "line one\nline two"]

        msg = (await asyncio.to_thread(bob.wait_for, bob_has_it, "the message at bob"))[0]
        mine = app.rows[msg["message_id"]]
        await until(pilot, lambda: mine.msg["status"] == "delivered", "delivered", 60)
        assert "✓✓" in mine.plain
        await call(bob, "messages.mark_read", {"contact": "alice"})
        await until(pilot, lambda: mine.msg["status"] == "read", "read", 60)
        assert "✓✓ read" in mine.plain

    run_app(alice, body)


def test_a_message_arriving_in_the_open_conversation_is_marked_read(
    peers: Callable[[str], Peer],
) -> None:
    alice, bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await app.open(contact_key("bob"))
        sent = await call(bob, "messages.send", {"contact": "alice", "text": "live one"})
        await until(pilot, lambda: any("live one" in t for t in shown_texts(app)), "live one")

        def status_at_bob() -> Any:
            h = bob.call("messages.history", {"contact": "alice"})["messages"]
            return next(m["status"] for m in h if m["message_id"] == sent["message_id"])

        await asyncio.to_thread(bob.wait_for, lambda: status_at_bob() == "read", "read at bob")
        assert app.convs[contact_key("bob")].unread == 0

    run_app(alice, body)


def test_daemon_restart_mid_session(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await app.open(contact_key("bob"))
        await call(bob, "messages.send", {"contact": "alice", "text": "before"})
        await until(pilot, lambda: any("before" in t for t in shown_texts(app)), "before")
        subs = app.subscriptions

        await asyncio.to_thread(alice.stop)
        status = app.query_one("#status", Static)
        await until(pilot, lambda: "daemon not running" in text_of(status), "the status line")
        # Sent while alice's daemon is down: it waits at the relay.
        await call(bob, "messages.send", {"contact": "alice", "text": "while down"})
        await asyncio.to_thread(alice.start)
        await until(pilot, lambda: app.subscriptions > subs, "a new subscription")
        await until(pilot, lambda: "daemon not running" not in text_of(status), "status")
        await call(bob, "messages.send", {"contact": "alice", "text": "after"})
        await until(pilot, lambda: any("after" in t for t in shown_texts(app)), "after", 60)
        await until(pilot, lambda: any("while down" in t for t in shown_texts(app)), "gap", 60)
        texts = [t.split("\n", 1)[1] for t in shown_texts(app)]
        assert texts.count("before") == 1 and texts.count("while down") == 1
        assert texts.count("after") == 1

    run_app(alice, body)


HOSTILE = (
    "[bold]x[/] [link=https://evil.example]click[/link] \x1b[2J\x1b]52;c;cGF5\x07"
    "\u202egnp.exe\r\nme: forged"
)


def test_hostile_text_is_inert(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)
    big = "A" * 60_000  # near the daemon's limit (64 KiB a message)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await call(bob, "messages.send", {"contact": "alice", "text": HOSTILE})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 1, "the message")
        await call(bob, "messages.send", {"contact": "alice", "text": big})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 2, "the big one")
        row = item(app, "bob")
        assert row is not None
        preview = text_of(row.line)
        assert len(preview) < 200  # 60 KB cut to one short line
        await app.open(contact_key("bob"))
        await pilot.pause(0.2)
        texts = shown_texts(app)
        hostile = next(t for t in texts if "forged" in t)
        assert "[bold]x[/]" in hostile and "[link=https://evil.example]" in hostile
        for ch in ("\x1b", "\x07", "\u202e", "\r"):
            assert ch not in hostile
        assert "<U+202E>" in hostile
        assert "<not Content" not in "".join(texts)
        # The forged line is inside the text (indented under its header), not a header.
        row = next(r for r in app.query(MessageRow) if "forged" in r.plain)
        assert "forged" not in text_of(row.head) and "me: forged" in text_of(row.text)
        assert row.text.content_region.x > row.head.content_region.x
        big_row = next(t for t in texts if "AAAA" in t)
        assert "more characters" in big_row
        svg = app.export_screenshot()
        assert "\x1b" not in svg and "\u202e" not in svg

    run_app(alice, body)


def test_small_terminal_help_jump_request_and_invitation(peers: Callable[[str], Peer]) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    carol.wait_connected()

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        helptext = text_of(app.screen.query_one("#help", Static))
        for key, _ in KEYS:
            assert key in helptext
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")

        # Carol asks alice (through alice's contact address); alice accepts in the client.
        link = (await call(alice, "address.get"))["link"]
        await call(carol, "contacts.add", {"name": "alice", "link": link})
        status = app.query_one("#status", Static)
        await until(pilot, lambda: "1 contact request" in text_of(status), "the request", 60)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the request dialog")
        ask = app.screen.query_one(Input)
        ask.value = "carol"
        await pilot.press("enter")
        await until(pilot, lambda: contact_key("carol") in app.convs, "carol in the list")
        await asyncio.to_thread(
            carol.wait_for,
            lambda: carol.call("contacts.list")["contacts"][0]["established"],
            "the acceptance",
        )
        await call(carol, "messages.send", {"contact": "alice", "text": "hi alice"})
        await until(pilot, lambda: app.convs[contact_key("carol")].unread == 1, "carol's text")

        await pilot.press("ctrl+g")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the jump dialog")
        app.screen.query_one(Input).value = "ca"
        await pilot.press("enter")
        await until(pilot, lambda: app.open_key == contact_key("carol"), "carol open")
        await until(pilot, lambda: any("hi alice" in t for t in shown_texts(app)), "the text")
        compose = app.query_one(Compose)
        await until(pilot, lambda: compose.has_focus, "the compose box")
        await pilot.press("question_mark", "q")  # typed, not the help key or quit
        await pilot.pause(0.1)
        assert compose.text == "?q" and not isinstance(app.screen, HelpScreen)
        compose.clear()
        pasted = "\n".join(f"line {i} " + "x" * 90 for i in range(200))  # ~20 KB, 200 lines
        app.post_message(events.Paste(pasted))  # as the terminal driver delivers it
        await until(pilot, lambda: compose.text == pasted, "the paste, whole and not sent")
        assert not any("line 199" in t for t in shown_texts(app))
        compose.clear()

        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, InfoScreen), "the invitation")
        shown = text_of(app.screen.query_one("#info", Static))
        assert "aegis:" in shown or "://" in shown
        assert "▄" in shown and "█" in shown  # the QR code, drawn in text
        box = app.screen.query_one("#info-box")
        assert box.max_scroll_y > 0  # taller than 24 rows: it scrolls
        await pilot.press("down", "down")
        await until(pilot, lambda: box.scroll_y > 0, "the code scrolled")
        await pilot.press("escape")
        await pilot.press("escape")  # back to the list
        await until(pilot, lambda: app.focused is app.query_one("#convs"), "the list")
        await pilot.press("q")  # a conversation is open: a bare q does not quit
        await pilot.pause(0.1)
        assert app.is_running
        await pilot.press("ctrl+q")
        await until(pilot, lambda: not app.is_running, "quit")

    async def main() -> None:
        app = ChatApp(resolve(alice.home).socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, app.ready.is_set, "the client to load")
            await body(app, pilot)

    asyncio.run(main())


def test_a_locked_profile_asks_for_the_passphrase(tmp_short: Path) -> None:
    home = tmp_short / "locked"
    pf = tmp_short / "pass"
    pf.write_text(PASSPHRASE + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home),
         "--passphrase-file", str(pf), *FAST_KDF_ARGS],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    daemon = DaemonProc(home, [], None)
    daemon.wait_ready()

    async def main() -> None:
        app = ChatApp(resolve(home).socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, AskScreen), "the prompt")
            ask = app.screen.query_one(Input)
            assert ask.password  # not echoed
            assert "locked" in text_of(app.query_one("#status", Static))
            await pilot.press("escape")  # later: it stays locked until Ctrl+L
            await until(pilot, lambda: not isinstance(app.screen, AskScreen), "no prompt")
            assert "Ctrl+L" in text_of(app.query_one("#status", Static))
            await pilot.press("ctrl+l")
            await until(pilot, lambda: isinstance(app.screen, AskScreen), "the prompt again")
            await pilot.press(*"wrong passphrase")
            await pilot.press("enter")
            await until(
                pilot,
                lambda: "Wrong passphrase" in text_of(app.screen.query_one("#ask-prompt", Static)),
                "a second prompt",
            )
            app.screen.query_one(Input).value = PASSPHRASE
            await pilot.press("enter")
            await until(pilot, app.ready.is_set, "the client to load")
            with daemon.client() as c:
                assert c.call("status")["locked"] is False
            assert "locked" not in text_of(app.query_one("#status", Static))

    try:
        asyncio.run(main())
    finally:
        daemon.stop()


async def answer(app: ChatApp, pilot: Pilot[None], text: str) -> str:
    """Type ``text`` in the open dialog and press Enter; the dialog's prompt."""
    await until(pilot, lambda: isinstance(app.screen, AskScreen), "a dialog")
    dialog = app.screen
    prompt = text_of(dialog.query_one("#ask-prompt", Static))
    dialog.query_one(Input).value = text
    await pilot.press("enter")
    await until(pilot, lambda: app.screen is not dialog, "the dialog closed")
    return prompt


def test_add_verify_rename_block(peers: Callable[[str], Peer]) -> None:
    alice, bob, carol = peers("alice"), peers("bob"), peers("carol")
    connect(alice, bob)
    carol.wait_connected()

    def contact(name: str) -> dict[str, Any] | None:
        return next((c for c in alice.call("contacts.list")["contacts"] if c["name"] == name), None)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        link = (await call(carol, "invitations.create"))["link"]
        await pilot.press("ctrl+t")
        await answer(app, pilot, link)
        await answer(app, pilot, "carol")
        await until(pilot, lambda: contact_key("carol") in app.convs, "carol in the list")

        await app.open(contact_key("bob"))
        expected = (await call(alice, "contacts.safety_number", {"name": "bob"}))["formatted"]
        await pilot.press("ctrl+s")
        prompt = await answer(app, pilot, "yes")
        assert expected.split("\n")[0] in prompt
        await until(pilot, lambda: app.convs[contact_key("bob")].verified, "verified")
        assert (await asyncio.to_thread(contact, "bob") or {})["verified"] is True

        await pilot.press("f2")
        await answer(app, pilot, "robert")
        await until(pilot, lambda: contact_key("robert") in app.convs, "renamed")
        assert app.open_key == contact_key("robert")

        await pilot.press("ctrl+b")
        await answer(app, pilot, "yes")
        await until(pilot, lambda: app.convs[contact_key("robert")].blocked, "blocked")
        assert (await asyncio.to_thread(contact, "robert") or {})["blocked"] is True

    run_app(alice, body)


def test_typing_after_up_edits_nothing_and_does_not_quit(peers: Callable[[str], Peer]) -> None:
    alice, _bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await app.open(contact_key("bob"))
        compose = app.query_one(Compose)
        await until(pilot, lambda: compose.has_focus, "the compose box")
        await pilot.press(*"first")
        await pilot.press("enter")
        mine = await until(pilot, lambda: row_with(app, "first"), "my message")
        await pilot.press("up")
        await until(pilot, lambda: app.selected == mine.message_id, "the selection")
        await pilot.press(*"excellent quick")
        await pilot.pause(0.3)
        assert app.is_running and compose.has_focus
        assert compose.text == "excellent quick"
        assert app.editing is None and app.reply_to is None
        h = (await call(alice, "messages.history", {"contact": "bob"}))["messages"]
        assert [(m["text"], m["edited_at"]) for m in h] == [("first", None)]
        assert "edited" not in mine.plain
        await pilot.press("down")  # past the newest: no selection, arrows are the box's again
        await until(pilot, lambda: app.selected is None, "no selection")
        assert not compose.selecting
        app.select(mine.message_id)
        await app.open(contact_key("bob"))  # opened again: no selection left behind
        assert app.selected is None and not compose.selecting

    run_app(alice, body)


def test_search_with_the_daemon_stopped_keeps_the_client(peers: Callable[[str], Peer]) -> None:
    alice, _bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await asyncio.to_thread(alice.stop)
        status = app.query_one("#status", Static)
        await until(pilot, lambda: "daemon not running" in text_of(status), "the status line")
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen), "the search box")
        app.screen.query_one(Input).value = "lunch"
        await pilot.press("enter")
        note = app.screen.query_one("#search-note", Static)
        await until(pilot, lambda: "not searched" in text_of(note), "the error in the box")
        await pilot.pause(0.2)
        assert app.is_running and isinstance(app.screen, SearchScreen)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, SearchScreen), "closed")
        assert app.is_running

    run_app(alice, body)


def test_a_gone_or_edited_message_leaves_no_stale_quote(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)

    def alice_has(text: str) -> Callable[[], Any]:
        def find() -> Any:
            h = alice.call("messages.history", {"contact": "bob"})["messages"]
            return next((m for m in h if m["text"] == text), None)

        return find

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await call(bob, "conversations.set_timer", {"contact": "alice", "seconds": 8})
        secret = await call(bob, "messages.send", {"contact": "alice", "text": "secret plan"})
        await call(bob, "conversations.set_timer", {"contact": "alice", "seconds": 0})
        params = {"contact": "alice", "message_id": secret["message_id"], "text": "see above"}
        await call(bob, "messages.reply", params)
        await asyncio.to_thread(alice.wait_for, alice_has("see above"), "the reply", 60)
        # Opened: read, so its 8 s start; alice starts a reply to it meanwhile.
        await app.open(contact_key("bob"))
        reply = await until(pilot, lambda: row_with(app, "see above"), "the reply's row")
        assert "┃ secret plan" in reply.plain
        app.select(secret["message_id"])
        await pilot.press("alt+r")
        context = app.query_one("#context", Static)
        await until(pilot, lambda: "secret plan" in text_of(context), "the reply bar")
        await until(pilot, lambda: secret["message_id"] not in app.rows, "expired", 60)
        await pilot.pause(0.1)
        assert not any("secret plan" in t for t in shown_texts(app))
        assert "┃ (the quoted message is not here)" in reply.plain
        assert not context.display and app.reply_to is None
        await app.rebuild()  # as when an older page loads: the text does not come back
        assert not any("secret plan" in t for t in shown_texts(app))

        # An edit shows in the quotes on screen too.
        first = await call(bob, "messages.send", {"contact": "alice", "text": "at noon"})
        params = {"contact": "alice", "message_id": first["message_id"], "text": "ok?"}
        await call(bob, "messages.reply", params)
        again = await until(pilot, lambda: row_with(app, "ok?"), "the second reply", 60)
        assert "┃ at noon" in again.plain
        await call(bob, "messages.edit", {"message_id": first["message_id"], "text": "at one"})
        await until(pilot, lambda: "┃ at one" in again.plain, "the quote edited", 60)

    run_app(alice, body)


def test_unread_counts_do_not_double_after_a_reload(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        for i in range(3):
            await call(bob, "messages.send", {"contact": "alice", "text": f"queued {i}"})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 3, "3 unread", 60)
        # A reload (as on daemon.unlocked or a contact event), then the same events handed
        # out again (as after a resubscription from a cursor behind them): counted once.
        await app.load()
        assert app.convs[contact_key("bob")].unread == 3
        got = await call(alice, "events.list", {"types": ["message.received"]})
        assert len(got["events"]) == 3
        for e in got["events"]:
            await app.handle(Event.from_json(e))
        await pilot.pause(0.1)
        assert app.convs[contact_key("bob")].unread == 3
        row = item(app, "bob")
        assert row is not None and "bob (3)" in text_of(row.line)
        # A new message after the reload still counts.
        await call(bob, "messages.send", {"contact": "alice", "text": "one more"})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 4, "4 unread", 60)

    run_app(alice, body)


def test_text_put_back_after_a_failed_send_sends_no_typing_notice(
    peers: Callable[[str], Peer],
) -> None:
    alice, _bob = pair(peers)
    alice.call("typing.config", {"enabled": True})

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.typing_on, "typing indicators on")
        await app.open(contact_key("bob"))
        compose = app.query_one(Compose)
        too_big = "B" * 70_000  # over the daemon's limit: the send fails, the text comes back
        compose.insert(too_big)
        await until(pilot, lambda: app.typing_sent > 0, "the typed text's notice")
        app.typing_sent = 0.0
        await pilot.press("enter")
        await until(pilot, lambda: compose.text == too_big, "the text put back", 60)
        await pilot.pause(0.2)
        assert app.typing_sent == 0.0  # no notice for text the client put back
        await pilot.press("x")  # typed: a notice again
        await until(pilot, lambda: app.typing_sent > 0, "the notice for typing")

    run_app(alice, body)


def test_file_paths_as_in_a_shell() -> None:
    from aegis_cli.chat.app import _paths

    assert _paths("/tmp/one file.txt") == ["/tmp/one file.txt"]  # one, unquoted: whole
    assert _paths('"/tmp/a b" /tmp/c \'/tmp/d e\'') == ["/tmp/a b", "/tmp/c", "/tmp/d e"]
    assert _paths('"/tmp/unbalanced') == []


def test_hostile_quotes_captions_search_lines_and_group_names_are_inert(
    peers: Callable[[str], Peer], tmp_path: Path
) -> None:
    alice, bob = pair(peers)
    g = bob.call("group.create", {"name": "[b]crew[/b] [link=x]y[/link]"})["group"]
    bob.call("group.invite", {"group": g, "contact": "alice"})
    inv = alice.wait_for(lambda: alice.call("group.invitations")["invitations"], "the invitation")
    ag = alice.call("group.accept", {"invitation": inv[0]["invitation"]})["group"]
    bob.wait_for(
        lambda: len(bob.call("group.get", {"group": g})["members"]) == 2, "alice in the group"
    )
    evil = tmp_path / "evil.txt"
    evil.write_text("x\n")

    def clean(text: str) -> None:
        for ch in ("\x1b", "\x07", "\u202e", "\r"):
            assert ch not in text, repr(ch)

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        first = await call(bob, "messages.send", {"contact": "alice", "text": HOSTILE})
        params = {"contact": "alice", "message_id": first["message_id"], "text": "quoting"}
        await call(bob, "messages.reply", params)
        await call(bob, "attachments.send",
                   {"contact": "alice", "path": str(evil), "caption": HOSTILE})  # fmt: skip
        await call(bob, "group.send", {"group": g, "text": HOSTILE})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread >= 3, "bob's", 60)
        await until(pilot, lambda: app.convs.get(f"g:{ag}") and app.convs[f"g:{ag}"].unread,
                    "the group's", 60)  # fmt: skip
        group_row = app.items[f"g:{ag}"]
        assert "# [b]crew[/b] [link=x]" in text_of(group_row.line)  # as text (cut to fit)
        clean(text_of(group_row.line))
        await app.open(contact_key("bob"))
        reply = await until(pilot, lambda: row_with(app, "quoting"), "the reply")
        assert "┃ [bold]x[/]" in reply.plain  # the quote: as text, markup shown not obeyed
        clean(reply.plain)
        caption = await until(pilot, lambda: row_with(app, "[file] evil.txt"), "the file", 60)
        assert "[link=https://evil.example]" in caption.plain
        clean(caption.plain)
        texts = shown_texts(app)
        assert "<not Content" not in "".join(texts)
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen), "the search box")
        app.screen.query_one(Input).value = "forged"
        await pilot.press("enter")
        await until(pilot, lambda: len(app.screen.query(SearchHit)) >= 3, "the hits", 30)
        for hit in app.screen.query(SearchHit):
            shown = text_of(hit.query_one(Static))
            clean(shown)
            assert "\n" not in shown.split("\n", 1)[1]  # the text: one line under its header
        assert any("# [b]crew[/b]" in h.plain_line for h in app.screen.query(SearchHit))
        svg = app.export_screenshot()
        assert "\x1b" not in svg and "\u202e" not in svg

    run_app(alice, body)


def test_no_key_of_the_map_is_taken_by_the_text_boxes() -> None:
    from textual.widgets import TextArea

    def keys(bindings: Any) -> set[str]:
        return {k for b in bindings for k in b.key.split(",")}

    own = keys(TextArea.BINDINGS) | keys(Input.BINDINGS)
    ours = keys(ChatApp.BINDINGS)
    assert not ours & own, ours & own


def test_older_history_loads_at_the_top(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)
    for i in range(60):
        bob.call("messages.send", {"contact": "alice", "text": f"number {i}"})
    alice.wait_for(
        lambda: len(alice.call("messages.history", {"contact": "bob", "limit": 100})["messages"])
        == 60,
        "60 messages",
        60,
    )

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        conv = app.convs[contact_key("bob")]
        assert conv.unread == 60  # conversations.list counts them all
        assert "bob (60)" in text_of(app.items[contact_key("bob")].line)
        await app.open(contact_key("bob"))
        await pilot.pause(0.2)
        assert len(app.rows) == 50
        app.query_one(MessageLog).scroll_home(animate=False)
        await until(pilot, lambda: len(app.rows) == 60, "the older page")
        texts = [t.split("\n", 1)[1] for t in shown_texts(app)]
        assert texts == [f"number {i}" for i in range(60)]

    run_app(alice, body)


@pytest.mark.parametrize("where", ["handler", "worker"])
def test_an_unexpected_error_shows_no_locals(
    tmp_short: Path, capfd: pytest.CaptureFixture[str], where: str
) -> None:
    # No daemon: the client waits for one; a handler (or a worker, whose error Textual wraps)
    # fails with a secret in its frame. Textual's own report would print the frame's locals.
    async def main() -> ChatApp:
        app = ChatApp(tmp_short / "none.sock")

        def boom() -> None:
            secret = "the passphrase is hunter2"
            raise RuntimeError(len(secret))

        async def boom_later() -> None:
            boom()

        with pytest.raises((RuntimeError, WorkerFailed)):
            async with app.run_test(size=(80, 24)) as pilot:
                status = app.query_one("#status", Static)
                await until(pilot, lambda: "daemon not running" in text_of(status), "status")
                if where == "worker":
                    app.run_worker(boom_later())
                else:
                    app.call_later(boom)
                for _ in range(200):  # until the app stops (it ends this block)
                    await pilot.pause(0.05)
        return app

    app = asyncio.run(main())
    assert app.failure is not None and "RuntimeError" in app.failure
    assert "test_chat_tui.py" in app.failure
    err = capfd.readouterr().err
    assert "hunter2" not in err and "hunter2" not in app.failure


def test_send_a_file_with_progress_and_save_one(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = pair(peers)
    src = tmp_short / "report.bin"
    src.write_bytes(bytes(range(256)) * 1200)  # 300 KB: several blocks
    second = tmp_short / "notes.txt"
    second.write_text("two files in one send\n")
    out = tmp_short / "saved"
    out.mkdir()

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await app.open(contact_key("bob"))
        await pilot.press("ctrl+f")
        await answer(app, pilot, f'"{src}" "{second}"')  # two files in one send
        await answer(app, pilot, "the [b]report[/b]")  # a caption, with the first
        row = await until(
            pilot, lambda: next((r for r in app.query(MessageRow) if "report.bin" in r.plain),
                                None), "the file's message")  # fmt: skip
        await until(pilot, lambda: row.transfer == "complete", "the upload", 60)

        def bob_has_it() -> Any:
            files = bob.call("attachments.list", {})["attachments"]
            return [f for f in files if f["name"] == "report.bin" and f["state"] == "complete"]

        got = await asyncio.to_thread(bob.wait_for, bob_has_it, "the file at bob", 60)
        assert got[0]["caption"] == "the [b]report[/b]"
        assert "the [b]report[/b]" in row.plain

        def notes_at_bob() -> Any:
            files = bob.call("attachments.list", {})["attachments"]
            return [f for f in files if f["name"] == "notes.txt" and f["state"] == "complete"]

        await asyncio.to_thread(bob.wait_for, notes_at_bob, "the second file at bob", 60)
        # One send: the sender's rows share the batch (the receiver may list the uncaptioned
        # file as sent alone: docs/api.md attachments.send_batch).
        sent = (await call(alice, "attachments.list", {}))["attachments"]
        assert len({f["batch_id"] for f in sent}) == 1 and sent[0]["batch_id"] is not None
        assert sorted(f["name"] for f in sent) == ["notes.txt", "report.bin"]
        assert any("[file] notes.txt" in t for t in shown_texts(app))

        # Bob sends one back; alice saves it from the client.
        back = tmp_short / "back.txt"
        back.write_text("from bob\n")
        await call(bob, "attachments.send", {"contact": "alice", "path": str(back)})
        await until(pilot, lambda: any("[file] back.txt" in t for t in shown_texts(app)), "file")
        incoming = next(r for r in app.query(MessageRow) if "back.txt" in r.plain)
        await until(pilot, lambda: incoming.transfer == "complete", "the download", 60)
        await pilot.press("f4")
        await answer(app, pilot, "")  # Enter: the newest
        await answer(app, pilot, str(out))
        await until(pilot, lambda: (out / "back.txt").exists(), "the saved file")
        assert (out / "back.txt").read_text() == "from bob\n"

    run_app(alice, body)


def test_incoming_call_answer_then_hang_up_and_decline(
    tmp_short: Path, relay_proc: RelayProcess, sound: PulseAudio
) -> None:
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    people: list[Peer] = []
    try:
        for name in ("alice", "bob"):
            p = Peer(tmp_short / name, url, name)
            people.append(p)
            p.stop()  # again with the test PulseAudio as microphone and speaker
            p.proc = DaemonProc(p.home, [], sound.daemon_env(name))
            p.proc.wait_ready()
            p.call("calls.configure", {"host_candidates": "loopback"})
        alice, bob = people
        connect(alice, bob)

        async def body(app: ChatApp, pilot: Pilot[None]) -> None:
            status = app.query_one("#status", Static)
            first = (await call(bob, "calls.start", {"contact": "alice"}))["call_id"]
            await until(pilot, lambda: isinstance(app.screen, CallScreen), "the call", 60)
            await pilot.press("a", "n", "d")  # typing on: letters do not answer or decline
            assert isinstance(app.screen, CallScreen)
            await pilot.press("f7")
            await until(pilot, lambda: "call with bob: active" in text_of(status), "active", 60)
            await pilot.press("f8")
            await until(pilot, lambda: app.call is None, "the end", 60)
            calls = (await call(alice, "calls.history", {"limit": 1}))["calls"]
            assert (calls[0]["call_id"], calls[0]["reason"]) == (first, "hangup")

            second = (await call(bob, "calls.start", {"contact": "alice"}))["call_id"]
            await until(pilot, lambda: isinstance(app.screen, CallScreen), "the 2nd call", 60)
            await pilot.press("f9")
            await until(pilot, lambda: app.call is None, "declined", 60)
            calls = (await call(alice, "calls.history", {"limit": 1}))["calls"]
            assert calls[0]["call_id"] == second and calls[0]["answered_at"] is None

        run_app(alice, body)
    finally:
        for p in people:
            p.stop()


def test_a_group_in_the_list_live_and_sent(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = pair(peers)
    g = alice.call("group.create", {"name": "[b]team[/b]"})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    inv = bob.wait_for(lambda: bob.call("group.invitations")["invitations"], "an invitation")
    bg = bob.call("group.accept", {"invitation": inv[0]["invitation"]})["group"]
    alice.wait_for(
        lambda: len(alice.call("group.get", {"group": g})["members"]) == 2, "bob in the group"
    )
    key = f"g:{g}"

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        assert key in app.convs
        await call(bob, "group.send", {"group": bg, "text": "hi team"})
        await until(pilot, lambda: app.convs[key].unread == 1, "the group's unread count", 60)
        line = text_of(app.items[key].line)
        assert "# [b]team[/b] (1)" in line and "hi team" in line
        await app.open(key)
        await until(pilot, lambda: app.convs[key].unread == 0, "read")
        assert any("bob" in t and "hi team" in t for t in shown_texts(app))
        await pilot.press(*"hello bob")
        await pilot.press("enter")

        def bob_has_it() -> Any:
            h = bob.call("group.history", {"group": bg})["messages"]
            return [m for m in h if m["text"] == "hello bob"]

        await asyncio.to_thread(bob.wait_for, bob_has_it, "the group message at bob", 60)

        # F4 lists the group's received files as attachments.list has them: a text that
        # reads like a file is not one.
        real = tmp_short / "real.txt"
        real.write_text("a group file\n")
        await call(bob, "group.send", {"group": bg, "text": "[file] fake.txt"})
        await call(bob, "group.send_file", {"group": bg, "path": str(real)})

        def alice_has_it() -> Any:
            files = alice.call("attachments.list", {})["attachments"]
            return [f for f in files if f["name"] == "real.txt" and f["state"] == "complete"]

        await asyncio.to_thread(alice.wait_for, alice_has_it, "the group file at alice", 60)
        await until(pilot, lambda: row_with(app, "fake.txt") and row_with(app, "real.txt"), "both")
        await pilot.press("f4")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the files")
        prompt = text_of(app.screen.query_one("#ask-prompt", Static))
        assert "  1 real.txt" in prompt and "complete" in prompt and "fake" not in prompt
        await pilot.press("escape")

    run_app(alice, body)


def test_the_command_without_a_terminal_or_a_daemon(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    def chat(home: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "chat", "--home", str(home)],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    r = chat(tmp_short / "nobody")
    assert r.returncode != 0 and "aegis init" in r.stderr and len(r.stderr.splitlines()) == 1
    alice = peers("alice")
    r = chat(alice.home)
    assert r.returncode != 0 and "needs a terminal" in r.stderr
    assert "\x1b" not in r.stdout  # nothing drawn


def row_with(app: ChatApp, text: str) -> MessageRow | None:
    return next((r for r in app.query(MessageRow) if text in r.plain), None)


def test_reply_react_edit_delete_timer_search_and_typing(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)
    for p in (alice, bob):
        p.call("typing.config", {"enabled": True})
    # contact.typing is live (never stored): bob's client listens from the start, as a
    # frontend would, to hear the first "typing" of alice's (her reply below).
    heard = bob.live(["contact.typing"])

    def bob_msg(text: str) -> Callable[[], Any]:
        def find() -> Any:
            h = bob.call("messages.history", {"contact": "alice"})["messages"]
            return next((m for m in h if m["text"] == text), None)

        return find

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.typing_on, "typing indicators on")
        q = await call(bob, "messages.send", {"contact": "alice", "text": "lunch at one?"})
        await until(pilot, lambda: app.convs[contact_key("bob")].unread == 1, "the question")
        await app.open(contact_key("bob"))
        compose = app.query_one(Compose)
        await until(pilot, lambda: compose.has_focus, "the compose box")

        # Reply: Up from the empty box selects the newest message, Alt+R quotes it.
        await pilot.press("up")
        await until(pilot, lambda: app.selected == q["message_id"], "the selection")
        await pilot.press("alt+r")
        context = app.query_one("#context", Static)
        await until(pilot, lambda: "lunch at one?" in text_of(context), "the quote bar")
        await pilot.press(*"yes")
        await pilot.press("enter")
        got = await asyncio.to_thread(bob.wait_for, bob_msg("yes"), "the reply at bob", 60)
        assert got["reply_to"] == {"message_id": q["message_id"], "text": "lunch at one?"}
        mine = app.rows[got["message_id"]]
        assert "┃ lunch at one?" in mine.plain and not context.display

        # Bob reacts to the reply: it shows live, with its count; alice adds hers (picker: 1).
        await call(bob, "messages.react", {"message_id": got["message_id"], "emoji": "👍"})
        await until(pilot, lambda: "👍 1" in mine.plain, "bob's reaction", 60)
        app.select(got["message_id"])
        await pilot.press("alt+equals_sign")
        await answer(app, pilot, "1")
        await until(pilot, lambda: "👍 2 (you)" in mine.plain, "two reactions")
        h = (await call(alice, "messages.history", {"contact": "bob"}))["messages"]
        assert next(m for m in h if m["message_id"] == got["message_id"])["reactions"] == [
            {"emoji": "👍", "count": 2, "mine": True}
        ]

        # Alice edits her reply (Alt+E); bob sees the new text marked edited.
        await pilot.press("alt+e")
        await until(pilot, lambda: compose.text == "yes" and compose.has_focus, "edit mode")
        compose.clear()
        compose.insert("yes, at one")
        await pilot.press("enter")
        await until(pilot, lambda: "edited" in mine.plain and "yes, at one" in mine.plain, "ed")
        edited = await asyncio.to_thread(bob.wait_for, bob_msg("yes, at one"), "the edit", 60)
        assert edited["edited_at"] is not None

        # Bob's reply to it arrives live with its quote.
        params = {"contact": "alice", "message_id": got["message_id"], "text": "great"}
        await call(bob, "messages.reply", params)
        back = await until(pilot, lambda: row_with(app, "great"), "bob's reply", 60)
        assert "┃ yes, at one" in back.plain

        # Bob edits, then deletes for everyone: both show live.
        oops = await call(bob, "messages.send", {"contact": "alice", "text": "meet at two"})
        await until(pilot, lambda: oops["message_id"] in app.rows, "bob's text", 60)
        theirs = app.rows[oops["message_id"]]
        await call(bob, "messages.edit", {"message_id": oops["message_id"], "text": "at 3"})
        await until(pilot, lambda: "at 3" in theirs.plain and "edited" in theirs.plain, "edit")
        await call(bob, "messages.delete",
                   {"message_id": oops["message_id"], "for_everyone": True})  # fmt: skip
        await until(pilot, lambda: "(deleted)" in theirs.plain, "blanked", 60)
        assert "at 3" not in theirs.plain

        # Alice deletes her own reply for everyone: a click selects it, x (confirmed).
        app.select(None)
        app.query_one(MessageLog).scroll_to_widget(mine, animate=False)
        await pilot.pause()
        await pilot.click(mine.head)
        await until(pilot, lambda: app.selected == got["message_id"], "selected by a click")
        assert compose.has_focus  # a click selects; the compose box keeps the focus
        await pilot.press("alt+x")
        await answer(app, pilot, "everyone")
        await until(pilot, lambda: "(deleted)" in mine.plain, "deleted here")
        assert "┃ (the quoted message is not here)" in back.plain  # its quote went too
        await asyncio.to_thread(
            bob.wait_for, lambda: (bob_msg("")() or {}).get("deleted"), "deleted at bob", 60
        )

        # Alice deletes bob's reply for herself only: gone here, from her history too.
        app.select(back.message_id)
        app.query_one(MessageLog).focus()
        await pilot.press("up")  # Up / Down move the selection through the messages
        await until(pilot, lambda: app.selected == got["message_id"], "the one above")
        await pilot.press("down")
        await until(pilot, lambda: app.selected == back.message_id, "back down")
        await pilot.press("delete")
        prompt = await answer(app, pilot, "me")
        assert "everyone" not in prompt  # not hers: for her only
        await until(pilot, lambda: row_with(app, "great") is None, "gone from view")
        h = (await call(alice, "messages.history", {"contact": "bob"}))["messages"]
        assert back.message_id not in {m["message_id"] for m in h}

        # The disappearing timer, from F5: bob's daemon has it; the header and a line show it.
        await pilot.press("f5")
        await answer(app, pilot, "2")
        timer = await asyncio.to_thread(
            bob.wait_for,
            lambda: bob.call("conversations.get_timer", {"contact": "alice"})["seconds"] == 3600,
            "the timer at bob", 60,
        )  # fmt: skip
        assert timer
        title = app.query_one("#title", Static)
        await until(pilot, lambda: "⏱ 1 hour" in text_of(title), "the timer in the header")
        await until(pilot, lambda: row_with(app, "set disappearing messages: 1 hour"), "line")
        # Bob makes it 2 s: his next message shows its deadline, then goes from view.
        await call(bob, "conversations.set_timer", {"contact": "alice", "seconds": 2})
        await until(pilot, lambda: "⏱ 2 seconds" in text_of(title), "bob's timer, live", 60)
        brief = await call(bob, "messages.send", {"contact": "alice", "text": "gone soon"})
        await until(pilot, lambda: brief["message_id"] in app.rows, "the brief one", 60)
        assert "⏱" in app.rows[brief["message_id"]].plain
        await until(pilot, lambda: row_with(app, "gone soon") is None, "it expired", 90)
        assert brief["message_id"] not in app.rows
        await call(bob, "conversations.set_timer", {"contact": "alice", "seconds": 0})
        await until(pilot, lambda: "⏱" not in text_of(title), "the timer off, live", 60)

        # Typing: bob types, alice's header says so; alice types, bob's client hears it (her
        # first "typing", at the reply above: these keys may fall within its 5 s).
        await call(bob, "messages.typing", {"contact": "alice", "typing": True})
        await until(pilot, lambda: "bob is typing…" in text_of(title), "bob typing", 60)
        app.query_one(Compose).focus()
        await pilot.press(*"hm")

        def bob_heard() -> Any:
            return [d for d in heard.data() if d["typing"]]

        await asyncio.to_thread(bob.wait_for, bob_heard, "alice typing at bob", 60)
        compose.clear()

        # Search: F3, a word, Enter; Enter on the hit opens the conversation at the message.
        await app.open(contact_key("bob"))
        app.query_one("#convs").focus()
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen), "the search box")
        app.screen.query_one(Input).value = "lunch"
        await pilot.press("enter")
        await until(pilot, lambda: len(app.screen.query(SearchHit)) == 1, "one hit")
        assert "bob" in app.screen.query_one(SearchHit).plain_line
        await pilot.press("enter")
        await until(pilot, lambda: app.selected == q["message_id"], "the hit selected")
        assert app.open_key == contact_key("bob")

    run_app(alice, body)


def notes(app: ChatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def test_groups_managed_from_the_client(peers: Callable[[str], Peer]) -> None:
    alice, bob = pair(peers)
    trips = bob.call("group.create", {"name": "Trips"})["group"]
    bob.call("group.invite", {"group": trips, "contact": "alice"})

    def bobs_group(name: str) -> Callable[[], Any]:
        def find() -> Any:
            groups = bob.call("group.list")["groups"]
            return next((g for g in groups if g["name"] == name), None)

        return find

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        # Bob's invitation: counted in the status line, accepted with Ctrl+R.
        status = app.query_one("#status", Static)
        await until(pilot, lambda: "1 group invitation" in text_of(status), "the invitation", 60)
        await pilot.press("ctrl+r")
        prompt = await answer(app, pilot, "yes")
        assert "Trips" in prompt and "bob" in prompt
        await asyncio.to_thread(
            bob.wait_for,
            lambda: len(bob.call("group.get", {"group": trips})["members"]) == 2,
            "alice in bob's group", 60,
        )  # fmt: skip

        # A contact's conversation open and a group highlighted: Alt+G shows that group.
        # "new" without a name, or a member number in other digits, is a note (no crash).
        await until(pilot, lambda: "g:" in "".join(app.items), "the group listed")
        await app.open(contact_key("bob"))
        lv = app.query_one("#convs", ListView)
        keys = [i.conv.key for i in lv.query(ConversationItem)]
        lv.index = next(i for i, k in enumerate(keys) if k.startswith("g:"))
        await pilot.press("alt+g")
        prompt = await answer(app, pilot, "new")
        assert "Group “Trips”" in prompt and "bob (owner)" in prompt
        prompt = await answer(app, pilot, "remove ²")
        assert "new NAME: the name of the new group." in prompt
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the group again")
        assert "remove N: a member's number" in text_of(app.screen.query_one("#ask-prompt", Static))
        await pilot.press("escape")
        assert app.is_running

        # Any other error in an action is a note naming its type only; the client goes on.
        async def broken() -> None:
            raise ValueError("the text typed")

        app.act(broken())
        await until(pilot, lambda: "not done: an unexpected ValueError" in notes(app), "note")
        assert app.is_running and not any("the text typed" in n for n in notes(app))

        # A new group from the client (Alt+G with no group open nor highlighted), bob invited
        # from the list.
        keys = [i.conv.key for i in lv.query(ConversationItem)]
        lv.index = keys.index(contact_key("bob"))
        await pilot.press("alt+g")
        await answer(app, pilot, "Book club")
        key = await until(pilot, lambda: app.open_key if app.open_key != contact_key("bob")
                          else None, "the new group open")  # fmt: skip
        ref = app.convs[key].group
        assert ref is not None and app.convs[key].name == "Book club"
        prompt = await answer(app, pilot, "invite bob")
        assert "me (owner)" in prompt and "Contacts to invite: bob" in prompt
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the group again")
        assert "Invited “bob”" in text_of(app.screen.query_one("#ask-prompt", Static))
        await pilot.press("escape")
        inv = await asyncio.to_thread(
            bob.wait_for, lambda: bob.call("group.invitations")["invitations"], "bob's", 60
        )
        assert inv[0]["name"] == "Book club"
        await call(bob, "group.accept", {"invitation": inv[0]["invitation"]})
        members = await asyncio.to_thread(
            alice.wait_for,
            lambda: [m for m in alice.call("group.get", {"group": ref})["members"]
                     if m["contact"] == "bob"],
            "bob in the group", 60,
        )  # fmt: skip
        order = (await call(alice, "group.get", {"group": ref}))["members"]
        n = 1 + next(i for i, m in enumerate(order) if m["contact"] == "bob")
        assert members

        # Members and roles shown; bob made admin, then removed; bob's daemon sees both.
        await pilot.press("alt+g")
        prompt = await answer(app, pilot, f"admin {n}")
        assert f"{n} bob (member)" in prompt
        prompt = await answer(app, pilot, "yes")  # asked first, naming the member
        assert "Make admin: “bob”?" in prompt
        theirs = await asyncio.to_thread(bob.wait_for, bobs_group("Book club"), "bob's copy", 60)
        await asyncio.to_thread(
            bob.wait_for,
            lambda: bob.call("group.get", {"group": theirs["group"]})["role"] == "admin",
            "bob made admin", 60,
        )  # fmt: skip
        prompt = await answer(app, pilot, f"remove {n}")
        assert f"{n} bob (admin)" in prompt
        prompt = await answer(app, pilot, "yes")
        assert "Remove “bob”?" in prompt
        await asyncio.to_thread(
            bob.wait_for,
            lambda: not bob.call("group.list")["groups"][-1]["member"]
            or bob.call("group.get", {"group": theirs["group"]})["role"] is None,
            "bob removed", 60,
        )  # fmt: skip
        prompt = await answer(app, pilot, "leave")
        assert "bob" not in prompt.split("\n", 2)[1]  # the member list: only me now
        await answer(app, pilot, "yes")
        await until(pilot, lambda: key not in app.convs and app.open_key is None, "left")
        assert "Left the group “Book club”." in notes(app)

    run_app(alice, body)


def test_a_call_started_from_the_client_rings_and_hangs_up(
    tmp_short: Path, relay_proc: RelayProcess, sound: PulseAudio
) -> None:
    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    people: list[Peer] = []
    try:
        for name in ("alice", "bob"):
            p = Peer(tmp_short / name, url, name)
            people.append(p)
            p.stop()  # again with the test PulseAudio as microphone and speaker
            p.proc = DaemonProc(p.home, [], sound.daemon_env(name))
            p.proc.wait_ready()
            p.call("calls.configure", {"host_candidates": "loopback"})
        alice, bob = people
        connect(alice, bob)

        async def body(app: ChatApp, pilot: Pilot[None]) -> None:
            status = app.query_one("#status", Static)
            await app.open(contact_key("bob"))
            # Ctrl+P pressed in the middle of a sentence: the rest of it places no call.
            await pilot.press("ctrl+p")
            prompt = await answer(app, pilot, "see you later")
            assert "Call “bob”" in prompt
            await until(pilot, lambda: "No call." in notes(app), "no call")
            assert app.call is None and (await call(alice, "calls.list"))["calls"] == []
            await pilot.press("ctrl+p")
            await answer(app, pilot, "voice")
            await until(pilot, lambda: "call with bob: ringing" in text_of(status), "ring", 60)
            ringing = await asyncio.to_thread(
                bob.wait_for, lambda: bob.call("calls.list")["calls"], "the call at bob", 60
            )
            assert ringing[0]["state"] == "ringing" and ringing[0]["contact"] == "alice"
            assert not ringing[0]["video"]
            await pilot.press("f8")
            await until(pilot, lambda: app.call is None, "the end", 60)
            await asyncio.to_thread(
                bob.wait_for, lambda: not bob.call("calls.list")["calls"], "ended at bob", 60
            )
            calls = (await call(alice, "calls.history", {"limit": 1}))["calls"]
            assert calls[0]["direction"] == "out" and calls[0]["answered_at"] is None

            # Answering, with the relays reached through a proxy: the IP address consent, then
            # the answer (calls.accept with reveal_ip).
            await call(bob, "calls.start", {"contact": "alice"})
            await until(pilot, lambda: isinstance(app.screen, CallScreen), "bob's call", 60)
            await call(alice, "network.set", {"proxy": DEAD_PROXY})
            await pilot.press("f7")
            prompt = await answer(app, pilot, "yes")
            assert "Answering would show your IP address" in prompt
            await until(pilot, lambda: "call with bob: connecting" in text_of(status), "ans", 60)
            await pilot.press("f8")
            await until(pilot, lambda: app.call is None, "hung up", 60)

            # Calling out that way asks the same; the call starts (its INVITE waits).
            await pilot.press("ctrl+p")
            await answer(app, pilot, "video")
            prompt = await answer(app, pilot, "yes")
            assert "This call would show your IP address" in prompt
            await until(pilot, lambda: app.call is not None, "calling", 60)
            assert (await call(alice, "calls.list"))["calls"][0]["video"] is True

            # The daemon killed mid-call sends no "ended": after the reconnect the client asks
            # the daemon (calls.list), and the call it remembered is gone.
            subs = app.subscriptions
            await asyncio.to_thread(alice.kill)
            alice.proc = DaemonProc(alice.home, [], sound.daemon_env("alice"))
            await asyncio.to_thread(alice.proc.wait_ready)
            await until(pilot, lambda: app.subscriptions > subs, "reconnected", 60)
            await until(pilot, lambda: app.call is None, "no call after the restart")
            assert "call with" not in text_of(status)

        run_app(alice, body)
    finally:
        for p in people:
            p.stop()


def test_older_file_saved_settings_daemon_gone_mid_open_and_contact_removed(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = pair(peers)
    for name in ("first.txt", "second.txt"):
        (tmp_short / name).write_text(f"{name} from bob\n")
        bob.call("attachments.send", {"contact": "alice", "path": str(tmp_short / name)})
    alice.wait_for(
        lambda: [a["state"] for a in alice.call("attachments.list")["attachments"]]
        == ["complete", "complete"],
        "both files at alice", 60,
    )  # fmt: skip
    out = tmp_short / "saved"
    out.mkdir()

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        # F4 lists every received file; the older one (1) is saved where asked.
        await app.open(contact_key("bob"))
        await pilot.press("f4")
        prompt = await answer(app, pilot, "1")
        assert "1 first.txt" in prompt and "2 second.txt" in prompt and "complete" in prompt
        await answer(app, pilot, str(out))
        await until(pilot, lambda: (out / "first.txt").exists(), "the older file saved")
        assert (out / "first.txt").read_text() == "first.txt from bob\n"
        assert not (out / "second.txt").exists()
        await until(pilot, lambda: any(n.startswith("Saved as") for n in notes(app)), "note")

        # F12: typing indicators on, new conversations' timer 1 day; the daemon has both.
        await pilot.press("f12")
        prompt = await answer(app, pilot, "1")
        assert "typing indicators: off" in prompt
        prompt = await answer(app, pilot, "2")
        assert "typing indicators: on" in prompt and app.typing_on
        await answer(app, pilot, "3")
        prompt = await answer(app, pilot, "")
        assert "new conversations: 1 day" in prompt
        assert (await call(alice, "typing.config"))["enabled"] is True
        assert (await call(alice, "settings.get"))["disappearing_default"] == 86400

        # The daemon stops; opening the conversation then, and a dialog's action, are notes.
        app.typing.add("bob")  # shown "typing": its live "stopped" is lost while away
        await asyncio.to_thread(alice.stop)
        lv = app.query_one("#convs")
        lv.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any("daemon not reachable" in n for n in notes(app)), "nr")
        # The conversation open before stays, its messages too (not an empty view).
        assert app.open_key == contact_key("bob") and row_with(app, "first.txt") is not None
        app.clear_notifications()
        await pilot.press("f12")
        await until(pilot, lambda: any("daemon not reachable" in n for n in notes(app)), "nr2")
        assert app.is_running
        subs = app.subscriptions
        await asyncio.to_thread(alice.start)
        await until(pilot, lambda: app.subscriptions > subs, "reconnected", 60)
        await app.open(contact_key("bob"))
        assert app.typing == set() and "typing…" not in text_of(app.query_one("#title", Static))
        assert any("first.txt" in t for t in shown_texts(app))

        # Alt+D removes the contact (asked first): gone from the daemon and the list. Over its
        # question the keys that reach the app past a dialog (priority bindings) do nothing:
        # no dialog over it (Alt+G, Alt+X, Alt+D), no reply set, the hidden draft kept (Alt+E).
        app.select(app.selectable()[-1])
        compose = app.query_one(Compose)
        compose.insert("a draft")
        await pilot.press("alt+d")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the question")
        dialog = app.screen
        def actions() -> set[object]:  # the user's actions only: typing sends go on
            return {w for w in app.workers if w.group == ACTION_WORKERS}

        workers = actions()
        await pilot.press("alt+g", "alt+x", "alt+e", "alt+r", "alt+equals_sign", "alt+d")
        assert actions() == workers  # none started: each would be a dialog or a call
        assert app.screen is dialog
        assert app.reply_to is None and app.editing is None and compose.text == "a draft"
        assert dialog.query_one(Input).value == ""
        prompt = await answer(app, pilot, "no")
        assert "Remove “bob”" in prompt
        assert contact_key("bob") in app.convs
        await pilot.press("alt+d")
        await answer(app, pilot, "yes")
        await until(pilot, lambda: contact_key("bob") not in app.convs, "bob gone")
        assert app.open_key is None
        assert (await call(alice, "contacts.list"))["contacts"] == []

    run_app(alice, body)


_SVG_TEXT = re.compile(
    r'<text [^>]*?x="([\d.]+)"[^>]*?clip-path="url\(#[\w-]+-line-(\d+)\)"[^>]*>(.*?)</text>'
)


#: The width of a cell in Textual's SVG export (pixels).
CELL = 12.2


def svg_rows(svg: str) -> list[str]:
    """The text of a Textual SVG screenshot, one string per terminal row: each run of text at
    its column (x over the cell width), blank cells as spaces; empty rows left out."""
    rows: dict[int, list[tuple[int, str]]] = {}
    for m in _SVG_TEXT.finditer(svg):
        text = html.unescape(m[3]).replace("\xa0", " ").rstrip("\n")
        rows.setdefault(int(m[2]), []).append((round(float(m[1]) / CELL), text))
    out = []
    for _, parts in sorted(rows.items()):
        line = ""
        for col, text in sorted(parts):
            line += " " * max(0, col - cell_len(line)) + text
        if line.strip():
            out.append(line.rstrip())
    return out


def test_screenshots_of_the_main_screens_at_80x24(peers: Callable[[str], Peer]) -> None:
    """The main screen, the key map and a dialog as Textual's SVG export draws them at 80x24,
    read back as text. AEGIS_CHAT_SVG=PATH also writes the main screen there (docs/chat.svg,
    README.md "Chat in the terminal", is made so)."""
    alice, bob = pair(peers)
    for p in (alice, bob):
        p.call("typing.config", {"enabled": True})
    g = alice.call("group.create", {"name": "Book club"})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    inv = bob.wait_for(lambda: bob.call("group.invitations")["invitations"], "an invitation")
    bg = bob.call("group.accept", {"invitation": inv[0]["invitation"]})["group"]
    alice.wait_for(
        lambda: len(alice.call("group.get", {"group": g})["members"]) == 2, "bob in the group"
    )
    bob.call("group.send", {"group": bg, "text": "Next month: The Dispossessed"})
    q = bob.call("messages.send", {"contact": "alice", "text": "Are we still on for Saturday?"})
    alice.wait_for(
        lambda: len(alice.call("messages.history", {"contact": "bob"})["messages"]) == 1, "it"
    )

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.convs[f"g:{g}"].unread == 1, "the group's message", 60)
        await app.open(contact_key("bob"))
        app.select(q["message_id"])
        await pilot.press("alt+r")
        await pilot.press(*"Yes, 10 am at the station")
        await pilot.press("enter")
        await until(pilot, lambda: len(app.rows) == 2, "the reply")
        mine = next(r for r in app.query(MessageRow) if "station" in r.plain)
        await until(pilot, lambda: mine.msg["status"] in ("delivered", "read"), "delivered", 60)
        await call(bob, "messages.react", {"message_id": mine.message_id, "emoji": "👍"})
        await until(pilot, lambda: "👍 1" in mine.plain, "the reaction", 60)
        await call(bob, "messages.typing", {"contact": "alice", "typing": True})
        title = app.query_one("#title", Static)
        await until(pilot, lambda: "bob is typing…" in text_of(title), "bob typing", 60)
        await pilot.pause(0.1)

        svg = app.export_screenshot(title="aegis chat")
        rows = svg_rows(svg)
        assert len(rows) <= 24 and all(cell_len(r) <= 80 for r in rows)
        screen = "\n".join(rows)
        assert rows[0].startswith("bob ") and "│ bob · bob is typing…" in rows[0]
        assert "# Book club (1)" in screen and "Next month: The Dispossessed" in screen
        assert "Are we still on for Saturday?" in screen and "Yes, 10 am at the station" in screen
        assert "┃ Are we still on for Saturday?" in screen and "👍 1" in screen
        assert "Enter sends · Ctrl+N new line · F1 keys" in screen
        assert rows[-1].strip().startswith("relay connected") and "F1 keys" in rows[-1]
        assert "aegis:" not in svg and str(alice.home) not in svg  # no link or path in it
        assert "://" not in screen
        if os.environ.get("AEGIS_CHAT_SVG"):
            Path(os.environ["AEGIS_CHAT_SVG"]).write_text(svg)

        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the key map")
        await pilot.pause(0.1)
        helptext = "\n".join(svg_rows(app.export_screenshot()))
        assert "│ Keys (Esc closes; arrows scroll)" in helptext  # a box over the main screen
        assert "│ F1 or ?                 this help" in helptext and "Alt+R" in helptext
        await pilot.press("escape")

        await pilot.press("alt+g")  # the open conversation is a contact's: a new group
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the dialog")
        await pilot.pause(0.1)
        dialog = "\n".join(svg_rows(app.export_screenshot()))
        assert "A new group: its name (Esc: none)" in dialog
        await pilot.press("escape")
        await app.open(f"g:{g}")
        assert "# Book club · members (Alt+G)" in text_of(app.query_one("#title", Static))
        await pilot.press("alt+g")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the group")
        await pilot.pause(0.1)
        dialog = "\n".join(svg_rows(app.export_screenshot()))
        assert "Group “Book club” · you: owner" in dialog
        assert "me (owner)" in dialog and "bob (member)" in dialog
        assert "invite NAME · remove N" in dialog
        await pilot.press("escape")

    run_app(alice, body, size=(80, 24))


def group_of_two(alice: Peer, bob: Peer, name: str) -> tuple[int, int]:
    """A group alice made with bob in it: (alice's reference, bob's)."""
    g = alice.call("group.create", {"name": name})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    inv = bob.wait_for(lambda: bob.call("group.invitations")["invitations"], "an invitation")
    bg = bob.call("group.accept", {"invitation": inv[0]["invitation"]})["group"]
    alice.wait_for(
        lambda: len(alice.call("group.get", {"group": g})["members"]) == 2, "bob in the group"
    )
    return g, bg


def test_reply_react_edit_delete_timer_and_caption_in_a_group(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = pair(peers)
    g, bg = group_of_two(alice, bob, "Trips")
    key = f"g:{g}"

    def bob_msg(text: str) -> Callable[[], Any]:
        def find() -> Any:
            h = bob.call("group.history", {"group": bg})["messages"]
            return next((m for m in h if m["text"] == text), None)

        return find

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        q = await call(bob, "group.send", {"group": bg, "text": "plans?"})
        await until(pilot, lambda: app.convs[key].unread == 1, "bob's question", 60)
        await app.open(key)
        compose = app.query_one(Compose)
        await until(pilot, lambda: compose.has_focus, "the compose box")

        # Reply (Up selects the newest, Alt+R quotes it): bob's copy quotes his message.
        await pilot.press("up")
        await until(pilot, lambda: app.selected is not None, "the selection")
        await pilot.press("alt+r")
        context = app.query_one("#context", Static)
        await until(pilot, lambda: "plans?" in text_of(context), "the quote bar")
        await pilot.press(*"sure")
        await pilot.press("enter")
        got = await asyncio.to_thread(bob.wait_for, bob_msg("sure"), "the reply at bob", 60)
        assert got["reply_to"] == {"message_id": q["message_id"], "text": "plans?"}
        mine = await until(pilot, lambda: row_with(app, "sure"), "my reply")
        assert "┃ plans?" in mine.plain and not context.display

        # Bob reacts to it: live here; alice adds hers (picker: 1): bob counts two.
        await call(bob, "messages.react",
                   {"group": bg, "message_id": got["message_id"], "emoji": "👍"})  # fmt: skip
        await until(pilot, lambda: "👍 1" in mine.plain, "bob's reaction", 60)
        app.select(mine.message_id)
        await pilot.press("alt+equals_sign")
        await answer(app, pilot, "1")
        await until(pilot, lambda: "👍 2 (you)" in mine.plain, "two reactions")
        await asyncio.to_thread(
            bob.wait_for, lambda: (bob_msg("sure")() or {}).get("reactions") == [
                {"emoji": "👍", "count": 2, "mine": True}], "both reactions at bob", 60,
        )  # fmt: skip

        # Alice edits her reply (Alt+E): bob's copy has the new text, marked edited.
        app.select(mine.message_id)
        await pilot.press("alt+e")
        await until(pilot, lambda: compose.text == "sure" and compose.has_focus, "edit mode")
        compose.clear()
        compose.insert("sure, Friday")
        await pilot.press("enter")
        await until(pilot, lambda: "edited" in mine.plain and "sure, Friday" in mine.plain, "ed")
        edited = await asyncio.to_thread(bob.wait_for, bob_msg("sure, Friday"), "the edit", 60)
        assert edited["edited_at"] is not None

        # Bob edits his question: live here, in the quote of the reply too.
        edit = {"group": bg, "message_id": q["message_id"], "text": "plans, Friday?"}
        await call(bob, "messages.edit", edit)
        await until(pilot, lambda: "┃ plans, Friday?" in mine.plain, "bob's edit, quoted", 60)
        theirs = row_with(app, "edited")
        assert theirs is not None and "bob" in theirs.plain and "plans, Friday?" in theirs.plain

        # Bob deletes his question for everyone: blanked here, and the quote goes.
        await call(bob, "messages.delete",
                   {"group": bg, "message_id": q["message_id"], "for_everyone": True})  # fmt: skip
        await until(pilot, lambda: row_with(app, "plans") is None, "bob's deletion", 60)
        assert any(t.endswith("(deleted)") for t in shown_texts(app))

        # Alice deletes her reply for everyone (Alt+X, everyone): deleted at bob's too.
        app.select(mine.message_id)
        await pilot.press("alt+x")
        prompt = await answer(app, pilot, "everyone")
        assert "every member's" in prompt
        await until(pilot, lambda: "(deleted)" in mine.plain, "deleted here")
        await asyncio.to_thread(
            bob.wait_for,
            lambda: next(m for m in bob.call("group.history", {"group": bg})["messages"]
                         if m["message_id"] == got["message_id"])["deleted"],
            "deleted at bob", 60,
        )  # fmt: skip

        # The group's timer from F5: bob's daemon has it; the header and a line show it.
        await pilot.press("f5")
        await answer(app, pilot, "2")
        await asyncio.to_thread(
            bob.wait_for,
            lambda: bob.call("conversations.get_timer", {"group": bg})["seconds"] == 3600,
            "the group timer at bob", 60,
        )  # fmt: skip
        title = app.query_one("#title", Static)
        await until(pilot, lambda: "⏱ 1 hour" in text_of(title), "the timer in the header")
        await until(pilot, lambda: row_with(app, "set disappearing messages: 1 hour"), "line")
        mid = (await call(bob, "group.send", {"group": bg, "text": "timed"}))["message_id"]
        row = await until(pilot, lambda: row_with(app, "timed"), "bob's timed message", 60)
        assert "⏱" in row.plain and mid in row.message_id
        await call(bob, "conversations.set_timer", {"group": bg, "seconds": 0})
        await until(pilot, lambda: "⏱" not in text_of(title), "bob's timer off, live", 60)
        await until(pilot, lambda: row_with(app, "bob set disappearing messages: off"), "his")

        # A file with a caption (Ctrl+F in the open group): bob's message carries both.
        f = tmp_short / "map.txt"
        f.write_text("north\n")
        await pilot.press("ctrl+f")
        await answer(app, pilot, str(f))
        await answer(app, pilot, "the route")
        await asyncio.to_thread(bob.wait_for, bob_msg("[file] map.txt\nthe route"), "file", 60)

    run_app(alice, body)


def link_screen(app: ChatApp) -> LinkScreen | None:
    return app.screen if isinstance(app.screen, LinkScreen) else None


def test_link_a_device_from_the_client_confirmed_then_declined(
    peers: Callable[[str], Peer],
) -> None:
    alice = peers("alice")
    alice.wait_connected()
    new, other = peers("alice2"), peers("alice3")

    async def link(app: ChatApp, pilot: Pilot[None], joiner: Peer) -> LinkScreen:
        """From the devices dialog: link; the joiner joins by RPC; the code shows."""
        prompt = await answer(app, pilot, "link")
        assert "This profile's devices" in prompt
        screen = await until(pilot, lambda: link_screen(app), "the link screen", 60)
        found = re.search(r"aegis:\S+", text_of(screen.query_one("#info", Static)))
        assert found is not None
        await asyncio.to_thread(joiner.wait_connected)
        await call(joiner, "devices.join", {"link": found.group(0)})
        await until(pilot, lambda: screen.state.get("state") == "code", "the code", 60)
        theirs = (await call(joiner, "devices.status"))["link"]
        digits = theirs["code"].replace(" ", "")  # shown in two groups of three
        assert theirs["state"] == "code" and len(digits) == 6 and digits.isdigit()
        shown = text_of(screen.query_one("#link-state", Static))
        assert "Type it below" in shown and digits[:3] not in shown  # only N shows it
        screen.code = digits  # type: ignore[attr-defined]
        return screen

    async def body(app: ChatApp, pilot: Pilot[None]) -> None:
        await pilot.press("alt+v")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the devices")
        shown = text_of(app.screen.query_one("#ask-prompt", Static))
        assert "(this device)" in shown and " 2 " not in shown
        screen = await link(app, pilot, new)
        # At 80x24 the QR code does not fit: it scrolls (the code stays at the top).
        box = screen.query_one("#info-box")
        assert box.max_scroll_y > 0 and box.scroll_y == 0
        await pilot.press("down", "down")
        await until(pilot, lambda: box.scroll_y > 0, "the QR code scrolled")

        # Only the 6 digits the new device shows are ever sent: a stray word, Enter or a
        # pasted link neither answers nor ends the link.
        field = screen.query_one("#link-code", Input)
        assert field.display and app.focused is field
        await pilot.press(*"yes", "enter", "y", "q", "enter")
        await pilot.pause(0.2)
        assert screen.state["state"] == "code" and not screen.answered
        assert app.is_running and app.screen is screen  # q over a dialog does not quit
        assert (await call(alice, "devices.status"))["link"]["state"] == "code"
        field.value = ""
        await call(new, "devices.confirm", {"accept": True})
        await pilot.press(*screen.code, "enter")  # type: ignore[attr-defined]
        await until(pilot, lambda: screen.state.get("state") == "done", "linked", 60)
        await asyncio.to_thread(
            new.wait_for, lambda: len(new.call("devices.list")["devices"]) == 2, "2 devices", 90
        )
        await pilot.press("escape")

        # The list again, with the new device: a second link, declined with F9.
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the devices again")
        listed = text_of(app.screen.query_one("#ask-prompt", Static))
        assert "A new device was linked." in listed and " 2 " in listed
        screen = await link(app, pilot, other)
        await pilot.press("f9")
        await until(pilot, lambda: screen.state.get("state") == "declined", "declined here")
        assert (await call(alice, "devices.status"))["link"]["state"] == "declined"
        assert "Declined" in text_of(screen.query_one("#link-state", Static))
        # The new device says yes: the profile never comes (docs/api.md, devices.confirm).
        await call(other, "devices.confirm", {"accept": True})
        await pilot.pause(2)
        assert (await call(other, "devices.status"))["link"]["state"] == "confirmed"
        assert (await call(other, "devices.list"))["version"] == 0
        assert (await call(other, "contacts.list"))["contacts"] == []
        assert len((await call(alice, "devices.list"))["devices"]) == 2
        await pilot.press("escape")

        # Removing the linked device: the question names it.
        ours = (await call(alice, "devices.list"))["devices"]
        n = next(i for i, d in enumerate(ours, 1) if not d["this_device"])
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the devices once more")
        await answer(app, pilot, f"remove {n}")
        question = await answer(app, pilot, "yes")
        assert ours[n - 1]["id"][:12] in question and "Remove the device" in question
        await asyncio.to_thread(
            alice.wait_for, lambda: len(alice.call("devices.list")["devices"]) == 1, "removed"
        )

    run_app(alice, body, size=(80, 24))
