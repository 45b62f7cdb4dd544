"""Daemons through relay nodes on PostgreSQL (issue 20): two nodes sharing one database behind a
real HAProxy, two real daemons connected to HAProxy's address. Alice sends while each node in
turn is killed with kill -9 (whichever holds Alice's or Bob's connections: both are hit) and
started again; the daemons reconnect through the same address and Bob shows every message
exactly once, in order. At least once at the relay (a block delivered and not acknowledged
before its node died is delivered again), once in the daemon."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.conftest import Peer, connect
from tests.relay.conftest import RelayProcess
from tests.relay.haproxy import HAProxy
from tests.relay.postgres import PostgresServer

N = 40


class Sender(threading.Thread):
    """Alice's messages one after the other, each as soon as the last was queued."""

    def __init__(self, peer: Peer, contact: str, texts: list[str]) -> None:
        super().__init__(daemon=True)
        self.peer, self.contact, self.texts = peer, contact, texts
        self.sent = 0

    def run(self) -> None:
        for t in self.texts:
            self.peer.call("messages.send", {"contact": self.contact, "text": t})
            self.sent += 1


def send_all(peer: Peer, contact: str, texts: list[str]) -> Sender:
    th = Sender(peer, contact, texts)
    th.start()
    return th


def incoming(peer: Peer, contact: str) -> list[str]:
    msgs = peer.call("messages.history", {"contact": contact, "limit": 500})["messages"]
    return [m["text"] for m in msgs if m["direction"] == "in"]


@pytest.fixture
def nodes(tmp_short: Path, postgres_server: PostgresServer) -> Iterator[list[RelayProcess]]:
    store = postgres_server.new_database()
    made: list[RelayProcess] = []
    try:
        for i in range(2):
            sub = tmp_short / f"node{i}"
            sub.mkdir()
            rp = RelayProcess(sub, {"--store": store})
            made.append(rp)
            rp.start()
        yield made
    finally:
        for rp in made:
            rp.close()


@pytest.fixture
def balancer(tmp_short: Path, nodes: list[RelayProcess]) -> Iterator[HAProxy]:
    lb = HAProxy(tmp_short, [n.port for n in nodes])
    try:
        yield lb
    finally:
        lb.close()


def test_daemons_through_a_node_killed_mid_stream(
        tmp_short: Path, nodes: list[RelayProcess], balancer: HAProxy) -> None:
    url = f"ws://127.0.0.1:{balancer.port}/v1/ws"
    alice = bob = None
    try:
        alice = Peer(tmp_short / "alice", url, "alice")
        bob = Peer(tmp_short / "bob", url, "bob")
        connect(alice, bob)
        texts = [f"message {i:02d}" for i in range(N)]
        th = send_all(alice, "bob", texts)
        at_kill: list[tuple[int, int]] = []
        for i, node in enumerate(nodes):
            # Mid-stream: part of the messages shown, the rest being sent, queued or in flight.
            want = (i + 1) * N // (len(nodes) + 2)
            bob.wait_for(lambda w=want: len(incoming(bob, "alice")) >= w,
                         "the stream to reach Bob")
            node.kill9()  # its connections die; its listening socket stays (the test holds it)
            at_kill.append((len(incoming(bob, "alice")), th.sent))
            node.start()  # the same port: the address HAProxy checks
        th.join(60)
        # A last message, sent after all the others: once Bob shows it, anything queued before
        # it (a block delivered again, a deposit resent after its node died before answering)
        # was processed, so a duplicate would be shown by now. A condition, not a delay.
        alice.call("messages.send", {"contact": "bob", "text": "the end"})
        bob.wait_for(lambda: "the end" in incoming(bob, "alice"), "every message", timeout=60)
        # (shown, sent) at each kill, for a failure's message.
        assert incoming(bob, "alice") == [*texts, "the end"], at_kill
        received = [e["data"]["text"] for e in bob.events(types=["message.received"])]
        assert received == [*texts, "the end"], at_kill  # one event each: shown once
        # Both daemons lost a connection to a killed node and came back through HAProxy.
        for peer in (alice, bob):
            kinds = [e["type"] for e in peer.events(types=["relay.*"])]
            assert "relay.down" in kinds, (peer.name, kinds)
            peer.wait_connected()
        assert "127.0.0.1:" not in balancer.output()  # HAProxy logs no client
        for node in nodes:
            assert node.proc is not None and node.proc.poll() is None
    finally:
        for peer in (alice, bob):
            if peer is not None:
                with contextlib.suppress(Exception):
                    peer.stop()
