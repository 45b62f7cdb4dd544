"""The outbox's batches (issue 16, "Benchmark"): a mailbox's blocks are pipelined on one relay
connection, in order, and blocks the relay accepted are forgotten together, after their
deposits: a profile locked (or a daemon stopped) in between resends them rather than losing
them, and the recipient drops the copies.

A real aegis-relay on loopback, a real SQLCipher store, real ratchet sessions; the drain
(``Delivery``) is driven directly, as bench/group.py does."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from aegisd.core import wire
from aegisd.core.errors import DecryptionError
from aegisd.core.primitives import SystemEntropy
from aegisd.core.session import Reassembler, Session
from aegisd.services.delivery import Delivery, DeliveryHooks, Recipient
from aegisd.services.mailbox import ContactState
from aegisd.store import Store, create_profile
from aegisd.transport.network import Network
from aegisd.transport.relaylink import RelayLink
from relay import wire as relay_wire
from relay.client import RelayClient
from tests.relay.conftest import RelayProcess
from tests.relay.helpers import Owner, new_owner
from tests.support.parties import make_pair


@dataclass
class Link:
    """The profile's relay link as the drain uses it (with_relay): one connected client."""

    client: RelayClient
    url: str
    network: Network = field(default_factory=Network)
    stopping: bool = False
    isolated: bool = False
    hello_ttl: int | None = None

    def require(self) -> RelayClient:
        return self.client


class Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any] | None]] = []

    def emit(self, type: str, data: dict[str, Any] | None = None) -> None:
        self.emitted.append((type, data))


def delivery(store: Callable[[], Store | None], link: Link, events: Events) -> Delivery:
    def never(*_: Any) -> Any:
        raise AssertionError("no deposit may be refused here")

    return Delivery(DeliveryHooks(
        store=store, events=events, entropy=SystemEntropy(),
        link=lambda: cast(RelayLink, link), network=lambda: link.network,
        superseded=lambda: None, cover_active=lambda: False, renewal_refused=never,
        drop_contact_mailbox=never, contact_mailbox_gone=never,
    ))  # fmt: skip


class HoldingProxy:
    """Between the daemon and the relay on loopback: passes every frame on, except that it
    holds the relay's answers back from the first DEPOSIT until ``hold_until`` DEPOSIT frames
    came through. A client that waits for each answer before its next deposit never gets one."""

    def __init__(self, upstream: str, hold_until: int) -> None:
        self.upstream = upstream
        self.hold_until = hold_until
        self.deposits = 0
        self.most_before_an_answer = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/ws", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/v1/ws"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        down = web.WebSocketResponse(max_msg_size=1 << 20)
        await down.prepare(request)
        held: list[bytes] = []
        async with aiohttp.ClientSession() as s, s.ws_connect(
            self.upstream, max_msg_size=1 << 20
        ) as up:

            async def from_relay() -> None:
                async for msg in up:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    if 0 < self.deposits < self.hold_until:
                        held.append(msg.data)
                    else:
                        await down.send_bytes(msg.data)

            relay_side = asyncio.ensure_future(from_relay())
            try:
                async for msg in down:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    if relay_wire.decode(msg.data).type == relay_wire.DEPOSIT:
                        self.deposits += 1
                        self.most_before_an_answer = max(self.most_before_an_answer,
                                                         self.deposits)  # fmt: skip
                        await up.send_bytes(msg.data)
                        if self.deposits == self.hold_until:
                            for data in held:
                                await down.send_bytes(data)
                            held.clear()
                        continue
                    await up.send_bytes(msg.data)
            finally:
                relay_side.cancel()
        return down


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    sub = tmp_path / "relay"
    sub.mkdir()
    rp = RelayProcess(sub, {})
    rp.start()
    yield rp
    rp.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = create_profile(tmp_path / "p", None)
    yield s
    s.close()


async def contact_with_mailbox(
    c: RelayClient, store: Store, url: str
) -> tuple[Owner, Recipient, Session]:
    token = os.urandom(32)
    owner = await new_owner(c, token=token)
    to = wire.MailboxAddress(url, owner.deposit_id, token)
    contact = store.add_contact("bob", state=ContactState(to, True).to_bytes())
    pair = make_pair()
    return owner, Recipient(contact, pair.a), pair.b


def send(store: Store, d: Delivery, r: Recipient, text: str) -> str:
    with store.transaction():
        mid = store.add_message(r.contact.id, "out", text, status="queued").id
        d.enqueue([r], wire.TextPayload(os.urandom(wire.MESSAGE_ID_LEN), 1, text), message_id=mid)
    return mid


async def fetch_all(c: RelayClient, owner: Owner) -> list[bytes]:
    out: list[bytes] = []
    while msgs := await owner.fetch(c):
        out += [owner.open(m) for m in msgs]
        await c.ack([m.msg_id for m in msgs])
    return out


def opened_texts(peer: Session, blocks: list[bytes]) -> list[str]:
    entropy, parts, texts = SystemEntropy(), Reassembler(), []
    for block in blocks:
        whole = parts.add(peer.decrypt(entropy, block))
        if whole is not None:
            payload = wire.decode_payload(whole)
            assert isinstance(payload, wire.TextPayload)
            texts.append(payload.text)
    return texts


def test_a_mailboxs_blocks_leave_pipelined_and_arrive_in_order(
    relay: RelayProcess, store: Store
) -> None:
    n = 6

    async def body() -> None:
        proxy = HoldingProxy(relay.url.replace("http://", "ws://"), hold_until=n)
        await proxy.start()
        owner_conn = await RelayClient.connect(relay.url)
        client = await RelayClient.connect(proxy.url, request_timeout=30)
        try:
            owner, bob, peer = await contact_with_mailbox(owner_conn, store, proxy.url)
            d = delivery(lambda: store, Link(client, proxy.url), Events())
            ids = [send(store, d, bob, f"text {i}") for i in range(n)]
            # Answers are held until all n deposits came: deposits sent one answer at a time
            # would wait here for ever.
            await asyncio.wait_for(d._drain_outbox(), 20)
            assert proxy.most_before_an_answer == n
            assert store.outbox_size() == 0
            assert all(store.get_message(i).status == "sent" for i in ids)  # type: ignore[union-attr]
            blocks = await fetch_all(owner_conn, owner)
            # In the order written: the recipient's ratchet opens each in sequence.
            assert opened_texts(peer, blocks) == [f"text {i}" for i in range(n)]
        finally:
            await client.close()
            await owner_conn.close()
            await proxy.stop()

    asyncio.run(body())


def test_blocks_accepted_but_not_yet_forgotten_are_resent_and_the_copy_dropped(
    relay: RelayProcess, store: Store
) -> None:
    async def body() -> None:
        owner_conn = await RelayClient.connect(relay.url)
        client = await RelayClient.connect(relay.url, request_timeout=30)
        try:
            owner, bob, peer = await contact_with_mailbox(owner_conn, store, relay.url)
            # The profile is locked (a stop, a crash) after the relay accepted the blocks and
            # before the outbox forgot them: the pass reaches the store once, at its start.
            calls = 0

            def until_accepted() -> Store | None:
                nonlocal calls
                calls += 1
                return store if calls == 1 else None

            events = Events()
            d = delivery(lambda: store, Link(client, relay.url), events)
            mid = send(store, d, bob, "once")
            d.h = replace(d.h, store=until_accepted)
            before = store.outbox_size()
            await asyncio.wait_for(d._drain_outbox(), 20)
            assert store.outbox_size() == before  # nothing lost: still to send
            assert store.get_message(mid).status == "queued"  # type: ignore[union-attr]
            first = await fetch_all(owner_conn, owner)
            assert len(first) == before  # the relay had them all

            # Unlocked again: the next pass resends the same bytes and forgets them.
            d.h = replace(d.h, store=lambda: store)
            await asyncio.wait_for(d._drain_outbox(), 20)
            assert store.outbox_size() == 0
            assert store.get_message(mid).status == "sent"  # type: ignore[union-attr]
            assert ("message.status", {"message_id": mid, "contact": "bob",
                                       "status": "sent"}) in events.emitted  # fmt: skip
            again = await fetch_all(owner_conn, owner)
            assert again == first  # the very same blocks
            assert opened_texts(peer, first) == ["once"]
            for block in again:  # the recipient's ratchet drops the copies
                with pytest.raises(DecryptionError):
                    peer.decrypt(SystemEntropy(), block)
        finally:
            await client.close()
            await owner_conn.close()

    asyncio.run(body())
