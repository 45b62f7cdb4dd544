"""A subscriber keeps receiving after it acknowledged everything (the queue emptied): a new
block is never mistaken for one already pushed, although an emptied queue's order keys start
again at random (relay/storage.py)."""

from __future__ import annotations

import os

import pytest

from relay.client import RelayClient
from tests.relay.conftest import RelayProcess, run
from tests.relay.helpers import block, new_owner, next_message


@pytest.mark.both_backends
def test_push_continues_after_queue_drained(relay: RelayProcess) -> None:
    async def main() -> None:
        url = relay.url.replace("http://", "ws://")
        owner_conn = await RelayClient.connect(url)
        sender = await RelayClient.connect(url)
        try:
            token = os.urandom(32)
            owner = await new_owner(owner_conn, token=token)
            await owner.subscribe(owner_conn)
            for tag in (b"one", b"two", b"three"):
                sent = block(tag)
                await sender.deposit(owner.deposit_id, sent, token)
                m = await next_message(owner_conn, 10)
                assert owner.open(m) == sent
                await owner_conn.ack([m.msg_id])  # the queue is empty again
        finally:
            await owner_conn.close()
            await sender.close()

    run(main())
