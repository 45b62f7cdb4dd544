"""Crashes and outages lose nothing and show nothing twice (real processes, kill -9)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess

N = 500


def incoming(peer: Peer, contact: str) -> list[str]:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return [m["text"] for m in msgs if m["direction"] == "in"]


def send_all(sender: Peer, contact: str, texts: list[str]) -> threading.Thread:
    def run() -> None:
        for t in texts:
            sender.call("messages.send", {"contact": contact, "text": t})

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def expected(n: int = N) -> list[str]:
    return [f"message {i:03d}" for i in range(n)]


def test_receiver_killed_mid_stream(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    th = send_all(alice, "bob", expected())
    bob.wait_for(lambda: len(incoming(bob, "alice")) >= 60, "the stream to start", timeout=120)
    bob.kill()  # kill -9 in the middle of the stream
    time.sleep(0.3)
    bob.start()
    th.join(120)
    bob.wait_for(lambda: len(incoming(bob, "alice")) >= N, "all messages", timeout=240)
    time.sleep(1.0)  # anything shown twice would have arrived by now
    assert incoming(bob, "alice") == expected()


def test_relay_killed_mid_stream(peers: Callable[[str], Peer], relay_proc: RelayProcess) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    th = send_all(alice, "bob", expected(200))
    bob.wait_for(lambda: len(incoming(bob, "alice")) >= 40, "the stream to start", timeout=120)
    relay_proc.kill9()
    time.sleep(0.5)
    relay_proc.start()
    th.join(120)
    bob.wait_for(lambda: len(incoming(bob, "alice")) >= 200, "all messages", timeout=240)
    time.sleep(1.0)
    assert incoming(bob, "alice") == expected(200)


def test_messages_sent_while_relay_down(
    peers: Callable[[str], Peer], relay_proc: RelayProcess
) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    relay_proc.kill9()
    alice.wait_for(lambda: not alice.call("status")["relay"]["connected"], "the outage")
    ids = [
        alice.call("messages.send", {"contact": "bob", "text": t})["message_id"]
        for t in ("while", "the relay", "was down")
    ]
    history = alice.call("messages.history", {"contact": "bob"})["messages"]
    assert {m["message_id"]: m["status"] for m in history} == dict.fromkeys(ids, "queued")
    relay_proc.start()
    bob.wait_for(lambda: len(incoming(bob, "alice")) == 3, "the queued messages", timeout=120)
    assert incoming(bob, "alice") == ["while", "the relay", "was down"]
    down = [e for e in alice.events(types=["relay.*"])]
    assert [e["type"] for e in down][-2:] == ["relay.down", "relay.up"]


def test_nothing_in_the_clear_at_rest(peers: Callable[[str], Peer]) -> None:
    alice, bob = peers("alice"), peers("bob")
    connect(alice, bob)
    secret = "the eagle lands at midnight 7f3a9c"
    alice.call("messages.send", {"contact": "bob", "text": secret})
    bob.wait_for(lambda: secret in incoming(bob, "alice"), "the message")
    bob.call("messages.send", {"contact": "alice", "text": secret + " (reply)"})
    alice.wait_for(lambda: secret + " (reply)" in incoming(alice, "bob"), "the reply")
    markers = [secret.encode(), secret.encode("utf-16-le")]
    for peer in (alice, bob):
        ident = peer.call("identity.get")
        markers += [bytes.fromhex(ident["address"]), ident["address"].encode()]
        markers += [bytes.fromhex(ident["identity_key"])[1:33]]  # Ed25519 public key
    alice.stop()
    bob.stop()
    for home in (alice.home, bob.home):
        files = [f for f in Path(home).rglob("*") if f.is_file()]
        assert files
        for f in files:
            data = f.read_bytes()
            for marker in markers:
                assert marker not in data, f"{f.name} holds a marker in the clear"
