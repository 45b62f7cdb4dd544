"""Every delivery of a block carries a fresh seal and a fresh msg_id (relay-protocol.md §4.3):
two deliveries of one block share no bytes, so the relay's redelivery cannot link the two
connections by content. A subscription that moves takes the undelivered-and-unacknowledged
blocks with it: the old connection's ids for them become unknown."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from relay import wire
from relay.client import Message, RelayClient, RelayError

from . import relaydb
from .conftest import RelayProcess, run
from .helpers import Owner, block, new_owner, next_message


def shared_run(a: bytes, b: bytes, n: int = 16) -> bool:
    """Whether `a` and `b` have any `n`-byte run in common."""
    runs = {a[i:i + n] for i in range(len(a) - n + 1)}
    return any(b[i:i + n] in runs for i in range(len(b) - n + 1))


def assert_unlinkable(*ms: Message) -> None:
    for i, m in enumerate(ms):
        assert len(m.sealed) == wire.SEALED_BLOCK_LEN
        for other in ms[i + 1:]:
            assert m.msg_id != other.msg_id
            assert not shared_run(m.sealed, other.sealed), "two deliveries share bytes"


@pytest.mark.both_backends
def test_moved_subscription_redelivers_resealed_and_withdraws_old_ids(
        relay: RelayProcess) -> None:
    async def body() -> None:
        c1 = await RelayClient.connect(relay.url)
        c2 = await RelayClient.connect(relay.url)
        sender = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c1, token=token)
        await o.subscribe(c1)
        b = block(b"moved")
        await sender.deposit(o.deposit_id, b, token=token)
        first = await next_message(c1)
        assert o.open(first) == b
        # The subscription moves before c1 acknowledged: c1 gets END, c2 gets the block again.
        await o.subscribe(c2)
        assert await asyncio.wait_for(c1.ended.get(), 10) == o.owner_id
        second = await next_message(c2)
        assert o.open(second) == b
        assert_unlinkable(first, second)
        # The superseded delivery's id is unknown on c1; nothing is deleted by trying.
        with pytest.raises(RelayError) as err:
            await c1.ack([first.msg_id])
        assert err.value.code == wire.E_UNKNOWN_MESSAGE
        # ...and c1's window no longer counts it: moving back delivers it a third time.
        await o.subscribe(c1)
        assert await asyncio.wait_for(c2.ended.get(), 10) == o.owner_id
        third = await next_message(c1)
        assert o.open(third) == b
        assert_unlinkable(first, second, third)
        with pytest.raises(RelayError) as err:
            await c2.ack([second.msg_id])
        assert err.value.code == wire.E_UNKNOWN_MESSAGE
        await c1.ack([third.msg_id])  # the current delivery's id works, and deletes it
        await c1.unsubscribe(o.owner_id, o.sig)
        c3 = await RelayClient.connect(relay.url)
        assert await o.fetch(c3) == []
        for c in (c1, c2, c3, sender):
            await c.close()

    run(body())


@pytest.mark.both_backends
def test_ack_before_the_move_deletes_the_block(relay: RelayProcess) -> None:
    async def body() -> None:
        c1 = await RelayClient.connect(relay.url)
        c2 = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c1, token=token)
        await o.subscribe(c1)
        await c2.deposit(o.deposit_id, block(), token=token)
        await c1.ack([(await next_message(c1)).msg_id])
        await o.subscribe(c2)
        await asyncio.wait_for(c1.ended.get(), 10)
        b = block(b"next")
        await c1.deposit(o.deposit_id, b, token=token)
        assert o.open(await next_message(c2)) == b  # the acknowledged one is not redelivered
        assert c2.messages.empty()
        await c1.close()
        await c2.close()

    run(body())


@pytest.mark.both_backends
def test_fetch_and_reconnection_deliveries_are_resealed(relay: RelayProcess) -> None:
    async def body() -> None:
        c1 = await RelayClient.connect(relay.url)
        c2 = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c1, token=token)
        b = block(b"fetched")
        await c2.deposit(o.deposit_id, b, token=token)
        (on_c1,) = await o.fetch(c1)
        (on_c2,) = await o.fetch(c2)  # delivered, unacknowledged on c1: delivered again
        assert o.open(on_c1) == o.open(on_c2) == b
        await c1.close()  # c1 ends without acknowledging: delivered again on a new connection
        c3 = await RelayClient.connect(relay.url)
        await o.subscribe(c3)
        pushed = await next_message(c3)
        assert o.open(pushed) == b
        assert_unlinkable(on_c1, on_c2, pushed)
        # Several connections hold a delivery (no subscription moved): either id acknowledges
        # the block; the other's id then still answers OK (it was given), deleting nothing more.
        await c3.ack([pushed.msg_id])
        await c2.ack([on_c2.msg_id])
        with pytest.raises(RelayError) as err:
            await c2.ack([on_c2.msg_id])  # already acknowledged
        assert err.value.code == wire.E_UNKNOWN_MESSAGE
        assert await o.fetch(c2) == []
        await c2.close()
        await c3.close()

    run(body())


@pytest.mark.both_backends
def test_delivered_bytes_are_never_the_stored_bytes(relay: RelayProcess) -> None:
    """The copy at rest is sealed too, but a delivery is never that copy: seizing the disk
    does not give the bytes that went over the wire to the owner."""
    async def body() -> tuple[bytes, Message]:
        c = await RelayClient.connect(relay.url)
        token = os.urandom(32)
        o = await new_owner(c, token=token)
        await c.deposit(o.deposit_id, block(), token=token)
        await o.subscribe(c)
        m = await next_message(c)
        await c.close()
        return o.owner_id, m

    owner_id, m = run(body())
    okey = hashlib.sha256(b"aegis-relay owner\x00" + owner_id).digest()
    (stored,) = relaydb.stored_blocks(relay, okey)
    assert len(stored) == wire.SEALED_BLOCK_LEN  # sealed at rest (never the plain block)
    assert not shared_run(bytes(stored), m.sealed)


@pytest.mark.both_backends
def test_a_stored_block_that_does_not_open_is_dropped(relay: RelayProcess) -> None:
    """Re-sealing opens the stored copy: one altered on disk is dropped (and logged by type
    only), and the blocks after it are still delivered."""
    token = os.urandom(32)

    async def deposit() -> tuple[bytes, bytes, Owner]:
        c = await RelayClient.connect(relay.url)
        o = await new_owner(c, token=token)
        first, second = block(b"first"), block(b"second")
        await c.deposit(o.deposit_id, first, token=token)
        await c.deposit(o.deposit_id, second, token=token)
        await c.close()
        return first, second, o

    _, second, o = run(deposit())
    assert relay.terminate() == 0
    okey = hashlib.sha256(b"aegis-relay owner\x00" + o.owner_id).digest()
    ((rowid, stored),) = relaydb.query(
        relay, "SELECT messages.id, block FROM messages JOIN mailboxes"
        " ON messages.mailbox = mailboxes.id WHERE owner_key = ? ORDER BY seq LIMIT 1", okey)
    altered = bytearray(stored)
    altered[100] ^= 1
    relaydb.query(relay, "UPDATE messages SET block = ? WHERE id = ?", bytes(altered), rowid)
    relay.start()

    async def receive() -> None:
        c = await RelayClient.connect(relay.url)
        await o.subscribe(c)
        m = await next_message(c)
        assert o.open(m) == second
        await c.ack([m.msg_id])
        await c.unsubscribe(o.owner_id, o.sig)
        assert await o.fetch(c) == []  # the altered one is gone, not stuck at the head
        await c.close()

    run(receive())
    assert "delivery failed: CryptoError" in relay.output()
