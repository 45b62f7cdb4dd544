"""Faults of a relay on PostgreSQL (issue 20): a node killed (kill -9) behind HAProxy while a
client streams deposits, and the PostgreSQL server crashing and coming back mid-stream. Nothing
acknowledged is lost, nothing is acknowledged that was not stored, clients reconnect through
the same address and receive everything, the nodes recover by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.client import RelayClient

from .conftest import RelayProcess, run
from .haproxy import HAProxy
from .helpers import Owner, block, new_owner
from .postgres import PostgresServer

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

TAG = 4  # bytes of a block that number it


async def connect(url: str, deadline: float) -> RelayClient:
    """Connect, again and again until `deadline` (a node or the database may be away)."""
    while True:
        try:
            return await asyncio.wait_for(RelayClient.connect(url, request_timeout=5), 5)
        except Exception:  # refused, reset, timed out, closed: try again
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Stream:
    """A sender depositing numbered blocks one after the other to a public mailbox, and its
    owner receiving and acknowledging them, each reconnecting whenever its connection fails."""

    def __init__(self, url: str, owner: Owner) -> None:
        self.url, self.owner = url, owner
        self.acked: set[int] = set()  # deposits answered OK
        self.refused = 0  # deposits answered with an error, or not answered
        self.received: set[int] = set()
        self.reconnects = 0
        self.down = False  # set by the test while the database is away
        self.ok_while_down: list[int] = []
        self.stop = False

    async def send(self) -> None:
        c = await connect(self.url, time.monotonic() + 30)
        n = 0
        while not self.stop:
            n += 1
            was_down = self.down
            try:
                await self.owner_deposit(c, n)
            except Exception:  # an error answer, a lost connection, no answer
                self.refused += 1
                if c.closed.is_set() or c.ws.closed:
                    self.reconnects += 1
                    await c.close()
                    c = await connect(self.url, time.monotonic() + 60)
                await asyncio.sleep(0.05)
                continue
            if was_down and self.down:
                self.ok_while_down.append(n)
            self.acked.add(n)
            await asyncio.sleep(0.01)
        await c.close()

    async def owner_deposit(self, c: RelayClient, n: int) -> None:
        await c.deposit(self.owner.deposit_id, block(n.to_bytes(TAG, "big")))

    async def receive(self) -> None:
        while not self.stop or not self.acked <= self.received:
            c = await connect(self.url, time.monotonic() + 60)
            try:
                await self.owner.subscribe(c)
                while True:
                    get = asyncio.ensure_future(c.messages.get())
                    ended = asyncio.ensure_future(c.closed.wait())
                    done, _ = await asyncio.wait({get, ended}, timeout=1,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        ended.cancel()
                        if ended in done or c.ws.closed:
                            break
                        if self.stop and self.acked <= self.received:
                            break
                        continue
                    ended.cancel()
                    m = get.result()
                    self.received.add(int.from_bytes(self.owner.open(m)[:TAG], "big"))
                    await c.ack([m.msg_id])
            except Exception:  # the connection failed: connect again
                pass
            finally:
                await c.close()
            if not (self.stop and self.acked <= self.received):
                self.reconnects += 1
                await asyncio.sleep(0.2)


def _established(port: int) -> int:
    """Established TCP connections whose local end is ``port`` (a node's accepted ones)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            n += 1
    return n


async def _node_with_a_client(nodes: list[RelayProcess]) -> RelayProcess:
    """A node that holds a client's WebSocket: one with a connection in each of several
    samples (HAProxy's health checks come and go)."""
    deadline = time.monotonic() + 10
    while True:
        samples = []
        for _ in range(5):
            samples.append([_established(n.port) for n in nodes])
            await asyncio.sleep(0.05)
        for i, n in enumerate(nodes):
            if min(sample[i] for sample in samples) >= 1:
                return n
        assert time.monotonic() < deadline, "no node holds a client"


@pytest.fixture
def haproxy_factory(tmp_path: Path) -> Iterator[Callable[[list[int]], HAProxy]]:
    made: list[HAProxy] = []

    def make(ports: list[int]) -> HAProxy:
        lb = HAProxy(tmp_path, ports)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.close()


def test_kill_9_of_a_node_behind_haproxy_loses_nothing(
        relay_factory: Callable[..., RelayProcess],
        haproxy_factory: Callable[[list[int]], HAProxy]) -> None:
    nodes = [relay_factory(deposit_burst=100_000, deposit_rate=100_000) for _ in range(2)]
    lb = haproxy_factory([n.port for n in nodes])

    async def body() -> Stream:
        c = await connect(lb.url, time.monotonic() + 30)
        owner = await new_owner(c, public=True)
        await c.close()
        s = Stream(lb.url, owner)
        tasks = [asyncio.ensure_future(s.receive()), asyncio.ensure_future(s.send())]
        while len(s.acked) < 30:
            await asyncio.sleep(0.05)
        # One node dies, one that holds a client (HAProxy's leastconn, contrib's, may have put
        # both on one node): its process and its port (a dead host refuses connections).
        victim = await _node_with_a_client(nodes)
        victim.kill9()
        victim.sock.close()
        before = len(s.acked)
        deadline = time.monotonic() + 60
        while len(s.acked) < before + 30:
            assert time.monotonic() < deadline, "deposits did not resume on the other node"
            await asyncio.sleep(0.05)
        s.stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return s

    s = run(body())
    assert s.reconnects >= 1  # the dead node held one of the two clients
    assert s.acked <= s.received  # every acknowledged deposit delivered
    out = lb.output()
    assert "127.0.0.1:" not in out  # HAProxy logs no connection (contrib: no `log`)
    # The survivor read its queues again for the dead node's unannounced deposits, and said
    # why: not as if its own listening connection had been lost.
    survivor = next(n for n in nodes if n.proc is not None and n.proc.poll() is None)
    deadline = time.monotonic() + 10
    while "a relay node went away" not in survivor.output():
        assert time.monotonic() < deadline, survivor.output()
        time.sleep(0.2)
    assert "storage notifications resumed" not in survivor.output()


def test_postgres_restarted_mid_stream(relay_factory: Callable[..., RelayProcess],
                                       tmp_path: Path) -> None:
    server = PostgresServer()  # a server of its own: the session's stays up
    try:
        store = server.new_database()
        nodes = [relay_factory(store=store, sweep_interval=0.5, deposit_burst=100_000,
                               deposit_rate=100_000) for _ in range(2)]

        async def body() -> Stream:
            c = await connect(nodes[0].url, time.monotonic() + 30)
            owner = await new_owner(c, public=True)
            await c.close()
            s = Stream(nodes[1].url, owner)  # deposits on one node, delivery on the other
            recv = Stream(nodes[0].url, owner)
            recv.acked = s.acked  # one set: what the sender had acknowledged
            tasks = [asyncio.ensure_future(recv.receive()), asyncio.ensure_future(s.send())]
            while len(s.acked) < 20:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.stop, True)  # a crash: no shutdown checkpoint
            s.down = True
            refused = s.refused
            deadline = time.monotonic() + 30
            while s.refused < refused + 5:
                assert time.monotonic() < deadline, "no deposit was refused"
                await asyncio.sleep(0.05)
            s.down = False
            await asyncio.to_thread(server.start)
            before = len(s.acked)
            deadline = time.monotonic() + 60
            while len(s.acked) < before + 20:
                assert time.monotonic() < deadline, "the nodes did not recover"
                await asyncio.sleep(0.05)
            s.stop = recv.stop = True
            await asyncio.wait_for(asyncio.gather(*tasks), 90)
            s.received = recv.received
            return s

        s = run(body())
        assert s.ok_while_down == []  # never OK for what could not be stored
        assert s.acked <= s.received
        said = []
        for n in nodes:
            assert n.proc is not None and n.proc.poll() is None  # recovered, not restarted
            # It said so in the relay's fixed lines only (exception types, no traceback).
            lines = n.output().splitlines()
            said += [line for line in lines if "failed" in line or "storage error" in line]
            assert all(line.startswith("aegis-relay: ") for line in lines), lines
        # The node that took the refused deposits said so; the other (a subscription only) may
        # not have touched the database while it was away.
        assert said
        # Both made their listening connection again and read their queues.
        for n in nodes:
            assert "storage notifications resumed" in n.output()
            assert "a relay node went away" not in n.output()
    finally:
        with contextlib.suppress(Exception):
            server.close()
