"""Network modes with contacts, through a real relay (issue 12): calls ask before they show
the user's IP address when relays are reached through Tor or a proxy, and a profile with
contacts moves to another relay with its contacts' mailboxes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aegis_cli.client import RpcCallError
from tests.daemon.conftest import DaemonProc
from tests.relay.conftest import RelayProcess

from .calls_support import write_tone
from .conftest import Peer, connect
from .test_daemon_log import assert_one_line_per_connection, check_log

DEAD_PROXY = "socks5://127.0.0.1:1"  # nothing listens: the link stays down, nothing goes direct


def cli(peer: Peer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", *args, "--home", str(peer.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_calls_ask_before_showing_the_ip_address(
    peers: Callable[[str], Peer], tmp_short: Path
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    # No sound device here: the calls that start play and record files.
    tone = tmp_short / "tone.wav"
    write_tone(tone, 440.0, 1.0)
    n = iter(range(100))

    def files() -> dict[str, str]:
        return {"play": str(tone), "record": str(tmp_short / f"rec{next(n)}.wav")}

    for p in (alice, bob):
        p.call("calls.configure", {"host_candidates": "loopback"})
    # Bob hides his address from relays (a proxy); Alice connects directly and calls him.
    bob.call("network.set", {"proxy": DEAD_PROXY})
    assert bob.call("status")["network"]["mode"] == "proxy"
    with pytest.raises(RpcCallError) as e:
        bob.call("calls.start", {"contact": "alice"})
    assert e.value.code == 1035 and e.value.data["error"] == "reveals_ip"
    assert "IP address" in e.value.message and "--reveal-ip" in e.value.message
    r = cli(bob, "call", "alice", "--no-wait")
    assert r.returncode == 1 and "would show your IP address" in r.stderr
    assert bob.call("calls.list")["calls"] == []  # refused before anything was sent
    # Allowed for one call, it starts (its INVITE waits for the relay: the proxy is dead).
    started = bob.call("calls.start", {"contact": "alice", "reveal_ip": True, **files()})
    assert started["state"] == "calling"
    bob.call("calls.hangup", {"call_id": started["call_id"]})
    # A TURN server with hide-my-IP needs no consent: the peer only sees the TURN server.
    bob.call("calls.configure", {"turn_url": "turn:127.0.0.1:3478", "hide_ip": True,
                                 "turn_username": "u", "turn_password": "p"})  # fmt: skip
    started = bob.call("calls.start", {"contact": "alice", **files()})
    bob.call("calls.hangup", {"call_id": started["call_id"]})
    bob.call("calls.configure", {"hide_ip": False})
    # Answering asks too: Alice (direct) calls, Bob's phone rings, Bob answers.
    bob.call("network.set", {"mode": "direct"})
    bob.wait_connected()
    # Bob's two calls above, queued while his proxy was dead, reach Alice now (each rings and
    # is cancelled): once they are over she is not busy.
    alice.wait_for(
        lambda: [c["state"] for c in alice.call("calls.history")["calls"]] == ["ended"] * 2
        and not alice.call("calls.list")["calls"],
        "bob's earlier calls to end",
    )
    call = alice.call("calls.start", {"contact": "bob", **files()})
    bob.wait_for(lambda: bob.call("calls.list")["calls"], "the call to ring")
    bob.call("network.set", {"proxy": DEAD_PROXY})
    with pytest.raises(RpcCallError) as e:
        bob.call("calls.accept", {})
    assert e.value.code == 1035
    assert bob.call("calls.list")["calls"][0]["state"] == "ringing"  # still his to answer
    assert bob.call("calls.accept", {"reveal_ip": True, **files()})["state"] == "connecting"
    alice.call("calls.hangup", {"call_id": call["call_id"]})


def test_relay_set_moves_a_profile_without_contacts(
    peers: Callable[[str], Peer], relay_proc: object
) -> None:
    alice, bob = peers("alice"), peers("bob")
    alice.wait_connected()
    before = alice.call("address.get")["link"]
    link = alice.call("invitations.create")["link"]
    assert link
    url = alice.call("status")["relay"]["url"]
    # A profile without contacts moves: its pending invitation is revoked, a new address is
    # made at the (here: same) relay on the next connection.
    r = cli(alice, "relay", "set", url, "--json")
    assert r.returncode == 0, r.stderr
    assert '"invitations_revoked": 1' in r.stdout
    alice.wait_connected()
    alice.wait_for(lambda: alice.call("address.get")["link"] != before, "a new address")
    assert alice.call("status")["relay_move"] is None
    assert bob.call("contacts.list")["contacts"] == []


def relay_mailboxes(relay: RelayProcess) -> int:
    db = sqlite3.connect(relay.data / "relay.sqlite3")
    try:
        return int(db.execute("SELECT count(*) FROM mailboxes").fetchone()[0])
    finally:
        db.close()


def test_relay_set_moves_the_contacts_mailboxes(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """Issue 14 item 1: a profile with contacts moves to another relay by the rotation; after
    both moved, texts flow both ways through the new relay and the old one holds nothing."""
    sub = tmp_short / "relay2"
    sub.mkdir()
    new = RelayProcess(sub, {})
    new.start()
    try:
        url2 = f"ws://127.0.0.1:{new.port}/v1/ws"
        alice, bob = peers("alice"), peers("bob")
        connect(alice, bob)
        alice.call("network.set", {"isolation": True})  # one connection per mailbox; bob: one
        for peer, other in ((alice, "bob"), (bob, "alice")):
            r = cli(peer, "relay", "set", url2)
            assert r.returncode == 0, r.stderr
            assert "1 contact(s) move to the new relay" in r.stdout
            peer.wait_connected()
            peer.wait_for(lambda p=peer: p.events(types=["relay.moved"]), "the move to finish")
            assert peer.call("status")["relay_move"] is None
            assert "moving" not in cli(peer, "relay", "show").stdout
            other_peer = bob if peer is alice else alice
            # Texts both ways after each move (one side on each relay, then both on the new).
            for a, b, name_b, name_a in ((peer, other_peer, other, peer.name),
                                         (other_peer, peer, peer.name, other)):
                text = f"{a.name} to {b.name} after {peer.name} moved"
                a.call("messages.send", {"contact": name_b, "text": text})
                b.wait_for(lambda b=b, n=name_a, t=text: any(
                    m["text"] == t for m in b.call("messages.history", {"contact": n})["messages"]
                ), text)  # fmt: skip
        # Everything of both profiles is at the new relay now: the old one holds nothing.
        assert relay_mailboxes(relay_proc) == 0
        assert relay_mailboxes(new) > 0
        # A new contact is made at the new relay too.
        carol = peers("carol")
        carol.call("relay.set", {"url": url2})
        carol.wait_connected()
        connect(carol, alice)
        assert relay_mailboxes(relay_proc) == 0
        # The log tells the old relay's connection (the drain) from the profile's relay, with
        # one line per change of either (finding 12 of the review of issue 14).
        for peer in (alice, bob):
            peer.stop()
            assert peer.proc is not None
            text = peer.proc.stderr()
            lines = check_log(text)
            assert_one_line_per_connection(lines)
            old = [ln for ln in lines if "old relay" in ln]
            assert old[0] == "old relay connected" and old[-1] == "old relay connection closed"
            assert "127.0.0.1" not in text and "ws://" not in text
    finally:
        new.close()


def test_a_local_profile_that_never_chose_a_mode_does_not_go_direct_elsewhere(
    peers: Callable[[str], Peer],
) -> None:
    """Alice's relay is on loopback and she never chose a network mode, so she connects
    directly, but to loopback relays only: a contact whose relay is elsewhere is refused with
    how to choose, before anything is sent (neither Tor, not running, nor a direct connection,
    never chosen, may carry it)."""
    import dataclasses

    from aegisd.core import wire

    alice, bob = peers("alice"), peers("bob")
    bob.wait_connected()
    link = wire.ContactLink.from_text(bob.call("invitations.create")["link"])
    elsewhere = dataclasses.replace(
        link, mailbox=dataclasses.replace(link.mailbox, relay_url="wss://relay.example.org/v1/ws")
    ).to_text()
    assert alice.call("network.get")["mode_chosen"] is False
    with pytest.raises(RpcCallError) as e:
        alice.call("contacts.add", {"name": "bob", "link": elsewhere})
    assert e.value.data["error"] == "bad_link" and "aegis network --mode tor" in e.value.message
    assert alice.call("contacts.list")["contacts"] == []


def test_privacy_sets_jitter_and_receipts(peers: Callable[[str], Peer]) -> None:
    """Issue 14 item 1: `aegis privacy` shows and sets send jitter and receipts, which only
    JSON-RPC (settings.set) reached before."""
    alice = peers("alice")
    r = cli(alice, "privacy", "--send-jitter-max", "5", "--read-receipts", "off",
            "--receipt-delay-max", "2.5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "send jitter: a random delay of 0 to 5 s" in r.stdout
    assert "read receipts: off" in r.stdout and "receipt delay: 0.5 to 2.5 s" in r.stdout
    got = alice.call("settings.get")
    assert (got["send_jitter_max"], got["read_receipts"], got["receipt_delay_max"]) == (
        5.0, False, 2.5)  # fmt: skip
    r = cli(alice, "privacy", "--send-jitter-max", "0", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["send_jitter_max"] == 0.0 and shown["read_receipts"] is False
    assert shown["level"] == "off"
    r = cli(alice, "privacy", "--send-jitter-max", "-1")
    assert r.returncode == 2 and "send-jitter-max" in r.stderr
    # issue 16: the group fan-out's spread, the same way
    r = cli(alice, "privacy", "--group-spread-max", "30")
    assert r.returncode == 0, r.stderr
    assert "group fan-out spread (cover off): each member's copy after a random 0 to 30 s" \
        in r.stdout  # fmt: skip
    assert alice.call("settings.get")["group_spread_max"] == 30.0
    r = cli(alice, "privacy", "--group-spread-max", "3601")
    assert r.returncode == 2 and "group-spread-max" in r.stderr


def test_a_profile_without_a_relay_or_with_a_wrong_one_is_repaired(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """Issue 14 item 1: `aegis relay set` repairs a profile made with a wrong relay URL or none,
    with init's URL policy."""
    from tests.daemon.conftest import DaemonProc

    url = f"ws://127.0.0.1:{relay_proc.port}/v1/ws"
    home = tmp_short / "norelay"
    r = subprocess.run(
        [sys.executable, "-m", "aegis_cli.main", "init", "--home", str(home), "--no-passphrase"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    proc = DaemonProc(home, [], None)
    proc.wait_ready()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "relay", "show", "--home", str(home)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert "none configured: aegis relay set URL" in r.stdout, r.stdout
        r = subprocess.run(
            [sys.executable, "-m", "aegis_cli.main", "relay", "set", url, "--home", str(home)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with proc.client() as c:
            deadline = time.monotonic() + 30
            while not c.call("status")["relay"]["connected"]:
                assert time.monotonic() < deadline, "never connected"
                time.sleep(0.1)
            assert c.call("address.get")["link"]
    finally:
        proc.stop()
    # A wrong URL (nothing listens there): plaintext elsewhere is refused as at init; the
    # right one repairs it, and the profile reaches a contact.
    wrong = Peer(tmp_short / "wrong", "ws://127.0.0.1:9/v1/ws", "wrong")
    try:
        assert not wrong.call("status")["relay"]["connected"]
        r = cli(wrong, "relay", "set", "ws://relay.example.org/v1/ws")
        assert r.returncode != 0 and "plaintext" in r.stderr
        r = cli(wrong, "relay", "set", url)
        assert r.returncode == 0, r.stderr
        connect(wrong, peers("bob"))
    finally:
        wrong.stop()


def wipe(relay: RelayProcess) -> None:
    """The relay loses its database: stopped, its data deleted, started on the same port."""
    relay.terminate()
    shutil.rmtree(relay.data)
    relay.start()


def test_a_relay_that_lost_its_data_does_not_disable_the_profile(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Review finding 1: one mailbox refused as gone (here the address: the relay lost its
    database) is no proof of a copy restored elsewhere. The profile is not marked superseded;
    status says the relay lost the mailboxes, and `aegis relay set` (the same URL) repairs it."""
    alice = peers("alice")
    alice.wait_connected()
    before = alice.call("address.get")["link"]
    url = alice.call("status")["relay"]["url"]
    wipe(relay_proc)
    st = alice.wait_for(lambda: (s := alice.call("status"))["relay_lost"] and s, "relay_lost")
    assert st["superseded"] is None
    assert "the relay no longer has this profile's address mailbox" in st["relay_lost"]
    assert "WARNING: the relay no longer has" in cli(alice, "status").stdout
    assert not alice.events(types=["profile.superseded"])
    r = cli(alice, "relay", "set", url)
    assert r.returncode == 0, r.stderr
    alice.wait_connected()
    alice.wait_for(lambda: alice.call("address.get")["link"] != before, "a new address")
    st = alice.call("status")
    assert st["relay_lost"] is None and st["superseded"] is None


def test_a_wiped_relay_with_contacts_marks_the_profile_and_relay_set_clears_it(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Review finding 1: the address and an established contact's mailbox both gone is the
    evidence of a copy restored elsewhere; a relay that lost its data gives the same, so the
    text says so too, and `relay set` (a deliberate user action) clears the mark."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    url = alice.call("status")["relay"]["url"]
    wipe(relay_proc)
    st = alice.wait_for(lambda: (s := alice.call("status"))["superseded"] and s, "the mark")
    assert "the relay lost its mailboxes" in st["superseded"]
    r = cli(alice, "relay", "set", url)
    assert r.returncode == 0, r.stderr
    alice.wait_connected()
    assert alice.call("status")["superseded"] is None
    alice.call("messages.send", {"contact": "bob", "text": "queued after the repair"})


def test_relay_set_to_the_same_relay_spelled_otherwise_moves_nothing(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    """Review finding 7: ws://h:p and ws://h:p/v1/ws are the same relay: no contact moves."""
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    stored = alice.call("status")["relay"]["url"]
    assert stored.endswith("/v1/ws")
    out = alice.call("relay.set", {"url": f"ws://127.0.0.1:{relay_proc.port}"})
    assert out["contacts_moving"] == 0
    alice.wait_connected()
    assert alice.call("status")["relay_move"] is None
    alice.call("messages.send", {"contact": "bob", "text": "still here"})
    bob.wait_for(lambda: any(m["text"] == "still here" for m in bob.call(
        "messages.history", {"contact": "alice"})["messages"]), "the text")  # fmt: skip


def test_a_relay_move_counts_contacts_and_survives_a_reconnect(
    peers: Callable[[str], Peer], relay_proc: RelayProcess, tmp_short: Path
) -> None:
    """Review findings 1 and 8: a contact with two mailboxes (a rotation not yet confirmed)
    counts once; the old relay restarting while the move deletes the old mailboxes (a
    reconnect) does not mark the profile superseded."""
    sub = tmp_short / "relay2"
    sub.mkdir()
    new = RelayProcess(sub, {})
    new.start()
    try:
        url2 = f"ws://127.0.0.1:{new.port}/v1/ws"
        alice, bob = peers("alice"), peers("bob")
        connect(alice, bob)
        bob.stop()
        alice.call("contacts.rotate_mailbox", {"name": "bob"})  # bob is away: two mailboxes
        for _ in range(3):
            alice.call("invitations.create")
        result: dict[str, object] = {}
        mover = threading.Thread(
            target=lambda: result.update(alice.call("relay.set", {"url": url2}))
        )
        mover.start()
        relay_proc.terminate()  # the old relay goes away and comes back during the move
        relay_proc.start()
        mover.join(120)
        assert result["contacts_moving"] == 1
        bob.start()
        alice.wait_connected()
        alice.wait_for(lambda: alice.events(types=["relay.moved"]), "the move to finish", 90)
        assert alice.call("status")["superseded"] is None
        assert alice.call("status")["relay_lost"] is None
    finally:
        new.close()


# Holds the mailbox invitations.create made (the CREATE done, the lock not yet taken) until
# the test creates the file AEGIS_TEST_GATE names: the moment a relay.set can come in between.
HOLD_INVITATION_MAILBOX = """
import asyncio, os, sys
import aegisd.services.mailboxes as m
_new_mailbox = m.Mailboxes.new_mailbox
async def _held(self, *, public):
    caller = sys._getframe(1).f_code.co_name
    mb = await _new_mailbox(self, public=public)
    if caller == "create_invitation":
        while not os.path.exists(os.environ["AEGIS_TEST_GATE"]):
            await asyncio.sleep(0.05)
    return mb
m.Mailboxes.new_mailbox = _held
"""


def test_an_invitation_paid_for_while_the_relay_changes_is_made_at_the_new_relay(
    tmp_short: Path,
) -> None:
    """invitations.create makes its mailbox before it takes the messenger lock (the CREATE's
    proof takes seconds); a relay.set in between (which deletes the address at the old relay)
    must not leave that mailbox at the old relay (the clean-clone CI once found one there), nor
    give a link to the deleted address: the invitation is made at the new relay, with the new
    address, and works."""
    old_dir, new_dir = tmp_short / "old", tmp_short / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old, new = RelayProcess(old_dir, {}), RelayProcess(new_dir, {})
    old.start()
    new.start()
    alice = bob = None
    try:
        alice = Peer(tmp_short / "alice", f"ws://127.0.0.1:{old.port}/v1/ws", "alice")
        bob = Peer(tmp_short / "bob", f"ws://127.0.0.1:{new.port}/v1/ws", "bob")
        alice.call("address.get")
        alice.stop()
        site, gate = tmp_short / "site", tmp_short / "gate"
        site.mkdir()
        (site / "sitecustomize.py").write_text(HOLD_INVITATION_MAILBOX)
        env = {**os.environ, "AEGIS_TEST_GATE": str(gate),
               "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        alice.proc = DaemonProc(alice.home, [], env)
        alice.proc.wait_ready()
        alice.wait_connected()
        bob.wait_connected()
        before = alice.wait_for(lambda: relay_mailboxes(old), "alice's mailboxes")
        result: dict[str, Any] = {}

        def invite() -> None:
            assert alice is not None
            result.update(alice.call("invitations.create"))

        paying = threading.Thread(target=invite, daemon=True)
        paying.start()
        alice.wait_for(lambda: relay_mailboxes(old) > before, "the invitation's CREATE")
        r = cli(alice, "relay", "set", f"ws://127.0.0.1:{new.port}/v1/ws")
        assert r.returncode == 0, r.stderr
        alice.wait_for(lambda: alice.call("status")["relay_move"] is None, "the move")
        gate.touch()
        paying.join(60)
        assert not paying.is_alive() and result.get("link")
        # Nothing of alice's is left at the old relay: her address moved, and the mailbox the
        # invitation made there was deleted, not kept.
        alice.wait_for(lambda: relay_mailboxes(old) == 0, "the old relay to hold nothing")
        # The invitation was made at the new relay: bob, who only knows that one, uses it.
        bob.call("contacts.add", {"name": "alice", "link": result["link"]})
        alice.wait_for(
            lambda: [c for c in alice.call("contacts.list")["contacts"] if c["established"]],
            "the invitation to be used",
        )
        assert relay_mailboxes(old) == 0
    finally:
        for p in (alice, bob):
            if p is not None:
                p.stop()
        old.close()
        new.close()
