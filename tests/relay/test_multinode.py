"""Several relay nodes on one PostgreSQL database (issue 20): a block deposited on one node is
pushed at once to its owner subscribed on another, subscriptions move between nodes, token
changes and deletions reach the other nodes' caches, queue limits hold across nodes, and an
acknowledged block's bytes are searched for in PostgreSQL's data directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay import storage_pg, wire
from relay.client import RelayClient, RelayError

from .conftest import RelayProcess, run
from .helpers import block, new_owner, next_message
from .postgres import PostgresServer

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def test_deposit_on_one_node_is_pushed_on_another(
        relay_factory: Callable[..., RelayProcess]) -> None:
    a, b = relay_factory(), relay_factory()

    async def body() -> None:
        owner_c = await RelayClient.connect(a.url)
        sender = await RelayClient.connect(b.url)
        token = os.urandom(32)
        alice = await new_owner(owner_c, token=token)  # created on A: B learns its token
        await alice.subscribe(owner_c)
        for i in range(5):
            blk = block(b"cross %d" % i)
            await sender.deposit(alice.deposit_id, blk, token=token)
            # Pushed without a new read by the owner: B's commit notified A.
            m = await next_message(owner_c, timeout=10)
            assert alice.open(m) == blk
            await owner_c.ack([m.msg_id])
        assert await alice.fetch(sender) == []  # acknowledged on A: gone for B too

        # The subscription moves to node B: A ends it (END), B pushes from now on.
        owner_b = await RelayClient.connect(b.url)
        await alice.subscribe(owner_b)
        assert await asyncio.wait_for(owner_c.ended.get(), 10) == alice.owner_id
        blk = block(b"after the move")
        await sender.deposit(alice.deposit_id, blk, token=token)
        assert alice.open(await next_message(owner_b)) == blk
        assert owner_c.messages.empty()

        # A token removed on B no longer opens the mailbox on A, whose cache held it.
        depositor_a = await RelayClient.connect(a.url)
        await depositor_a.deposit(alice.deposit_id, block(), token=token)  # A caches it
        await owner_b.token_del(alice.owner_id, alice.sig, token)
        deadline = time.monotonic() + 10
        while True:
            try:
                await depositor_a.deposit(alice.deposit_id, block(), token=token)
            except RelayError as exc:
                assert exc.code == wire.E_DENIED
                break
            assert time.monotonic() < deadline, "node A still takes a removed token"
            await asyncio.sleep(0.1)
        # Deleted on B: denied on A at once after the notification.
        await owner_b.delete(alice.owner_id, alice.sig)
        deadline = time.monotonic() + 10
        while True:
            try:
                await alice.subscribe(owner_c)
            except RelayError as exc:
                assert exc.code == wire.E_DENIED
                break
            assert time.monotonic() < deadline, "node A still serves a deleted mailbox"
            await asyncio.sleep(0.1)
        for c in (owner_c, sender, owner_b, depositor_a):
            await c.close()

    run(body())


def test_a_node_killed_before_announcing_its_deposits(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Node A answers OK once a deposit is committed and announces it later, in a batch (a
    window of ten minutes here: never before it dies). Killed (-9) in between, its
    announcement is never sent: node B sees A's listening connection go and reads every
    subscribed queue again, so the block is pushed all the same."""
    a, b = relay_factory(pg_notify_batch_ms=600_000), relay_factory()

    async def body() -> None:
        owner_c = await RelayClient.connect(b.url)
        sender = await RelayClient.connect(a.url)
        token = os.urandom(32)
        alice = await new_owner(owner_c, token=token)
        await alice.subscribe(owner_c)
        blk = block(b"committed, never announced")
        await sender.deposit(alice.deposit_id, blk, token=token)  # OK: committed
        a.kill9()
        m = await next_message(owner_c, timeout=30)
        assert alice.open(m) == blk
        await owner_c.ack([m.msg_id])
        await owner_c.close()
        with contextlib.suppress(Exception):
            await sender.close()

    run(body())


def test_queue_limit_and_mailbox_cap_hold_across_nodes(
        relay_factory: Callable[..., RelayProcess]) -> None:
    a = relay_factory(queue_limit=4, max_mailboxes=3)
    b = relay_factory(queue_limit=4, max_mailboxes=3)

    async def body() -> None:
        ca, cb = await RelayClient.connect(a.url), await RelayClient.connect(b.url)
        o = await new_owner(ca, public=True)
        for c in (ca, cb, ca, cb):
            await c.deposit(o.deposit_id, block())
        for c in (ca, cb):  # each node saw two deposits only: the database counted four
            with pytest.raises(RelayError) as e:
                await c.deposit(o.deposit_id, block())
            assert e.value.code == wire.E_QUEUE_FULL
        await new_owner(cb)
        await new_owner(ca)  # three mailboxes in all, two created on A
        for c in (ca, cb):
            with pytest.raises(RelayError) as e:
                await new_owner(c)
            assert e.value.code == wire.E_FULL
        await ca.close()
        await cb.close()

    run(body())


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return _files_holding_each(root, [needle])[0]


def _files_holding_each(root: Path, needles: list[bytes]) -> list[list[str]]:
    """For each needle, the files under ``root`` that hold it. Each file is read once for
    all the needles: the data directory of the session's PostgreSQL grows with every test's
    database, and one pass instead of one per needle is most of these tests' time."""
    found: list[list[str]] = [[] for _ in needles]
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for i, needle in enumerate(needles):
                if needle in data:
                    found[i].append(str(path.relative_to(root)))
    return found


@pytest.mark.parametrize("case", ["alone", "keep_other", "large"])
def test_an_acknowledged_block_leaves_the_data_directory(
        relay_factory: Callable[..., RelayProcess], store: str,
        postgres_server: PostgresServer, case: str) -> None:
    """The relay's maintenance (every checkpoint_interval) rewrites the key tables whatever
    their size and its small tables (VACUUM FULL, pg_rewrite_rows), then, its role being a
    superuser here, runs pg_switch_wal() and CHECKPOINT; the server runs with wal_recycle=off.
    After that an acknowledged block's key and its bytes as the relay serves them are in no
    file of the data directory: not in the tables' files (rewritten without them; the old
    files unlinked) nor in pg_wal (the segments holding them removed).

    `keep_other`: another block stays queued after it, so the table's emptied end cannot be
    what removed it (with plain VACUUM its bytes stay in the page's freed space: measured,
    docs/threat-model.md). Then its stored ciphertext is gone too. `large`: `messages` holds
    more than pg_rewrite_rows rows (2 here) and `message_keys` more than 4096, so only the
    key table is rewritten: the ciphertext may stay in freed space, its key must not (this
    fails if the key table is rewritten only when small). The bound: one checkpoint_interval
    after the ACK."""
    large = case == "large"
    relay = relay_factory(checkpoint_interval=0.5, **({"pg_rewrite_rows": 2} if large else {}))
    db = store.rsplit("/", 1)[1]

    async def body() -> tuple[bytes, bytes, bytes]:
        c = await RelayClient.connect(relay.url)
        o = await new_owner(c, public=True)
        if large:
            # Filler keys: a key table of any size is rewritten.
            await postgres_server.aquery(
                "INSERT INTO message_keys SELECT -g, sha256(g::text::bytea)"
                " FROM generate_series(1, 5000) g", db)
            # Blocks that stay, written before: a page's live rows compacted by VACUUM
            # (toward the page's end) do not cover the acknowledged key's place, written last.
            other = await new_owner(c, public=True)
            for _ in range(3):
                await c.deposit(other.deposit_id, block())
        await c.deposit(o.deposit_id, block())
        rows = await postgres_server.aquery(
            "SELECT m.block, k.secret FROM messages m JOIN message_keys k ON k.id = m.id"
            " WHERE m.mailbox = (SELECT max(mailbox) FROM messages m2"
            "   GROUP BY mailbox HAVING count(*) = 1 LIMIT 1)", db)
        assert len(rows) == 1
        stored, secret = bytes(rows[0][0]), bytes(rows[0][1])
        served = storage_pg.unseal(secret, stored)
        # The search finds them once they reached the files. Again if not: the relay's own
        # maintenance (every 0.5 s) may unlink a rewritten file between the scan of pg_wal
        # and that of the tables, before the new file is written.
        deadline = time.monotonic() + 10
        while True:
            await postgres_server.aquery("CHECKPOINT")
            if all(_files_holding_each(postgres_server.data, [secret, stored[100:164]])):
                break
            assert time.monotonic() < deadline, "the search never found the block"
            await asyncio.sleep(0.2)
        if case == "keep_other":
            other = await new_owner(c, public=True)
            await c.deposit(other.deposit_id, block())
        await o.subscribe(c)
        m = await next_message(c)
        await c.ack([m.msg_id])
        await c.close()
        return stored, secret, served

    stored, secret, served = run(body())
    # 64 bytes of ciphertext or of the block: found nowhere by chance.
    needles = [secret, served[100:164]] + ([] if large else [stored[100:164]])
    data = postgres_server.data
    deadline = time.monotonic() + 30
    while True:
        left = [f for files in _files_holding_each(data, needles) for f in files]
        if not left:
            break
        assert time.monotonic() < deadline, f"still on disk: {left}"
        time.sleep(0.5)


NODES_CHANGED = "relay nodes sharing the store changed"


def _wait_output(node: RelayProcess, line: str, times: int) -> None:
    """Until `node` said `line` `times` times (a condition, not a delay)."""
    deadline = time.monotonic() + 30
    while node.output().count(line) < times:
        assert time.monotonic() < deadline, f"not said {times} times: {line}"
        time.sleep(0.05)


def test_per_mailbox_rates_hold_across_nodes(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """A sender spreading one mailbox's deposits (and bundle fetches) over two nodes as fast as
    it can gets about the configured rate, not twice it: each node applies half of it (the
    live nodes are counted in relay_nodes). Counted, not timed: the accepted deposits are at
    most the burst plus the rate times the time the attempts took (plus one), where a bucket
    per node would let twice as many in. Once one node stops, the other has it all again."""
    rate, burst, attempts, items = 1.0, 4, 40, 3
    options = {"deposit_rate": rate, "deposit_burst": burst, "bundle_fetch_rate": 0.0001,
               "bundle_fetch_burst": items, "pow_bundle_bits": 4}
    a = relay_factory(**options)
    b = relay_factory(**options)
    _wait_output(b, NODES_CHANGED, 1)  # B counted two nodes at its start,
    _wait_output(a, NODES_CHANGED, 1)  # A when B's start was announced

    async def spread(owner_c: RelayClient, conns: list[RelayClient]) -> tuple[int, float]:
        token = os.urandom(32)
        o = await new_owner(owner_c, token=token)
        accepted = 0
        start = time.monotonic()
        for i in range(attempts):
            try:
                await conns[i % len(conns)].deposit(o.deposit_id, block(), token=token)
                accepted += 1
            except RelayError as exc:
                assert exc.code == wire.E_RATE_LIMITED
        return accepted, time.monotonic() - start

    async def body() -> None:
        ca, cb = await RelayClient.connect(a.url), await RelayClient.connect(b.url)
        accepted, took = await spread(ca, [ca, cb])
        assert burst <= accepted <= burst + rate * took + 1, (accepted, took)

        # Bundle fetches: the one-time items handed out over both nodes are the burst's worth.
        o = await new_owner(ca, public=True)
        await ca.bundle_base(o.owner_id, o.sig, os.urandom(100))
        await ca.bundle_add(o.owner_id, o.sig, wire.ITEM_X25519,
                            [os.urandom(38) for _ in range(10)])
        got = [await c.bundle_fetch(o.deposit_id) for c in (ca, cb) * (items + 1)]
        assert sum(g[1] is not None for g in got) <= items
        await ca.close()
        await cb.close()

    run(body())

    # B stops (it retires its row and says so): A alone applies the whole rate again.
    assert b.terminate() == 0
    _wait_output(a, NODES_CHANGED, 2)

    async def alone() -> None:
        ca = await RelayClient.connect(a.url)
        accepted, took = await spread(ca, [ca])
        assert burst <= accepted <= burst + rate * took + 1, (accepted, took)
        await ca.close()

    run(alone())


def test_blob_quotas_fit_the_area_across_nodes(
        relay_factory: Callable[..., RelayProcess]) -> None:
    """Blob quotas reserve room in the blob area until used or released, in the memory of the
    node that granted them: each of two nodes grants at most half of the free area, so the
    quotas granted on both fit in it (one node's own reservations would let twice as many)."""
    unit = wire.BLOB_POW_UNIT
    quotas = 4
    options = {"blob_max_bytes": quotas * unit * wire.BLOCK_SIZE}
    a = relay_factory(**options)
    b = relay_factory(**options)
    _wait_output(b, NODES_CHANGED, 1)
    _wait_output(a, NODES_CHANGED, 1)

    async def body() -> int:
        conns = []
        granted = 0
        for node in (a, b) * quotas:  # a quota per connection: held while it lives
            c = await RelayClient.connect(node.url)
            conns.append(c)
            try:
                assert await c.blob_quota(unit) == unit
                granted += 1
            except RelayError as exc:
                assert exc.code == wire.E_FULL
        for c in conns:
            await c.close()
        return granted

    assert run(body()) == quotas
