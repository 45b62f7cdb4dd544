"""Two copies of one profile running at once (a copied profile directory: the same mailboxes,
as after a backup restored elsewhere while the old device still runs). The relay gives each
mailbox to the copy that subscribed last and sends the other END (docs/relay-protocol.md §4.3);
the other does not take it back in a loop, says so once in its log, and no message is lost
(docs/protocol.md §20.7)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tests.daemon.conftest import DaemonProc
from tests.functional.conftest import Peer, connect
from tests.functional.test_daemon_log import check_log

TAKEN = "another connection took over this profile's mailboxes at the relay: "


def _incoming(call: Callable[..., object]) -> list[str]:
    msgs = call("messages.history", {"contact": "bob", "limit": 500})["messages"]  # type: ignore[index]
    return sorted(m["text"] for m in msgs if m["direction"] == "in")


def test_a_copy_that_lost_its_mailboxes_does_not_take_them_back(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    alice.stop()
    copy_home = tmp_short / "copy"
    shutil.copytree(alice.home, copy_home,
                    ignore=shutil.ignore_patterns("aegisd.sock", "aegisd.lock", "aegisd.pid"))
    alice.start()
    alice.wait_connected()
    copy = DaemonProc(copy_home, [], None)
    try:
        copy.wait_ready()

        def call(method: str, params: dict[str, object] | None = None) -> object:
            with copy.client() as c:
                return c.call(method, params)

        alice.wait_for(lambda: call("status")["relay"]["connected"], "the copy's relay")  # type: ignore[index]
        # The copy subscribed last: it holds alice's mailboxes now, and gets every message.
        sent = [f"to whichever copy {i}" for i in range(6)]
        for text in sent:
            bob.call("messages.send", {"contact": "alice", "text": text})
        alice.wait_for(lambda: _incoming(call) == sorted(sent), "the copy's messages")
        assert _incoming(alice.call) == []
        # alice's own link kept its one connection and fought no one: the copy still holds
        # the mailboxes (a message sent now reaches it too).
        bob.call("messages.send", {"contact": "alice", "text": "one more"})
        alice.wait_for(lambda: "one more" in _incoming(call), "the last message at the copy")
        assert _incoming(alice.call) == []
        assert alice.call("status")["relay"]["connected"]
    finally:
        copy.stop()
    alice.stop()
    assert alice.proc is not None
    lines = check_log(alice.proc.stderr())
    assert lines.count("relay connected") == 1, lines  # one connection, kept throughout
    assert not [ln for ln in lines if ln.startswith("relay connection lost")], lines
    assert len([ln for ln in lines if ln.startswith(TAKEN)]) == 1, lines
    copy_lines = check_log(copy.stderr())
    assert copy_lines.count("relay connected") == 1, copy_lines
