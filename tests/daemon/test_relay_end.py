"""A mailbox's subscription moved to another connection (docs/relay-protocol.md §4.3, END):
the daemon's relay link, against a real relay, neither loops reconnecting to take the mailbox
back nor fails on the withdrawn delivery's ACK (unknown_message), and no block is lost: the
connection that holds the subscription gets it again (docs/protocol.md §20.7)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegisd.transport.network import Network
from aegisd.transport.relaylink import RelayLink, acknowledge
from relay.client import Message, RelayClient
from tests.relay.conftest import RelayProcess
from tests.relay.helpers import block, new_owner, next_message


@pytest.fixture
def relay_process() -> Iterator[RelayProcess]:
    d = Path(tempfile.mkdtemp(prefix="ae", dir="/tmp"))
    rp = RelayProcess(d, {})
    rp.start()
    try:
        yield rp
    finally:
        rp.close()
        shutil.rmtree(d, ignore_errors=True)


class Counting(RelayLink):
    """A RelayLink that counts the connections it makes."""

    dials = 0

    async def _dial(self, url: str | None = None) -> RelayClient:
        self.dials += 1
        return await super()._dial(url)


@pytest.mark.parametrize("isolation", [False, True], ids=["shared", "isolated"])
def test_an_end_is_neither_fought_nor_fatal_and_loses_no_block(
    relay_process: RelayProcess, isolation: bool, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"ws://127.0.0.1:{relay_process.port}/v1/ws"

    async def main() -> None:
        admin = await RelayClient.connect(url)
        token = os.urandom(32)
        o = await new_owner(admin, token=token)
        other_mailbox = await new_owner(admin, token=token)  # stays with the link (shared)
        got: asyncio.Queue[Message] = asyncio.Queue()
        release = asyncio.Event()
        acked: list[bool] = []

        async def handler(client: RelayClient, msg: Message) -> None:
            # As the messenger does: process (here: wait for the move), then acknowledge.
            await got.put(msg)
            await release.wait()
            acked.append(await acknowledge(client, msg.msg_id))

        mine = [(o.owner_id, o.sig), (other_mailbox.owner_id, other_mailbox.sig)]
        link = Counting(url, handler=handler, subscriptions=lambda: list(mine),
                        on_state=lambda up, reason: None, network=Network(isolation=isolation))
        link.start()
        await asyncio.wait_for(link.connected.wait(), 20)
        dials = link.dials
        sender = await RelayClient.connect(url)
        first = block(b"first")
        await sender.deposit(o.deposit_id, first, token=token)
        delivered = await asyncio.wait_for(got.get(), 20)
        assert o.open(delivered) == first
        # Another copy of the profile subscribes the mailbox while the link processes the
        # block: the link's connection gets END, its delivery is withdrawn.
        copy = await RelayClient.connect(url)
        await o.subscribe(copy)
        again = await next_message(copy, 20)  # the withdrawn block comes on the new holder
        assert o.open(again) == first
        release.set()
        second = block(b"second")
        await sender.deposit(o.deposit_id, second, token=token)
        assert o.open(await next_message(copy, 20)) == second
        await copy.ack([again.msg_id])
        # The link is still served: a block of its other mailbox arrives and is acknowledged.
        third = block(b"third")
        await sender.deposit(other_mailbox.deposit_id, third, token=token)
        assert other_mailbox.open(await asyncio.wait_for(got.get(), 20)) == third
        for _ in range(400):  # until the link's handler acknowledged the third block
            if len(acked) == 2:
                break
            await asyncio.sleep(0.05)
        # The withdrawn delivery's ACK was unknown_message: harmless, not a reconnect; the
        # third block's ACK went through on the same connection.
        assert acked == [False, True]
        assert link.connected.is_set()
        assert o.owner_id in link._taken
        # Nothing fought over the mailbox: the copy still holds it (no END came to it), and
        # the link made no new connection for it (shared: not even a reconnect).
        assert copy.ended.empty()
        assert link.dials == dials
        assert got.empty()
        await link.stop()
        for c in (admin, sender, copy):
            await c.close()

    with caplog.at_level(logging.INFO, logger="aegisd.relay"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    taken = [ln for ln in lines if ln.startswith("another connection took over")]
    assert len(taken) == 1, lines
    assert not [ln for ln in lines if "lost" in ln or "cannot reach" in ln], lines
    assert lines.count("relay connected") == 1, lines
