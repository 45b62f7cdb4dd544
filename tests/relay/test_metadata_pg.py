"""The metadata scan of test_metadata.py, on PostgreSQL (issue 20): two relay nodes share one
database while clients on 127.0.0.2 use both; then every column of every table the relay made
(its types, and every value), what the server shows about the relay's connections
(pg_stat_activity), every notification on the relay's channel (heard by the test's own LISTEN),
the server's log and the nodes' output hold nothing about the clients: no address, no port, no
time of theirs. test_metadata.py's scan of the data directory's files runs on PostgreSQL too."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable

import asyncpg
import pytest
from nacl.public import PrivateKey

from relay import wire
from relay.client import RelayClient
from relay.pg_notify import CHANNEL
from relay.storage import owner_key

from .conftest import RelayProcess, run
from .helpers import block, new_owner, next_message
from .postgres import PostgresServer
from .test_metadata import CLIENT_ADDR, forms, holds, time_forms

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

#: The only column types the relay's tables may have (docs/relay-protocol.md §8.1): no time,
#: no address type.
TYPES = {"bigint", "bytea", "boolean", "integer"}
#: A payload on the relay's channel (§8.1): a kind letter and mailboxes' row keys in decimal
#: (several, comma-separated, for a batch of deposits), `n0` (a node's count changed) or `n`
#: and the server process id of a node's listening connection (a node started listening).
PAYLOAD = re.compile(r"([dms])([0-9]+(?:,[0-9]+)*)|n([0-9]+)")
#: A node's heartbeat row (relay_nodes.expires) is the database's clock in seconds, rounded up
#: to a third of three sweep intervals (the default sweep: 60 s): a node's, not a client's.
NODE_GRAIN = 60
EXPIRY_GRANULARITY = 3600


def test_postgres_keeps_no_client_address_port_or_time(
        relay_factory: Callable[..., RelayProcess], store: str,
        postgres_server: PostgresServer) -> None:
    pg = postgres_server
    db = store.rsplit("/", 1)[1]
    a = relay_factory(log_level="debug", expiry_granularity=EXPIRY_GRANULARITY,
                      checkpoint_interval=0.5)
    b = relay_factory(log_level="debug", expiry_granularity=EXPIRY_GRANULARITY)
    ports: list[int] = []
    secrets: list[bytes] = []
    payloads: list[str] = []
    mailbox_keys: set[int] = set()
    activity: list[asyncpg.Record] = []
    t0 = int(time.time())

    async def connect(rp: RelayProcess) -> RelayClient:
        c = await RelayClient.connect(rp.url, local_addr=(CLIENT_ADDR, 0))
        ports.append(c.ws.get_extra_info("sockname")[1])
        return c

    async def body() -> None:
        listener = await asyncpg.connect(store, timeout=10)
        await listener.add_listener(CHANNEL, lambda *args: payloads.append(args[3]))
        try:
            owner_c, sender, other = await connect(a), await connect(b), await connect(b)
            token = os.urandom(32)
            alice = await new_owner(owner_c, token=token)
            bob = await new_owner(other, public=True)
            gone = await new_owner(other, public=True)
            for o in (alice, bob, gone):
                secrets.extend([*forms(o.owner_id), *forms(o.deposit_id)])
            secrets.extend(forms(token))
            await other.bundle_base(bob.owner_id, bob.sig, os.urandom(1482))
            await other.bundle_add(bob.owner_id, bob.sig, wire.ITEM_X25519, [os.urandom(38)])
            await sender.bundle_fetch(bob.deposit_id)
            await alice.subscribe(owner_c)  # on node A; deposits arrive on node B
            for i in range(4):
                await sender.deposit(alice.deposit_id, block(bytes([i])), token=token)
                await sender.deposit(bob.deposit_id, block(bytes([i])))
            for _ in range(2):
                m = await next_message(owner_c)
                await owner_c.ack([m.msg_id])
            await sender.blob_quota(1)
            blob_id, cap = os.urandom(16), os.urandom(32)
            secrets.extend([*forms(blob_id), *forms(cap)])
            await sender.blob_put(blob_id, cap, block())
            await other.blob_get(blob_id, cap, PrivateKey.generate())
            moved = await connect(b)
            await alice.subscribe(moved)  # the subscription moves to node B
            await other.token_add(bob.owner_id, bob.sig, os.urandom(32))
            mailbox_keys.update(int(r[0]) for r in await listener.fetch(
                "SELECT id FROM mailboxes"))
            gone_key = await listener.fetchval("SELECT id FROM mailboxes WHERE owner_key = $1",
                                               owner_key(gone.owner_id))
            await other.delete(gone.owner_id, gone.sig)
            # What the server shows of the nodes' connections while clients are on them.
            activity.extend(await listener.fetch(
                "SELECT pid, application_name, client_addr::text, client_hostname, client_port,"
                " query FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'",
                db))
            deadline = time.monotonic() + 10  # the deletion's notification is the last
            while f"m{gone_key}" not in payloads:
                assert time.monotonic() < deadline, payloads
                await asyncio.sleep(0.05)
            for c in (owner_c, sender, other, moved):
                await c.close()
        finally:
            await listener.close()

    run(body())
    t1 = int(time.time())
    address = [CLIENT_ADDR.encode(), bytes([127, 0, 0, 2])]

    # Notifications: each a kind letter and the row key of a mailbox, nothing else.
    assert payloads, "no notification heard"
    for p in payloads:
        m = PAYLOAD.fullmatch(p)
        assert m is not None, p
        if m.group(3) is not None:
            listening = {r["pid"] for r in activity if r["application_name"].endswith("listen")}
            assert m.group(3) == "0" or int(m.group(3)) in listening, p
        else:
            assert {int(k) for k in m.group(2).split(",")} <= mailbox_keys, p
    kinds = {p[0] for p in payloads}
    assert {"d", "m", "s"} <= kinds, kinds

    # pg_stat_activity: each node's connections (a pool and a listening one) name the relay,
    # nothing of a client; they come from the node's own address; their last statements' text
    # carries no value (parameters are sent apart from it).
    assert len(activity) >= 4, activity
    assert {r["application_name"] for r in activity} == {"aegis-relay", "aegis-relay listen"}
    assert {r["client_addr"] for r in activity} == {"127.0.0.1/32"}
    assert {r["client_hostname"] for r in activity} == {None}
    assert not {r["client_port"] for r in activity} & set(ports)
    for r in activity:
        text = (r["query"] or "").encode()
        found = [v for v in [*address, *secrets, *(str(p).encode() for p in ports)]
                 if holds(text, v)]
        assert found == [], (r["query"], found)

    # Every table and column: the types, then every value.
    columns = pg.query("SELECT table_name, column_name, data_type FROM"
                       " information_schema.columns WHERE table_schema = 'public'", db)
    tables = {r[0] for r in columns}
    assert {"mailboxes", "messages", "bundles", "bundle_items", "blobs"} <= tables
    assert {r[2] for r in columns} <= TYPES, columns
    near = range(t0 - 3600, t1 + 3600)  # seconds; also looked for in ms and µs
    arrival = [f for t in range(t0 - 1, t1 + 2) for f in time_forms(t)]
    checked = 0
    for table, column, kind in columns:
        for (value,) in pg.query(f'SELECT "{column}" FROM "{table}"', db):
            checked += 1
            if kind == "boolean" or value is None:
                continue
            where = f"{table}.{column}"
            if kind == "bytea":
                data = bytes(value)
                assert data not in address, where
                assert not holds(data, CLIENT_ADDR.encode()), where
                assert not [f for f in arrival if holds(data, f)], where
                assert not [s for s in secrets if len(s) >= 16 and s in data], where
                continue
            assert value not in ports, where
            if where == "relay_nodes.expires":
                assert value % NODE_GRAIN == 0, (where, value)
                continue
            # A coarse expiry or last use may be near now, rounded to a whole hour or month;
            # an arrival time may not be there at all, in any unit.
            assert value not in near or value % EXPIRY_GRANULARITY == 0, (where, value)
            assert value // 1000 not in near and value // 1_000_000 not in near, (where, value)
    assert checked > 20

    # The server's log (this session's, shared by its tests) and the nodes' output.
    logs = [pg.log_path.read_bytes(), a.output().encode(), b.output().encode()]
    for text in logs:
        assert not [v for v in [*address, *(str(p).encode() for p in ports)]
                    if holds(text, v)]
    for rp in (a, b):
        assert rp.terminate() == 0
