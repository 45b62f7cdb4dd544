"""aegis-bridge against a real session bus (dbus-daemon started here) with a notification
server in the test that records the Notify calls, real daemons and a real relay."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Peer, connect
from .dbus_session import DBUS_DAEMON, SKIP_REASON, NotificationServer, SessionBus

pytestmark = pytest.mark.skipif(DBUS_DAEMON is None, reason=SKIP_REASON)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bus(tmp_short: Path) -> Iterator[SessionBus]:
    d = tmp_short / "dbus"
    d.mkdir()
    b = SessionBus(d)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def pair(peers: Callable[[str], Peer]) -> tuple[Peer, Peer]:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    return alice, bob


class BridgeProc:
    def __init__(
        self, home: Path, bus_address: str, *extra: str, ready: Callable[[], None] | None = None
    ) -> None:
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus_address, PYTHONPATH=str(ROOT))
        env.pop("AEGIS_HOME", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aegis_bridge.main", "--home", str(home), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        if ready is not None:  # the daemon is not running yet: the bridge waits for it
            line = self.proc.stderr.readline()
            assert line.startswith("aegis-bridge: warning: waiting for aegisd"), line
            ready()
        line = self.proc.stderr.readline()
        assert line.startswith("aegis-bridge: listening"), line

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        return err


def wait(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def send(alice: Peer, text: str) -> None:
    alice.call("messages.send", {"contact": "bob", "text": text})


def test_privacy_levels(
    bus: SessionBus, pair: tuple[Peer, Peer], peers: Callable[[str], Peer]
) -> None:
    alice, bob = pair
    server = NotificationServer(bus.address)
    errs = ""
    try:
        expected = {
            "none": ("New message", ""),
            "sender": ("New message from alice", ""),
            "text": ("alice", "secret at text"),
        }
        for level, (summary, body) in expected.items():
            before = len(server.calls())
            extra = [] if level == "none" else ["--level", level]  # none is the default
            bridge = BridgeProc(bob.home, bus.address, *extra)
            try:
                send(alice, f"secret at {level}")
                calls = wait(lambda b=before: server.calls()[b:], f"a notification at {level}")
                time.sleep(0.3)
                assert server.calls()[before:] == calls  # one, not more
                assert len(calls) == 1
                (call,) = calls
                assert (call["summary"], call["body"]) == (summary, body), level
                assert call["app_name"] == "AegisLink"
                assert call["category"] == "im.received"
            finally:
                errs += bridge.stop()
        # A contact request through the address: no name at level none.
        bridge = BridgeProc(bob.home, bus.address)
        try:
            before = len(server.calls())
            carol = peers("carol")
            carol.wait_connected()
            carol.call("contacts.add", {"name": "bob", "link": bob.call("address.get")["link"]})
            calls = wait(lambda: server.calls()[before:], "a request notification")
            assert (calls[0]["summary"], calls[0]["body"]) == ("New contact request", "")
        finally:
            errs += bridge.stop()
    finally:
        server.close()
    assert "secret" not in errs and "alice" not in errs and "carol" not in errs, errs
    seq_file = bob.home / "bridge.seq"
    assert stat.S_IMODE(seq_file.stat().st_mode) == 0o600


def test_daemon_and_bridge_restarts(bus: SessionBus, pair: tuple[Peer, Peer]) -> None:
    """Nothing shown twice, nothing missed: across a daemon restart (messages arrive while it
    is down) and across a restart of the bridge itself (messages arrive while it is gone)."""
    alice, bob = pair
    server = NotificationServer(bus.address)
    try:
        bridge = BridgeProc(bob.home, bus.address, "--level", "text")
        send(alice, "m1")
        wait(lambda: len(server.calls()) == 1, "m1")
        bob.stop()
        send(alice, "m2")
        send(alice, "m3")
        time.sleep(0.5)
        bob.start()
        wait(lambda: len(server.calls()) >= 3, "m2 and m3 after the daemon restart")
        bob.kill()  # and once more, without a clean stop
        bob.start()
        send(alice, "m4")
        wait(lambda: len(server.calls()) >= 4, "m4")
        bridge.stop()
        send(alice, "m5")
        wait(
            lambda: [
                m for m in bob.call("messages.history", {"contact": "alice"})["messages"]
                if m["text"] == "m5"
            ],
            "m5 to arrive while the bridge is gone",
        )  # fmt: skip
        bridge = BridgeProc(bob.home, bus.address, "--level", "text")
        send(alice, "m6")
        wait(lambda: len(server.calls()) >= 6, "m5 and m6 after the bridge restart")
        time.sleep(0.5)
        bridge.stop()
        assert [c["body"] for c in server.calls()] == ["m1", "m2", "m3", "m4", "m5", "m6"]
    finally:
        server.close()


def test_no_notification_server(bus: SessionBus, pair: tuple[Peer, Peer]) -> None:
    """No server on the bus, then no bus at all: one warning line each time, no crash; a
    server that appears later gets the next notifications."""
    alice, bob = pair
    bridge = BridgeProc(bob.home, bus.address)
    send(alice, "one")
    send(alice, "two")
    assert bridge.proc.stderr is not None
    line = bridge.proc.stderr.readline()
    assert line.startswith("aegis-bridge: warning: no notification server"), line
    assert "org.freedesktop.Notifications" in line
    seq_file = bob.home / "bridge.seq"
    wait(lambda: seq_file.exists() and int(seq_file.read_text()) > 0, "both events handled")
    wait(
        lambda: int(seq_file.read_text()) == max(
            e["seq"] for e in bob.events(types=["message.received"])
        ) and len(bob.events(types=["message.received"])) == 2,
        "both events handled",
    )  # fmt: skip
    assert bridge.proc.poll() is None
    server = NotificationServer(bus.address)
    try:
        send(alice, "three")
        calls = wait(server.calls, "a notification once a server runs")
        assert calls[0]["summary"] == "New message"
    finally:
        server.close()
    err = bridge.stop()
    assert "warning" not in err  # one line, not one per event
    # No session bus at all.
    bridge = BridgeProc(bob.home, "unix:path=/nonexistent/bus")
    send(alice, "four")
    send(alice, "five")
    assert bridge.proc.stderr is not None
    line = bridge.proc.stderr.readline()
    assert line.startswith("aegis-bridge: warning: no session D-Bus"), line
    time.sleep(1.0)
    assert bridge.proc.poll() is None
    err = bridge.stop()
    assert "warning" not in err, err
    assert "four" not in err and "five" not in err


def test_exec_hook(tmp_short: Path, pair: tuple[Peer, Peer]) -> None:
    alice, bob = pair
    out = tmp_short / "exec.jsonl"
    # The hook is still running when the test sees its output and stops the bridge: the
    # bridge must finish that event and record it, or the next bridge shows it again.
    hook = f"{shlex.quote(sys.executable)} -c " + shlex.quote(
        f"import sys, time; open({str(out)!r}, 'a').write(sys.stdin.read()); time.sleep(1)"
    )
    for level in ("none", "sender", "text"):
        no_bus = "unix:path=/nonexistent/bus"
        bridge = BridgeProc(bob.home, no_bus, "--level", level, "--exec", hook)
        try:
            send(alice, f"hook {level}")
            wait(lambda lv=level: out.exists() and f'"level": "{lv}"' in out.read_text(), level)
        finally:
            err = bridge.stop()
        assert "warning" not in err, err  # --exec: D-Bus is not used
        last = json.loads(out.read_text().splitlines()[-1])
        assert (Path(bob.home) / "bridge.seq").read_text().strip() == str(last["seq"])
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["level"] for e in events] == ["none", "sender", "text"]
    assert all(e["type"] == "message.received" for e in events)
    none, sender, text = events
    assert none["data"] == {} and none["summary"] == "New message" and none["body"] == ""
    assert sender["data"]["contact"] == "alice" and "text" not in sender["data"]
    assert sender["summary"] == "New message from alice"
    assert text["data"]["text"] == "hook text" and text["body"] == "hook text"
    assert len({e["seq"] for e in events}) == 3


def test_bridge_started_before_the_daemon(bus: SessionBus, pair: tuple[Peer, Peer]) -> None:
    alice, bob = pair
    bob.stop()
    send(alice, "early")  # waits at the relay
    server = NotificationServer(bus.address)
    try:
        bridge = BridgeProc(bob.home, bus.address, "--level", "text", ready=bob.start)
        try:
            # Subscribed "from now" (no bridge.seq yet): what arrives from here on is shown.
            send(alice, "later")
            wait(lambda: "later" in [c["body"] for c in server.calls()], "the later message")
            assert bridge.proc.poll() is None
        finally:
            bridge.stop()
    finally:
        server.close()


def test_hostile_text_and_markup(bus: SessionBus, pair: tuple[Peer, Peer]) -> None:
    """A contact's text reaches the notification with its controls shown visibly and, for a
    server that reads markup in bodies, its markup escaped: a <a href> is no link and an
    <img> is fetched from nowhere (issue 15, item 11)."""
    alice, bob = pair
    hostile = ('<a href="https://evil.example/">click</a> <img src="file:///etc/passwd"> '
               "&amp; \x1b]52;c;ZXZpbA==\x07\x9b2J\u202eevil\rforged")  # fmt: skip
    for caps, body in (
        (("body", "body-markup", "body-hyperlinks", "body-images"),
         '&lt;a href="https://evil.example/"&gt;click&lt;/a&gt; '
         '&lt;img src="file:///etc/passwd"&gt; &amp;amp; '
         "␛]52;c;ZXZpbA==␇&lt;U+009B&gt;2J&lt;U+202E&gt;evil␍forged"),
        (("body",),  # plain text: shown as is, so nothing to escape but the controls
         '<a href="https://evil.example/">click</a> <img src="file:///etc/passwd"> '
         "&amp; ␛]52;c;ZXZpbA==␇<U+009B>2J<U+202E>evil␍forged"),
    ):  # fmt: skip
        server = NotificationServer(bus.address, caps)
        bridge = BridgeProc(bob.home, bus.address, "--level", "text")
        try:
            send(alice, hostile)
            (call,) = wait(server.calls, "the notification")
            assert call["body"] == body, caps
            assert call["summary"] == "alice"
        finally:
            bridge.stop()
            server.close()


def test_markup_in_the_summary_and_a_server_that_does_not_answer(
    bus: SessionBus, pair: tuple[Peer, Peer]
) -> None:
    """Issue 15 review, findings 6 and 9: the summary carries the contact's name (here one
    with markup) and is escaped too for a server that reads markup; a server whose
    GetCapabilities fails is taken to read markup (escaped: shown as text at worst)."""
    alice, bob = pair
    bob.call("contacts.rename", {"name": "alice", "new_name": '<a href="x">al</a>'})
    for caps, summary, body in (
        (("body", "body-markup"), '&lt;a href="x"&gt;al&lt;/a&gt;', "&lt;b&gt;hi&lt;/b&gt;"),
        (("(fail)",), '&lt;a href="x"&gt;al&lt;/a&gt;', "&lt;b&gt;hi&lt;/b&gt;"),
        (("body",), '<a href="x">al</a>', "<b>hi</b>"),
    ):
        server = NotificationServer(bus.address, caps)
        bridge = BridgeProc(bob.home, bus.address, "--level", "text")
        try:
            send(alice, "<b>hi</b>")
            (call,) = wait(server.calls, "the notification")
            assert (call["summary"], call["body"]) == (summary, body), caps
        finally:
            bridge.stop()
            server.close()


def test_group_invitations_and_messages(bus: SessionBus, pair: tuple[Peer, Peer]) -> None:
    """Issue 16: a group invitation and a group message make notifications with the group's
    name and the sender, neutralised and markup-escaped as one-to-one messages are; at level
    none a group message is "New message", nothing more."""
    alice, bob = pair
    # The group's name is the inviter's choice: markup in it (the daemon refuses controls).
    g = alice.call("group.create", {"name": "<b>Trips</b> & co"})["group"]
    server = NotificationServer(bus.address, ("body", "body-markup"))
    errs = ""
    try:
        bridge = BridgeProc(bob.home, bus.address, "--level", "text")
        try:
            alice.call("group.invite", {"group": g, "contact": "bob"})
            (call,) = wait(server.calls, "the invitation's notification")
            assert call["summary"] == (
                "Group invitation from alice: &lt;b&gt;Trips&lt;/b&gt; &amp; co"
            )
            assert (call["body"], call["category"]) == ("", "im")
            invitation = bob.call("group.invitations")["invitations"][0]["invitation"]
            bob.call("group.accept", {"invitation": invitation})
            wait(
                lambda: (
                    bob.call("group.list")["groups"]
                    and bob.call("group.list")["groups"][0]["member"]
                ),
                "bob to be a member",
            )
            alice.call("group.send", {"group": g, "text": "<i>to all</i>\x1b[2J"})
            calls = wait(lambda: server.calls()[1:], "the group message's notification")
            assert calls[0]["summary"] == "alice in &lt;b&gt;Trips&lt;/b&gt; &amp; co"
            assert calls[0]["body"] == "&lt;i&gt;to all&lt;/i&gt;␛[2J"
            assert calls[0]["category"] == "im.received"
        finally:
            errs += bridge.stop()
        for level, summary in (("sender", "New message from alice in &lt;b&gt;Trips"),
                               ("none", "New message")):  # fmt: skip
            before = len(server.calls())
            bridge = BridgeProc(bob.home, bus.address, "--level", level)
            try:
                alice.call("group.send", {"group": g, "text": f"secret at {level}"})
                (call,) = wait(lambda b=before: server.calls()[b:], f"a notification at {level}")
                if level == "none":
                    assert call["summary"] == summary
                else:
                    assert call["summary"].startswith(summary), level
                assert call["body"] == ""
            finally:
                errs += bridge.stop()
    finally:
        server.close()
    for leak in ("secret", "alice", "Trips", "to all"):
        assert leak not in errs, errs


def test_group_events_through_exec(tmp_short: Path, pair: tuple[Peer, Peer]) -> None:
    """--exec gets the group's name above level none, and neither name nor text at none."""
    alice, bob = pair
    g = alice.call("group.create", {"name": "Trips"})["group"]
    alice.call("group.invite", {"group": g, "contact": "bob"})
    invs = wait(lambda: bob.call("group.invitations")["invitations"], "the invitation")
    bob.call("group.accept", {"invitation": invs[0]["invitation"]})
    wait(lambda: bob.call("group.list")["groups"][0]["member"], "bob to be a member")
    out = tmp_short / "exec.jsonl"
    hook = f"{shlex.quote(sys.executable)} -c " + shlex.quote(
        f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"
    )
    no_bus = "unix:path=/nonexistent/bus"
    for level in ("none", "sender", "text"):
        bridge = BridgeProc(bob.home, no_bus, "--level", level, "--exec", hook)
        try:
            alice.call("group.send", {"group": g, "text": f"hook {level}"})
            wait(lambda lv=level: out.exists() and f'"level": "{lv}"' in out.read_text(), level)
        finally:
            bridge.stop()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["type"] for e in events] == ["group.message"] * 3
    none, sender, text = events
    assert none["data"] == {} and none["summary"] == "New message"
    assert sender["data"]["group_name"] == "Trips" and "text" not in sender["data"]
    assert sender["data"]["from_contact"] == "alice"
    assert sender["summary"] == "New message from alice in Trips"
    assert text["data"]["text"] == "hook text" and text["body"] == "hook text"
    assert text["summary"] == "alice in Trips"


def test_a_disappearing_message_notification_expires_and_is_closed(
    bus: SessionBus, pair: tuple[Peer, Peer]
) -> None:
    """docs/protocol.md §27: the notification of a message with a timer carries an expiry of
    at most the timer and is closed when the message is erased; one without keeps the
    server's default."""
    alice, bob = pair
    server = NotificationServer(bus.address)
    bridge = BridgeProc(bob.home, bus.address)
    try:
        send(alice, "no timer")
        plain = wait(lambda: server.calls()[0:1], "the plain notification")[0]
        assert plain["expire_timeout"] == -1
        alice.call("conversations.set_timer", {"contact": "bob", "seconds": 2})
        bob.wait_for(
            lambda: bob.call("conversations.get_timer", {"contact": "alice"})["seconds"] == 2,
            "the timer",
        )
        send(alice, "with a timer")
        call = wait(lambda: server.calls()[1:2], "the timed notification")[0]
        assert call["expire_timeout"] == 2000 and call["summary"] == "New message"
        assert server.iface.closed == []
        bob.call("messages.mark_read", {"contact": "alice"})  # its timer runs from now
        wait(lambda: server.iface.closed == [2], "the notification closed at expiry")
        # A reply takes the timer too: its notification expires and is closed alike.
        mid = alice.call("messages.send", {"contact": "bob", "text": "to reply to"})["message_id"]
        wait(lambda: server.calls()[2:3], "the third notification")
        alice.call("messages.reply", {"contact": "bob", "message_id": mid, "text": "a reply"})
        reply = wait(lambda: server.calls()[3:4], "the reply's notification")[0]
        assert reply["expire_timeout"] == 2000
        bob.call("messages.mark_read", {"contact": "alice"})
        wait(lambda: sorted(server.iface.closed) == [2, 3, 4], "both closed at expiry")
    finally:
        bridge.stop()
        server.close()


def test_a_reaction_an_edit_or_a_deletion_is_not_announced(
    bus: SessionBus, pair: tuple[Peer, Peer]
) -> None:
    """Issue 17: the bridge announces new messages only. A reaction, an edit and a deletion
    for everyone, each sent before a plain text, raise no notification of their own: the
    text's is the next one (one session delivers in order, so they arrived before it)."""
    alice, bob = pair
    server = NotificationServer(bus.address)
    bridge = BridgeProc(bob.home, bus.address, "--level", "text")
    try:
        mid = alice.call("messages.send", {"contact": "bob", "text": "first"})["message_id"]
        assert wait(lambda: server.calls()[0:1], "the first notification")[0]["body"] == "first"
        alice.call("messages.edit", {"message_id": mid, "text": "first, edited"})
        alice.call("messages.react", {"message_id": mid, "emoji": "👍"})
        alice.call("messages.delete", {"message_id": mid, "for_everyone": True})
        send(alice, "second")
        second = wait(lambda: server.calls()[1:2], "the second notification")[0]
        assert second["body"] == "second"
        time.sleep(1.0)  # anything announced late would show now (a wait, not an assertion)
        assert len(server.calls()) == 2
        first = bob.call("messages.history", {"contact": "alice"})["messages"][0]
        assert first["deleted"]  # the deletion did arrive, and said nothing
    finally:
        bridge.stop()
        server.close()
